"""Benchmark: which ``add_task`` defaults buy the most accuracy per second (issue #21).

Every variant trains one task per shipped corpus from scratch with ``Registry.add_task`` (1,000
training examples, or all when fewer; validation and test capped at ``--max-eval``) and is scored on
the test split. ``--validation held-out`` passes no validation rows, as a user with one labelled file
would: ``add_task`` then holds out ``TrainConfig.validation_fraction`` (20 %) of the training rows to stop
and choose on, and the ``probe`` reference still fits on all of them. References run beside them:
``probe``, a linear probe on the frozen backbone's mean-pooled features (the head alone, fitted as
``refit_heads`` fits heads: full-batch L-BFGS, L2 1e-3); ``probe-kept-rows``, with ``--validation held-out``
the same fitted only on the rows the default ``add_task`` trains on (20 % held out: what its step-0 probe
sees, so what any ``probe_margin`` would have kept; with validation given it is ``probe`` again); and
``single``, the whole backbone fine-tuned per task (the benchmarks' ``single`` strategy; with ``--validation
held-out`` it trains and stops on the rows ``add_task`` keeps and holds out).
Each (corpus, seed) uses the corpus split and training seed ``seed``, so seeds differ in data and
initialisation. Results are appended to ``results.json`` as each run ends, so an interrupted study
resumes where it stopped (under the same settings and the same ``TrainConfig``/``AdapterConfig`` defaults
and default LoRA targets); ``results.md`` holds the per-variant means and a per-corpus table.

    python scenarios/defaults.py                                   # every variant, 6 corpora, 3 seeds
    python scenarios/defaults.py --variants probe,v01,default --seeds 0
    python scenarios/defaults.py --layers 2 --max-train 64 --max-eval 32 --corpora trec6   # a quick look
    python scenarios/defaults.py --variants probe,default --validation held-out    # add_task as a user calls it

Read ``time_s`` only within one run on one machine: it is the wall time of ``add_task``
(training, the probe when on, and writing the version), with whatever else shared the cores.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from cmtl import AdapterConfig, BackboneConfig, Registry, TrainConfig
from cmtl.benchmarks.learners import StrategyConfig, run_stream
from cmtl.benchmarks.results import write_results
from cmtl.benchmarks.scenarios import ExperienceSpec, Scenario
from cmtl.continual import updates
from cmtl.core.adapters import TARGETS
from cmtl.data import read_examples
from cmtl.training.evaluation import compute_metrics
from cmtl.training.probe import linear_probe

#: The corpora the study runs on: one per shipped source (vader_movies is left out because it
#: repeats rotten_tomatoes; vader_tweets stands for the four VADER sets, as the one most unlike the others).
CORPORA = ("bbc_news", "trec6", "sms_spam", "rotten_tomatoes", "fine_foods", "vader_tweets")

_ATTENTION = ("query", "key", "value", "attention.output.dense")
_QUERY_VALUE = ("query", "value")
_ATTENTION_FFN = ("query", "key", "value", "intermediate.dense", "output.dense")  # output.dense: both outputs

#: name -> (what it is, AdapterConfig kwargs, TrainConfig kwargs). ``v01`` is cmtl 0.1's add_task.
VARIANTS: dict[str, tuple[str, dict, dict]] = {
    "v01": ("cmtl 0.1 defaults: r 8 on query/value, 3 epochs, patience 2 per epoch, no probe",
            {"target_modules": _QUERY_VALUE}, {"epochs": 3, "patience": 2, "eval_every": None, "probe_init": False}),
    "v01-lp-ft": ("v01, training started from the linear probe's head (LP-FT)", {"target_modules": _QUERY_VALUE},
                  {"epochs": 3, "patience": 2, "eval_every": None, "probe_init": True, "probe_start": True}),
    "default": ("the library's defaults now (TrainConfig(), AdapterConfig(); on BERT all four attention "
                "projections)", {}, {}),
    "query-value": ("default with LoRA on query/value only (BERT's default until 2026-12-05)",
                    {"target_modules": _QUERY_VALUE}, {}),
    "no-probe": ("default without the probe as step-0 candidate", {}, {"probe_init": False}),
    "lp-ft": ("default, training started from the probe's head (LP-FT)", {}, {"probe_start": True}),
    "attention": ("default with LoRA on all attention projections", {"target_modules": _ATTENTION}, {}),
    "attn-ffn": ("default with LoRA on attention and feed-forward", {"target_modules": _ATTENTION_FFN}, {}),
    "r4": ("default with rank 4 (alpha 8)", {"r": 4, "alpha": 8.0}, {}),
    "r16": ("default with rank 16 (alpha 32)", {"r": 16, "alpha": 32.0}, {}),
    "top-half": ("default adapting the top half of the layers (frozen-layer cache on)", {"layers": "top-half"}, {}),
    "lr-3e-4": ("default with learning rate 3e-4", {}, {"learning_rate": 3e-4}),
    "lr-3e-3": ("default with learning rate 3e-3", {}, {"learning_rate": 3e-3}),
    "head-lr-1e-2": ("default with the head at learning rate 1e-2 (LoRA at 1e-3)", {}, {"head_learning_rate": 1e-2}),
    "lora-lr-3e-4": ("default with LoRA at learning rate 3e-4 (the head at 1e-3)", {},
                     {"learning_rate": 3e-4, "head_learning_rate": 1e-3}),
    "no-clip": ("default without gradient clipping (Avalanche's loop clips nothing)", {}, {"grad_clip": None}),
    "held-out-10": ("default holding out 10 % of the training rows to stop and choose on when no validation rows "
                    "are given (20 % by default, 10 % until 2026-12-07; matters only with --validation held-out)",
                    {}, {"validation_fraction": 0.1}),
    "ema-0.98": ("default scoring also an exponential moving average of the trained weights (decay 0.98 per "
                 "step) beside them at each evaluation", {}, {"ema_decay": 0.98}),
    "probe-margin-1": ("default keeping the probe unless training beats it on validation by more than one "
                       "standard error of the paired per-row difference", {}, {"probe_margin": 1.0}),
}
REFERENCES = ("probe", "single", "probe-kept-rows")


def load_corpora(corpora: list[str], seed: int, max_train: int, max_eval: int) -> dict:
    """Each corpus as a loaded experience (its task named after the corpus), capped and seeded."""
    padded = corpora + [c for c in CORPORA if c not in corpora][: max(0, 2 - len(corpora))]  # streams hold >= 2
    scenario = Scenario(name="defaults", kind="task-incremental",
                        experiences=tuple(ExperienceSpec(name=c.replace("_", "-"), corpus=c) for c in padded),
                        max_train=max_train, max_eval=max_eval, seed=seed)
    return {e.corpus: e for e in scenario.load() if e.corpus in corpora}


def run_variant(variant: str, exp, backbone: BackboneConfig, seed: int, device: str,
                validation: str = "given") -> dict:
    """Train and score one variant (or reference) on one loaded experience; with ``validation="held-out"``
    ``add_task`` gets no validation rows and holds its own out of the training rows, and ``single`` trains and
    stops on the same split of them."""
    if variant == "single":
        if validation == "held-out":  # the rows add_task would train and stop on, not the corpus's validation rows
            train, held = updates.split(read_examples(exp.train, exp.spec), TrainConfig().validation_fraction, seed,
                                        exp.spec.name)
            exp = dataclasses.replace(exp, train=train, validation=held)
        report = run_stream("single", [exp], "task-incremental", backbone,
                            StrategyConfig(training=TrainConfig(seed=seed, progress=False)), device=device)
        return {"accuracy": report.R[0][0], "time_s": report.seconds_per_experience[0],
                "trainable_parameters": report.trainable_parameters_per_task[0], "bytes": report.bytes_per_task[0],
                "examples_trained": len(exp.train)}
    with tempfile.TemporaryDirectory(prefix="cmtl-defaults-") as tmp:
        reg = Registry.create(Path(tmp) / "registry", backbone, device=device)
        if variant in ("probe", "probe-kept-rows"):
            started = time.perf_counter()
            spec, fitted = exp.spec, exp.train
            if variant == "probe-kept-rows" and validation == "held-out":  # the rows add_task trains on
                fitted, _ = updates.split(read_examples(exp.train, spec), TrainConfig().validation_fraction, seed,
                                          spec.name)
            head = linear_probe(spec, reg.embed(fitted.texts), spec.encode_labels(fitted.labels), seed=seed)
            accuracy = compute_metrics(spec, head(reg.embed(exp.test.texts)),
                                       spec.encode_labels(exp.test.labels))["accuracy"]
            return {"accuracy": accuracy, "time_s": time.perf_counter() - started, "examples_trained": len(fitted),
                    "trainable_parameters": sum(p.numel() for p in head.parameters()), "bytes": None}
        _, adapter_kwargs, training_kwargs = VARIANTS[variant]
        adapter_kwargs = dict(adapter_kwargs)
        if adapter_kwargs.get("layers") == "top-half":
            n = reg.backbone.num_layers
            adapter_kwargs["layers"] = tuple(range(n // 2, n))
        training = TrainConfig(**{**training_kwargs, "seed": seed, "progress": False})
        started = time.perf_counter()
        info = reg.add_task(exp.spec, exp.train, exp.validation if validation == "given" else None,
                            adapter=AdapterConfig(**adapter_kwargs), training=training)
        seconds = time.perf_counter() - started
        scores = reg.evaluate(exp.spec.name, exp.test)
        record = info.training
        return {"accuracy": scores["accuracy"], "macro_f1": scores["macro_f1"], "time_s": seconds,
                "trainable_parameters": info.trainable_parameters, "bytes": info.bytes_on_disk,
                "steps": record.get("steps"), "best_step": record.get("best_step"),
                "examples_trained": record.get("examples"),  # fewer than n_train where add_task held rows out
                "probe_gain": record.get("probe_gain"), "stopped_early": record.get("stopped_early"),
                "best_averaged": record.get("best_averaged"),  # kept the running average (TrainConfig.ema_decay)
                # Validation scores of the kept state and of the step-0 probe: enough to replay any rule that
                # chooses between them by their gap (in points or standard errors) without training again.
                "validation_accuracy": info.metrics.get("validation_accuracy"),
                "probe_validation_accuracy": (record.get("probe_metrics") or {}).get("validation_accuracy")}


def summarise(results: dict) -> str:
    """Per-variant means over corpora and seeds, and per-corpus accuracy. Errors removed is (acc − probe) /
    (1 − probe) per run, against the probe of the same corpus and seed, averaged over the runs whose probe erred."""
    rows = results["runs"]
    probe = {(r["corpus"], r["seed"]): r["accuracy"] for r in rows if r["variant"] == "probe"}
    v01 = {(r["corpus"], r["seed"]): r["time_s"] for r in rows if r["variant"] == "v01"}
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    corpora = list(dict.fromkeys(r["corpus"] for r in rows))
    lines = ["| variant | runs | mean accuracy | sd over seeds (mean) | errors removed vs probe | below probe "
             "| kept the probe | epochs run | time s | time / v01 | trainable params | bytes |", "|---" * 12 + "|"]
    for v in variants:
        mine = [r for r in rows if r["variant"] == v]
        acc = statistics.fmean(r["accuracy"] for r in mine)
        by_corpus = [[r["accuracy"] for r in mine if r["corpus"] == c] for c in corpora]
        sds = [statistics.stdev(a) for a in by_corpus if len(a) > 1]
        removed = [(r["accuracy"] - probe[k]) / (1 - probe[k]) for r in mine  # a perfect probe left none to remove
                   if (k := (r["corpus"], r["seed"])) in probe and probe[k] < 1]
        below = sum(r["accuracy"] < probe[(r["corpus"], r["seed"])] for r in mine if (r["corpus"], r["seed"]) in probe)
        ratio = [r["time_s"] / v01[k] for r in mine if (k := (r["corpus"], r["seed"])) in v01]
        size = [r["bytes"] for r in mine if r.get("bytes")]
        kept_probe = sum(r.get("best_step") == 0 for r in mine)  # a trained run whose step-0 probe won
        # Over the rows trained on (fewer than n_train where add_task held some out); batches of 16 rows.
        epochs = [r["steps"] / math.ceil((r.get("examples_trained") or r["n_train"]) / 16)
                  for r in mine if r.get("steps")]
        lines.append(
            f"| {v} | {len(mine)} | {acc:.4f} | {statistics.fmean(sds) if sds else float('nan'):.4f} | "
            f"{statistics.fmean(removed) * 100 if removed else float('nan'):.1f} % | {below} | "
            f"{kept_probe if 'steps' in mine[0] and mine[0]['steps'] is not None else '–'} | "
            f"{statistics.fmean(epochs) if epochs else float('nan'):.1f} | "
            f"{statistics.fmean(r['time_s'] for r in mine):.1f} | "
            f"{statistics.fmean(ratio) if ratio else float('nan'):.2f} | "
            f"{mine[0]['trainable_parameters']:,} | {statistics.fmean(size) if size else 0:,.0f} |")
    lines += ["", "| variant | " + " | ".join(corpora) + " |", "|---" * (len(corpora) + 1) + "|"]
    for v in variants:
        cells = []
        for c in corpora:
            a = [r["accuracy"] for r in rows if r["variant"] == v and r["corpus"] == c]
            cells.append(f"{statistics.fmean(a):.3f}" + (f" ± {statistics.stdev(a):.3f}" if len(a) > 1 else "")
                         if a else "–")
        lines.append(f"| {v} | " + " | ".join(cells) + " |")
    described = {**{k: d for k, (d, _, _) in VARIANTS.items()},
                 "probe": "linear probe on the frozen backbone (no adapter)",
                 "probe-kept-rows": "the probe fitted only on the training rows the default add_task keeps (with "
                                    "--validation held-out, what its step-0 probe sees; otherwise the probe)",
                 "single": "the whole backbone fine-tuned (lr 5e-5), under the default budget rule"}
    lines += [""] + [f"- `{v}`: {described[v]}" for v in variants]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variants", default=",".join(REFERENCES[:1] + tuple(VARIANTS)),
                        help=f"comma-separated; from {list(REFERENCES + tuple(VARIANTS))}")
    parser.add_argument("--corpora", default=",".join(CORPORA))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--max-train", type=int, default=1000)
    parser.add_argument("--max-eval", type=int, default=500)
    parser.add_argument("--validation", choices=("given", "held-out"), default="given",
                        help="given: pass the corpus's validation rows to add_task; held-out: pass none, so add_task "
                             "holds out TrainConfig.validation_fraction of the training rows")
    parser.add_argument("--layers", type=int, default=None, help="Use only the first N backbone layers.")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default="runs/bench/defaults")
    args = parser.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    if unknown := sorted(set(variants) - set(REFERENCES) - set(VARIANTS)):
        parser.error(f"unknown variants {unknown}; choose from {list(REFERENCES + tuple(VARIANTS))}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    backbone = BackboneConfig(num_hidden_layers=args.layers)
    path = out / "results.json"
    settings = {"max_train": args.max_train, "max_eval": args.max_eval, "backbone": backbone.to_dict(),
                "torch_threads": torch.get_num_threads(), "validation": args.validation}
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() and args.device != "cpu" else "no GPU"
    results = json.loads(path.read_text()) if path.exists() else {
        "machine": f"{platform.machine()} {platform.processor() or ''}, {gpu}".strip(), **settings, "runs": []}
    # Studies stored before --validation existed passed the corpus's validation rows.
    stored = {k: results.get(k, "given" if k == "validation" else None) for k in settings}
    if changed := {k: (stored[k], v) for k, v in settings.items() if stored[k] != v}:
        parser.error(f"{path} holds runs made with other settings {changed} (stored, now): use another --out")
    # The variants set only what they change: runs made under other library defaults are other variants.
    now = json.loads(json.dumps({"training": TrainConfig().to_dict(), "adapter": AdapterConfig().to_dict(),
                                 "targets": TARGETS}))  # the modules AdapterConfig() adapts, per family
    before = results.get("defaults") or {}
    if moved := {f"{kind}.{k}": (v, now[kind][k]) for kind in now for k, v in before.get(kind, {}).items()
                 if k in now[kind] and v != now[kind][k]}:
        parser.error(f"{path} holds runs made under other library defaults {moved} (stored, now): their variants "
                     "trained other configurations than the same names would now; use another --out")
    results["defaults"] = now
    done = {(r["variant"], r["corpus"], r["seed"]) for r in results["runs"]}
    for seed in [int(s) for s in args.seeds.split(",")]:
        corpora = [c for c in args.corpora.split(",") if c]
        loaded = load_corpora(corpora, seed, args.max_train, args.max_eval)
        for corpus in corpora:
            exp = loaded[corpus]
            for variant in variants:
                if (variant, corpus, seed) in done:
                    continue
                row = run_variant(variant, exp, backbone, seed, args.device, args.validation)
                row.update(variant=variant, corpus=corpus, seed=seed, n_train=len(exp.train),
                           n_test=len(exp.test), date=time.strftime("%Y-%m-%d"))
                results["runs"].append(row)
                print(f"{variant:10s} {corpus:16s} seed {seed}: acc {row['accuracy']:.4f} "
                      f"({row['time_s']:.0f} s)", flush=True)
                write_results(out, results)
    write_results(out, results, summarise(results))
    print(summarise(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

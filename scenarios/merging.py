"""Benchmark: fold the task adapters of a task-incremental scenario into one adapter.

Trains one adapter per task of ``scenarios/text5.yaml`` (default) in a registry,
then merges all of them with every cmtl method (``linear``, ``ties``, ``dare``,
``dare_ties``) and with peft's ``add_weighted_adapter`` on the same adapters
(``peft_linear``, ``peft_ties``, ``peft_dare_ties``, ``peft_ties_svd``). Each
merge's knobs are searched on the tasks' validation samples; each task is then
scored on its test split through the merged adapter and its own head, and
normalised by the task's own adapter. With ``--heads both`` (the default) every
method also runs with ``refit_heads``: each task's head is refitted on the task's
replay buffer through the merged adapter (the adapter is the same merge). Every row also shows the
frozen backbone (no adapter; the members' heads, or heads refitted on the same buffers), the
tasks on which the merge beats it on the test split, and the merge's wall time against the time
the five adapters took to train in the same run. ``--compare-full ties+refit`` also runs that searched
merge without successive halving. Writes ``results.json`` and ``results.md``; ``--resume`` continues a
run in the same ``--out`` folder: its trained adapters, training times and recorded merges are kept,
and only the merges not recorded yet run.

    python scenarios/merging.py                          # embedded MiniLM, text5
    python scenarios/merging.py --layers 2 --max-train 200   # quick look
    python scenarios/merging.py --compare-full ties+refit   # every method, and TIES's full grid (#26)
    python scenarios/merging.py --methods ties --heads refit --out runs/bench/m   # ... later, the rest:
    python scenarios/merging.py --resume --out runs/bench/m
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from cmtl import BackboneConfig, Registry, TrainConfig
from cmtl.benchmarks.results import write_results
from cmtl.benchmarks.scenarios import Scenario
from cmtl.core.heads import TaskHead
from cmtl.merging.methods import METHODS, PEFT_METHODS, MergeConfig, parse_rank
from cmtl.training.evaluation import compute_metrics
from cmtl.training.probe import linear_probe


def run(scenario: Scenario, out: Path, *, backbone: BackboneConfig, training: TrainConfig, device: str = "auto",
        methods: tuple[str, ...] = METHODS + PEFT_METHODS, rank: int | str | None = "auto", search: bool = True,
        heads: tuple[str, ...] = ("refit", "keep"), compare_full: tuple[str, ...] = (), resume: bool = False,
        echo=print) -> dict:
    """Train, merge with each method, score; write results into ``out``; return them. With ``resume``, keep
    the adapters, training times and merges that ``out`` already records and run only the missing merges."""
    if scenario.kind != "task-incremental":
        raise ValueError(f"Scenario {scenario.name!r} is {scenario.kind}; merging needs one adapter per task "
                         "(a task-incremental scenario).")
    label_of = lambda m, h: m if h == "keep" else f"{m}+refit"  # noqa: E731
    if compare_full and not search:
        raise ValueError(f"--compare-full {','.join(compare_full)} compares a searched merge with its full grid; "
                         "without the knob search (--no-search) there is no grid. Drop one of the two.")
    if unknown := sorted(set(compare_full) - {label_of(m, h) for m in methods for h in heads}):
        raise ValueError(f"--compare-full names merges this run does not make: {unknown}. It runs "
                         f"{sorted(label_of(m, h) for m in methods for h in heads)} (--methods and --heads).")
    experiences = scenario.load()
    tasks = [e.spec.name for e in experiences]
    out.mkdir(parents=True, exist_ok=True)
    # What the recorded merges depend on: a resumed run must repeat them all, or its rows would mix settings.
    settings = {"scenario": scenario.name, "tasks": tasks, "backbone": backbone.to_dict(),
                "training": training.to_dict(), "max_train": scenario.max_train, "max_eval": scenario.max_eval,
                "rank": rank, "search": search}
    if resume:
        results = _previous(out, settings)
        reg = Registry.open(out / "registry", device=device)
        individual, frozen = results["individual"], results["frozen"]
        echo(f"resuming {out}: adapters trained on {results['date']}, merges recorded: "
             f"{', '.join(results['merges']) or 'none'}")
    else:
        reg = Registry.create(out / "registry", backbone, device=device)
        individual, train_seconds = {}, {}
        for exp in experiences:
            started = time.perf_counter()
            reg.add_task(exp.spec, exp.train, exp.validation, training=training)
            train_seconds[exp.name] = time.perf_counter() - started
            individual[exp.name] = reg.evaluate(exp.name, exp.test)["accuracy"]
            echo(f"individual {exp.name}: {individual[exp.name]:.3f} ({train_seconds[exp.name]:.0f} s)")
        frozen = {"refit": {exp.name: probe_accuracy(reg, exp, training.seed) for exp in experiences},
                  "keep": {exp.name: frozen_accuracy(reg, exp) for exp in experiences}}
        for head, what in (("refit", "heads refitted on the buffers"), ("keep", "the tasks' own heads")):
            echo(f"frozen backbone, {what}: " + " ".join(f"{t}={a:.3f}" for t, a in frozen[head].items()))
        results = {**settings,
                   "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
                   "torch_threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d"),
                   "individual": individual, "train_seconds": train_seconds, "frozen": frozen, "merges": {}}
    train_seconds = results["train_seconds"]
    runs = [(m, h, halving) for m in methods for h in heads
            for halving in ((True, False) if search and label_of(m, h) in compare_full else (True,))]
    for method, head, halving in runs:
        label = label_of(method, head) + ("" if halving or not search else " (full grid)")
        if label in results["merges"]:
            continue
        name = label.replace("_", "-").replace("+", "-").replace(" (full grid)", "-full")
        if name in reg.merges():  # written by a run stopped before it recorded the merge's scores
            reg.remove_merge(name)
        started = time.perf_counter()
        record = reg.merge(tasks, name, search=search, config=MergeConfig(
            method=method, rank=rank, refit_heads=head == "refit", halving=halving, progress=False))
        seconds = time.perf_counter() - started
        merged = {e.name: reg.evaluate(e.name, e.test, merge=record["name"])["accuracy"] for e in experiences}
        normalised = ratios(merged, individual)
        base = frozen[head]
        results["merges"][label] = {
            "test_accuracy": merged, "normalised": normalised, "mean_normalised": float(np.mean(list(normalised.values()))),
            "frozen_mean_normalised": float(np.mean(list(ratios(base, individual).values()))),
            "beats_frozen": [t for t in tasks if merged[t] > base[t]],
            "below_frozen": [t for t in tasks if merged[t] < base[t]],
            "config": record["config"], "rank": record["adapter"]["r"],
            "reconstruction_error": record["reconstruction_error"], "heldout_normalised": record["normalised"],
            "heldout_frozen_normalised": record.get("baseline_normalised"),
            "seconds": seconds, "vs_training": seconds / sum(train_seconds.values()),
            "candidates_scored": len(record["search"]), "date": time.strftime("%Y-%m-%d"),
            "torch_threads": torch.get_num_threads(),
        }
        echo(f"{label}: mean normalised {results['merges'][label]['mean_normalised']:.3f} "
             + " ".join(f"{t}={merged[t]:.3f}" for t in tasks)
             + f" ({seconds:.0f} s, {results['merges'][label]['vs_training']:.2f}x training)")
        write_results(out, results)
    write_results(out, results, to_markdown(results))
    return results


def ratios(scores: dict[str, float], individual: dict[str, float]) -> dict[str, float]:
    """Each task's score over its own adapter's: NaN where that scored 0 (nothing to normalise by)."""
    return {t: scores[t] / individual[t] if individual[t] else float("nan") for t in individual}


def _previous(out: Path, settings: dict) -> dict:
    """The results ``out`` records, checked to be of the same scenario, backbone, training, rank and search."""
    path = out / "results.json"
    if not path.exists() or not (out / "registry").exists():
        raise FileNotFoundError(f"--resume: {out} holds no results.json and registry of an earlier run (a run "
                                "writes them once its adapters are trained and its first merge is scored). "
                                "Run without --resume.")
    results = json.loads(path.read_text(encoding="utf-8"))
    changed = [k for k, v in settings.items() if results.get(k) != json.loads(json.dumps(v))]
    if changed:
        values = "; ".join(f"{k}: {results.get(k)!r} there, {settings[k]!r} now" for k in changed
                           if k in ("rank", "search", "max_train", "max_eval"))
        raise ValueError(f"--resume: {out} was run with other {', '.join(changed)}" + (f" ({values})" if values else "")
                         + "; resume with the same scenario and settings, or use a new --out folder.")
    return results


def probe_accuracy(reg: Registry, exp, seed: int) -> float:
    """Test accuracy of a head fitted, as ``refit_heads`` fits it, on the task's replay buffer through the
    bare backbone (no adapter): what refitted heads get from the backbone alone, the reference a merge
    with refitted heads must beat to show its adapter matters. The fit starts from a head drawn under
    ``seed``, not from whatever the process's random state is."""
    spec = reg.spec(exp.name)
    buffer = reg.buffer(exp.name).to_examples()
    head = linear_probe(spec, reg.embed(buffer.texts), spec.encode_labels(buffer.labels), seed=seed)
    return compute_metrics(spec, head(reg.embed(exp.test.texts)), spec.encode_labels(exp.test.labels))["accuracy"]


def frozen_accuracy(reg: Registry, exp) -> float:
    """Test accuracy of the task's own head on the bare backbone's features: what a merge that keeps the
    heads must beat."""
    spec = reg.spec(exp.name)
    return float((torch.tensor(_own_head_predictions(reg, exp.name, exp.test.texts))
                  == spec.encode_labels(exp.test.labels)).float().mean())


def _own_head_predictions(reg: Registry, task: str, texts: list[str]) -> list[int]:
    from safetensors.torch import load_file

    from cmtl.registry import store

    spec = reg.spec(task)
    head = TaskHead(reg.backbone.hidden_size, spec.num_outputs).eval()
    version = reg.versions(task)[-1].version
    head.load_state_dict(load_file(store.version_dir(reg.root, task, version) / "head.safetensors"))
    with torch.no_grad():
        return head(reg.embed(texts)).argmax(-1).tolist()


def to_markdown(results: dict) -> str:
    tasks = results["tasks"]
    train = sum(results.get("train_seconds", {}).values())
    lines = [f"### {results['scenario']}: all task adapters merged into one", "",
             f"Training the {len(tasks)} adapters took {train:.0f} s." if train else "",
             "", "| method | " + " | ".join(tasks) + " | mean normalised | frozen backbone | beats it on | λ | density "
             "| drop | rank | recon. error | seconds | × training |",
             "|---" * (len(tasks) + 11) + "|",
             "| individual adapters | " + " | ".join(f"{results['individual'][t]:.3f}" for t in tasks)
             + " | 1.000 | | | | | | | | | |"]
    frozen = results.get("frozen") or {"refit": results.get("probe")}
    for head, what in (("keep", "the tasks' own heads"), ("refit", "heads fitted on the buffers")):
        if frozen.get(head):
            acc = frozen[head]
            lines.append(f"| frozen backbone, {what} (λ = 0) | " + " | ".join(f"{acc[t]:.3f}" for t in tasks)
                         + f" | {np.mean([acc[t] / results['individual'][t] for t in tasks]):.3f} | | | 0 | | | | | | |")
    for label, m in results["merges"].items():
        c = m["config"]
        method = c["method"]
        dare_like = "dare" in method
        ties_like = "ties" in method and method != "peft_dare_ties"  # peft's DARE-TIES keeps 1 − drop, no trim
        base = f"{m['frozen_mean_normalised']:.3f}" if "frozen_mean_normalised" in m else ""
        beats = ", ".join(m.get("beats_frozen", [])) or ("none" if "beats_frozen" in m else "")
        seconds = f"{m['seconds']:.0f}" if "seconds" in m else ""
        ratio = f"{m['vs_training']:.2f}" if "vs_training" in m else ""
        lines.append(f"| {label} | " + " | ".join(f"{m['test_accuracy'][t]:.3f}" for t in tasks)
                     + f" | {m['mean_normalised']:.3f} | {base} | {beats} | {c['scale']:g} | "
                     f"{c['density'] if ties_like else '–'} | {c['drop'] if dare_like else '–'} | {m['rank']} | "
                     f"{m['reconstruction_error']['max']:.1e} | {seconds} | {ratio} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("scenario", nargs="?", default=str(Path(__file__).with_name("text5.yaml")))
    parser.add_argument("--out", default="runs/bench/merging")
    parser.add_argument("--layers", type=int, default=None, help="Use only the first N backbone layers.")
    parser.add_argument("--max-train", type=int, default=None)
    parser.add_argument("--max-eval", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=None, help="Epoch cap (default: TrainConfig's).")
    parser.add_argument("--rank", default="auto",
                        help="Rank of the stored merged adapters: auto (MergeConfig's default), exact or a number.")
    parser.add_argument("--no-search", action="store_true", help="Use the default knobs instead of searching.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--methods", default=",".join(METHODS + PEFT_METHODS))
    parser.add_argument("--heads", choices=["keep", "refit", "both"], default="both",
                        help="keep the task heads, refit them on the replay buffers after merging, or both")
    parser.add_argument("--resume", action="store_true",
                        help="Continue the run in --out: keep its adapters and recorded merges, run the rest.")
    parser.add_argument("--compare-full", default="",
                        help="Comma-separated merges (e.g. ties+refit) to run also on the full grid (no halving).")
    args = parser.parse_args(argv)
    scenario = Scenario.from_yaml(args.scenario)
    scenario = scenario.shrink(args.max_train or scenario.max_train, args.max_eval or scenario.max_eval)
    methods = tuple(m for m in args.methods.split(",") if m)
    if unknown := sorted(set(methods) - set(METHODS + PEFT_METHODS)):
        parser.error(f"unknown methods {unknown}; choose from {list(METHODS + PEFT_METHODS)}")
    run(scenario, Path(args.out), backbone=BackboneConfig(num_hidden_layers=args.layers),
        training=TrainConfig(**({} if args.epochs is None else {"epochs": args.epochs}), seed=args.seed,
                             progress=False), device=args.device,
        methods=methods, rank=parse_rank(args.rank),
        search=not args.no_search,
        heads=("refit", "keep") if args.heads == "both" else (args.heads,),
        compare_full=tuple(x for x in args.compare_full.split(",") if x), resume=args.resume)
    print((Path(args.out) / "results.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark: MT2ST (Diminish / Switch) against single-task and plain multi-task training
(issue "multi-task").

A primary task trains with auxiliary tasks through one shared LoRA adapter (a head per task),
five ways, each with the same number of optimiser steps, in each of which the primary gets a batch
of ``--batch-size`` rows: with the default ``--sampler per_task`` every auxiliary task adds a batch of
its own, as in MT2ST's loss L_primary + Σ_k γ_k(t) · L_aux,k (so the primary sees as many examples as
in single-task training, and the auxiliaries cost extra time); ``--sampler temperature`` instead mixes
one batch of ``--batch-size`` rows drawn across the tasks (the primary then gets a third of them):

* ``stl``             — the primary alone;
* ``mtl``             — primary and auxiliaries, all weights 1;
* ``diminish``        — auxiliary weight γ(t) = γ0 · exp(−η · t^ν) (ν = 1, η so that γ ≈ 0.05 at the end);
* ``switch``          — auxiliaries on until 60 % of the steps, then the primary alone (MT2ST's 15 of 25 epochs);
* ``adaptive-switch`` — auxiliaries stop once the primary validation accuracy stops improving (2 evaluations).

The primary's validation accuracy is recorded 20 times with the wall time; reported: the best
validation accuracy, test accuracy at that state, total time, and the time to reach ``--target``
(default 99 %) of STL's best validation accuracy.

Default pairing: primary Rotten Tomatoes, auxiliaries fine-food reviews and VADER Amazon
(not VADER movies: its snippets are Rotten Tomatoes sentences, so it would leak the primary's test
set). ``--pairing trec`` runs the second pairing: primary TREC-6, auxiliaries SMS spam and BBC News.

    python scenarios/mt2st.py                        # embedded MiniLM, all 6 layers
    python scenarios/mt2st.py --layers 2 --max-train 200 --steps 60   # a quick look
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch

PAIRINGS = {
    "rotten": ("rotten_tomatoes", ("fine_foods", "vader_amazon")),
    "trec": ("trec6", ("sms_spam", "bbc_news")),
}
WAYS = ("stl", "mtl", "diminish", "switch", "adaptive-switch")


def _settings(args) -> dict:
    """The options a run's results depend on (recorded, and checked before another run writes into --out)."""
    return {k: v for k, v in vars(args).items() if k not in ("out", "argv")}


def run(args, echo=print) -> dict:
    from cmtl import BackboneConfig, TaskSpec, TrainConfig
    from cmtl.benchmarks.corpora import corpus_info, load_corpus
    from cmtl.core.adapters import AdapterBank, AdapterConfig
    from cmtl.core.backbone import load_backbone
    from cmtl.core.heads import TaskHead
    from cmtl.data import encode, read_examples
    from cmtl.multitask.config import MultiTaskConfig
    from cmtl.multitask.joint import grouped_forward, train_multitask
    from cmtl.training.evaluation import compute_metrics, predict_logits
    from cmtl.training.loop import seeded
    from cmtl.training.trainee import Trainee

    primary, aux = PAIRINGS[args.pairing]
    corpora = [primary, *aux]
    where = {"name_or_path": args.backbone} if args.backbone else {}
    backbone = load_backbone(BackboneConfig(**where, num_hidden_layers=args.layers, max_length=args.max_length),
                             device=args.device)
    specs = [TaskSpec(c.replace("_", "-"), labels=list(corpus_info(c).labels)) for c in corpora]
    splits = {c: load_corpus(c) for c in corpora}

    def enc(corpus, split, n, spec):
        rows = splits[corpus][split]
        return encode(read_examples(rows.select(range(min(n, len(rows)))), spec), spec, backbone.tokenize)

    train_data = [enc(c, "train", args.max_train, s) for c, s in zip(corpora, specs)]
    val_primary = enc(primary, "validation", args.max_eval, specs[0])
    test_primary = enc(primary, "test", args.max_eval, specs[0])
    training = TrainConfig(batch_size=args.batch_size, learning_rate=args.lr, seed=args.seed, progress=False)
    steps = args.steps or math.ceil(len(train_data[0]) / args.batch_size) * 6
    common = {"steps": steps, "sampler": args.sampler}
    configs = {
        "stl": MultiTaskConfig(**common),
        "mtl": MultiTaskConfig(**common),
        "diminish": MultiTaskConfig(**common, primary=specs[0].name, schedule="diminish", gamma0=1.0,
                                    eta=3.0 / steps, nu=1.0),
        "switch": MultiTaskConfig(**common, primary=specs[0].name, schedule="switch", switch_step=int(0.6 * steps)),
        "adaptive-switch": MultiTaskConfig(**common, primary=specs[0].name, schedule="adaptive_switch",
                                           switch_patience=2),
    }
    results = {"pairing": {"primary": primary, "auxiliaries": list(aux)}, "steps": steps, "sampler": args.sampler,
               "batch_size": args.batch_size, "max_train": args.max_train, "max_eval": args.max_eval,
               "layers": args.layers, "max_length": args.max_length, "device": str(backbone.device),
               "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores",
               "torch_threads": torch.get_num_threads(),
               "command": " ".join([Path(sys.argv[0]).name] + (sys.argv[1:] if args.argv is None else args.argv)),
               "settings": _settings(args), "ways": {}}
    bank = AdapterBank(backbone.encoder)
    for way in args.ways:
        n_tasks = 1 if way == "stl" else len(specs)
        key = f"mt2st-{way}"
        # One seed for the way's initialisation and its training (dropout): a way's numbers do not depend on
        # the ways run before it.
        with seeded(args.seed, backbone.device):
            bank.add(key, AdapterConfig())
            heads = [TaskHead(backbone.hidden_size, s.num_outputs, training.head_dropout).to(backbone.device)
                     for s in specs[:n_tasks]]
            bank.activate(key)
            trainee = Trainee(grouped_forward(backbone.embed, heads), heads, bank=bank, key=key)
            config = dataclasses.replace(configs[way], eval_every=max(1, steps // 20))
            with trainee.unfrozen() as params:  # the adapter's LoRA tensors, then the heads'
                n_shared = len(params) - sum(len(list(h.parameters())) for h in heads)
                result = train_multitask(trainee.forward, params[:n_shared], params[n_shared:], trainee.set_training,
                                         specs[:n_tasks], train_data[:n_tasks],
                                         [val_primary] + [None] * (n_tasks - 1), config, training,
                                         pad_id=backbone.pad_id, device=backbone.device)
        test = dataclasses.replace(test_primary, groups=torch.zeros(len(test_primary), dtype=torch.long))
        logits = predict_logits(trainee.forward, test, batch_size=64, pad_id=backbone.pad_id, device=backbone.device)
        curve = [(h["seconds"], h[f"{specs[0].name}_accuracy"]) for h in result.history]
        results["ways"][way] = {"best_validation": result.best_metrics[specs[0].name],
                                "test_accuracy": compute_metrics(specs[0], logits[:, : specs[0].num_outputs],
                                                                 test.targets)["accuracy"],
                                "seconds": result.seconds, "best_step": result.best_step,
                                "switched_at": result.switched_at, "curve": curve}
        bank.remove(key)
        echo(f"{way}: best validation {result.best_metrics[specs[0].name]:.4f}, "
             f"test {results['ways'][way]['test_accuracy']:.4f}, {result.seconds:.0f} s")
    if "stl" in results["ways"]:
        target = args.target * results["ways"]["stl"]["best_validation"]
        results["target"] = target
        for row in results["ways"].values():
            reached = [s for s, acc in row["curve"] if acc >= target]
            row["seconds_to_target"] = reached[0] if reached else None
    return results


def plot_curves(results: dict, path: Path) -> None:
    """Primary validation accuracy against wall time, one line per way, the target dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for way, r in results["ways"].items():
        seconds, accuracy = zip(*r["curve"]) if r["curve"] else ((), ())
        ax.plot(seconds, accuracy, marker=".", label=way)
    if results.get("target"):
        ax.axhline(results["target"], color="grey", linestyle="--", linewidth=1, label="target")
    p = results["pairing"]
    ax.set_title(f"{p['primary']} with {', '.join(p['auxiliaries'])}")
    ax.set_xlabel("wall time (s)")
    ax.set_ylabel(f"{p['primary']} validation accuracy")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def to_markdown(results: dict) -> str:
    p = results["pairing"]
    lines = [f"Primary `{p['primary']}`, auxiliaries {', '.join(f'`{a}`' for a in p['auxiliaries'])}; "
             f"{results['steps']} steps of batch {results['batch_size']} "
             f"({'per task' if results.get('sampler', 'temperature') == 'per_task' else 'mixed across the tasks'}), "
             f"{results['max_train']} training examples "
             f"per task, backbone layers: {results['layers'] or 'all'}, at most {results['max_length']} tokens per "
             f"text. {results['machine']} ({results['device']}), "
             f"{results['date']}.", ""]
    target = results.get("target")
    lines += [f"| way | best val. acc | test acc | total s | s to {target:.3f} val. acc | switched at step |"
              if target else "| way | best val. acc | test acc | total s | s to target | switched at step |",
              "|---|---|---|---|---|---|"]
    for way, r in results["ways"].items():
        reach = r.get("seconds_to_target")
        lines.append(f"| {way} | {r['best_validation']:.4f} | {r['test_accuracy']:.4f} | {r['seconds']:.0f} | "
                     f"{'not reached' if reach is None else f'{reach:.0f}'} | {r['switched_at'] or ''} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None, echo=print) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairing", choices=sorted(PAIRINGS), default="rotten")
    p.add_argument("--ways", default=",".join(WAYS))
    p.add_argument("--max-train", type=int, default=500)
    p.add_argument("--max-eval", type=int, default=300)
    p.add_argument("--steps", type=int, default=None, help="default: 6 epochs of the primary task")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--sampler", choices=["per_task", "temperature", "uniform", "proportional"], default="per_task",
                   help="per_task: a batch of each task per step (MT2ST's loss); others: one mixed batch")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--target", type=float, default=0.99, help="fraction of STL's best validation accuracy")
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--backbone", default=None, help="a local encoder folder (default: the embedded MiniLM)")
    p.add_argument("--max-length", type=int, default=256, help="tokens per text")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="runs/bench/mt2st")
    args = p.parse_args(argv)
    args.argv = argv
    args.ways = [w for w in args.ways.split(",") if w]
    unknown = sorted(set(args.ways) - set(WAYS))
    if unknown:
        p.error(f"unknown ways {unknown}; choose from {list(WAYS)}")
    from cmtl.benchmarks.results import check_same_run, write_results

    out = Path(args.out) / args.pairing
    check_same_run(out, _settings(args))
    results = run(args, echo)
    out.mkdir(parents=True, exist_ok=True)

    write_results(out, results, to_markdown(results))
    plot_curves(results, out / "accuracy-vs-time.png")
    echo(to_markdown(results))
    return results


if __name__ == "__main__":
    main()

"""Benchmark: one task updated on shifted data, three ways (issue "continual updates").

Runs a domain-incremental scenario (default ``scenarios/sentiment4.yaml``) as ONE
registry task trained on the first domain and then updated on each next one:

* ``update-replay``  — ``Registry.update_task`` with replay (``--replay-ratio``, default 1);
* ``update-naive``   — ``Registry.update_task`` on the new data only (``replay_ratio=0``);
* ``retrain``        — a fresh ``add_task`` on all training data seen so far.

Each update is promoted regardless of the gate (the benchmark measures the update
method; the gate's verdict is recorded beside it). After each step every domain
seen so far is evaluated on its test split. Writes ``results.json`` and
``results.md`` to ``--out``.

    python scenarios/updates.py                      # embedded MiniLM, sentiment4
    python scenarios/updates.py --layers 2 --max-train 200   # quick look
    python scenarios/updates.py --update-epochs 2            # warm-started updates train shorter
    python scenarios/updates.py --seeds 0,1,2                # mean ± sd over seeds (OUT/summary.md)
    python scenarios/updates.py --update-validation-fraction 0.2   # updates hold out 20 % of the new data
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from cmtl import BackboneConfig, Registry, TrainConfig, UpdateConfig
from cmtl.benchmarks.metrics import ContinualReport
from cmtl.benchmarks.results import write_results
from cmtl.benchmarks.scenarios import Scenario
from cmtl.data import Examples

METHODS = ("update-replay", "update-naive", "retrain")


def run(scenario: Scenario, out: Path, *, backbone: BackboneConfig, training: TrainConfig, device: str = "auto",
        methods: tuple[str, ...] = METHODS, replay_ratio: float = 1.0, update_training: TrainConfig | None = None,
        penalty: str = "none", validation_fraction: float | None = None, echo=print) -> dict:
    """Run ``methods`` over ``scenario``'s domains; write results into ``out`` (refused if it holds an earlier
    run's); return them.

    ``training`` trains the first version and every retraining; ``update_training`` (default: the
    same) the warm-started updates; ``penalty`` (``"none"``, ``"ewc"``, ``"lwf"``) applies to ``update-replay``.
    ``validation_fraction``: the updates get no validation data and hold out this share of the new training
    data instead (``UpdateConfig.validation_fraction``), as an update given one file does; ``None`` passes each
    domain's validation split. The first version and the retrainings always get the validation splits.
    """
    update_training = update_training or training
    if scenario.kind != "domain-incremental":
        raise ValueError(f"Scenario {scenario.name!r} is {scenario.kind}; this benchmark needs a domain-incremental "
                         "one (one task whose data shifts).")
    if (out / "results.json").exists():  # results.json holds this run's methods only: it would replace the earlier's
        earlier = list(json.loads((out / "results.json").read_text()).get("methods", {}))
        raise FileExistsError(f"{out} holds the results of an earlier run (methods {earlier}); pass another --out, "
                              "or move them.")
    experiences = scenario.load()
    names = [e.name for e in experiences]
    out.mkdir(parents=True, exist_ok=True)
    results = {"scenario": scenario.name, "domains": names, "backbone": backbone.to_dict(),
               "training": training.to_dict(), "update_training": update_training.to_dict(), "penalty": penalty,
               "replay_ratio": replay_ratio, "update_validation_fraction": validation_fraction,
               "max_train": scenario.max_train, "max_eval": scenario.max_eval,
               "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
               "torch_threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d"), "methods": {}}
    for method in methods:
        reg = Registry.create(out / f"registry-{method}", backbone, device=device)
        R = np.zeros((len(names), len(names)))
        seconds, gate = [], []
        for i, exp in enumerate(experiences):
            started = time.perf_counter()
            if i == 0 or method == "retrain":
                task = exp.spec.name if method != "retrain" else f"{exp.spec.name}-{i}"
                seen = experiences[: i + 1]
                reg.add_task(exp.spec.__class__(task, labels=exp.spec.labels),
                             train=Examples.concat([e.train for e in seen]),
                             validation=Examples.concat([e.validation for e in seen]), training=training)
                gate.append(None)
            else:
                held = {} if validation_fraction is None else {"validation_fraction": validation_fraction}
                config = (UpdateConfig(replay_ratio=replay_ratio, penalty=penalty, **held) if method == "update-replay"
                          else UpdateConfig(replay_ratio=0.0, **held))
                result = reg.update_task(task, exp.train, validation=exp.validation if validation_fraction is None
                                         else None, training=update_training, config=config, promote=True)
                gate.append(result.reason.split("the gate said: ", 1)[-1])
            seconds.append(time.perf_counter() - started)
            for j in range(i + 1):
                R[i, j] = reg.evaluate(task, experiences[j].test)["accuracy"]
            echo(f"{method}: after {exp.name} ({seconds[-1]:.0f} s): "
                 + " ".join(f"{names[j]}={R[i, j]:.3f}" for j in range(i + 1)))
        report = ContinualReport.from_matrix(R, names, seconds_per_experience=seconds)
        seen_avg = [float(R[i, : i + 1].mean()) for i in range(len(names))]
        results["methods"][method] = {"report": report.to_dict(), "average_seen_accuracy": seen_avg, "gate": gate}
        write_results(out, results)
    write_results(out, results, to_markdown(results))
    return results


def to_markdown(results: dict) -> str:
    """A summary table (average accuracy on the domains seen, forgetting, time per update), then each matrix."""
    methods = results["methods"]
    names = results["domains"]
    lines = [f"### {results['scenario']}: one task updated on each new domain", "",
             "| method | " + " | ".join(f"avg acc after {n}" for n in names) + " | mean forgetting | BWT | "
             "seconds per step | total s |", "|---" * (len(names) + 5) + "|"]
    for name, m in methods.items():
        r = m["report"]
        secs = r["seconds_per_experience"]
        lines.append(f"| {name} | " + " | ".join(f"{v:.3f}" for v in m["average_seen_accuracy"])
                     + f" | {r['mean_forgetting']:.3f} | {r['bwt']:.3f} | "
                     + ", ".join(f"{s:.0f}" for s in secs) + f" | {sum(secs):.0f} |")
    if "update-replay" in methods and "retrain" in methods:
        a = methods["update-replay"]["report"]["seconds_per_experience"]
        c = methods["retrain"]["report"]["seconds_per_experience"]
        lines += ["", "time of update-replay / retrain per update: "
                  + ", ".join(f"{names[i]} {a[i] / c[i]:.2f}" for i in range(1, len(names)))]
    for name, m in methods.items():
        r = m["report"]
        lines += ["", f"#### {name}", "", "| after \\ on | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
        for i, row in enumerate(r["R"]):  # a domain is scored once it has been seen
            lines.append(f"| {names[i]} | " + " | ".join(f"{v:.3f}" if j <= i else "–" for j, v in enumerate(row)) + " |")
        lines += ["", "forgetting per domain: " + ", ".join(f"{n} {f:.3f}" for n, f in zip(names, r["forgetting"]))]
        if any(m["gate"]):
            lines += ["", "gate (promotion forced; what it would have decided): "
                      + "; ".join(f"{names[i]}: {g}" for i, g in enumerate(m["gate"]) if g)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("scenario", nargs="?", default=str(Path(__file__).with_name("sentiment4.yaml")))
    parser.add_argument("--out", default="runs/bench/updates")
    parser.add_argument("--layers", type=int, default=None, help="Use only the first N backbone layers.")
    parser.add_argument("--max-train", type=int, default=None)
    parser.add_argument("--max-eval", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seeds", default=None,
                        help="comma-separated seeds: one run per seed under OUT/seed-N, then mean ± sd in OUT/summary.md")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--replay-ratio", type=float, default=1.0, help="update-replay: replayed per new example.")
    parser.add_argument("--update-epochs", type=int, default=None, help="epochs of an update (default: --epochs)")
    parser.add_argument("--update-lr", type=float, default=None, help="learning rate of an update (default: that of training, 1e-3)")
    parser.add_argument("--penalty", choices=["none", "ewc", "lwf"], default="none", help="update-replay's penalty")
    parser.add_argument("--update-validation-fraction", type=float, default=None,
                        help="updates get no validation data and hold out this share of the new data instead "
                             "(default: each domain's validation split is passed)")
    args = parser.parse_args(argv)
    scenario = Scenario.from_yaml(args.scenario)
    scenario = scenario.shrink(args.max_train or scenario.max_train, args.max_eval or scenario.max_eval)
    methods = tuple(m for m in args.methods.split(",") if m)
    if unknown := sorted(set(methods) - set(METHODS)):
        parser.error(f"unknown methods {unknown}; choose from {list(METHODS)}")
    try:
        seeds = [int(v) for v in args.seeds.split(",")] if args.seeds else [args.seed]
    except ValueError:
        parser.error(f"--seeds takes integers separated by commas, e.g. 0,1,2; got {args.seeds!r}")
    out = Path(args.out)
    runs = []
    for seed in seeds:
        training = TrainConfig(epochs=args.epochs, seed=seed, progress=False)
        update_training = dataclasses.replace(training, epochs=args.update_epochs or training.epochs,
                                              learning_rate=args.update_lr or training.learning_rate)
        where = out / f"seed-{seed}" if args.seeds else out
        runs.append(run(scenario, where, backbone=BackboneConfig(num_hidden_layers=args.layers), training=training,
                        update_training=update_training, penalty=args.penalty, device=args.device, methods=methods,
                        replay_ratio=args.replay_ratio, validation_fraction=args.update_validation_fraction))
        print((where / "results.md").read_text())
    if args.seeds:
        summary = summarise(runs)
        write_results(out, summary, summary_markdown(summary), name="summary")
        print((out / "summary.md").read_text())
    return 0


def summarise(runs: list[dict]) -> dict:
    """Per method, over seeds: average accuracy on every domain after the last update, mean forgetting,
    and (with both ``update-replay`` and ``retrain``) the last update's time ratio; each as mean, sd, values."""

    def stats(values):
        return {"mean": float(np.mean(values)), "sd": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
                "values": [float(v) for v in values]}

    summary = {"seeds": [r["training"]["seed"] for r in runs], "methods": {}}
    for method in runs[0]["methods"]:
        ms = [r["methods"][method] for r in runs]
        summary["methods"][method] = {"final_average": stats([m["average_seen_accuracy"][-1] for m in ms]),
                                      "mean_forgetting": stats([m["report"]["mean_forgetting"] for m in ms])}
    if {"update-replay", "retrain"} <= set(runs[0]["methods"]):
        ratio = [r["methods"]["update-replay"]["report"]["seconds_per_experience"][-1]
                 / r["methods"]["retrain"]["report"]["seconds_per_experience"][-1] for r in runs]
        gap = [r["methods"]["retrain"]["average_seen_accuracy"][-1]
               - r["methods"]["update-replay"]["average_seen_accuracy"][-1] for r in runs]
        summary["update_vs_retrain"] = {"last_time_ratio": stats(ratio), "final_average_gap": stats(gap)}
    return summary


def summary_markdown(summary: dict) -> str:
    fmt = lambda s: f"{s['mean']:.3f} ± {s['sd']:.3f}"  # noqa: E731
    lines = [f"### Over seeds {', '.join(map(str, summary['seeds']))} (mean ± sd)", "",
             "| method | avg acc after the last update | mean forgetting |", "|---|---|---|"]
    lines += [f"| {name} | {fmt(m['final_average'])} | {fmt(m['mean_forgetting'])} |"
              for name, m in summary["methods"].items()]
    if "update_vs_retrain" in summary:
        u = summary["update_vs_retrain"]
        lines += ["", f"retrain − update-replay, average accuracy after the last update: {fmt(u['final_average_gap'])}; "
                      f"time of the last update / its retraining: {fmt(u['last_time_ratio'])}"]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

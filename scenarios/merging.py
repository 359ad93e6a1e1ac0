"""Benchmark: fold the task adapters of a task-incremental scenario into one adapter.

Trains one adapter per task of ``scenarios/text5.yaml`` (default) in a registry,
then merges all of them with every cmtl method (``linear``, ``ties``, ``dare``,
``dare_ties``) and with peft's ``add_weighted_adapter`` on the same adapters
(``peft_linear``, ``peft_ties``, ``peft_dare_ties``, ``peft_ties_svd``). Each
merge's knobs are searched on the tasks' validation samples; each task is then
scored on its test split through the merged adapter and its own head, and
normalised by the task's own adapter. With ``--heads both`` (the default) every
method also runs with ``refit_heads``: each task's head is refitted on the task's
replay buffer through the merged adapter (the adapter is the same merge). Writes
``results.json`` and ``results.md``.

    python scenarios/merging.py                          # embedded MiniLM, text5
    python scenarios/merging.py --layers 2 --max-train 200   # quick look
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from cmtl import BackboneConfig, Registry, TrainConfig
from cmtl.benchmarks.results import write_results
from cmtl.benchmarks.scenarios import Scenario
from cmtl.core.tasks import TaskHead
from cmtl.merging.methods import METHODS, PEFT_METHODS, MergeConfig, refit_head


def run(scenario: Scenario, out: Path, *, backbone: BackboneConfig, training: TrainConfig, device: str = "auto",
        methods: tuple[str, ...] = METHODS + PEFT_METHODS, rank: int | None = None, search: bool = True,
        heads: tuple[str, ...] = ("keep", "refit"), echo=print) -> dict:
    """Train, merge with each method, score; write results into ``out``; return them."""
    if scenario.kind != "task-incremental":
        raise ValueError(f"Scenario {scenario.name!r} is {scenario.kind}; merging needs one adapter per task "
                         "(a task-incremental scenario).")
    experiences = scenario.load()
    tasks = [e.spec.name for e in experiences]
    out.mkdir(parents=True, exist_ok=True)
    reg = Registry.create(out / "registry", backbone, device=device)
    individual = {}
    for exp in experiences:
        reg.add_task(exp.spec, exp.train, exp.validation, training=training)
        individual[exp.name] = reg.evaluate(exp.name, exp.test)["accuracy"]
        echo(f"individual {exp.name}: {individual[exp.name]:.3f}")
    probe = {exp.name: probe_accuracy(reg, exp) for exp in experiences}
    echo("linear probe on the bare backbone: " + " ".join(f"{t}={a:.3f}" for t, a in probe.items()))
    results = {"scenario": scenario.name, "tasks": tasks, "backbone": backbone.to_dict(),
               "training": training.to_dict(), "max_train": scenario.max_train, "max_eval": scenario.max_eval,
               "rank": rank, "search": search,
               "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
               "torch_threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d"),
               "individual": individual, "probe": probe, "merges": {}}
    for method, head in [(m, h) for m in methods for h in heads]:
        started = time.perf_counter()
        label = method if head == "keep" else f"{method}+refit"
        record = reg.merge(tasks, label.replace("_", "-").replace("+", "-"), search=search,
                           config=MergeConfig(method=method, rank=rank, refit_heads=head == "refit"))
        seconds = time.perf_counter() - started
        merged = {e.name: reg.evaluate(e.name, e.test, merge=record["name"])["accuracy"] for e in experiences}
        normalised = {t: merged[t] / individual[t] for t in tasks}
        results["merges"][label] = {
            "test_accuracy": merged, "normalised": normalised, "mean_normalised": float(np.mean(list(normalised.values()))),
            "config": record["config"], "rank": record["adapter"]["r"],
            "reconstruction_error": record["reconstruction_error"], "validation_normalised": record["normalised"],
            "seconds": seconds,
        }
        echo(f"{label}: mean normalised {results['merges'][label]['mean_normalised']:.3f} "
             + " ".join(f"{t}={merged[t]:.3f}" for t in tasks) + f" ({seconds:.0f} s)")
        write_results(out, results)
    write_results(out, results, to_markdown(results))
    return results


def probe_accuracy(reg: Registry, exp) -> float:
    """Test accuracy of a head fitted, as ``refit_heads`` fits it, on the task's replay buffer through the
    bare backbone (no adapter): what refitted heads get from the backbone alone, the reference a merge
    with refitted heads must beat to show its adapter matters."""
    spec = reg.spec(exp.name)
    buffer = reg.buffer(exp.name).to_examples()
    test = exp.test
    head = refit_head(TaskHead(reg.backbone.hidden_size, spec.num_outputs).eval(), reg.embed(buffer.texts),
                      spec.encode_labels(buffer.labels), spec.loss)
    with torch.no_grad():
        predicted = head(reg.embed(test.texts)).argmax(-1)
    return float((predicted == spec.encode_labels(test.labels)).float().mean())


def to_markdown(results: dict) -> str:
    tasks = results["tasks"]
    lines = [f"### {results['scenario']}: all task adapters merged into one", "",
             "| method | " + " | ".join(tasks) + " | mean normalised | λ | density | drop | rank | recon. error |",
             "|---" * (len(tasks) + 7) + "|",
             "| individual adapters | " + " | ".join(f"{results['individual'][t]:.3f}" for t in tasks)
             + " | 1.000 | | | | | |"]
    if results.get("probe"):
        probe = results["probe"]
        lines.append("| linear probe, no adapter (λ = 0, heads fitted on the buffers) | "
                     + " | ".join(f"{probe[t]:.3f}" for t in tasks)
                     + f" | {np.mean([probe[t] / results['individual'][t] for t in tasks]):.3f} | 0 | | | | |")
    for label, m in results["merges"].items():
        c = m["config"]
        method = c["method"]
        dare_like = "dare" in method
        ties_like = "ties" in method and method != "peft_dare_ties"  # peft's DARE-TIES keeps 1 − drop, no trim
        lines.append(f"| {label} | " + " | ".join(f"{m['test_accuracy'][t]:.3f}" for t in tasks)
                     + f" | {m['mean_normalised']:.3f} | {c['scale']:g} | {c['density'] if ties_like else '–'} | "
                     f"{c['drop'] if dare_like else '–'} | {m['rank']} | {m['reconstruction_error']['max']:.1e} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("scenario", nargs="?", default=str(Path(__file__).with_name("text5.yaml")))
    parser.add_argument("--out", default="runs/bench/merging")
    parser.add_argument("--layers", type=int, default=None, help="Use only the first N backbone layers.")
    parser.add_argument("--max-train", type=int, default=None)
    parser.add_argument("--max-eval", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--rank", type=int, default=None, help="Rank of the stored merged adapters (default exact).")
    parser.add_argument("--no-search", action="store_true", help="Use the default knobs instead of searching.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--methods", default=",".join(METHODS + PEFT_METHODS))
    parser.add_argument("--heads", choices=["keep", "refit", "both"], default="both",
                        help="keep the task heads, refit them on the replay buffers after merging, or both")
    args = parser.parse_args(argv)
    scenario = Scenario.from_yaml(args.scenario)
    scenario = scenario.shrink(args.max_train or scenario.max_train, args.max_eval or scenario.max_eval)
    methods = tuple(m for m in args.methods.split(",") if m)
    if unknown := sorted(set(methods) - set(METHODS + PEFT_METHODS)):
        parser.error(f"unknown methods {unknown}; choose from {list(METHODS + PEFT_METHODS)}")
    run(scenario, Path(args.out), backbone=BackboneConfig(num_hidden_layers=args.layers),
        training=TrainConfig(epochs=args.epochs, seed=args.seed, progress=False), device=args.device,
        methods=methods, rank=args.rank, search=not args.no_search,
        heads=("keep", "refit") if args.heads == "both" else (args.heads,))
    print((Path(args.out) / "results.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())

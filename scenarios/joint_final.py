"""Benchmark: the ``joint`` strategy's final model alone, without the rows before it (issue #24).

``cmtl bench --strategy joint`` retrains a fresh shared adapter on everything seen so far after every
experience, so its accuracy matrix costs the sum of T joint trainings. Its last row, which gives ACC,
comes from the last of them alone: each experience starts from a fresh adapter and fresh heads under a
seed that depends only on the experience's index (:func:`cmtl.benchmarks.learners.fit_experience`).
This script trains that last experience and nothing else, so the final row and ACC are those of
``cmtl bench --strategy joint`` with the same options, at the cost of one joint training. BWT, FWT and
forgetting need the earlier rows and are not measured.

    python scenarios/joint_final.py text5 --backbone SmolLM2-135M-Instruct.Q4_1.gguf --adapter-layers 26,27,28,29
    python scenarios/joint_final.py text5 --layers 2 --max-train 64 --max-eval 32      # a quick look

Writes ``results.json`` and ``results.md`` into ``--out`` (default ``runs/bench/joint-final/<scenario>``):
the accuracy on each task's test set, ACC, the training seconds, the wall time and the peak resident
memory of the process. A folder holding another run's results (other backbone, order, sizes or training) is
refused before anything trains.
"""

from __future__ import annotations

import argparse
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path


def run(scenario, out: str | Path, *, backbone=None, config=None, order: str = "stated", device: str = "auto",
        echo=print) -> dict:
    """Train ``joint`` on the last experience of ``scenario``'s ``order``; write and return the results."""
    import torch

    from cmtl.benchmarks.learners import StrategyConfig, experience_accuracy, fit_experience, make_learner
    from cmtl.benchmarks.results import check_same_run, write_results
    from cmtl.core.backbone import BackboneConfig, load_backbone

    started = time.perf_counter()
    available = dict(scenario.orders())
    if order not in available:
        raise ValueError(f"Unknown order {order!r} for scenario {scenario.name!r}. Available: {list(available)}.")
    config = config or StrategyConfig()
    backbone = backbone or BackboneConfig()
    command_config = {"max_train": scenario.max_train, "max_eval": scenario.max_eval, "seed": scenario.seed,
                      "backbone": backbone.to_dict(), "adapter": config.adapter.to_dict(),
                      "training": config.training.to_dict()}
    out = Path(out)
    check_same_run(out, {"scenario": scenario.name, "order": order, "command_config": command_config}, key=None)
    stream = available[order]
    experiences = stream.load()
    T = len(experiences)
    loaded = load_backbone(backbone, device=device)
    echo(f"== {scenario.name} [{order}] joint, final experience only: "
         + " + ".join(e.name for e in experiences))
    with tempfile.TemporaryDirectory(prefix="cmtl-joint-") as tmp:
        learner = make_learner("joint", experiences, stream.kind, loaded, config, Path(tmp))
        seconds = fit_experience(learner, T - 1, config.training.seed, loaded.device)
        row = [experience_accuracy(learner, experiences, j, T) for j in range(T)]
    results = {
        "scenario": scenario.name, "kind": stream.kind, "order": order, "strategy": "joint",
        "what": "the final model of cmtl bench --strategy joint (its last row of R), trained alone",
        "command_config": command_config,
        "task_names": [e.name for e in experiences],
        "final_row": row,
        "acc": sum(row) / T,
        "training_seconds": seconds,
        "trainable_parameters": learner.trainable_parameters[-1],
        "wall_seconds": time.perf_counter() - started,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # Linux: KiB
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, "
                   + (torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"),
        "date": time.strftime("%Y-%m-%d"),
    }
    out.mkdir(parents=True, exist_ok=True)
    names = results["task_names"]
    cells = [f"{v:.3f}" for v in row] + [f"{results['acc']:.3f}", f"{seconds:.0f}", f"{results['wall_seconds']:.0f}",
                                          f"{results['peak_rss_mib']:.0f}"]
    write_results(out, results, f"# {scenario.name} ({order}): joint, final experience only\n\n"
                  "| " + " | ".join(names) + " | ACC | training s | wall s | peak RSS MiB |\n"
                  + "|---" * (len(names) + 4) + "|\n| " + " | ".join(cells) + " |")
    echo(f"joint after {experiences[-1].name} ({seconds:.0f} s): "
         + " ".join(f"{n}={v:.3f}" for n, v in zip(names, row)))
    echo(f"   ACC {results['acc']:.3f}; wrote {out}/results.json and results.md")
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("scenario", help="A shipped scenario's name (text5, ...) or a scenario file.")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--order", default="stated")
    parser.add_argument("--backbone", default=None, help="Local folder or .gguf file (default: embedded MiniLM).")
    parser.add_argument("--layers", type=int, default=None, help="Use only the first N backbone layers.")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--adapter-layers", default=None, help="Comma-separated indices, e.g. 26,27,28,29.")
    parser.add_argument("--max-train", type=int, default=None)
    parser.add_argument("--max-eval", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=None, help="At most this many epochs (default TrainConfig's).")
    parser.add_argument("--patience", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)

    from cmtl import AdapterConfig, BackboneConfig, TrainConfig
    from cmtl.benchmarks.learners import StrategyConfig
    from cmtl.benchmarks.scenarios import Scenario
    from cmtl.core.config import DEFAULT_BACKBONE

    scenario = Scenario.from_yaml(args.scenario)
    if args.max_train or args.max_eval:
        scenario = scenario.shrink(args.max_train or scenario.max_train, args.max_eval or scenario.max_eval)
    # The same settings as `cmtl bench` with the same options.
    training = TrainConfig(**({} if args.epochs is None else {"epochs": args.epochs}), lr_schedule="linear",
                           patience=args.patience or None, seed=args.seed, progress=False)
    layers = None if args.adapter_layers is None else [int(x) for x in args.adapter_layers.split(",") if x.strip()]
    config = StrategyConfig(adapter=AdapterConfig(layers=layers), training=training)
    backbone = BackboneConfig(name_or_path=args.backbone or DEFAULT_BACKBONE, num_hidden_layers=args.layers,
                              dtype=args.dtype)
    run(scenario, args.out or Path("runs/bench/joint-final") / scenario.name, backbone=backbone, config=config,
        order=args.order, device=args.device)
    return 0


if __name__ == "__main__":
    sys.exit(main())

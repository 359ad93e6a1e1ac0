"""Task Affinity Groupings (Fifty et al., 2021) on the tasks of a task-incremental scenario
(issue "multi-task").

1. Every task of the scenario (default ``text5``) gets its own adapter in a fresh registry
   (the per-task baseline).
2. One adapter trains jointly on all of them while TAG measures, every ``--tag-every`` steps,
   the lookahead affinity Z_{i→j} (:mod:`cmtl.multitask`); the averaged matrix is written as
   ``affinity.json`` and ``affinity.png``.
3. :func:`cmtl.multitask.select_groups` picks at most ``--groups`` groups; each group of two or
   more tasks trains as a joint adapter in the registry (``Registry.train_group``).
4. Test accuracy per task: its own adapter, the all-tasks adapter, and its best chosen group.

    python scenarios/tag.py                        # text5, embedded MiniLM, 2 groups
    python scenarios/tag.py --layers 2 --max-train 150 --steps 60   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch


def run(args, echo=print) -> dict:
    from cmtl import BackboneConfig, Registry, TrainConfig
    from cmtl.multitask import MultiTaskConfig, group_score, select_groups
    from cmtl.scenarios import Scenario

    scenario = Scenario.from_yaml(args.scenario)
    if scenario.kind != "task-incremental":
        raise ValueError(f"TAG groups tasks with their own labels; {scenario.name!r} is {scenario.kind}.")
    if args.max_train or args.max_eval:
        scenario = scenario.shrink(args.max_train or scenario.max_train, args.max_eval or scenario.max_eval)
    experiences = scenario.load()
    names = [e.name for e in experiences]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    where = {"name_or_path": args.backbone} if args.backbone else {}
    reg = Registry.create(out / f"registry-{time.strftime('%Y%m%d-%H%M%S')}", BackboneConfig(**where, num_hidden_layers=args.layers,
                                                            max_length=args.max_length), device=args.device)
    training = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.lr, seed=args.seed,
                           progress=False)
    started = time.perf_counter()
    for e in experiences:
        reg.add_task(e.spec.__class__(e.name, labels=e.spec.labels), e.train, validation=e.validation,
                     training=training)
    individual = {e.name: reg.evaluate(e.name, e.test)["accuracy"] for e in experiences}
    echo("own adapters: " + ", ".join(f"{n} {a:.3f}" for n, a in individual.items()))
    data = {e.name: (e.train, e.validation) for e in experiences}
    steps = args.steps or int(np.ceil(sum(len(e.train) for e in experiences) / args.batch_size) * args.epochs)
    record = reg.train_group("all", data, config=MultiTaskConfig(steps=steps, tag_every=args.tag_every),
                             training=training)
    Z = np.array(record["affinity"])
    together = {e.name: reg.evaluate(e.name, e.test, merge="all")["accuracy"] for e in experiences}
    echo("all tasks together: " + ", ".join(f"{n} {a:.3f}" for n, a in together.items()))
    groups, score = select_groups(Z, args.groups)
    chosen = [[names[i] for i in g] for g in groups]
    echo(f"chosen groups: {chosen} (score {score:.4f})")
    grouped: dict[str, dict[str, float]] = {}
    for k, group in enumerate(chosen):
        if len(group) < 2:
            continue
        name = f"group{k}"
        reg.train_group(name, {t: data[t] for t in group}, config=MultiTaskConfig(steps=steps), training=training)
        grouped[name] = {t: reg.evaluate(t, experiences[names.index(t)].test, merge=name)["accuracy"] for t in group}
    best_group = {}
    for j, t in enumerate(names):  # a task alone in its group keeps its own adapter
        options = [(group_score(Z, [names.index(x) for x in g], j), f"group{k}" if len(g) > 1 else "own")
                   for k, g in enumerate(chosen) if t in g]
        _, where_from = max(options)
        best_group[t] = {"group": where_from, "accuracy": grouped.get(where_from, {}).get(t, individual[t])}
    results = {"scenario": scenario.name, "tasks": names, "affinity": Z.tolist(), "groups": chosen, "score": score,
               "individual": individual, "together": together, "grouped": grouped, "best_group": best_group,
               "steps": steps, "tag_every": args.tag_every, "seconds": time.perf_counter() - started,
               "max_train": scenario.max_train, "max_eval": scenario.max_eval, "layers": args.layers,
               "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores",
               "command": " ".join([Path(sys.argv[0]).name] + (sys.argv[1:] if args.argv is None else args.argv))}
    (out / "affinity.json").write_text(json.dumps({"tasks": names, "affinity": Z.tolist()}, indent=2) + "\n")
    plot_affinity(Z, names, out / "affinity.png")
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(to_markdown(results) + "\n")
    return results


def plot_affinity(Z: np.ndarray, names: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.1 * len(names) + 2, 1.0 * len(names) + 1.5))
    bound = max(float(np.abs(Z).max()), 1e-6)
    im = ax.imshow(Z, cmap="RdBu", vmin=-bound, vmax=bound)
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("onto task j")
    ax.set_ylabel("step on task i")
    for i in range(len(names)):
        for j in range(len(names)):
            ax.text(j, i, f"{Z[i, j]:.3f}", ha="center", va="center", fontsize=8)
    fig.colorbar(im, ax=ax, label="Z (i → j)")
    ax.set_title("TAG lookahead affinity")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def to_markdown(results: dict) -> str:
    names = results["tasks"]
    lines = [f"`{results['scenario']}`, {results['max_train']} training examples per task, {results['steps']} joint "
             f"steps, affinity every {results['tag_every']} steps, backbone layers: {results['layers'] or 'all'}. "
             f"{results['machine']}, {results['date']}. Chosen groups: "
             + "; ".join("{" + ", ".join(g) + "}" for g in results["groups"]) + f" (score {results['score']:.4f}).",
             "", "| Z (row i onto column j) | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for i, n in enumerate(names):
        lines.append(f"| {n} | " + " | ".join(f"{z:.4f}" for z in results["affinity"][i]) + " |")
    lines += ["", "| task | own adapter | all tasks, one adapter | best chosen group | group |", "|---|---|---|---|---|"]
    for n in names:
        b = results["best_group"][n]
        lines.append(f"| {n} | {results['individual'][n]:.4f} | {results['together'][n]:.4f} | "
                     f"{b['accuracy']:.4f} | {b['group']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None, echo=print) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scenario", default=str(Path(__file__).with_name("text5.yaml")))
    p.add_argument("--groups", type=int, default=2, help="at most this many groups")
    p.add_argument("--tag-every", type=int, default=5)
    p.add_argument("--steps", type=int, default=None, help="joint steps (default: --epochs over all tasks)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--max-train", type=int, default=None)
    p.add_argument("--max-eval", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--backbone", default=None, help="a local encoder folder (default: the embedded MiniLM)")
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="runs/bench/tag")
    args = p.parse_args(argv)
    args.argv = argv
    results = run(args, echo)
    echo(to_markdown(results))
    return results


if __name__ == "__main__":
    main()

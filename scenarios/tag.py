"""Task Affinity Groupings (Fifty et al., 2021) on the tasks of a task-incremental scenario
(issue "multi-task"), against the search TAG is meant to replace.

1. Every task of the scenario (default ``text5``) gets its own adapter in a fresh registry
   (the per-task baseline).
2. One adapter trains jointly on all of them while TAG measures, every ``--tag-every`` steps,
   the lookahead affinity Z_{i→j} (:mod:`cmtl.multitask.affinity`); the averaged matrix is written as
   ``affinity.json`` and ``affinity.png``.
3. Pair search (``--pairs``, the default): every pair of tasks trains as a joint adapter; the
   validation gain of task j when paired with i over its own adapter fills S[i, j]. This is the
   pairwise "higher-order approximation" of Standley et al. (2020) that TAG's paper compares to.
4. :func:`cmtl.multitask.affinity.select_groups` picks at most ``--groups`` groups from Z (TAG) and from
   S (pair search); each group of two or more tasks trains as a joint adapter in the registry
   (``Registry.train_group``), each for ``--epochs`` over its own tasks' data.
5. Test accuracy per task: its own adapter, all tasks in one adapter, its group under TAG and
   under the pair search (a task alone in its group keeps its own adapter), and the compute each
   selection cost: TAG = the joint run that measured Z (of which the lookaheads), pair search =
   the sum of the pair runs.

    python scenarios/tag.py                        # text5, embedded MiniLM, 2 groups
    python scenarios/tag.py --layers 2 --max-train 150 --no-pairs   # a quick look
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np


def _settings(args) -> dict:
    """The options a run's results depend on (recorded, and checked before another run writes into --out)."""
    return {k: v for k, v in vars(args).items() if k not in ("out", "argv")}


def run(args, echo=print) -> dict:
    from cmtl import BackboneConfig, Registry, TrainConfig
    from cmtl.benchmarks.scenarios import Scenario
    from cmtl.multitask.affinity import group_score, select_groups
    from cmtl.multitask.config import MultiTaskConfig

    scenario = Scenario.from_yaml(args.scenario)
    if scenario.kind != "task-incremental":
        raise ValueError(f"TAG groups tasks with their own labels; {scenario.name!r} is {scenario.kind}.")
    if args.max_train or args.max_eval:
        scenario = scenario.shrink(args.max_train or scenario.max_train, args.max_eval or scenario.max_eval)
    experiences = scenario.load()
    names = [e.name for e in experiences]
    tests = {e.name: e.test for e in experiences}
    data = {e.name: (e.train, e.validation) for e in experiences}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    where = {"name_or_path": args.backbone} if args.backbone else {}
    reg = Registry.create(out / f"registry-{time.strftime('%Y%m%d-%H%M%S')}",
                          BackboneConfig(**where, num_hidden_layers=args.layers, max_length=args.max_length),
                          device=args.device)
    training = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.lr, seed=args.seed,
                           progress=False)

    def steps_for(group) -> int:  # --epochs over the group's own data unless --steps fixes it
        n = sum(len(data[t][0]) for t in group)
        return args.steps or int(np.ceil(n / args.batch_size) * args.epochs)

    def train_group(name, group, **knobs) -> dict:
        record = reg.train_group(name, {t: data[t] for t in group},
                                 config=MultiTaskConfig(steps=steps_for(group), **knobs), training=training)
        record["test"] = {t: reg.evaluate(t, tests[t], merge=name)["accuracy"] for t in group}
        return record

    started = time.perf_counter()
    own_seconds = 0.0
    for e in experiences:
        t0 = time.perf_counter()
        reg.add_task(e.spec.__class__(e.name, labels=e.spec.labels), e.train, validation=e.validation,
                     training=training)
        own_seconds += time.perf_counter() - t0
    individual = {t: reg.evaluate(t, tests[t])["accuracy"] for t in names}
    own_val = {t: reg.evaluate(t, data[t][1])["accuracy"] for t in names}
    echo("own adapters: " + ", ".join(f"{n} {a:.3f}" for n, a in individual.items()))

    everything = train_group("all", names, tag_every=args.tag_every)
    Z = np.array(everything["affinity"])
    together = everything["test"]
    echo(f"all tasks together ({everything['seconds']:.0f} s, of which TAG {everything['tag_seconds']:.0f} s): "
         + ", ".join(f"{n} {a:.3f}" for n, a in together.items()))
    trained = {tuple(names): everything}  # group (in scenario order) -> its record

    pair_gain, pair_seconds = None, 0.0
    if args.pairs:
        pair_gain = np.zeros((len(names), len(names)))
        for i, j in itertools.combinations(range(len(names)), 2):
            record = train_group(f"pair-{names[i]}-{names[j]}", [names[i], names[j]])
            trained[(names[i], names[j])] = record
            pair_seconds += record["seconds"]
            val = record["validation_accuracy"]
            pair_gain[i, j] = val[names[j]] - own_val[names[j]]
            pair_gain[j, i] = val[names[i]] - own_val[names[i]]
            echo(f"pair {names[i]}+{names[j]} ({record['seconds']:.0f} s): "
                 + ", ".join(f"{t} {a:.3f}" for t, a in record["test"].items()))

    def apply(matrix: np.ndarray, label: str) -> dict:
        groups, score = select_groups(matrix, args.groups)
        chosen = [[names[i] for i in g] for g in groups]
        echo(f"{label} groups: {chosen} (score {score:.4f})")
        for group in chosen:
            if len(group) > 1 and tuple(group) not in trained:
                trained[tuple(group)] = train_group(f"group-{'-'.join(group)}", group)
        per_task = {}
        for j, t in enumerate(names):  # the group the selection's own matrix expects to help t most
            _, group = max((group_score(matrix, g, j), [names[i] for i in g]) for g in groups if j in g)
            accuracy = trained[tuple(group)]["test"][t] if len(group) > 1 else individual[t]
            per_task[t] = {"group": group, "accuracy": accuracy}
        return {"groups": chosen, "score": score, "per_task": per_task,
                "mean": float(np.mean([v["accuracy"] for v in per_task.values()]))}

    selections = {"tag": apply(Z, "TAG")}
    if pair_gain is not None:
        selections["pairs"] = apply(pair_gain, "pair search")
    results = {"scenario": scenario.name, "tasks": names, "affinity": Z.tolist(),
               "pair_gain": None if pair_gain is None else pair_gain.tolist(),
               "individual": individual, "individual_validation": own_val, "together": together,
               "selections": selections, "groups_trained": {"+".join(g): r["test"] for g, r in trained.items()},
               "cost_seconds": {"own adapters": own_seconds, "tag run": everything["seconds"],
                                "tag measurements": everything["tag_seconds"], "pair search": pair_seconds},
               "steps": everything["steps"], "tag_every": args.tag_every, "max_groups": args.groups,
               "seconds": time.perf_counter() - started,
               "max_train": scenario.max_train, "max_eval": scenario.max_eval, "layers": args.layers,
               "max_length": args.max_length,
               "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores",
               "command": " ".join([Path(sys.argv[0]).name] + (sys.argv[1:] if args.argv is None else args.argv)),
               "settings": _settings(args)}
    (out / "affinity.json").write_text(json.dumps({"tasks": names, "affinity": Z.tolist()}, indent=2) + "\n")
    plot_affinity(Z, names, out / "affinity.png", "TAG lookahead affinity", "Z (i → j)")
    if pair_gain is not None:
        plot_affinity(pair_gain, names, out / "pair_gain.png", "Pair search: validation gain", "gain of j with i")
    from cmtl.benchmarks.results import write_results

    write_results(out, results, to_markdown(results))
    return results


def plot_affinity(Z: np.ndarray, names: list[str], path: Path, title: str, label: str) -> None:
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
    fig.colorbar(im, ax=ax, label=label)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def to_markdown(results: dict) -> str:
    names = results["tasks"]
    selections = results["selections"]

    def groups(label):
        return "; ".join("{" + ", ".join(g) + "}" for g in selections[label]["groups"])

    def matrix(title, Z):
        rows = [f"| {title} | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
        return rows + [f"| {n} | " + " | ".join(f"{z:+.4f}" for z in Z[i]) + " |" for i, n in enumerate(names)]

    lines = [f"`{results['scenario']}`, {results['max_train']} training examples per task, {results['steps']} joint "
             f"steps for all tasks, affinity every {results['tag_every']} steps, at most {results['max_groups']} "
             f"groups, backbone layers: {results['layers'] or 'all'}, at most {results['max_length']} tokens per text. "
             f"{results['machine']}, {results['date']}.",
             "", f"TAG groups: {groups('tag')}."]
    if "pairs" in selections:
        lines.append(f"Pair-search groups: {groups('pairs')}.")
    lines += [""] + matrix("Z (step on row i, onto column j)", results["affinity"])
    if results["pair_gain"] is not None:
        lines += [""] + matrix("pair gain (column j's validation gain with row i)", results["pair_gain"])
    header = ["task", "own adapter", "all tasks, one adapter", "TAG group"] + (["pair-search group"]
                                                                             if "pairs" in selections else [])
    lines += ["", "| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for n in names:
        cells = [n, f"{results['individual'][n]:.4f}", f"{results['together'][n]:.4f}"]
        cells += [f"{selections[k]['per_task'][n]['accuracy']:.4f} ({'+'.join(selections[k]['per_task'][n]['group'])})"
                  for k in ("tag", "pairs") if k in selections]
        lines.append("| " + " | ".join(cells) + " |")
    mean = lambda d: float(np.mean(list(d.values())))  # noqa: E731
    cells = ["**mean**", f"**{mean(results['individual']):.4f}**", f"**{mean(results['together']):.4f}**"]
    cells += [f"**{selections[k]['mean']:.4f}**" for k in ("tag", "pairs") if k in selections]
    lines.append("| " + " | ".join(cells) + " |")
    cost = results["cost_seconds"]
    lines += ["", f"Selection cost: TAG {cost['tag run']:.0f} s (the all-tasks joint run that measured Z, of which "
                  f"{cost['tag measurements']:.0f} s lookaheads)"
              + (f"; pair search {cost['pair search']:.0f} s ({cost['pair search'] / cost['tag run']:.1f}× TAG)"
                 if results["pair_gain"] is not None else "") + f". Own adapters: {cost['own adapters']:.0f} s."]
    return "\n".join(lines)


def main(argv: list[str] | None = None, echo=print) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scenario", default=str(Path(__file__).with_name("text5.yaml")))
    p.add_argument("--groups", type=int, default=2, help="at most this many groups")
    p.add_argument("--tag-every", type=int, default=5)
    p.add_argument("--pairs", action=argparse.BooleanOptionalAction, default=True,
                   help="also train every pair of tasks (the search TAG replaces) and group by its gains")
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
    from cmtl.benchmarks.results import check_same_run

    check_same_run(args.out, _settings(args))
    results = run(args, echo)
    echo(to_markdown(results))
    return results


if __name__ == "__main__":
    main()

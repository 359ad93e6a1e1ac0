"""Run strategies on a scenario and write what a person wants to read.

``run_benchmark`` trains each strategy through each requested order of a
scenario's stream (:func:`cmtl.benchmarks.learners.run_stream`) and writes, into one
folder: ``results.json`` (every accuracy matrix and metric), ``results.md``
(one summary table, then each matrix) and ``heatmap-<strategy>-<order>.png``.
"""

from __future__ import annotations

import dataclasses
import logging
import platform
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Sequence

import torch

from cmtl._version import __version__
from cmtl.benchmarks.learners import STRATEGIES, StrategyConfig, fresh_head, run_stream
from cmtl.benchmarks.metrics import ContinualReport, plot_heatmap
from cmtl.benchmarks.results import write_results
from cmtl.benchmarks.scenarios import Scenario
from cmtl.core.backbone import BackboneConfig, load_backbone
from cmtl.integrations import avalanche

logger = logging.getLogger(__name__)
AVALANCHE_STRATEGIES = tuple(f"avl-{name}" for name in avalanche.AVALANCHE_STRATEGIES)


def run_benchmark(
    scenario: Scenario,
    strategies: Sequence[str],
    out: str | Path,
    *,
    backbone: BackboneConfig | None = None,
    config: StrategyConfig | None = None,
    orders: Sequence[str] = ("stated",),
    device: str = "auto",
    echo: Callable[[str], None] = lambda _: None,
) -> dict:
    """Run ``strategies`` × ``orders`` of ``scenario``; write results into ``out``; return the JSON dict.

    Args:
        orders: Names from :meth:`Scenario.orders` (``"stated"``, ``"random-1"``, ...) or ``"all"``.
    """
    config = config or StrategyConfig()
    wanted = check_request(scenario, strategies, orders, config)
    available = dict(scenario.orders())
    backbone = backbone or BackboneConfig()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results = {
        "scenario": scenario.name,
        "kind": scenario.kind,
        "command_config": {"max_train": scenario.max_train, "max_eval": scenario.max_eval, "seed": scenario.seed,
                           "backbone": backbone.to_dict(), "adapter": config.adapter.to_dict(),
                           "training": config.training.to_dict(),
                           **{k: v for k, v in asdict(config).items() if k not in ("adapter", "training")}},
        "machine": _machine(),
        "date": time.strftime("%Y-%m-%d"),
        "cmtl_version": __version__,
        "runs": [],
    }
    for order in wanted:
        stream = available[order]
        experiences = stream.load()
        for strategy in strategies:
            echo(f"== {scenario.name} [{order}] {strategy}: " + " -> ".join(e.name for e in experiences))
            started = time.perf_counter()
            if strategy in AVALANCHE_STRATEGIES:
                report = run_avalanche_stream(strategy.removeprefix("avl-"), experiences, stream.kind, backbone,
                                              config, device=device, on_step=echo)
            else:
                report = run_stream(strategy, experiences, stream.kind, backbone, config, device=device,
                                    on_step=echo)
            seconds = time.perf_counter() - started
            png = plot_heatmap(report.R, report.task_names, out / f"heatmap-{strategy}-{order}.png")
            results["runs"].append({"strategy": strategy, "order": order, "seconds": seconds,
                                    "heatmap": png.name, **report.to_dict()})
            echo(f"   ACC {report.acc:.3f}  BWT {_fmt(report.bwt)}  FWT {_fmt(report.fwt)}  ({seconds:.0f} s)")
            transfer_vs_fresh(results["runs"], order, echo)
            _write(out, results)  # after every run: a long benchmark keeps what it measured
    return results


def check_request(scenario: Scenario, strategies: Sequence[str], orders: Sequence[str],
                  config: StrategyConfig | None = None) -> list[str]:
    """The orders :func:`run_benchmark` would run (``"all"`` expanded), after refusing what it refuses before
    training anything: unknown strategies or orders, Avalanche's strategies on a stream that is not
    task-incremental or with training knobs their loop never reads, ``init_scale`` without ``adapters-auto``
    (``cmtl bench --dry-run`` checks the same).

    Raises:
        ValueError: says which of these, and what is known.
    """
    unknown = [s for s in strategies if s not in STRATEGIES + AVALANCHE_STRATEGIES]
    if unknown:
        raise ValueError(f"Unknown strategies {unknown}. Known: {list(STRATEGIES + AVALANCHE_STRATEGIES)}.")
    check_avalanche_kind(scenario.kind, strategies, scenario.name)
    config = config or StrategyConfig()
    check_avalanche_budget(config, strategies)
    if config.init_scale != 1 and "adapters-auto" not in strategies:
        raise ValueError(f"init_scale={config.init_scale} applies to strategy adapters-auto only (the share of "
                         "the chosen source each start keeps); add adapters-auto or leave init_scale unset.")
    available = [name for name, _ in scenario.orders()]
    wanted = available if "all" in orders else list(orders)
    missing = [o for o in wanted if o not in available]
    if missing:
        raise ValueError(f"Unknown orders {missing} for scenario {scenario.name!r}. Available: {available}.")
    return wanted


def check_avalanche_budget(config: StrategyConfig, strategies: Sequence[str]) -> None:
    """Refuse training knobs that Avalanche's loop never reads when avl-* strategies run: it trains whole
    epochs and checks validation once per epoch, so a step cap, an evaluation cadence or a weight average
    would leave their rows under another budget than cmtl's strategies. (Its loop also has no warm-up,
    decay or gradient clipping, which are on by default in cmtl's; docs/results.md says so beside its rows.)"""
    avl = [s for s in strategies if s in AVALANCHE_STRATEGIES]
    unread = [k for k in ("max_steps", "eval_every", "ema_decay") if getattr(config.training, k) is not None]
    if avl and unread:
        raise ValueError(f"TrainConfig sets {', '.join(f'{k}={getattr(config.training, k)!r}' for k in unread)}, "
                         f"which Avalanche's loop never reads, so {avl} would train under another budget than "
                         "cmtl's strategies. Leave them unset (budget by epochs and patience), or run avl-* apart.")


def transfer_vs_fresh(runs: list[dict], order: str, echo: Callable[[str], None] = lambda _: None) -> None:
    """Forward transfer of ``adapters-auto`` against ``adapters`` in the same order, once both ran: the mean
    over tasks after the first of ``R[i][i]`` (auto) − ``R[i][i]`` (fresh), stored on the auto run as
    ``fwt_vs_fresh`` with the per-task differences. The standard FWT cannot show this transfer: a task's
    adapter does not exist before it is trained, so ``R[i-1][i]`` is the untrained head's score either way."""
    by = {r["strategy"]: r for r in runs if r["order"] == order}
    if "adapters" not in by or "adapters-auto" not in by or "fwt_vs_fresh" in by["adapters-auto"]:
        return
    fresh, auto = by["adapters"]["R"], by["adapters-auto"]["R"]
    gains = [auto[i][i] - fresh[i][i] for i in range(1, len(auto))]
    by["adapters-auto"]["fwt_vs_fresh"] = sum(gains) / len(gains) if gains else None
    by["adapters-auto"]["fwt_vs_fresh_per_task"] = gains
    echo(f"   adapters-auto against adapters [{order}]: forward transfer {_fmt(by['adapters-auto']['fwt_vs_fresh'])} "
         f"(per task after the first: {' '.join(f'{g:+.3f}' for g in gains)})")


def check_avalanche_kind(kind: str, strategies: Sequence[str], scenario: str | None = None) -> None:
    """Refuse Avalanche's strategies on a scenario that is not task-incremental, before anything runs.

    Raises:
        ValueError: names the strategies, the scenario's kind and what to run instead.
    """
    avl = [s for s in strategies if s in AVALANCHE_STRATEGIES]
    if avl and kind != "task-incremental":
        ours = [s for s in STRATEGIES if s not in ("single", "adapters-auto")]
        raise ValueError(
            f"{avl} cannot run on {'this stream' if scenario is None else f'scenario {scenario!r}'}: it is {kind}, "
            "and cmtl exports a stream to Avalanche as a "
            "task-incremental benchmark only (one task label and head per experience). Exported that way it "
            "would tell Avalanche's strategies the task identity its kind withholds, and their results would "
            f"not be comparable. Run cmtl's strategies on it ({', '.join(ours)}), or avl-* on a task-incremental "
            "scenario such as text5.")


def run_avalanche_stream(name: str, experiences: Sequence, kind: str, backbone_config: BackboneConfig | None = None,
                         config: StrategyConfig | None = None, *, device: str = "auto",
                         on_step: Callable[[str], None] | None = None) -> ContinualReport:
    """Run Avalanche's own strategy ``name`` on a loaded cmtl stream with the budget of a ``cmtl bench`` run.

    Args:
        name: ``"naive"``, ``"replay"``, ``"ewc"`` or ``"lwf"``.
        experiences: :class:`cmtl.benchmarks.scenarios.Experience` objects (task-incremental).
        backbone_config: :class:`cmtl.core.config.BackboneConfig` of the backbone to load.
        config: :class:`cmtl.benchmarks.learners.StrategyConfig`: epochs, batch size, learning rate, seed, replay
            budget, penalty weights and ``avalanche_reset_optimizer`` carry over.
        on_step: Receives one line per experience (its time and the accuracy on every task), as
            cmtl's strategies print them.
    """
    check_avalanche_kind(kind, [f"avl-{name}"])
    config = config or StrategyConfig()
    check_avalanche_budget(config, [f"avl-{name}"])
    backbone = load_backbone(backbone_config, device=device)
    stream = [(e.spec, e.train, e.test, None) for e in experiences]
    specs = avalanche.task_specs(stream)
    t = config.training
    model = avalanche.build_model(backbone, specs, config.adapter, head_dropout=t.head_dropout, seed=t.seed)
    with torch.no_grad():  # the heads cmtl's shared strategies start from: b is one row for every strategy
        for j, (head, spec) in enumerate(zip(model.heads, specs)):
            head.load_state_dict(fresh_head(backbone.hidden_size, spec.num_outputs, 0.0, t.seed, j).state_dict())
    # The same budget rule as cmtl's strategies: at most t.epochs, stopped by patience on validation, best kept.
    # cmtl keeps the best validated state without patience too: Avalanche then gets a patience it cannot reach.
    validation = [e.validation for e in experiences] if all(
        e.validation is not None and len(e.validation) for e in experiences) else None
    benchmark = avalanche.export_benchmark(stream, backbone, validation=validation)
    names = [e.name for e in experiences]

    def progress(i: int, row: tuple[float, ...], seconds: float) -> None:
        if on_step is not None:
            on_step(f"avl-{name}: after {names[i]} ({seconds:.0f} s): "
                    + " ".join(f"{n}={a:.3f}" for n, a in zip(names, row)))

    run = avalanche.run_strategy(name, benchmark, model, progress=progress, config=avalanche.AvalancheConfig(
        epochs=t.epochs, patience=(t.patience or t.epochs) if validation is not None else None, batch_size=t.batch_size,
        eval_batch_size=t.eval_batch_size, learning_rate=t.learning_rate, head_learning_rate=t.head_learning_rate,
        weight_decay=t.weight_decay, reset_optimizer_state=config.avalanche_reset_optimizer, seed=t.seed,
        device=str(backbone.device), mem_size=config.replay_budget, ewc_lambda=config.ewc_lambda,
        lwf_alpha=config.lwf_lambda, lwf_temperature=config.lwf_temperature))
    return run.report()


def summary_rows(results: dict) -> list[dict]:
    """One row per run: the table of the issue (ACC, BWT, FWT, forgetting, time, parameters, bytes)."""
    rows = []
    for run in results["runs"]:
        params = run.get("trainable_parameters_per_task") or []
        added = run.get("bytes_per_task") or []
        rows.append({
            "strategy": run["strategy"], "order": run["order"], "ACC": run["acc"], "BWT": run["bwt"],
            "FWT": run["fwt"], "forgetting": run["mean_forgetting"],
            # Results files written before it was recorded: computed from the matrix.
            "StreamForgetting": run["stream_forgetting"] if "stream_forgetting" in run else
            ContinualReport.from_matrix(run["R"], run["task_names"]).stream_forgetting,
            "time_s": sum(run.get("seconds_per_experience") or [run["seconds"]]),
            "params_per_exp": int(sum(params) / len(params)) if params else None,
            "bytes_added": sum(added) if added else None,
        })
    return rows


def to_markdown(results: dict) -> str:
    columns = ["strategy", "order", "ACC", "BWT", "FWT", "forgetting", "StreamForgetting", "time_s", "params_per_exp",
               "bytes_added"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in summary_rows(results):
        lines.append("| " + " | ".join(_fmt(row[c]) for c in columns) + " |")
    for run in results["runs"]:
        if run.get("fwt_vs_fresh") is not None:
            lines += ["", f"Forward transfer of adapters-auto against adapters ({run['order']}): "
                      f"{_fmt(run['fwt_vs_fresh'])}, the mean of R[i][i] (auto) − R[i][i] (fresh) over the tasks "
                      "after the first: " + " ".join(f"{g:+.3f}" for g in run["fwt_vs_fresh_per_task"]) + "."]
    for run in results["runs"]:
        report = ContinualReport.from_matrix(run["R"], run["task_names"], b=run["b"])
        report = dataclasses.replace(report, fwt=run["fwt"])  # None where the run found FWT meaningless
        lines += ["", f"### {run['strategy']} ({run['order']})", "", report.to_markdown(),
                  "", f"![{run['strategy']} {run['order']}]({run['heatmap']})"]
    return "\n".join(lines) + "\n"


def _write(out: Path, results: dict) -> None:
    """Both files atomically: a write that fails part-way keeps the runs saved before it."""
    write_results(out, results, f"# {results['scenario']} ({results['kind']})\n\n" + to_markdown(results).rstrip("\n"))


def _fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 100 else f"{v:.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def _machine() -> str:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.machine()} {platform.processor() or ''}, {torch.get_num_threads()} torch threads, {gpu}".strip()

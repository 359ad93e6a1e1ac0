"""The commands that run something rather than one registry verb: the HTTP server, the demo, a benchmark.

Registered on the app by :mod:`cmtl.cli.commands` (which keeps the order of ``cmtl --help``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from cmtl._extras import require
from cmtl.cli.common import RegistryArg, format_table


def serve(
    registry: RegistryArg,
    host: Annotated[str, typer.Option(help="Interface to listen on (loopback by default).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port to listen on (0: any free port).")] = 8000,
    max_texts: Annotated[int, typer.Option(help="Texts per request; more gets HTTP 413.")] = 256,
    max_chars: Annotated[int, typer.Option(help="Characters per text; longer gets HTTP 413.")] = 20_000,
    max_body_bytes: Annotated[int, typer.Option(help="Bytes per request body; more gets HTTP 413 before it is "
                                                     "read.")] = 16 * 1024 * 1024,
    max_batch_size: Annotated[int, typer.Option(help="Rows per batch, at most.")] = 64,
    max_batch_tokens: Annotated[int, typer.Option(help="Padded tokens per backbone forward, at most.")] = 4096,
    max_wait_ms: Annotated[float, typer.Option(help="Wait this long for more rows before running a batch.")] = 5.0,
    poll_seconds: Annotated[float, typer.Option(help="How often to check the registry for changes.")] = 1.0,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
) -> None:
    """Serve every task of a registry over HTTP (POST /v1/predict, /v1/predict/all; GET /v1/tasks, /healthz,
    /metrics, /docs); picks up new versions without a restart."""
    from cmtl.serving import ServeConfig
    from cmtl.serving import serve as run_server

    config = ServeConfig(max_texts=max_texts, max_chars=max_chars, max_body_bytes=max_body_bytes,
                         max_batch_size=max_batch_size,
                         max_batch_tokens=max_batch_tokens, max_wait_ms=max_wait_ms, poll_seconds=poll_seconds)
    run_server(registry, host=host, port=port, config=config, device=device)


def demo(
    out: Annotated[Path, typer.Option(help="Registry folder to create: new or empty, or one an earlier demo created "
                                           "(it is replaced).")] = Path("runs/demo"),
    max_train: Annotated[int, typer.Option(help="Training examples per task.")] = 2000,
    epochs: int = 2,
    layers: Annotated[Optional[int], typer.Option(help="Use only the first N backbone layers (faster).")] = None,
) -> None:
    """End-to-end demo on real data: two tasks on the embedded MiniLM, predictions and a results table."""
    from cmtl.cli.commands import _progress  # imports this module: here, not at the top
    from cmtl.cli.demo import run_demo

    result = run_demo(out, max_train=max_train, epochs=epochs, layers=layers, progress=_progress(True), echo=typer.echo)
    typer.echo("")
    typer.echo(format_table(result["table"], ["task", "labels", "train", "test", "accuracy", "macro_f1",
                                              "train_s", "params", "bytes"]))
    typer.echo("")
    for row in result["predictions"]:
        typer.echo(f"{row['task']:>6}: {row['prediction']:<5} <- {row['text']}")


def bench(
    scenario: Annotated[str, typer.Argument(help="A shipped scenario's name (text5, sentiment4, trec-classes, "
                                                 "bbc-classes) or a scenario file, e.g. my-stream.yaml.")],
    strategy: Annotated[str, typer.Option(help="Comma-separated strategies: adapters, adapters-auto, "
                                               "adapters-routed, seq-ft, replay, ewc, lwf, joint, single, analytic, "
                                               "grow, grow-analytic, avl-naive, avl-replay, avl-ewc, avl-lwf.")]
    = "adapters,seq-ft,replay,ewc,lwf,joint",
    out: Annotated[Optional[Path], typer.Option(help="Output folder (default runs/bench/<scenario>).")] = None,
    orders: Annotated[str, typer.Option(help="Comma-separated orders: stated, random-1, ..., or all.")] = "stated",
    max_train: Annotated[Optional[int], typer.Option(min=1, help="Override the scenario's training cap.")] = None,
    max_eval: Annotated[Optional[int], typer.Option(min=1, help="Override the scenario's validation/test cap.")]
    = None,
    epochs: Annotated[Optional[int], typer.Option(help="At most this many epochs per experience (default: "
                                                       "TrainConfig's, 10), for every strategy.")] = None,
    lr_schedule: Annotated[str, typer.Option(help="linear (decay to 0) or constant after the warm-up.")] = "linear",
    patience: Annotated[int, typer.Option(help="Stop after this many validation checks (one per epoch, or every "
                                               "250 steps when an epoch is longer) without improvement and keep "
                                               "the best; 0 never stops early.")] = 2,
    layers: Annotated[Optional[int], typer.Option(help="Use only the first N backbone layers.")] = None,
    backbone: Annotated[Optional[str], typer.Option(
        help="Local folder of an encoder or a decoder, or a .gguf file (default: embedded all-MiniLM-L6-v2).")]
    = None,
    dtype: Annotated[str, typer.Option(help="Precision of the frozen backbone: float32, bfloat16, float16 or auto "
                                            "(the checkpoint's own).")] = "float32",
    adapter_layers: Annotated[Optional[str], typer.Option(
        help="Comma-separated indices of the layers every adapter adapts (default all), e.g. 26,27,28,29: the "
             "layers below run once per text and are cached.")] = None,
    replay_budget: Annotated[int, typer.Option(help="Rows the replay buffer of replay and avl-replay keeps, over "
                                               "all experiences (grow replays from its task's own buffer: "
                                               "1,000 rows).")] = 500,
    avl_reset_optimizer: Annotated[bool, typer.Option(
        "--avl-reset-optimizer", help="avl-* strategies: start every experience with fresh AdamW state, as "
                                      "cmtl's strategies do (Avalanche's default carries it over).")] = False,
    init_scale: Annotated[float, typer.Option(
        help="adapters-auto: the share of the chosen source's change B·A each start keeps, in (0, 1] (1: a "
             "full copy).")] = 1.0,
    seed: int = 0,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Load the scenario's data, print each experience's "
                                                            "rows and what would run; train nothing.")] = False,
) -> None:
    """Run continual-learning strategies on a scenario; write results.json, results.md and heatmaps."""
    from cmtl import AdapterConfig, BackboneConfig, TrainConfig
    from cmtl.benchmarks.learners import StrategyConfig
    from cmtl.benchmarks.runner import check_request, run_benchmark, summary_rows
    from cmtl.benchmarks.scenarios import Scenario
    from cmtl.continual.analytic import AnalyticConfig
    from cmtl.core.config import DEFAULT_BACKBONE
    from cmtl.errors import InvalidParameterError
    from cmtl.training.transfer import check_scale

    try:
        check_scale(init_scale, "auto", owner="cmtl bench")
    except InvalidParameterError as error:
        raise typer.BadParameter(str(error), param_hint="--init-scale") from None
    try:
        sc = Scenario.from_yaml(scenario)
    except FileNotFoundError as error:
        raise typer.BadParameter(str(error), param_hint="SCENARIO") from None
    if max_train or max_eval:
        sc = sc.shrink(max_train or sc.max_train, max_eval or sc.max_eval)
    strategies = [s.strip() for s in strategy.split(",") if s.strip()]
    training = TrainConfig(**({} if epochs is None else {"epochs": epochs}), lr_schedule=lr_schedule,
                           patience=patience or None, seed=seed, progress=False)
    try:
        adapted = None if adapter_layers is None else [int(x) for x in adapter_layers.split(",") if x.strip()]
    except ValueError:
        raise typer.BadParameter(f"{adapter_layers!r} is not a comma-separated list of layer indices.",
                                 param_hint="--adapter-layers") from None
    adapter = AdapterConfig(layers=adapted)
    config = StrategyConfig(adapter=adapter, training=training, replay_budget=replay_budget,
                            analytic=AnalyticConfig(seed=seed), avalanche_reset_optimizer=avl_reset_optimizer,
                            init_scale=init_scale)
    wanted = [o.strip() for o in orders.split(",")]
    check_request(sc, strategies, wanted, config)  # what the run would refuse, the dry run refuses too
    if not dry_run:  # before hours of training, not after
        require("matplotlib", purpose="cmtl bench (its heat maps)")
        if any(s.startswith("avl-") for s in strategies):
            require("avalanche", "torchvision", purpose=f"cmtl bench --strategy {strategy}")
    if dry_run:
        typer.echo(f"{sc.name} ({sc.kind}): {len(sc.experiences)} experiences, at most {sc.max_train} training and "
                   f"{sc.max_eval} validation/test examples each")
        rows = [{"experience": e.name, "task": e.spec.name, "labels": len(e.spec.labels or ()), "train": len(e.train),
                 "validation": len(e.validation), "test": len(e.test)} for e in sc.load()]
        typer.echo(format_table(rows, ["experience", "task", "labels", "train", "validation", "test"]))
        typer.echo(f"would run {', '.join(strategies)} on orders {orders} into {out or Path('runs/bench') / sc.name}")
        return
    out = out or Path("runs/bench") / sc.name
    results = run_benchmark(sc, strategies, out,
                            backbone=BackboneConfig(name_or_path=backbone or DEFAULT_BACKBONE, num_hidden_layers=layers,
                                                    dtype=dtype), config=config,
                            orders=wanted, device=device, echo=typer.echo)
    typer.echo("")
    typer.echo(format_table(summary_rows(results), ["strategy", "order", "ACC", "BWT", "FWT", "forgetting",
                                                    "StreamForgetting", "time_s", "params_per_exp", "bytes_added"]))
    typer.echo(f"\nwrote {out}/results.json, results.md and heatmaps")

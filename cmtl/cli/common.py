"""What the CLI's commands share: argument types and the table printer."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from cmtl.core.tasks import PRIMARY_METRIC  # torch-free, like the manifest commands

RegistryArg = Annotated[Path, typer.Argument(help="Registry folder.")]
TaskArg = Annotated[str, typer.Argument(help="Task name.")]
EncodingOpt = Annotated[Optional[str], typer.Option(
    help="Text encoding of the data files, e.g. latin-1 or cp1252 (default: UTF-8).")]


def format_table(rows: list[dict], columns: list[str]) -> str:
    """Plain-text table with a header and aligned columns."""

    def cell(v) -> str:
        if isinstance(v, float):
            return f"{v:.4f}"
        return "" if v is None else str(v)

    cells = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    line = lambda vals: "  ".join(v.ljust(w) for v, w in zip(vals, widths)).rstrip()  # noqa: E731
    return "\n".join([line(columns), line(["-" * w for w in widths])] + [line(r) for r in cells])


def _source(init: dict) -> str:
    """The start's source, and the share of its change it kept when not all (``init_scale``)."""
    from cmtl.registry.reader import scale_note  # torch-free, like the manifest commands

    source = f"merge {init['merge']!r}" if "merge" in init else f"task {init['task']!r} v{init['version']}"
    return source + scale_note(init)


def _versus(scores: dict) -> str:
    """``accuracy 0.8100 against the fresh adapter's 0.7900`` from an ``init`` record's ``validation``."""
    return f"{scores['metric']} {scores['source']:.4f} against the fresh adapter's {scores['fresh']:.4f}"


def training_story(info) -> list[str]:
    """Where a newly trained version's adapter started and which state training kept (a trained one, or
    the step-0 linear probe, which leaves the adapter as it started), from its record (a ``VersionInfo``)."""
    init, training = info.init, info.training
    if init is None:
        lines = ["start: a fresh adapter"]
    elif "peft" in init:
        lines = [f"start: the PEFT adapter in {init['peft']}"]
    elif init.get("chosen") != "auto":
        lines = [f"start: {_source(init)}"]
    elif "task" in init or "merge" in init:
        from cmtl.registry.reader import source_label  # torch-free, like the manifest commands

        gain = ((init.get("trial") or {}).get("gain_z") or {}).get(source_label(init))
        ahead = "" if gain is None else f", {gain:.1f} standard errors ahead of a fresh start"
        lines = [f"start: {_source(init)}, chosen by a short trial (init='auto'{ahead})"]
        if "validation" in init:  # records since auto trains a fresh adapter first: it kept its probe
            lines.append("why: a fresh adapter could not beat the step-0 probe; from this source the task scored "
                         + _versus(init["validation"]) + " on validation")
    else:
        rejected = init.get("rejected")
        if init.get("fresh") == "beat the probe":
            why = "it beat the step-0 probe, so no earlier adapter was tried"
        elif init.get("fresh") == "kept a perfect probe":
            why = "it kept a step-0 probe that scores perfectly on validation, which no start can beat"
        elif "error" in init:
            why = f"it kept the step-0 probe; trying earlier adapters failed: {init['error']}"
        elif rejected:
            error = rejected.get("error", "")
            scored = ("ran out of memory" if error.startswith("OutOfMemoryError") else "diverged" if error else
                      "scored " + _versus(init["validation"]) + " on validation")
            why = f"it kept the step-0 probe; the start from {rejected['source']} {scored}"
        elif "trial" in init:
            why = "no earlier adapter beat a fresh start in the trial"
        elif (losses := {k: v for k, v in (init.get("probe_losses") or {}).items() if k != "backbone"}) and all(
                v is None for v in losses.values()):
            why = "it kept the step-0 probe; no earlier adapter could be probed (their features were not finite)"
        else:
            why = init.get("note") or "no earlier adapter to try"
        lines = [f"start: a fresh adapter (init='auto': {why})"]
    steps, best, gain = training.get("steps"), training.get("best_step"), training.get("probe_gain")
    if info.head is not None or not steps or best is None:  # an analytic head is computed, not trained
        return lines
    probe = _primary(training.get("probe_metrics"))
    if best == 0 and training.get("probe_init"):
        margin = training.get("probe_margin") or 0.0
        why = (f"the best trained state was {gain:.1f} standard errors ahead on validation, not more than "
               f"probe_margin {margin:g}" if gain is not None and 0 < gain <= margin else
               "no trained state scored higher on validation")
        score = "" if probe is None else f", validation {probe[0]} {probe[1]:.4f}"
        lines.append(f"kept: the step-0 linear probe{score} ({why}); the adapter keeps its starting weights")
    else:
        early = ", stopped early" if training.get("stopped_early") else ""
        versus = "" if gain is None else f"; {gain:+.1f} standard errors against the step-0 probe on validation"
        state = (f"the running average of the trained states (ema_decay {training.get('ema_decay')}) at step"
                 if training.get("best_averaged") else "the trained state of step")
        lines.append(f"kept: {state} {best} of {steps}{early}{versus}")
        kept = _primary(info.metrics)
        if probe is not None and kept is not None and kept[0] == probe[0]:
            lines.append(f"against the probe: validation {kept[0]} {kept[1]:.4f}, the probe's {probe[1]:.4f}"
                         + _errors_removed(kept, probe))
    return lines


def _primary(metrics: dict | None) -> tuple[str, float, bool] | None:
    """(name, value, higher is better) of the primary validation metric in a recorded ``metrics`` dict."""
    for name, higher in PRIMARY_METRIC.values():
        value = (metrics or {}).get(f"validation_{name}")
        if isinstance(value, (int, float)):
            return name, float(value), higher
    return None


def _errors_removed(kept: tuple[str, float, bool], probe: tuple[str, float, bool]) -> str:
    """' (N % of its errors removed)' for accuracy (error = 1 − accuracy), else '' (1 − F1 counts no errors)."""
    if kept[0] != "accuracy" or probe[1] >= 1.0:
        return ""
    return f" ({100 * (kept[1] - probe[1]) / (1 - probe[1]):.0f} % of its errors removed)"

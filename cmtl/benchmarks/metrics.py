"""Continual-learning metrics: pure functions on an accuracy matrix.

``R[i][j]`` is the test accuracy on task ``j`` after training through task ``i`` (T×T,
0-indexed here); ``b[j]`` the accuracy on task ``j`` before any training on it. BWT, FWT and
forgetting need T ≥ 2 and raise ``ValueError`` below that (a number for a one-task stream
would be a made-up zero); :class:`ContinualReport` stores ``None`` for them instead.

The ``avalanche_*`` variants reproduce Avalanche 0.6's ``forgetting_metrics`` / ``bwt_metrics``
(``avalanche/evaluation/metrics/forgetting_bwt.py``). Per experience, forgetting = its *first*
accuracy (recorded by an eval while it was the latest training experience) − its *last* one;
BWT = −forgetting. The stream value is the plain mean over the experiences that have both in
the current eval: after training experience ``i`` and evaluating the whole stream, the
experiences ``j < i``. The one just trained (its value is a "first" this round) and unseen
ones (no "first") are left out; an experience never evaluated right after its own training is
left out for good. With nothing to average Avalanche reports 0.0, and so do these functions.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import numpy as np

from cmtl._extras import require
from cmtl._io import write_bytes_atomic


def accuracy_matrix(R: Any) -> np.ndarray:
    """Validate ``R`` and return it as a float64 (T, T) array (a copy).

    Raises:
        ValueError: ``R`` is not square, is empty, or holds NaN / infinite values.
    """
    try:
        arr = np.array(R, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"The accuracy matrix must be a T×T table of numbers. Got {R!r}: {exc}.") from None
    if arr.ndim != 2 or arr.shape[0] != arr.shape[1] or arr.shape[0] < 1:
        raise ValueError(
            f"The accuracy matrix must be square T×T with T >= 1 (row i = after training task i). "
            f"Got shape {arr.shape}."
        )
    bad = np.argwhere(~np.isfinite(arr))
    if len(bad):
        i, j = (int(v) for v in bad[0])
        raise ValueError(f"The accuracy matrix must hold finite values. R[{i}][{j}] is {arr[i, j]}.")
    return arr


def _at_least_two(arr: np.ndarray, what: str) -> int:
    T = arr.shape[0]
    if T < 2:
        raise ValueError(f"{what} needs at least 2 tasks; the accuracy matrix is {T}×{T}.")
    return T


def acc(R: Any) -> float:
    """Average accuracy after the last task: ``(1/T) Σ_j R[T−1][j]``."""
    return float(accuracy_matrix(R)[-1].mean())


def bwt(R: Any) -> float:
    """Backward transfer: ``(1/(T−1)) Σ_{j<T−1} (R[T−1][j] − R[j][j])``.

    Lopez-Paz & Ranzato, 2017, "Gradient Episodic Memory for Continual Learning". Negative
    values mean forgetting.
    """
    arr = accuracy_matrix(R)
    T = _at_least_two(arr, "BWT")
    return float(np.mean([arr[T - 1, j] - arr[j, j] for j in range(T - 1)]))


def fwt(R: Any, b: Sequence[float]) -> float:
    """Forward transfer: ``(1/(T−1)) Σ_{j≥1} (R[j−1][j] − b[j])`` (Lopez-Paz & Ranzato, 2017).

    Args:
        R: The (T, T) accuracy matrix.
        b: Accuracy on each task before any training on it, length T (``b[0]`` is unused).
    """
    arr = accuracy_matrix(R)
    T = _at_least_two(arr, "FWT")
    base = _per_task(b, T, "b")
    return float(np.mean([arr[j - 1, j] - base[j] for j in range(1, T)]))


class Forgetting(NamedTuple):
    """Forgetting of each task but the last (T−1 values) and their mean."""

    per_task: tuple[float, ...]
    mean: float


def forgetting(R: Any) -> Forgetting:
    """Forgetting of task j < T−1: ``max_{i<T−1} R[i][j] − R[T−1][j]``; and the mean over j.

    Chaudhry et al., 2018, "Riemannian Walk for Incremental Learning". As in the paper the max
    runs over every row before the last, rows recorded before task j was trained included.
    """
    arr = accuracy_matrix(R)
    T = _at_least_two(arr, "Forgetting")
    per = tuple(float(arr[: T - 1, j].max() - arr[T - 1, j]) for j in range(T - 1))
    return Forgetting(per, float(np.mean(per)))


class AvalancheValues(NamedTuple):
    """Avalanche-style values after training row ``after``: per experience id, and the stream mean."""

    per_experience: dict[int, float]
    stream: float


def _after(arr: np.ndarray, after: int | None) -> int:
    T = arr.shape[0]
    if after is None:
        return T - 1
    if not isinstance(after, (int, np.integer)) or not 0 <= after < T:
        raise ValueError(f"after must be a row index in 0..{T - 1}. Got {after!r}.")
    return int(after)


def avalanche_forgetting(R: Any, after: int | None = None) -> AvalancheValues:
    """Forgetting as Avalanche 0.6 ``forgetting_metrics`` logs it once training row ``after`` is done.

    Per experience j < after: ``R[j][j] − R[after][j]`` (first value, recorded right after training
    on j, minus the last). Stream: their plain mean, 0.0 when ``after`` is 0. See
    https://avalanche-api.continualai.org (``StreamForgetting``, ``ExperienceForgetting``).

    Args:
        R: The (T, T) accuracy matrix, one row per evaluation after a training experience.
        after: The last trained row; default the last row.
    """
    arr = accuracy_matrix(R)
    i = _after(arr, after)
    per = {j: float(arr[j, j] - arr[i, j]) for j in range(i)}
    return AvalancheValues(per, float(np.mean(list(per.values()))) if per else 0.0)


def avalanche_bwt(R: Any, after: int | None = None) -> AvalancheValues:
    """BWT as Avalanche 0.6 ``bwt_metrics`` logs it: the negated :func:`avalanche_forgetting`.

    After the last row this equals :func:`bwt` (Lopez-Paz & Ranzato's BWT).
    """
    f = avalanche_forgetting(R, after)
    return AvalancheValues({j: -v for j, v in f.per_experience.items()}, -f.stream if f.per_experience else 0.0)


def _per_task(values: Sequence[float], T: int, name: str, kind: type = float) -> tuple:
    """One finite number per task, as a tuple of ``kind``."""
    try:
        out = tuple(kind(v) for v in values)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be a list of T = {T} numbers. Got {values!r}: {exc}.") from None
    if len(out) != T:
        raise ValueError(f"{name} must hold one value per task, T = {T}. Got {len(out)} values.")
    if not all(math.isfinite(v) for v in out):
        raise ValueError(f"{name} must hold finite values. Got {list(out)}.")
    return out


def _names(names: Sequence[str], T: int, what: str) -> tuple[str, ...]:
    out = tuple(str(n) for n in names)
    if len(out) != T:
        raise ValueError(f"{what} must name each of the T = {T} tasks. Got {list(out)}.")
    return out


@dataclass(frozen=True, kw_only=True)
class ContinualReport:
    """Everything measured over one continual stream, ready for JSON or a Markdown table.

    Build it with :meth:`from_matrix`. Metrics that need two tasks (or ``b``) are ``None``
    when they cannot be computed. Two forgetting measures, named apart: ``mean_forgetting`` is
    Chaudhry et al.'s (:func:`forgetting`: the best earlier accuracy on a task minus the last), and
    ``stream_forgetting`` is what Avalanche logs as ``StreamForgetting`` (:func:`avalanche_forgetting`:
    the accuracy right after training on a task minus the last; Avalanche's ``StreamBWT`` is its
    negation). On the same run they differ whenever a task scored better later than right after its
    own training.
    """

    task_names: tuple[str, ...]
    R: tuple[tuple[float, ...], ...]
    acc: float
    b: tuple[float, ...] | None = None
    bwt: float | None = None
    fwt: float | None = None
    forgetting: tuple[float, ...] | None = None
    mean_forgetting: float | None = None
    stream_forgetting: float | None = None
    seconds_per_experience: tuple[float, ...] | None = None
    trainable_parameters_per_task: tuple[int, ...] | None = None
    bytes_per_task: tuple[int, ...] | None = None

    @classmethod
    def from_matrix(
        cls,
        R: Any,
        task_names: Sequence[str],
        *,
        b: Sequence[float] | None = None,
        seconds_per_experience: Sequence[float] | None = None,
        trainable_parameters_per_task: Sequence[int] | None = None,
        bytes_per_task: Sequence[int] | None = None,
    ) -> "ContinualReport":
        """Compute ACC, BWT, FWT (if ``b`` is given) and forgetting from ``R``."""
        arr = accuracy_matrix(R)
        T = arr.shape[0]
        f = forgetting(arr) if T >= 2 else None
        extras = {
            key: None if value is None else _per_task(value, T, key, kind)
            for key, value, kind in (
                ("seconds_per_experience", seconds_per_experience, float),
                ("trainable_parameters_per_task", trainable_parameters_per_task, int),
                ("bytes_per_task", bytes_per_task, int),
            )
        }
        return cls(
            task_names=_names(task_names, T, "task_names"),
            R=tuple(tuple(float(v) for v in row) for row in arr),
            b=None if b is None else _per_task(b, T, "b"),
            acc=acc(arr),
            bwt=bwt(arr) if T >= 2 else None,
            fwt=fwt(arr, b) if T >= 2 and b is not None else None,
            forgetting=f.per_task if f else None,
            mean_forgetting=f.mean if f else None,
            stream_forgetting=avalanche_forgetting(arr).stream if T >= 2 else None,
            **extras,
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain lists, floats, ints and ``None``: ``json.dumps`` takes it as is."""
        out: dict[str, Any] = {}
        for key, value in self.__dict__.items():
            if isinstance(value, tuple):
                value = [list(v) if isinstance(v, tuple) else v for v in value]
            out[key] = value
        return out

    def to_markdown(self, digits: int = 3) -> str:
        """The accuracy matrix as a table, then one line per summary metric."""
        fmt = lambda v: "–" if v is None else f"{v:.{digits}f}"  # noqa: E731
        lines = ["| after \\ on | " + " | ".join(self.task_names) + " |", "|---" * (len(self.task_names) + 1) + "|"]
        for name, row in zip(self.task_names, self.R):
            lines.append(f"| {name} | " + " | ".join(fmt(v) for v in row) + " |")
        if self.b is not None:
            lines.append("| before training (b) | " + " | ".join(fmt(v) for v in self.b) + " |")
        lines += ["", f"ACC {fmt(self.acc)} · BWT {fmt(self.bwt)} · FWT {fmt(self.fwt)} · "
                  f"forgetting {fmt(self.mean_forgetting)} (Chaudhry; Avalanche's StreamForgetting "
                  f"{fmt(self.stream_forgetting)})"]
        extras = {"seconds": self.seconds_per_experience, "trainable parameters": self.trainable_parameters_per_task,
                  "bytes added": self.bytes_per_task}
        for label, values in extras.items():
            if values is not None:
                lines.append(f"{label} per task: " + ", ".join(f"{n}={v:g}" for n, v in zip(self.task_names, values)))
        return "\n".join(lines)


def plot_heatmap(R: Any, names: Sequence[str], path: str | Path) -> Path:
    """Write the accuracy matrix as an annotated heat map PNG (matplotlib Agg, no pyplot state)."""
    require("matplotlib", purpose="Heat maps of accuracy matrices")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    arr = accuracy_matrix(R)
    T = arr.shape[0]
    names = _names(names, T, "names")
    fig = Figure(figsize=(1.2 + 0.9 * T, 1.0 + 0.8 * T))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(arr, vmin=min(0.0, float(arr.min())), vmax=max(1.0, float(arr.max())), cmap="viridis")
    ax.set_xticks(range(T), names, rotation=45, ha="right")
    ax.set_yticks(range(T), names)
    ax.set_xlabel("evaluated on")
    ax.set_ylabel("after training")
    low, high = image.get_clim()
    for i in range(T):
        for j in range(T):
            dark = (arr[i, j] - low) / (high - low) < 0.6  # viridis is dark below ~60 %
            ax.text(j, i, f"{arr[i, j]:.2f}", ha="center", va="center", color="white" if dark else "black")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    write_bytes_atomic(Path(path), buffer.getvalue())
    return Path(path)

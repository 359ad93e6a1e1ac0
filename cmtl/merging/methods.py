"""Task-arithmetic merging of LoRA adapters, on their exact low-rank deltas.

For every adapted linear layer, each adapter contributes ΔW = (alpha / r) · B · A.
Methods combine these dense deltas (not A and B separately, which only
approximates the sum and needs equal ranks):

* ``linear`` — task arithmetic: λ · Σ_t ΔW_t (Ilharco et al. 2023);
* ``ties`` — trim each ΔW_t to its top-``density`` fraction by magnitude, elect
  a sign per entry by total mass, average the agreeing non-zero entries, scale by λ
  (Yadav et al. 2023);
* ``dare`` / ``dare_ties`` — drop each entry with probability ``drop`` and
  rescale by 1 / (1 − drop), then ``linear`` / ``ties`` (Yu et al. 2024).

The merged delta goes back into LoRA form by truncated SVD
(:func:`refactorise`), with its relative reconstruction error; by default at the smallest rank
whose error stays within ``MergeConfig.rank_tolerance`` in every module. Optionally each task's
head is then refitted to the merged features on the task's replay buffer
(:func:`refit_head`): the merged adapter is shared, the heads stay per task. ``peft_*`` methods
run peft's ``add_weighted_adapter`` instead (see :meth:`cmtl.Registry.merge`), as the
baseline these are measured against.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal, Sequence

import torch

from cmtl._config import check_seed, plain_numbers, refuse_unread, set_fields
from cmtl.core.adapters import lora_factors, lora_state
from cmtl.errors import InvalidParameterError, bad_param
from cmtl.training.probe import refit_head  # noqa: F401  (re-exported: cmtl.merging.refit_head)

Method = Literal["linear", "ties", "dare", "dare_ties", "peft_linear", "peft_ties", "peft_dare_ties", "peft_ties_svd"]
METHODS: tuple[str, ...] = ("linear", "ties", "dare", "dare_ties")
# peft's LoraModel.add_weighted_adapter, for comparison: it merges A and B separately (non-SVD types) or takes
# an SVD of the weighted sum at the adapters' rank (``*_svd``).
PEFT_METHODS: tuple[str, ...] = ("peft_linear", "peft_ties", "peft_dare_ties", "peft_ties_svd")
READS: dict[str, tuple[str, ...]] = {  # knob -> the methods that read it (the rest would ignore it)
    "density": ("ties", "dare_ties", "peft_ties", "peft_ties_svd"),
    "drop": ("dare", "dare_ties", "peft_dare_ties"),
}


#: Default bound of ``MergeConfig(rank="auto")``: relative reconstruction error per module.
RANK_TOLERANCE = 1e-3


def parse_rank(text: str) -> int | str | None:
    """A command line's ``--rank`` (``auto``, ``exact`` or a number) as :class:`MergeConfig` takes it."""
    if text == "auto":
        return "auto"
    if text == "exact":
        return None
    if not text.isdigit():
        raise ValueError(f"--rank {text!r}: write auto, exact or a positive number, e.g. --rank 16.")
    return int(text)


@dataclass(kw_only=True, frozen=True)
class MergeConfig:
    """Knobs of a merge.

    Args:
        method: One of the 8 in :data:`METHODS` + :data:`PEFT_METHODS`: cmtl's ``"linear"``,
            ``"ties"``, ``"dare"`` or ``"dare_ties"`` on the exact deltas, or the peft baselines
            ``"peft_linear"``, ``"peft_ties"``, ``"peft_dare_ties"`` or ``"peft_ties_svd"``
            (peft's ``add_weighted_adapter`` with that combination type).
        scale: λ, multiplies the combined delta. ``None``: 1 / (number of adapters) for
            ``linear``, ``dare`` and ``peft_linear`` (their mean), 1 for the TIES variants. ``0`` is
            no delta at all: the frozen backbone (what a search returns when no merge beats it).
        density: TIES (``ties``, ``dare_ties``, ``peft_ties``, ``peft_ties_svd``): fraction of
            entries of each delta kept (top-k by magnitude).
        drop: DARE (``dare``, ``dare_ties``, ``peft_dare_ties``): probability of dropping each
            entry (peft is given density = 1 - drop).
        rank: Rank of the stored LoRA adapter. ``"auto"``: the smallest rank whose relative
            reconstruction error ‖ΔW − BA‖ / ‖ΔW‖ is at most ``rank_tolerance`` in every module
            (a task-arithmetic merge of n rank-r adapters needs at most n · r; TIES and DARE deltas
            are sparse and need more); ``None`` keeps the merged delta exactly (full rank of each
            layer); an integer truncates to that rank, and the search then scores the truncated
            candidates.
        rank_tolerance: The error bound of ``rank="auto"``.
        seed: Seeds DARE's drops (peft's too).
        refit_heads: After merging, retrain each task's head (only the head, warm-started
            from the member's) on the task's replay buffer through the merged adapter.
            The merged features differ from those each head was trained on; refitting a
            linear head costs one forward pass over the buffer.
        selection_fraction: With ``search``, the share of each member's held-out sample that chooses
            the knobs (copies of one text kept on one side); the scores recorded are those on the rest,
            which the choice never saw.
        halving: With ``search``, score the candidates by successive halving (all on a small share of
            the rows, the best third on three times as many, ..., the last one on all rows) instead of
            every candidate on every row: about a quarter of the search's cost for the TIES grid.
        require_gain: Refuse the merge (:class:`~cmtl.errors.MergeRefusedError`, nothing written) unless
            it scores above the frozen backbone on average and not below it on any member task
            (reported rows; the backbone's heads refitted as the merge's are). Every member needs held-out rows.
        cache_frozen_mb: When the adapters leave the bottom layers untouched, run those layers once per
            row (up to this many MiB of hidden states; 0: never) instead of once per candidate.
        progress: Show a progress bar (candidates scored, best score so far).
    """

    method: Method = "ties"
    scale: float | None = None
    density: float = 0.2
    drop: float = 0.9
    rank: int | Literal["auto"] | None = "auto"
    rank_tolerance: float = RANK_TOLERANCE
    seed: int = 0
    refit_heads: bool = False
    selection_fraction: float = 0.5
    halving: bool = True
    require_gain: bool = False
    cache_frozen_mb: int = 2048
    progress: bool = True

    def __post_init__(self) -> None:
        plain_numbers(self)
        if self.method not in METHODS + PEFT_METHODS:
            raise InvalidParameterError(bad_param("method", "MergeConfig", f"be one of {list(METHODS + PEFT_METHODS)}",
                                                  self.method))
        check_seed(self.seed, "MergeConfig")
        if self.scale is not None and not 0 <= self.scale <= 10:
            raise InvalidParameterError(bad_param("scale", "MergeConfig", "be in [0, 10] or None", self.scale))
        if not 0 < self.selection_fraction < 1:
            raise InvalidParameterError(bad_param("selection_fraction", "MergeConfig", "be in (0, 1)",
                                                  self.selection_fraction))
        if not 0 < self.density <= 1:
            raise InvalidParameterError(bad_param("density", "MergeConfig", "be in (0, 1]", self.density))
        if not 0 <= self.drop < 1:
            raise InvalidParameterError(bad_param("drop", "MergeConfig", "be in [0, 1)", self.drop))
        if self.rank not in (None, "auto") and (isinstance(self.rank, bool) or not isinstance(self.rank, int)
                                                 or self.rank < 1):
            raise InvalidParameterError(bad_param("rank", "MergeConfig", "be a positive integer, 'auto' or None",
                                                  self.rank))
        if not 0 < self.rank_tolerance < 1:
            raise InvalidParameterError(bad_param("rank_tolerance", "MergeConfig", "be in (0, 1)",
                                                  self.rank_tolerance))
        refuse_unread(self, "method", READS)

    def refuse_searched(self) -> None:
        """Refuse knobs set away from their defaults that a search (``Registry.merge(search=True)``) chooses
        itself: the grid would overwrite them, silently."""
        chosen = ["scale"] + [k for k, users in READS.items() if self.method in users]
        kept = set_fields(self, chosen)
        if kept:
            raise ValueError(f"{kept} set, but search=True chooses {chosen} for method={self.method!r} itself and "
                             "would overwrite them. Leave them out to let the search choose, or merge with your "
                             "values and search=False (CLI: without --search).")

    def resolved_scale(self, n: int) -> float:
        if self.scale is not None:
            return self.scale
        return 1.0 / n if self.method in ("linear", "dare", "peft_linear") else 1.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def lora_deltas(state: dict[str, torch.Tensor], scaling: float) -> dict[str, torch.Tensor]:
    """ΔW = scaling · B · A for every module of a LoRA state dict (keys ``<module>.lora_A/B.weight``).

    Raises:
        DataError: (a ValueError) a key that is not a LoRA factor, or a module without both factors.
    """
    return {m: scaling * (b.double() @ a.double()) for m, (a, b) in lora_factors(state).items()}


def dare(delta: torch.Tensor, drop: float, generator: torch.Generator) -> torch.Tensor:
    """Drop entries with probability ``drop``, rescale the rest by 1 / (1 − drop): unbiased."""
    if drop == 0:
        return delta
    keep = torch.rand(delta.shape, generator=generator, dtype=torch.float64) >= drop
    return delta * keep / (1.0 - drop)


def trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``density`` fraction of entries largest in magnitude (at least one), zero the rest."""
    k = max(1, round(density * delta.numel()))
    if k >= delta.numel():
        return delta
    threshold = delta.abs().flatten().kthvalue(delta.numel() - k + 1).values
    return torch.where(delta.abs() >= threshold, delta, torch.zeros_like(delta))


def ties(deltas: Sequence[torch.Tensor], density: float) -> torch.Tensor:
    """Trim, elect sign by total mass, disjoint mean of the agreeing non-zero entries."""
    trimmed = torch.stack([trim(d, density) for d in deltas])  # (T, out, in)
    sign = torch.sign(trimmed.sum(0))
    agree = (torch.sign(trimmed) == sign) & (trimmed != 0)
    count = agree.sum(0)
    total = (trimmed * agree).sum(0)
    return torch.where(count > 0, total / count.clamp_min(1), torch.zeros_like(total))


def merge_deltas(per_adapter: Sequence[dict[str, torch.Tensor]], config: MergeConfig) -> dict[str, torch.Tensor]:
    """Combine per-module deltas of several adapters with ``config.method``.

    Raises:
        ValueError: fewer than two adapters, or adapters on different modules or shapes.
    """
    if len(per_adapter) < 2:
        raise ValueError(f"A merge needs at least two adapters; got {len(per_adapter)}.")
    modules = set(per_adapter[0])
    for i, d in enumerate(per_adapter[1:], 1):
        if set(d) != modules:
            diff = sorted(modules ^ set(d))[:3]
            raise ValueError(f"Adapter {i} adapts other modules than adapter 0 (e.g. {diff}); only adapters with the "
                             "same target modules and layers merge.")
        shapes = [m for m in modules if d[m].shape != per_adapter[0][m].shape]
        if shapes:
            raise ValueError(f"Adapter {i} has other shapes than adapter 0 at {shapes[:3]}: different backbones?")
    generator = torch.Generator().manual_seed(config.seed)
    scale = config.resolved_scale(len(per_adapter))
    merged = {}
    for module in sorted(modules):
        deltas = [d[module] for d in per_adapter]
        if config.method in ("dare", "dare_ties"):
            deltas = [dare(d, config.drop, generator) for d in deltas]
        tied = config.method in ("ties", "dare_ties")
        combined = ties(deltas, config.density) if tied else torch.stack(deltas).sum(0)
        merged[module] = scale * combined
    return merged


def refactorise(delta: torch.Tensor, rank: int | None) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(A, B, relative error) with B · A ≈ ``delta`` by truncated SVD (B = U_r S_r, A = V_rᵀ).

    ``rank=None`` keeps every singular value (exact up to rounding).
    """
    return _truncate(torch.linalg.svd(delta.double(), full_matrices=False), rank)


def smallest_rank(singular_values: torch.Tensor, tolerance: float) -> int:
    """The smallest r whose truncation keeps the relative error ‖ΔW − BA‖ / ‖ΔW‖ (the norm of the
    dropped singular values over the norm of all) at most ``tolerance``; 0 for a zero delta."""
    tail = singular_values.double().pow(2).flip(0).cumsum(0).flip(0)  # tail[k] = Σ_{i ≥ k} s_i²
    if len(tail) == 0 or tail[0] == 0:
        return 0
    within = torch.nonzero((tail / tail[0]).sqrt() <= tolerance)
    return int(within[0]) if len(within) else len(tail)


def to_lora_state(merged: dict[str, torch.Tensor], rank: int | str | None,
                  tolerance: float = RANK_TOLERANCE) -> tuple[dict[str, torch.Tensor], int, dict]:
    """LoRA tensors (scaling 1) for merged deltas, their common rank, and reconstruction errors per module.

    All modules share one rank (peft's config has one ``r``): ``rank``; with ``"auto"`` the largest
    of the modules' :func:`smallest_rank` for ``tolerance`` (at least 1); with ``None`` the largest full
    rank among the modules. Smaller factors are zero-padded.
    """
    svds = {module: torch.linalg.svd(delta.double(), full_matrices=False) for module, delta in merged.items()}
    full = max(len(s) for _, s, _ in svds.values())
    if rank == "auto":
        r = max(1, *(smallest_rank(s, tolerance) for _, s, _ in svds.values()))
    else:
        r = full if rank is None else min(int(rank), full)
    factors, errors = {}, {}
    for module, svd in svds.items():
        a, b, errors[module] = _truncate(svd, r)
        pad = r - a.shape[0]
        if pad:
            a = torch.cat([a, a.new_zeros(pad, a.shape[1])])
            b = torch.cat([b, b.new_zeros(b.shape[0], pad)], 1)
        factors[module] = (a.float().contiguous(), b.float().contiguous())
    return lora_state(factors), r, errors


def _truncate(svd: tuple[torch.Tensor, torch.Tensor, torch.Tensor], rank: int | None
              ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(A, B, relative error) of the rank-``rank`` truncation of a delta given by its SVD (U, S, Vᵀ)."""
    u, s, vh = svd
    r = len(s) if rank is None else min(rank, len(s))
    b, a = u[:, :r] * s[:r], vh[:r]
    norm = torch.linalg.norm(s)
    error = float(torch.linalg.norm(s[r:]) / norm) if norm > 0 else 0.0
    return a, b, error

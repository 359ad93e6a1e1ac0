"""Run the frozen layers below an adapter once, and reuse their outputs for every epoch.

When a LoRA adapter only touches the top layers of the backbone (``AdapterConfig.layers``),
the layers below it compute the same hidden states in every epoch and every validation
pass. :func:`cache_prefix` runs them once per example and stores the result on the
:class:`~cmtl.data.examples.Encoded`; :func:`cmtl.data.examples.batches` then pads those hidden states instead
of token ids and :meth:`cmtl.core.backbone.Backbone.embed` runs only the layers above. The
outputs are the same as the plain path's (float rounding aside): nothing is approximated.

The cache is refused, with the reason logged, for encoders whose layers cmtl cannot run in
slices (:attr:`cmtl.core.backbone.Backbone.split_refusal`), and whenever the cached path does not
reproduce the full forward pass on a sample of the first rows (:func:`cache_mismatch`);
training then runs the full forward pass.
"""

from __future__ import annotations

import dataclasses
import logging

import torch

from cmtl.core.adapters import AdapterConfig
from cmtl.core.backbone import Backbone
from cmtl.data import Encoded, batches, length_sorted

logger = logging.getLogger(__name__)


def frozen_layers(adapter: AdapterConfig, backbone: Backbone) -> int:
    """How many bottom layers ``adapter`` leaves untouched (0 when it adapts layer 0 or all layers)."""
    if adapter.layers is None:
        return 0
    return min(min(adapter.layers), backbone.num_layers)


def prefix_megabytes(encoded: Encoded, backbone: Backbone) -> float:
    """Memory the cached hidden states of ``encoded`` would take (in the backbone's precision)."""
    return sum(encoded.lengths()) * backbone.hidden_size * backbone.dtype.itemsize / 2**20


def cache_prefix(encoded: Encoded, backbone: Backbone, layers: int, *, batch_size: int = 64) -> Encoded:
    """A copy of ``encoded`` carrying the hidden states after the backbone's first ``layers`` layers.

    The caller guarantees that no adapter it will run touches those layers.
    """
    if layers < 1 or not backbone.splittable:
        raise ValueError(f"Nothing to cache: layers={layers}, split refused: {backbone.split_refusal}")
    prefix: list[torch.Tensor | None] = [None] * len(encoded)
    plain = _plain(encoded)
    with torch.no_grad():  # not inference_mode: the cached tensors feed later autograd graphs
        for idx, inputs, _ in batches(plain, length_sorted(plain), batch_size, backbone.pad_id, backbone.device):
            hidden = backbone.run_layers(None, inputs["attention_mask"], stop=layers, input_ids=inputs["input_ids"],
                                         token_type_ids=inputs.get("token_type_ids"))
            for row, i in enumerate(idx):
                prefix[i] = hidden[row, : len(encoded.input_ids[i])].clone()
    return dataclasses.replace(encoded, prefix=prefix, prefix_layers=layers)


def cache_mismatch(encoded: Encoded, backbone: Backbone, layers: int, *, rows: int = 8) -> str | None:
    """Why the cached path would not reproduce the full forward pass on ``encoded``, or ``None`` when it does.

    Takes up to ``rows`` rows spread over the length range, caches their prefix two rows at a time
    (other padding than they are then used with) and compares the pooled vectors of one padded batch
    through the cache with the full forward pass's, as ``allclose`` with rtol = 1e-5 for a float32 backbone
    (4 eps of its precision for a bfloat16 or float16 one) and atol that times the largest component (at
    least 1): float rounding grows with scale and depth, a wrong mask or position moves vectors by far
    more. Guards against models whose layers need inputs cmtl does not know of.
    """
    by_length = length_sorted(encoded)
    picks = sorted({by_length[round(k * (len(by_length) - 1) / max(rows - 1, 1))] for k in range(rows)})
    sample = _plain(dataclasses.replace(encoded, input_ids=[encoded.input_ids[i] for i in picks],
                                        token_type_ids=None if encoded.token_type_ids is None
                                        else [encoded.token_type_ids[i] for i in picks]))
    cached = cache_prefix(sample, backbone, layers, batch_size=2)
    order = list(range(len(picks)))
    with torch.no_grad():
        _, plain_inputs, _ = next(batches(sample, order, len(order), backbone.pad_id, backbone.device))
        _, cached_inputs, _ = next(batches(cached, order, len(order), backbone.pad_id, backbone.device))
        full, fast = backbone.embed(**plain_inputs), backbone.embed(**cached_inputs)  # (B, H) each
    tol = max(1e-5, 4 * torch.finfo(backbone.dtype).eps)  # pooled vectors are float32; the layers ran in this
    # Rounding grows with the values' scale (and the depth): the absolute allowance is relative to the largest
    # component, so a deep model's float noise passes and a wrong mask or position (off by O(|v|)) does not.
    scale = max(1.0, full.abs().max().item())
    if torch.allclose(fast, full, atol=tol * scale, rtol=tol):
        return None
    return (f"cached and full forward passes differ by up to {(fast - full).abs().max().item():.3g} "
            f"(allowed {tol * scale:.3g} + {tol:g}*|v|, |v| up to {scale:.3g}) on {len(picks)} rows")


def maybe_cache(parts: list[Encoded | None], backbone: Backbone, adapter: AdapterConfig, max_mb: float,
                *, batch_size: int = 64) -> list[Encoded | None]:
    """:func:`cache_prefix` on every part when that saves work, all of them fit in ``max_mb`` together
    and :func:`cache_mismatch` finds the cached path exact; otherwise ``parts`` unchanged (training then
    runs the full forward pass), with the reason logged."""
    layers = frozen_layers(adapter, backbone)
    if max_mb <= 0 or layers == 0:
        return parts
    if not backbone.splittable:
        logger.info("Not caching the %d frozen layers: %s", layers, backbone.split_refusal)
        return parts
    need = sum(prefix_megabytes(p, backbone) for p in parts if p is not None)
    if need > max_mb:
        logger.info("Not caching the %d frozen layers: %.0f MiB needed, cache_frozen_mb=%s.", layers, need, max_mb)
        return parts
    first = next((p for p in parts if p is not None and len(p)), None)
    if first is None:
        return parts
    mismatch = cache_mismatch(first, backbone, layers)
    if mismatch is not None:
        logger.warning("Not caching the %d frozen layers of %s: %s. Training runs the full forward pass instead.",
                       layers, backbone.config.name_or_path, mismatch)
        return parts
    logger.info("Caching the %d frozen layers (%.0f MiB).", layers, need)
    return [None if p is None else cache_prefix(p, backbone, layers, batch_size=batch_size) for p in parts]


def _plain(encoded: Encoded) -> Encoded:
    """Only the token ids of ``encoded`` (what the full forward pass reads)."""
    return dataclasses.replace(encoded, targets=None, groups=None, prefix=None, prefix_layers=0)

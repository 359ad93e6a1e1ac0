"""Run the frozen layers below an adapter once, and reuse their outputs for every epoch.

When a LoRA adapter only touches the top layers of the backbone (``AdapterConfig.layers``),
the layers below it compute the same hidden states in every epoch and every validation
pass. :func:`cache_prefix` runs them once per example and stores the result on the
:class:`~cmtl.data.Encoded`; :func:`cmtl.data.batches` then pads those hidden states instead
of token ids and :meth:`cmtl.backbone.Backbone.embed` runs only the layers above. The
outputs are the same as the plain path's (float rounding aside): nothing is approximated.
"""

from __future__ import annotations

import dataclasses
import logging

import torch

from cmtl.adapters import AdapterConfig
from cmtl.backbone import Backbone
from cmtl.data import Encoded, batches, length_sorted

logger = logging.getLogger(__name__)


def frozen_layers(adapter: AdapterConfig, backbone: Backbone) -> int:
    """How many bottom layers ``adapter`` leaves untouched (0 when it adapts layer 0 or all layers)."""
    if adapter.layers is None:
        return 0
    return min(min(adapter.layers), backbone.num_layers)


def prefix_megabytes(encoded: Encoded, backbone: Backbone) -> float:
    """Memory the cached hidden states of ``encoded`` would take (float32)."""
    return sum(encoded.lengths()) * backbone.hidden_size * 4 / 2**20


def cache_prefix(encoded: Encoded, backbone: Backbone, layers: int, *, batch_size: int = 64) -> Encoded:
    """A copy of ``encoded`` carrying the hidden states after the backbone's first ``layers`` layers.

    The caller guarantees that no adapter it will run touches those layers.
    """
    if layers < 1 or not backbone.splittable:
        raise ValueError(f"Nothing to cache: layers={layers}, splittable={backbone.splittable}.")
    prefix: list[torch.Tensor | None] = [None] * len(encoded)
    plain = dataclasses.replace(encoded, targets=None, groups=None, prefix=None, prefix_layers=0)
    with torch.no_grad():  # not inference_mode: the cached tensors feed later autograd graphs
        for idx, inputs, _ in batches(plain, length_sorted(plain), batch_size, backbone.pad_id, backbone.device):
            hidden = backbone.run_layers(None, inputs["attention_mask"], stop=layers, input_ids=inputs["input_ids"],
                                         token_type_ids=inputs.get("token_type_ids"))
            for row, i in enumerate(idx):
                prefix[i] = hidden[row, : len(encoded.input_ids[i])].clone()
    return dataclasses.replace(encoded, prefix=prefix, prefix_layers=layers)


def maybe_cache(parts: list[Encoded | None], backbone: Backbone, adapter: AdapterConfig, max_mb: float,
                *, batch_size: int = 64) -> list[Encoded | None]:
    """:func:`cache_prefix` on every part when that saves work and all of them fit in ``max_mb``
    together; otherwise ``parts`` unchanged."""
    layers = frozen_layers(adapter, backbone)
    if max_mb <= 0 or layers == 0 or not backbone.splittable:
        return parts
    need = sum(prefix_megabytes(p, backbone) for p in parts if p is not None)
    if need > max_mb:
        logger.info("Not caching the %d frozen layers: %.0f MiB needed, cache_frozen_mb=%s.", layers, need, max_mb)
        return parts
    return [None if p is None else cache_prefix(p, backbone, layers, batch_size=batch_size) for p in parts]

"""The seam between a model and the training loops: what they need of it, and nothing more.

A :class:`Trainee` is a forward pass, the parameters it trains and a switch between training and
evaluation. The loops (:func:`cmtl.training.train`, :func:`cmtl.multitask.train_multitask`) take
its parts; :meth:`Trainee.unfrozen` makes its parameters trainable for one run and freezes them
again afterwards, whatever happens in between. :func:`fit` trains one adapter and head.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

from cmtl.core.adapters import AdapterBank, AdapterConfig
from cmtl.core.backbone import Backbone
from cmtl.core.tasks import TaskSpec
from cmtl.data import Encoded
from cmtl.training.caching import maybe_cache
from cmtl.training.evaluation import predict_logits
from cmtl.training.loop import TrainConfig, TrainResult, assign, train
from cmtl.training.probe import pooled_features, probe_head

Forward = Callable[[dict[str, torch.Tensor]], torch.Tensor]


class Trainee:
    """A forward pass with the modules it trains.

    Args:
        forward: Model inputs (a batch of :func:`cmtl.data.batches`) to logits.
        modules: Modules trained whole (heads, a copied encoder): switched with ``train()``/``eval()``.
        bank: The bank holding the adapter trained with them (only its LoRA tensors train; its
            dropout follows the switch); ``None`` when no adapter trains.
        key: That adapter's name in ``bank``.
    """

    def __init__(self, forward: Forward, modules: Sequence[nn.Module] = (), *,
                 bank: AdapterBank | None = None, key: str | None = None):
        if (bank is None) != (key is None):
            raise ValueError("Trainee takes bank= and key= together (an adapter of that bank), or neither.")
        self.forward = forward
        self.modules = list(modules)
        self.bank, self.key = bank, key

    @classmethod
    def adapter(cls, backbone: Backbone, bank: AdapterBank, key: str, head: nn.Module) -> "Trainee":
        """Adapter ``key`` of ``bank`` on ``backbone``, pooled into ``head``."""
        return cls(lambda inputs: head(backbone.embed(**inputs)), [head], bank=bank, key=key)

    def parameters(self) -> list[nn.Parameter]:
        """What trains: the adapter's LoRA tensors, then the modules' parameters; all made trainable."""
        params = self.bank.parameters(self.key) if self.bank is not None else []
        params += [p for m in self.modules for p in m.parameters()]
        for p in params:
            p.requires_grad_(True)
        return params

    def set_training(self, flag: bool) -> None:
        """Dropout on (``True``) or off in the adapter and the modules; the frozen backbone stays in eval()."""
        if self.bank is not None:
            self.bank.set_training(self.key, flag)
        for m in self.modules:
            m.train(flag)

    def activate(self) -> None:
        """Switch the bank to this trainee's adapter (forward passes go through it from now on)."""
        if self.bank is not None:
            self.bank.activate(self.key)

    @contextlib.contextmanager
    def unfrozen(self) -> Iterator[list[nn.Parameter]]:
        """The trainable parameters, frozen again when the block ends (also on an error)."""
        params = self.parameters()
        try:
            yield params
        finally:
            for p in params:
                p.requires_grad_(False)

    def logits(self, encoded: Encoded, *, pad_id: int, device: torch.device, batch_size: int = 64) -> torch.Tensor:
        """Logits of every row of ``encoded``, in eval mode, through this trainee's adapter."""
        self.activate()
        self.set_training(False)
        return predict_logits(self.forward, encoded, batch_size=batch_size, pad_id=pad_id, device=device)


def fit(trainee: Trainee, backbone: Backbone, adapter: AdapterConfig, spec: TaskSpec, train_data: Encoded,
        validation: Encoded | None, config: TrainConfig, *, extra_loss=None, new_head: bool = False) -> TrainResult:
    """Train ``trainee`` (an adapter of ``backbone``'s bank, configured as ``adapter``, and its head) on
    ``train_data`` with early stopping on ``validation``; its parameters are frozen again afterwards.

    ``new_head``: the trainee's head (its first module) is untrained; with ``config.probe_init`` and
    validation data a linear probe is fitted on the adapter's features as they are
    (:func:`cmtl.training.probe.probe_head`) and scored as the step-0 candidate of early stopping;
    training starts from it with ``config.probe_start``, from the fresh head otherwise. The features the
    probe saw are returned as ``TrainResult.start_features``.
    """
    # Layers below the adapter are frozen for every adapter this run switches in (an update's
    # parent, for LwF, has the same layers): compute their outputs once, for all epochs. Activate
    # first: the prefix must not carry whichever adapter was active before (another task's).
    trainee.activate()
    train_data, validation = maybe_cache([train_data, validation], backbone, adapter, config.cache_frozen_mb,
                                         batch_size=config.eval_batch_size)
    # Without validation nothing could choose the probe: fit it only when training starts from it.
    probe = new_head and config.probe_init and (validation is not None or config.probe_start)
    features: dict[str, torch.Tensor] = {}
    candidate_logits = None
    if probe:
        head = trainee.modules[0]
        fresh = [p.detach().clone() for p in head.parameters()]
        trainee.set_training(False)  # features without dropout, as evaluation sees them
        trained_on = probe_head(head, backbone, spec, train_data, batch_size=config.eval_batch_size, seed=config.seed)
        if trained_on is not None:
            features["train"] = trained_on
        if validation is not None:  # the probe's validation logits, from features its callers may keep
            features["validation"] = pooled_features(backbone, validation, config.eval_batch_size)
            with torch.no_grad():
                candidate_logits = head(features["validation"].to(backbone.device)).float().cpu()
    with trainee.unfrozen() as params:
        candidate = None
        if probe:
            candidate = [p.detach().clone() for p in params]  # the adapter as it is, the probe's head
            if not config.probe_start:
                assign(list(head.parameters()), fresh)
        with backbone.checkpointed(config.gradient_checkpointing):
            result = train(trainee.forward, params, trainee.set_training, spec, train_data, validation, config,
                           pad_id=backbone.pad_id, device=backbone.device, desc=f"{spec.name}",
                           extra_loss=extra_loss, candidate=candidate, candidate_logits=candidate_logits,
                           heads=[p for m in trainee.modules for p in m.parameters()])
    result.start_features = features
    return result

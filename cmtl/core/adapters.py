"""LoRA adapters on the shared backbone. The only module that imports peft.

An :class:`AdapterBank` wraps the frozen encoder in a peft model once and then
holds any number of named LoRA adapters (one per task version). Exactly one is
active at a time; the rest of cmtl sees adapters as plain tensors keyed by
module name (peft's own saved format, so an exported adapter loads in peft).
That key format is read and written here only: :func:`lora_factors` and its
inverse :func:`lora_state`. The per-row LoRA term of a mixed-task batch (the
serving engine's adapters, :class:`TaskLoRA`'s per-task factors) is added by one
forward hook, :func:`hook_row_lora`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from cmtl.core.config import AdapterConfig  # noqa: F401  (re-exported)
from cmtl.errors import STORED_FILE_FIX, CorruptFileError, DataError, InvalidParameterError, bad_param

# peft's state-dict keys start with the wrapper's path; the encoder's own module paths do not.
PEFT_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<part>[AB])\.weight$")


#: LoRA target modules by transformers ``model_type``, ahead of peft's own table (which covers RoBERTa,
#: XLM-R, ELECTRA, DeBERTa-v2 and more with query and value). BERT gets all four attention projections:
#: the defaults study (docs/results.md, "Defaults of add_task") measured them ahead of query/value on
#: the embedded MiniLM and never below the linear probe. The others are query and value projections, or
#: the fused query/key/value projection where there is one, for encoders peft has no default for.
TARGETS: dict[str, tuple[str, ...]] = {
    "bert": ("attention.output.dense", "key", "query", "value"),
    "distilbert": ("q_lin", "v_lin"),
    "mpnet": ("q", "v"),
    "albert": ("query", "value"),
    "modernbert": ("Wqkv",),
}
_QUERY = re.compile(r"^(q|query|q_proj|q_lin|wq|Wq)$")
_VALUE = re.compile(r"^(v|value|v_proj|v_lin|wv|Wv)$")
_FUSED = re.compile(r"^(qkv|Wqkv|qkv_proj|in_proj|c_attn)$")
#: Encoders whose transformer layers share one set of weights: ``layers=`` cannot pick some of them.
SHARED_LAYERS = ("albert",)


def default_targets(encoder: nn.Module) -> tuple[str, ...]:
    """The modules a LoRA adapter on ``encoder`` adapts when none are named: :data:`TARGETS`, else peft's
    default for the architecture, else the attention projections found by name and shape (square
    query and value layers, or a fused query/key/value layer three times as wide as its input).

    Raises:
        DataError: none found; the message lists the encoder's linear layers to choose from.
    """
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_TARGETS

    model_type = getattr(getattr(encoder, "config", None), "model_type", None)
    if model_type in TARGETS:
        return TARGETS[model_type]
    if model_type in PEFT_TARGETS:
        return tuple(PEFT_TARGETS[model_type])
    dims = {n: linear_dims(m) for n, m in _linear_layers(encoder).items()}
    square = {n for n, (fan_in, fan_out) in dims.items() if fan_in == fan_out}
    query, value = sorted(n for n in square if _QUERY.match(n)), sorted(n for n in square if _VALUE.match(n))
    if query and value:
        return (query[0], value[0])
    fused = sorted(n for n, (fan_in, fan_out) in dims.items() if _FUSED.match(n) and fan_out == 3 * fan_in)
    if fused:
        return (fused[0],)
    raise DataError(
        f"cmtl knows no LoRA target modules for model type {model_type!r} and found no query/value projections "
        f"by name. Name them: AdapterConfig(target_modules=[...]) (CLI: --target-modules). This backbone's linear "
        f"layers: {sorted(dims)}.")


def targets(path: str, target_modules: tuple[str, ...]) -> bool:
    """Whether the module at ``path`` is one of ``target_modules``, by peft's rule: a target is the
    module's whole path or a dotted suffix of it (``"value"``, ``"attention.output.dense"``)."""
    return any(path == t or path.endswith("." + t) for t in target_modules)


def state_targets(state: dict[str, torch.Tensor], encoder: nn.Module) -> tuple[str, ...]:
    """The target module names that select exactly the modules a LoRA state dict adapts in ``encoder``:
    for each adapted kind of layer (its path after the layer index, e.g. ``attention.self.query``), the
    shortest dotted suffix that names no kind the state leaves alone (``"query"``, but
    ``"attention.output.dense"`` where ``"dense"`` would also take the feed-forward layers)."""

    def kind(path: str) -> str:
        parts = path.split(".")
        last_index = max((i for i, p in enumerate(parts) if p.isdigit()), default=-1)
        return ".".join(parts[last_index + 1:])

    adapted = {kind(m.removeprefix(PEFT_PREFIX)) for m in lora_factors(state)}
    kinds = {kind(p) for p in _linear_paths(encoder)}
    names = set()
    for k in adapted:
        parts = k.split(".")
        for n in range(1, len(parts) + 1):
            suffix = ".".join(parts[-n:])
            if all(other in adapted for other in kinds if targets(other, (suffix,))):
                names.add(suffix)
                break
    return tuple(sorted(names))


def bare_model_state(state: dict[str, torch.Tensor], encoder: nn.Module) -> dict[str, torch.Tensor]:
    """``state`` with the module paths of an adapter saved on a task model around ``encoder`` (a decoder's causal
    LM: ``model.layers.…``, GPT-2's ``transformer.h.…``) renamed to ``encoder``'s own; as it is when its paths
    already name ``encoder``'s modules, or do not all name them after the base model's prefix
    (``encoder.base_model_prefix``)."""
    prefix = f"{getattr(encoder, 'base_model_prefix', '') or '-'}."
    modules = {name.removesuffix(".base_layer") for name, _ in encoder.named_modules()}
    parsed = {key: lora_key(key) for key in state}
    paths = {p[0].removeprefix(PEFT_PREFIX) for p in parsed.values() if p is not None}
    if not paths or paths <= modules or not all(p.startswith(prefix) and p[len(prefix):] in modules for p in paths):
        return state
    return {key if p is None else f"{PEFT_PREFIX}{p[0].removeprefix(PEFT_PREFIX)[len(prefix):]}.lora_{p[1]}.weight":
            value for (key, value), p in zip(state.items(), parsed.values())}


def existing_layers(config: AdapterConfig, encoder: nn.Module) -> AdapterConfig:
    """A stored ``config`` with only the layers ``encoder`` has: an earlier cmtl stored the layers it was given,
    and peft adapted those that exist, silently dropping those a cut removed (:meth:`AdapterBank.add` now
    refuses them in a new config). As it is when it lists no such layer, or only such layers."""
    absent = absent_layers(config, encoder)
    kept = tuple(i for i in config.layers or () if i not in absent)
    return dataclasses.replace(config, layers=kept) if kept and absent else config


def absent_layers(config: AdapterConfig, encoder: nn.Module) -> list[int]:
    """The indices of ``config.layers`` that ``encoder`` lacks (none when it lists no layers, or when cmtl cannot
    count the encoder's layers)."""
    from cmtl.core.backbone import layer_list

    found = layer_list(encoder) if config.layers is not None else None
    return [] if found is None else [i for i in config.layers if i >= len(found[1])]


def state_layers(state: dict[str, torch.Tensor], encoder: nn.Module) -> tuple[int, ...] | None:
    """The indices of the transformer layers a LoRA state dict adapts in ``encoder`` (the first number in each
    module's path, as :func:`check_adapter_state` reads it); ``None`` when that is every layer."""
    from cmtl.core.backbone import layer_list

    found = {next((int(p) for p in m.split(".") if p.isdigit()), None) for m in lora_factors(state)}
    layers = layer_list(encoder)
    if None in found or layers is None or found == set(range(len(layers[1]))):
        return None
    return tuple(sorted(found))


def linear_dims(module: nn.Module) -> tuple[int, int] | None:
    """``(in_features, out_features)`` of a layer LoRA can adapt: an ``nn.Linear``, or transformers'
    ``Conv1D`` (GPT-2's linear layer, its weight stored transposed as (in, out)); ``None`` for others.
    A layer peft wrapped answers for its base layer."""
    module = getattr(module, "base_layer", module)
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if _is_conv1d(module):
        return module.weight.shape[0], module.weight.shape[1]
    return None


def _is_conv1d(module: nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, Conv1D)


def _linear_paths(encoder: nn.Module) -> dict[str, nn.Module]:
    """The encoder's linear layers (:func:`linear_dims`) by module path (one that peft wrapped, by the
    wrapper's path)."""
    return {name.removesuffix(".base_layer"): module for name, module in encoder.named_modules()
            if "lora_" not in name and not hasattr(module, "base_layer") and linear_dims(module) is not None}


def _linear_layers(encoder: nn.Module) -> dict[str, nn.Module]:
    """The encoder's linear layers by their own (last) name."""
    return {path.rsplit(".", 1)[-1]: module for path, module in _linear_paths(encoder).items()}


def peft_layout(config: AdapterConfig, encoder: nn.Module) -> dict[str, Any]:
    """What peft must know of ``encoder``'s layout to place ``config``'s adapter as cmtl does:
    ``layers_pattern`` (the name before the layer index, for ``layers=``) and ``fan_in_fan_out``
    (the targets are GPT-2-style ``Conv1D`` layers)."""
    from cmtl.core.backbone import layer_list

    pattern = None
    if config.layers is not None:  # peft finds layer indices after this name ("layer", "layers", "h")
        found = layer_list(encoder)
        pattern = None if found is None else found[0].rsplit(".", 1)[-1]
    conv1d = any(_is_conv1d(m) for p, m in _linear_paths(encoder).items() if targets(p, config.target_modules or ()))
    return {"layers_pattern": pattern, "fan_in_fan_out": conv1d}


def peft_config(config: AdapterConfig, encoder: nn.Module, **extra: Any):
    """peft's ``LoraConfig`` of ``config`` on ``encoder`` (``extra``: more LoraConfig fields)."""
    from peft import LoraConfig

    return LoraConfig(
        r=config.r,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=list(config.target_modules) if config.target_modules else None,
        layers_to_transform=list(config.layers) if config.layers is not None else None,
        bias="none",
        **peft_layout(config, encoder),
        **extra,
    )


def lora_key(key: str) -> tuple[str, str] | None:
    """``(module path, "A" or "B")`` of a key in peft's form ``<module>.lora_A.weight`` /
    ``<module>.lora_B.weight``; ``None`` for any other key."""
    match = _LORA_KEY.match(key)
    return None if match is None else (match["module"], match["part"])


def lora_factors(state: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{module path: (A (r, in), B (out, r))}`` of a LoRA state dict in peft's key form, modules in
    the order they first appear; paths keep peft's prefix (strip :data:`PEFT_PREFIX` for the encoder's).

    Raises:
        DataError: a key that is not a LoRA factor, or a module without both factors.
    """
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        parsed = lora_key(key)
        if parsed is None:
            raise DataError(f"Unexpected key {key!r} in a LoRA state dict: only lora_A / lora_B weights "
                            "(peft's '<module>.lora_A.weight', '<module>.lora_B.weight') are LoRA factors.")
        parts.setdefault(parsed[0], {})[parsed[1]] = value
    incomplete = [m for m, p in parts.items() if set(p) != {"A", "B"}]
    if incomplete:
        raise DataError(f"Modules {incomplete[:3]} lack lora_A or lora_B weights.")
    return {m: (p["A"], p["B"]) for m, p in parts.items()}


def unchanged(state: dict[str, torch.Tensor]) -> bool:
    """Whether a LoRA state dict changes nothing: in every module A or B is exactly zero, so B · A = 0 and the
    adapter computes what the bare backbone does (peft starts B at zero; a version whose training kept
    its step-0 probe stores it so)."""
    return all(not (a.any() and b.any()) for a, b in lora_factors(state).values())


def lora_state(factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The inverse of :func:`lora_factors`: ``<module>.lora_A.weight`` and ``<module>.lora_B.weight`` per module."""
    state = {}
    for module, (a, b) in factors.items():
        state[f"{module}.lora_A.weight"] = a
        state[f"{module}.lora_B.weight"] = b
    return state


def lora_shapes(state: dict[str, torch.Tensor]) -> dict[str, tuple[int, int]]:
    """``{module path: (in_features, out_features)}`` of the layers a LoRA state dict adapts."""
    return {m: (a.shape[1], b.shape[0]) for m, (a, b) in lora_factors(state).items()}


def stack_lora(parts: list[tuple[dict[str, torch.Tensor], float]]) -> dict[str, torch.Tensor]:
    """One LoRA state with scaling 1 whose ΔW is the sum of the parts' (state, scaling) ΔWs:
    A factors stacked along the rank, each B scaled by its part's scaling. Every part must adapt
    the same modules; the result's rank is the sum of the parts' ranks."""
    keys = sorted(parts[0][0])
    for state, _ in parts[1:]:
        if sorted(state) != keys:
            raise DataError("Adapters to stack must adapt the same modules; "
                            f"{sorted(set(keys) ^ set(state))[:3]} differ.")
    factors = [(lora_factors(state), scaling) for state, scaling in parts]
    stacked = {module: (torch.cat([f[module][0] for f, _ in factors], dim=0),
                        torch.cat([f[module][1] * scaling for f, scaling in factors], dim=1))
               for module in factors[0][0]}
    return dict(sorted(lora_state(stacked).items()))


class AdapterBank:
    """Named LoRA adapters injected into one frozen encoder.

    The encoder is modified in place (peft swaps adapted ``nn.Linear`` layers
    for LoRA layers), so calling the encoder applies the active adapter.
    """

    def __init__(self, encoder: nn.Module):
        self.encoder = encoder
        self._peft = None  # peft.PeftModel, created with the first adapter

    # --- membership -------------------------------------------------------------

    @property
    def names(self) -> list[str]:
        return [] if self._peft is None else list(self._peft.peft_config)

    def __contains__(self, name: str) -> bool:
        return name in self.names

    def add(self, name: str, config: AdapterConfig) -> AdapterConfig:
        """Create a fresh adapter (B = 0) and return its config with target modules resolved.

        Raises:
            InvalidParameterError: ``config.layers`` names a layer the encoder lacks (peft would drop it
                silently and adapt the others).
        """
        from cmtl.core.backbone import layer_list

        missing = absent_layers(config, self.encoder)
        if missing:
            count = len(layer_list(self.encoder)[1])
            raise InvalidParameterError(bad_param(
                "layers", "AdapterConfig", f"name only layers this backbone has (indices 0 to {count - 1}: it has "
                f"{count} layers)", config.layers, f"Layers {missing} do not exist; pass indices below {count} "
                "(the top layers of a cut backbone are those below its num_hidden_layers)."))
        return self._add(name, config)

    def _add(self, name: str, config: AdapterConfig) -> AdapterConfig:
        from peft import get_peft_model

        if name in self:
            raise ValueError(f"Adapter {name!r} already exists in this bank.")
        model_type = getattr(getattr(self.encoder, "config", None), "model_type", None)
        if config.layers is not None and model_type in SHARED_LAYERS:
            raise InvalidParameterError(
                f"A {model_type} encoder shares one set of weights across its layers, so an adapter cannot adapt "
                f"only layers {list(config.layers)}: leave AdapterConfig.layers (CLI --layers) out.")
        if config.target_modules is None:
            config = AdapterConfig.from_dict({**config.to_dict(), "target_modules": default_targets(self.encoder)})
        paths = _linear_paths(self.encoder)
        missing = [t for t in config.target_modules if not any(targets(p, (t,)) for p in paths)]
        if missing:  # peft matches a name against the end of each module path
            raise DataError(f"Target modules {missing} are not linear layers of this backbone "
                            f"({getattr(self.encoder.config, 'model_type', type(self.encoder).__name__)}). Its "
                            f"linear layers: {sorted(_linear_layers(self.encoder))}.")
        first = self._peft is None
        try:
            with warnings.catch_warnings():
                # peft 0.21 asks transformers 5 a deprecated question; users can do nothing about it.
                warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
                if first:
                    self._peft = get_peft_model(self.encoder, peft_config(config, self.encoder), adapter_name=name)
                else:
                    self._peft.add_adapter(name, peft_config(config, self.encoder))
        except BaseException as exc:  # e.g. out of memory halfway through the layers
            self._take_back(name, first)
            if isinstance(exc, ValueError):
                raise DataError(f"Cannot build LoRA adapter with {config}: {exc}") from exc
            raise
        self._freeze_all()
        self.set_training(name, False)  # peft builds the adapter's dropout in training mode
        resolved = tuple(sorted(self._peft.peft_config[name].target_modules))
        return AdapterConfig.from_dict({**config.to_dict(), "target_modules": resolved})

    def load(self, name: str, config: AdapterConfig, state: dict[str, torch.Tensor]) -> None:
        """Add adapter ``name`` with the given weights (keys as returned by :meth:`state_dict`)."""
        from peft import set_peft_model_state_dict

        self._add(name, config)  # a stored config may list layers a cut dropped: its weights say which
        try:
            result = set_peft_model_state_dict(self._peft, state, adapter_name=name)
        except BaseException:  # e.g. out of memory while copying: no half-loaded adapter stays behind
            self.remove(name)
            raise
        missing = [k for k in result.missing_keys if "lora_" in k and f".{name}." in k]
        unexpected = list(result.unexpected_keys)
        if missing or unexpected:
            self.remove(name)
            raise DataError(
                f"Adapter weights do not fit adapter {name!r}: missing {missing[:3]}, unexpected {unexpected[:3]}."
            )
        self._freeze_all()

    def remove(self, name: str) -> None:
        if name not in self:
            return
        if len(self.names) == 1:
            # peft cannot delete the last adapter; unload() restores the plain layers in place.
            self.encoder = self._peft.unload()
            self._peft = None
        else:
            if self._peft.active_adapter == name:
                self._peft.set_adapter([n for n in self.names if n != name][0])
            self._peft.delete_adapter(name)
        self._freeze_all()

    # --- use --------------------------------------------------------------------

    def activate(self, name: str) -> None:
        """Make ``name`` the adapter every forward pass applies."""
        if name not in self:
            raise KeyError(f"Adapter {name!r} is not loaded. Loaded: {self.names}.")
        # peft's set_adapter also flips requires_grad; activation must not change what trains
        # (a training step may switch to another adapter and back, e.g. for distillation).
        lora = [p for n, p in self.encoder.named_parameters() if "lora_" in n]
        flags = [p.requires_grad for p in lora]
        self._peft.set_adapter(name)
        for p, flag in zip(lora, flags):
            p.requires_grad_(flag)

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        """Run the plain backbone, no adapter applied."""
        if self._peft is None:
            yield
        else:
            with self._peft.disable_adapter():
                yield

    @contextlib.contextmanager
    def added(self, deltas: dict[str, torch.Tensor]) -> Iterator[None]:
        """Run the plain backbone (no adapter) with dense ``deltas`` added to its weights: ``{module path:
        ΔW}``, paths as in :meth:`state_dict`'s keys. Costs no more than the plain forward pass (a LoRA
        adapter of full rank costs about a third more); the weights are restored bit for bit on exit."""
        root = self.encoder if self._peft is None else self._peft
        modules = dict(root.named_modules())
        saved: dict[str, torch.Tensor] = {}
        try:
            for path, delta in deltas.items():
                module = modules.get(path if self._peft is not None else path.removeprefix(PEFT_PREFIX))
                if module is None:
                    raise DataError(f"The backbone has no module {path!r} to add a delta to.")
                base = getattr(module, "base_layer", module)
                weight = base.weight
                if _is_conv1d(base):  # Conv1D stores its weight as (in, out)
                    delta = delta.T
                if weight.shape != delta.shape:
                    raise DataError(f"A delta of shape {tuple(delta.shape)} does not fit {path!r}, whose weight is "
                                    f"{tuple(weight.shape)}.")
                saved[path] = weight.data.clone()
                weight.data += delta.to(weight.dtype).to(weight.device)
            with self.disabled():
                yield
        finally:
            for path, original in saved.items():
                module = modules[path if self._peft is not None else path.removeprefix(PEFT_PREFIX)]
                getattr(module, "base_layer", module).weight.data.copy_(original)

    def parameters(self, name: str) -> list[nn.Parameter]:
        """The adapter's LoRA tensors, made trainable (everything else stays frozen)."""
        params = [p for n, p in self._named(name)]
        for p in params:
            p.requires_grad_(True)
        return params

    def set_training(self, name: str, training: bool) -> None:
        """Switch only the adapter's dropout between train and eval; the backbone stays in eval()."""
        for module_name, module in self.encoder.named_modules():
            if module_name.endswith(f"lora_dropout.{name}"):
                module.train(training)

    def state_dict(self, name: str) -> dict[str, torch.Tensor]:
        """The adapter's weights in peft's saved format (adapter name stripped), cloned to CPU."""
        from peft import get_peft_model_state_dict

        state = get_peft_model_state_dict(self._peft, adapter_name=name)
        return {k: v.detach().to("cpu").clone().contiguous() for k, v in state.items()}

    def scaling(self, name: str) -> float:
        """The factor peft applies to B · A of adapter ``name`` (alpha / r, or what a peft merge set)."""
        for module in self.encoder.modules():
            if isinstance(getattr(module, "scaling", None), dict) and name in module.scaling:
                return float(module.scaling[name])
        raise KeyError(f"Adapter {name!r} is not loaded. Loaded: {self.names}.")

    def peft_merge(self, name: str, adapters: list[str], weights: list[float], combination_type: str,
                   density: float | None = None) -> None:
        """Add adapter ``name`` made by peft's ``LoraModel.add_weighted_adapter`` (the baseline
        :mod:`cmtl.merging.methods` is measured against; it combines A and B separately)."""
        missing = [a for a in adapters if a not in self]
        if missing:
            raise KeyError(f"Adapters {missing} are not loaded. Loaded: {self.names}.")
        self._peft.base_model.add_weighted_adapter(adapters=adapters, weights=weights, adapter_name=name,
                                                   combination_type=combination_type, density=density)
        self._freeze_all()
        self.set_training(name, False)

    def modules(self, name: str) -> dict[str, nn.Module]:
        """The layers adapter ``name`` adapts, keyed as in :meth:`state_dict` (``….query``)."""
        if name not in self:
            raise KeyError(f"Adapter {name!r} is not loaded. Loaded: {self.names}.")
        return {path: module for path, module in self._peft.named_modules()
                if isinstance(getattr(module, "lora_A", None), nn.ModuleDict) and name in module.lora_A}

    def num_parameters(self, name: str) -> int:
        return sum(p.numel() for _, p in self._named(name))

    # --- internals --------------------------------------------------------------

    def _named(self, name: str):
        if name not in self:
            raise KeyError(f"Adapter {name!r} is not loaded. Loaded: {self.names}.")
        marker = f".{name}."
        return [(n, p) for n, p in self.encoder.named_parameters() if "lora_" in n and marker in n + "."]

    def _take_back(self, name: str, first: bool) -> None:
        """Undo an :meth:`add` that failed partway. peft (0.21) then forgets only the adapter's name: the
        layers it had already built stay in the encoder, unlisted, and their tensors would be saved with
        every other adapter's weights. The first adapter's failed add restores the plain encoder."""
        from peft.functional import delete_adapter
        from peft.tuners.tuners_utils import BaseTunerLayer

        if first:  # get_peft_model wrapped the encoder's layers in place: put the plain ones back
            self._peft = None
            wrapped = [(path, m) for path, m in self.encoder.named_modules() if isinstance(m, BaseTunerLayer)]
            for path, module in wrapped:
                parent, _, child = path.rpartition(".")
                setattr(self.encoder.get_submodule(parent), child, module.get_base_layer())
            return
        self._peft.peft_config.pop(name, None)
        delete_adapter(self.encoder, name, prefix="lora_")  # from every layer, listed or not

    def _freeze_all(self) -> None:
        # peft makes the active adapter trainable; cmtl decides what trains, per call.
        for p in self.encoder.parameters():
            p.requires_grad_(False)


def check_adapter_state(state: dict[str, torch.Tensor], config: AdapterConfig, encoder: torch.nn.Module,
                        path: Path) -> None:
    """Check stored LoRA factors against their recorded config and the backbone they adapt: each tensor
    a ``lora_A`` (r, in) or ``lora_B`` (out, r) of a linear layer in ``config``'s target modules and layers.

    Raises:
        CorruptFileError: a tensor of another module, rank or width; names the file and the shapes.
    """
    problems = []
    for name, tensor in sorted(state.items()):
        module_name, part = lora_key(name) or ("", "")
        module_name = module_name.removeprefix(PEFT_PREFIX)
        try:
            module = encoder.get_submodule(module_name)
        except AttributeError:
            module = None
        layer = next((int(p) for p in module_name.split(".") if p.isdigit()), None)
        dims = None if module is None else linear_dims(module)
        if (not part or dims is None
                or (config.target_modules is not None and not targets(module_name, config.target_modules))
                or (config.layers is not None and layer not in config.layers)):
            problems.append(f"tensor {name!r} is not a LoRA factor of the adapted modules "
                            f"{list(config.target_modules or [])} in layers {list(config.layers or []) or 'all'}")
            continue
        expected = (config.r, dims[0]) if part == "A" else (dims[1], config.r)
        if tuple(tensor.shape) != expected:
            problems.append(f"tensor {name!r}: expected shape {expected}, found {tuple(tensor.shape)}")
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise CorruptFileError(f"File {str(path)!r} does not fit its recorded adapter (rank {config.r}): "
                               f"{problems[0]}{more}. {STORED_FILE_FIX}")


# --- per-row LoRA (a mixed-task batch: each row its own factors) ----------------------------

RowFactors = Callable[[], "tuple[torch.Tensor, torch.Tensor, float | None] | None"]


def add_row_lora(out: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                 scaling: float | None = None) -> torch.Tensor:
    """``out + scaling · x Aᵀ Bᵀ`` with row b's own factors: ``x`` (B, T, in), ``out`` (B, T, out),
    ``a`` (B, r, in), ``b`` (B, out, r); two batched matrix products, no loop over rows.
    ``scaling=None`` adds the term unscaled (a caller that folded the scaling into ``b``). The term is
    computed and added in the factors' precision, and the sum rounded once to the layer's (a half-precision
    backbone's), as peft does."""
    delta = torch.bmm(torch.bmm(x.to(a.dtype), a.transpose(1, 2)), b.transpose(1, 2))  # (B, T, out)
    return (out + (delta if scaling is None else scaling * delta)).to(out.dtype)  # one rounding, as peft


def hook_row_lora(module: nn.Module, factors: RowFactors) -> torch.utils.hooks.RemovableHandle:
    """Hook ``module`` so its output gains :func:`add_row_lora` of ``factors()``, asked at every forward:
    ``(a (B, r, in), b (B, out, r), scaling)`` gathered for the batch's rows, or ``None`` to add nothing."""

    def hook(mod: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        rows = factors()
        return out if rows is None else add_row_lora(out, args[0], *rows)

    return module.register_forward_hook(hook)


class TaskLoRA(nn.Module):
    """Small LoRA factors per task beside the shared adapter: in a mixed batch, row b's output of
    every adapted layer gains its own task's ΔW_t x = (alpha / r) · B_t A_t x, through forward hooks
    (two batched matrix products per layer, gathered by row; no loop over tasks).

    Args:
        shapes: ``{module path: (in_features, out_features)}`` of the layers the shared adapter
            adapts, paths in peft's state-dict form (``….attention.self.query``; see :func:`lora_shapes`).
        num_tasks: Tasks of the group, in order; ``groups`` values index them.
        r: Rank of each task's factors (B starts at zero).
        alpha: Scaling numerator: the delta is scaled by ``alpha / r``.
    """

    def __init__(self, shapes: dict[str, tuple[int, int]], num_tasks: int, r: int, alpha: float):
        super().__init__()
        self.paths = sorted(shapes)
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        self.A, self.B = nn.ParameterList(), nn.ParameterList()
        for path in self.paths:
            fan_in, fan_out = shapes[path]
            a = torch.empty(num_tasks, r, fan_in)
            for t in range(num_tasks):  # peft's LoRA A initialisation, per task
                nn.init.kaiming_uniform_(a[t], a=math.sqrt(5))
            self.A.append(nn.Parameter(a))
            self.B.append(nn.Parameter(torch.zeros(num_tasks, fan_out, r)))
        self.groups: torch.Tensor | None = None
        self._handles: list = []

    def attach(self, modules: dict[str, nn.Module]) -> None:
        """Hook ``modules`` (``{path: module}``, the adapted layers) so their outputs gain the rows' deltas."""
        self.detach()
        for i, path in enumerate(self.paths):
            self._handles.append(hook_row_lora(modules[path], self._rows(i)))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _rows(self, i: int) -> RowFactors:
        def rows() -> tuple[torch.Tensor, torch.Tensor, float]:
            if self.groups is None:
                raise RuntimeError("TaskLoRA needs the rows' tasks: call the model through TaskLoRA.wrap(forward).")
            return self.A[i][self.groups], self.B[i][self.groups], self.scaling  # (B, r, in), (B, out, r)

        return rows

    def wrap(self, forward: Callable[[dict[str, torch.Tensor]], torch.Tensor]
             ) -> Callable[[dict[str, torch.Tensor]], torch.Tensor]:
        """``forward`` with ``inputs["groups"]`` routed to the hooks for the duration of the call."""

        def wrapped(inputs: dict[str, torch.Tensor]) -> torch.Tensor:
            self.groups = inputs["groups"]
            try:
                return forward(inputs)
            finally:
                self.groups = None

        return wrapped

    def state(self, t: int) -> dict[str, torch.Tensor]:
        """Task t's factors in peft's state-dict format (:func:`lora_state`), on CPU."""
        return lora_state({path: (a[t].detach().cpu().clone().contiguous(), b[t].detach().cpu().clone().contiguous())
                           for path, a, b in zip(self.paths, self.A, self.B)})

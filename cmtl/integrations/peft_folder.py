"""A task version as a standard PEFT adapter folder, and back.

:func:`write_folder` writes what ``PeftModel.from_pretrained(base_model, folder)`` loads
(``adapter_config.json``, ``adapter_model.safetensors``), plus cmtl's own files beside them: the head
(``cmtl_head.safetensors``), the task and backbone it belongs to (``cmtl_task.json``) and a model card
(``README.md``). :func:`read_folder` reads such a folder, or any PEFT LoRA folder for an encoder
(then without head or task). ``Registry.export_peft`` / ``Registry.import_peft`` and ``cmtl export`` /
``cmtl import`` use them.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from cmtl._version import __version__
from cmtl.core.adapters import AdapterConfig
from cmtl.core.tasks import TaskSpec
from cmtl.errors import DataError
from cmtl.registry.store import MANIFEST

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
HEAD = "cmtl_head.safetensors"
TASK = "cmtl_task.json"
CARD = "README.md"
#: What an export or ``PeftModel.save_pretrained`` writes into a folder: ``overwrite`` replaces nothing else.
_WRITTEN = frozenset({ADAPTER_CONFIG, ADAPTER_WEIGHTS, "adapter_model.bin", HEAD, TASK, CARD})


@dataclass
class PeftFolder:
    """What a PEFT adapter folder holds: the LoRA settings and weights and, when cmtl wrote it, the
    task's spec and head and the backbone record (name, weights hash) it was trained on."""

    adapter: AdapterConfig
    state: dict[str, torch.Tensor]
    base_model: str | None
    spec: TaskSpec | None = None
    head: dict[str, torch.Tensor] | None = None
    backbone: dict[str, Any] | None = None
    source: dict[str, Any] | None = None  # task, version, metrics, cmtl version of the export
    pattern: str | None = None  # a string target_modules: peft's regular expression over module paths


def write_folder(path: str | Path, *, adapter: AdapterConfig, state: dict[str, torch.Tensor], base_model: str,
                 spec: TaskSpec, head: dict[str, torch.Tensor], backbone: dict[str, Any],
                 source: dict[str, Any], layout: dict[str, Any] | None = None, overwrite: bool = False) -> Path:
    """Write the folder at ``path`` (whole, or not at all). ``backbone``: the registry's backbone record
    (its ``sha256`` is checked on import); ``source``: task, version and metrics for the card;
    ``layout``: :func:`cmtl.core.adapters.peft_layout` of the backbone, so peft places the adapter as cmtl did.

    ``overwrite`` replaces only an earlier export: a folder (not a link) holding ``adapter_config.json`` and no
    other files than an export or ``PeftModel.save_pretrained`` writes. The old folder is moved aside, the new one
    renamed into its place, and only then is the old one deleted: a failure in between puts the old one back, and a
    crash leaves it beside ``path`` as ``.<name>.old-<hex>``.

    Raises:
        FileExistsError: ``path`` exists and is not an empty folder, and is not an earlier export or
            ``overwrite`` is not set.
    """
    from peft import LoraConfig

    path = Path(path)
    _check_target(path, overwrite)
    config = LoraConfig(r=adapter.r, lora_alpha=adapter.alpha, lora_dropout=adapter.dropout,
                        target_modules=list(adapter.target_modules) if adapter.target_modules else None,
                        layers_to_transform=list(adapter.layers) if adapter.layers is not None else None,
                        bias="none", base_model_name_or_path=base_model, inference_mode=True, **(layout or {}))
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    try:
        config.save_pretrained(str(staging))
        save_file({k: v.contiguous() for k, v in state.items()}, str(staging / ADAPTER_WEIGHTS),
                  metadata={"format": "pt"})
        save_file({k: v.contiguous() for k, v in head.items()}, str(staging / HEAD))
        record = {"spec": spec.to_dict(), "backbone": backbone, "source": source, "cmtl_version": __version__}
        (staging / TASK).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        (staging / CARD).write_text(_card(spec, base_model, backbone, adapter, source), encoding="utf-8")
        _put_in_place(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return path


def _check_target(path: Path, overwrite: bool) -> None:
    """Refuse to write at ``path`` unless nothing is there, an empty folder, or (with ``overwrite``) an earlier
    export; see :func:`write_folder`."""
    if not os.path.lexists(path) or (path.is_dir() and not path.is_symlink() and not any(path.iterdir())):
        return
    if not overwrite:
        raise FileExistsError(f"{str(path)!r} exists and is not empty. Pick a new folder, or pass overwrite=True "
                              "(cmtl export --overwrite) to replace an earlier export there.")
    why = _not_an_export(path)
    if why:
        raise FileExistsError(f"{str(path)!r} {why}, and overwrite replaces only a folder that an earlier export "
                              f"wrote ({ADAPTER_CONFIG} and no other files than an export writes). Pick a new folder, "
                              "or move or delete this one yourself if nothing in it is needed.")


def _not_an_export(path: Path) -> str | None:
    """Why ``path`` is not a folder that an export (or ``PeftModel.save_pretrained``) wrote; None when it is one."""
    if path.is_symlink():
        return "is a symbolic link"
    if not path.is_dir():
        return "is a file"
    if (path / MANIFEST).exists():
        return f"holds a {MANIFEST} (a cmtl registry)"
    if not (path / ADAPTER_CONFIG).is_file():
        return f"has no {ADAPTER_CONFIG}"
    other = next((p.name for p in sorted(path.iterdir()) if p.is_symlink() or not p.is_file()), None)
    if other is not None:
        return f"holds {other!r}, which is not a file"
    other = next((p.name for p in sorted(path.iterdir()) if p.name not in _WRITTEN), None)
    return None if other is None else f"holds {other!r}, which an export does not write"


def _put_in_place(staging: Path, path: Path) -> None:
    """Rename ``staging`` to ``path``. What is at ``path`` (an earlier export, or an empty folder) is moved aside
    first and deleted only once the new folder is in place, so no failure loses both."""
    if not os.path.lexists(path):
        os.replace(staging, path)
        return
    aside = path.parent / f".{path.name}.old-{uuid.uuid4().hex}"
    os.replace(path, aside)
    try:
        os.replace(staging, path)
    except BaseException:
        os.replace(aside, path)
        raise
    shutil.rmtree(aside)


def read_folder(path: str | Path) -> PeftFolder:
    """Read a PEFT LoRA adapter folder (and cmtl's files in it, if any).

    Raises:
        DataError: no adapter config or weights, an adapter that is not LoRA, or LoRA settings that plain
            LoRA on the bare backbone cannot reproduce (DoRA, per-module ranks or alphas, trained biases, saved
            whole modules, base-rewriting initialisations, …; rsLoRA is converted exactly).
    """
    from peft import LoraConfig, PeftConfig

    path = Path(path)
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not (path / name).is_file():
            raise DataError(f"{str(path)!r} is not a PEFT adapter folder: it has no {name}. Point to the folder "
                            "that PeftModel.save_pretrained (or cmtl export) wrote.")
    config = PeftConfig.from_pretrained(str(path))
    if not isinstance(config, LoraConfig):
        raise DataError(f"The adapter in {str(path)!r} is {type(config).__name__}; cmtl imports LoRA adapters only.")
    unsupported = _unsupported(config)
    if unsupported:
        raise DataError(f"The LoRA adapter in {str(path)!r} sets {'; '.join(unsupported)}. cmtl's adapters compute "
                        "plain LoRA (x + (alpha/r)·B·A·x on the targeted linear layers), so it would run another "
                        "adapter than the folder holds. Train or save the adapter without these settings to "
                        "import it.")
    # A string is a regular expression that peft matches against whole module paths, layers_to_transform
    # unread: the modules and layers are those the weights adapt (left None here, read from the weights on import).
    pattern = config.target_modules if isinstance(config.target_modules, str) else None
    layers = None if pattern is not None else config.layers_to_transform
    # rsLoRA scales by alpha/sqrt(r); plain LoRA with alpha·sqrt(r) scales by the same number.
    alpha = float(config.lora_alpha) * (math.sqrt(config.r) if config.use_rslora else 1.0)
    adapter = AdapterConfig(r=int(config.r), alpha=alpha, dropout=float(config.lora_dropout),
                            target_modules=(tuple(sorted(config.target_modules))
                                            if config.target_modules and pattern is None else None),
                            layers=None if layers is None else tuple([layers] if isinstance(layers, int) else layers))
    folder = PeftFolder(adapter, load_file(str(path / ADAPTER_WEIGHTS)), config.base_model_name_or_path,
                        pattern=pattern)
    if (path / TASK).is_file() and (path / HEAD).is_file():
        record = json.loads((path / TASK).read_text(encoding="utf-8"))
        folder.spec = TaskSpec.from_dict(record["spec"])
        folder.head = load_file(str(path / HEAD))
        folder.backbone, folder.source = record.get("backbone"), record.get("source")
    return folder


#: TaskSpec fields that say where a task's data lives and how its integer labels read (positions or values), not
#: what its head answers: a spec may differ there.
_WHERE_DATA_LIVES = ("name", "text_column", "label_column", "label_encoding", "description")


def spec_differences(exported: TaskSpec, spec: TaskSpec) -> list[str]:
    """How ``spec`` differs from the ``exported`` task in what its head answers, as ``field: exported X, spec
    Y``: an exported head answers only as its own task (its labels, problem type, threshold, whether it reads
    text pairs, …), whatever its name, columns, label encoding and description."""
    mine, theirs = spec.to_dict(), exported.to_dict()
    for d in (mine, theirs):  # the pair column's name is where the second texts live; having one is not
        d["text_pair_column"] = d.get("text_pair_column") is not None
    return [f"{k}: exported {theirs.get(k)!r}, spec {mine.get(k)!r}" for k in sorted(set(mine) | set(theirs))
            if k not in _WHERE_DATA_LIVES and mine.get(k) != theirs.get(k)]


#: ``init_lora_weights`` values that only choose the starting A and B; the others (PiSSA, OLoRA, CorDA,
#: LoftQ, LoRA-GA, …) also rewrite the base model's weights, which a folder does not carry.
_PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal")


def _unsupported(config: Any) -> list[str]:
    """The settings of a peft ``LoraConfig`` that change what the adapter computes and that plain LoRA on
    the bare backbone cannot reproduce, each as ``name=value`` (empty: the folder imports as it is)."""
    found = {name: getattr(config, name, None) for name in (
        "use_dora", "lora_bias", "use_qalora", "layer_replication", "trainable_token_indices", "target_parameters",
        "alora_invocation_tokens", "modules_to_save", "exclude_modules", "megatron_config", "velora_config",
        "monteclora_config", "kasa_config", "arrow_config", "use_bdlora")}
    found["bias"] = None if config.bias == "none" else config.bias
    found["rank_pattern"] = {k: v for k, v in (config.rank_pattern or {}).items() if v != config.r}
    found["alpha_pattern"] = {k: v for k, v in (config.alpha_pattern or {}).items() if v != config.lora_alpha}
    found["init_lora_weights"] = None if config.init_lora_weights in _PLAIN_INITS else config.init_lora_weights
    return [f"{name}={value!r}" for name, value in found.items() if value]


def _decision(spec: TaskSpec) -> str:
    """How the head's outputs give the prediction, for the card (as :meth:`TaskSpec.decode` decides)."""
    if spec.problem_type == "multi_label":
        return f"; the task predicts every label where sigmoid(logit) >= {spec.threshold:g}"
    if spec.problem_type == "regression":
        return "; the outputs are the predicted values"
    return "; the task predicts the label of the largest logit"


def _card(spec: TaskSpec, base_model: str, backbone: dict[str, Any], adapter: AdapterConfig,
          source: dict[str, Any]) -> str:
    metrics = "\n".join(f"| {k} | {v:.4f} |" for k, v in sorted((source.get("metrics") or {}).items())
                        if isinstance(v, (int, float)))
    # A registry on a cut backbone runs only its first layers; the full model computes other features.
    layers = backbone.get("num_hidden_layers")
    cut = "" if layers is None else f", num_hidden_layers={layers}"
    # The registry computes its features in its backbone's precision, so the snippet names it every time:
    # transformers 5 loads a checkpoint in its own precision unless told. A record without a dtype loaded "auto".
    dtype = backbone.get("dtype") or "auto"
    cut += ', dtype="auto"' if dtype == "auto" else f", dtype=torch.{dtype}"
    imports = "" if dtype == "auto" else "import torch\n"
    return f"""---
library_name: peft
base_model: {base_model}
tags: [cmtl, lora, text-classification]
---

# {spec.name}: a LoRA adapter and head exported by cmtl

Task `{spec.name}` ({spec.problem_type}), version {source.get('version')} of a cmtl registry, exported
with cmtl {__version__}. Labels, in the order of the head's outputs: {', '.join(f'`{x}`' for x in spec.labels)}.

Backbone: `{backbone.get('name_or_path')}` (weights SHA-256 `{backbone.get('sha256')}`), pooling
`{backbone.get('pooling')}`, at most {backbone.get('max_length')} tokens. LoRA r={adapter.r}, alpha={adapter.alpha:g} on
{', '.join(adapter.target_modules or ())}{'' if adapter.layers is None else f' of layers {list(adapter.layers)}'}.

| metric (validation) | value |
|---|---|
{metrics}

## Use

```python
{imports}from transformers import AutoModel
from peft import PeftModel

model = PeftModel.from_pretrained(AutoModel.from_pretrained("{base_model}"{cut}), "<this folder>")
```

The head (`{HEAD}`: `linear.weight`, `linear.bias`) maps the {backbone.get('pooling')}-pooled last hidden
state to one output per label{_decision(spec)}. Into a cmtl registry on the same backbone:
`Registry.import_peft("<this folder>")` or `cmtl import REGISTRY <this folder>`.
"""

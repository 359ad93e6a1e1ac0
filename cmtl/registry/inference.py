"""A registry loaded on its backbone, read-only: predictions, metrics, embeddings, drift checks.

:class:`LoadedRegistry` adds to the manifest's read side (:class:`~cmtl.registry.reader.RegistryReader`)
the backbone and the adapters and heads loaded on it (:class:`~cmtl.registry.runtime.Runtime`);
:class:`~cmtl.registry.Registry` adds the verbs that train and write.
"""

from __future__ import annotations

import gc
import weakref
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from cmtl.core.backbone import Backbone, BackboneConfig, load_backbone
from cmtl.core.tasks import TaskSpec
from cmtl.data import Encoded, Examples, as_texts, encode, read_examples
from cmtl.errors import DataError, InvalidParameterError, bad_param
from cmtl.monitoring.drift import DriftMonitor, DriftReport, MonitorConfig
from cmtl.registry import commit, store
from cmtl.registry.manifest import backbone_config, refuse_other_settings
from cmtl.registry.reader import RegistryReader
from cmtl.registry.runtime import Runtime
from cmtl.training.evaluation import compute_metrics


def check_free(backbone: Backbone, root: Path) -> None:
    """Refuse a loaded backbone that another live registry object already answers through: each puts its
    adapters into the backbone's encoder, under names like ``spam__v1``, so the two would overwrite each
    other's and answer with them."""
    owner = getattr(backbone, "_registry", None)
    if owner is not None and owner() is not None:
        gc.collect()  # an owner the caller dropped may live on in a reference cycle until collected
    if owner is not None and owner() is not None:
        raise InvalidParameterError(
            f"This loaded backbone already serves the registry {str(owner().root)!r}, which puts its adapters into "
            f"the backbone's encoder; registry {str(root)!r} would overwrite them. Give it a backbone of its own: "
            "load_backbone(config) again, or pass the BackboneConfig and let the registry load it.")


class LoadedRegistry(RegistryReader):
    """The read side of the registry at ``root`` with ``backbone`` loaded: answers through any stored
    task version or merged entry (loaded lazily, kept while their files stay the same)."""

    def __init__(self, root: Path, manifest: dict[str, Any], backbone: Backbone):
        super().__init__(root, manifest)
        check_free(backbone, root)
        backbone._registry = weakref.ref(self)  # see check_free
        self.backbone = backbone
        self._runtime = Runtime(backbone)
        self._lock = self._runtime.lock  # one active adapter at a time: forward passes must not interleave

    @classmethod
    def open(cls, path: str | Path, backbone: BackboneConfig | str | None = None, *,
             device: str = "auto") -> "LoadedRegistry":
        """Open an existing registry.

        Args:
            path: The registry folder.
            backbone: Load this backbone instead of the recorded one (e.g. the same weights moved to
                another folder). Its weights (and, where recorded, its tokenizer and model config) must match
                the recorded ones.

        Raises:
            RegistryError: no registry at ``path``.
            BackboneMismatchError: the backbone's weights, tokenizer or model config differ from the recorded ones.
        """
        root = Path(path)
        manifest = store.read_manifest(root)
        recorded = manifest["backbone"]
        if isinstance(backbone, BackboneConfig):
            config = backbone
        else:
            config = backbone_config(recorded, **({} if backbone is None else {"name_or_path": backbone}))
        loaded = load_backbone(config, device=device)
        refuse_other_settings(recorded, loaded.config, f"Registry {str(root)!r}")
        loaded.check_matches(recorded["sha256"], f"registry {str(root)!r}",
                             tokenizer_sha256=recorded.get("tokenizer_sha256"),
                             model_config=recorded.get("model_config"))
        return cls(root, manifest, loaded)

    def reload(self) -> bool:
        """Re-read the manifest if another process changed it; return whether it changed.

        Any change counts, not only a new generation (a registry deleted and created again can reach the
        same one). Adapters and heads loaded from files the new manifest no longer names (a task or merge
        removed and added again under its name) are unloaded.

        Raises:
            BackboneMismatchError: the registry on disk now records another backbone (it was replaced);
                this object keeps what it had.
        """
        manifest = commit.read_manifest(self.root, self._manifest["backbone"])
        with self._lock:
            if manifest == self._manifest:
                return False
            self._adopt(manifest)
        return True

    def __repr__(self) -> str:
        return f"Registry({str(self.root)!r}, backbone={self.backbone.config.name_or_path!r}, tasks={self.tasks()})"

    def predict(self, task: str, texts: str | Sequence[str], text_pairs: Sequence[str] | None = None,
                *, version: int | None = None, merge: str | None = None) -> list:
        """Predicted labels (a list of label strings; lists of labels for multi-label; numbers for regression).

        ``version`` picks a stored version (default: current); ``merge`` a merged entry holding ``task``.
        """
        with self._lock:  # the labels and the outputs of one version, whatever another thread rolls back
            spec = self.spec(task, version=version, merge=merge)
            return spec.decode(self._logits(task, spec, texts, text_pairs, version, merge))

    def predict_proba(self, task: str, texts: str | Sequence[str], text_pairs: Sequence[str] | None = None,
                      *, version: int | None = None, merge: str | None = None) -> np.ndarray:
        """Per-label probabilities, shape (N, L), columns in the order of the answering version's labels
        (``spec(task, version=version, merge=merge).labels``)."""
        with self._lock:
            spec = self.spec(task, version=version, merge=merge)
            return spec.probabilities(self._logits(task, spec, texts, text_pairs, version, merge)).numpy()

    def evaluate(self, task: str, data: Any, *, version: int | None = None, merge: str | None = None
                 ) -> dict[str, float]:
        """Metrics of ``task`` (current version unless given, or through ``merge``) on labelled ``data``."""
        with self._lock:  # targets read with the labels of the version that answers
            spec = self.spec(task, version=version, merge=merge)
            encoded = self._encode(read_examples(data, spec), spec)
            logits = self._runtime.predict(self, task, encoded, version, merge)
        return compute_metrics(spec, logits, encoded.targets)

    def embed(self, texts: str | Sequence[str], task: str | None = None, *, text_pairs: Sequence[str] | None = None,
              version: int | None = None, batch_size: int = 64) -> torch.Tensor:
        """Pooled embeddings (N, H) of ``texts``: through ``task``'s adapter, or the plain backbone if ``None``.
        With ``text_pairs``, each text is read with its pair (as a task on text pairs reads them)."""
        if task is None and version is not None:
            raise InvalidParameterError(bad_param("version", "embed", "come with a task (the plain backbone has "
                                                  "no versions)", version))
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise InvalidParameterError(bad_param("batch_size", "embed", "be a positive int", batch_size))
        texts = as_texts(texts)
        pairs = None if text_pairs is None else _matched_pairs(texts, text_pairs)
        with self._lock:
            key = None if task is None else self._runtime.task(self, task, self._version(task, version))
            return self._runtime.embed(texts, key, batch_size, pairs)

    def adapter_state(self, task: str, version: int | None = None, *, merge: str | None = None
                      ) -> dict[str, torch.Tensor]:
        """The LoRA factors that answer ``task`` (current version unless given, or through ``merge``), as
        loaded: peft's state-dict keys (``….lora_A.weight`` (r, in), ``….lora_B.weight`` (out, r)), CPU copies."""
        with self._lock:
            return self._runtime.bank.state_dict(self._runtime.keys(self, task, version, merge)[0])

    def head_state(self, task: str, version: int | None = None, *, merge: str | None = None
                   ) -> dict[str, torch.Tensor]:
        """The weights of the head that answers ``task`` (as :meth:`adapter_state`), copies on the CPU."""
        with self._lock:
            head = self._runtime.heads[self._runtime.keys(self, task, version, merge)[1]]
            return {k: v.detach().cpu().clone() for k, v in head.state_dict().items()}

    def monitor(self, task: str, texts: Sequence[str], text_pairs: Sequence[str] | None = None, *,
                reference: Sequence[str] | None = None, reference_pairs: Sequence[str] | None = None,
                config: MonitorConfig | None = None) -> DriftReport:
        """Test whether incoming unlabelled ``texts`` for ``task`` have drifted from its reference sample.

        The reference is, unless given, the held-out sample kept with the current version (or with its
        nearest ancestor that kept at least ``config.min_samples``): the data the task was last validated
        on. A task on text pairs needs ``text_pairs`` (and ``reference_pairs`` with ``reference``): the
        test then embeds each text with its pair. See :mod:`cmtl.monitoring.drift` for the test. The report's
        confidence and predicted-label fields are filled for a single-label task only (``None`` otherwise).

        Raises:
            DataError: fewer texts than ``config.min_samples``, no reference sample, pairs missing for
                a task on text pairs (given for one on single texts), or ``reference_pairs`` without ``reference``.
        """
        with self._lock:  # one version's labels and probabilities, whatever another thread rolls back
            current = self._version(task, None)
        spec, config = self.spec(task, version=current), config or MonitorConfig()
        paired = spec.text_pair_column is not None
        for name, value in (("text_pairs", text_pairs), ("reference_pairs", reference_pairs)):
            if value is not None and not paired:
                raise DataError(f"Task {task!r} takes single texts, but {name} were given: leave them out.")
        if reference is None and reference_pairs is not None:
            raise DataError(f"reference_pairs were given without reference for task {task!r}: they pair with the "
                            "reference texts. Pass reference=[...] as well, or leave both out to use the kept sample.")
        if paired and (text_pairs is None or (reference is not None and reference_pairs is None)):
            raise DataError(f"Task {task!r} takes text pairs: pass text_pairs=[...]"
                            f"{' and reference_pairs=[...]' if reference is not None else ''} as well.")
        if reference is None:
            v = current
            while v is not None:
                held = self.holdout(task, v, lineage=False)
                if held is not None and len(held) >= config.min_samples:
                    break
                v = self._version_record(task, v)["parent"]
            if v is None:
                raise DataError(f"No version of task {task!r} in the current one's lineage kept a held-out sample of "
                                f"at least {config.min_samples} texts to compare against. Pass reference=[...] texts.")
            reference, reference_pairs = held.texts, held.pairs
        single = spec.problem_type == "single_label"
        proba = (lambda xs, ps=None: self.predict_proba(task, xs, ps, version=current)) if single else None
        return DriftMonitor(lambda xs, ps=None: self.embed(xs, text_pairs=ps), reference,
                            reference_pairs=reference_pairs, config=config, predict_proba=proba, labels=spec.labels,
                            task=task).check(texts, pairs=text_pairs)

    def _adopt(self, manifest: dict[str, Any]) -> None:
        """Make ``manifest`` this object's, unloading every adapter and head loaded from files it no longer names."""
        self._manifest = manifest
        self._runtime.adopt(self)

    def _encode(self, examples: Examples, spec: TaskSpec) -> Encoded:
        return encode(examples, spec, self.backbone.tokenize)

    def _logits(self, task: str, spec: TaskSpec, texts, text_pairs, version: int | None,
                merge: str | None = None) -> torch.Tensor:
        pairs = None
        if spec.text_pair_column is None and text_pairs is not None:
            raise DataError(f"Task {spec.name!r} takes single texts, but text_pairs were given: leave them out, "
                            "or add the task with TaskSpec(..., text_pair_column=...) to classify pairs.")
        if spec.text_pair_column is not None:
            if text_pairs is None:
                raise DataError(f"Task {spec.name!r} takes text pairs: pass text_pairs=[...] as well.")
            pairs = _matched_pairs(as_texts(texts), text_pairs)
        encoded = encode(Examples(as_texts(texts), pairs), spec, self.backbone.tokenize, with_targets=False)
        with self._lock:
            return self._runtime.predict(self, task, encoded, version, merge)


def _matched_pairs(texts: list[str], text_pairs: Sequence[str]) -> list[str]:
    """``text_pairs`` as a list of strings, one per text.

    Raises:
        DataError: not strings, or not as many as ``texts``.
    """
    pairs = as_texts(text_pairs)
    if len(pairs) != len(texts):
        raise DataError(f"Got {len(texts)} texts but {len(pairs)} text_pairs; they must match.")
    return pairs

"""Avalanche 0.6 bridge: cmtl text tasks as a task-incremental benchmark, a LoRA model its
strategies can train, and a runner that returns the accuracy matrix with Avalanche's own metrics.

The only cmtl module that imports ``avalanche``, and only inside functions (importing
Avalanche takes seconds and warns about QP solvers)::

    from cmtl.integrations import avalanche as av
    stream = [("spam", spam_train, spam_test, ["ham", "spam"]), ("trec", ...)]
    benchmark = av.export_benchmark(stream, backbone)
    model = av.build_model(backbone, av.task_specs(stream))
    run = av.run_strategy("ewc", benchmark, model)
    print(run.report().to_markdown())

Avalanche: Lomonaco et al., 2021, "Avalanche: an End-to-End Library for Continual Learning";
https://avalanche.continualai.org. Strategies: EWC (Kirkpatrick et al., 2017), LwF (Li & Hoiem,
2017), experience replay (Chaudhry et al., 2019, "On Tiny Episodic Memories in Continual
Learning").
"""

from __future__ import annotations

import functools
import math
import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Literal, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cmtl.benchmarks.metrics import ContinualReport
from cmtl.core.adapters import AdapterBank, AdapterConfig
from cmtl.core.backbone import Backbone
from cmtl.core.tasks import TaskHead, TaskSpec, route_to_heads
from cmtl.data import Encoded, batches, encode, read_examples
from cmtl.training.evaluation import Forward
from cmtl.training.loop import seeded

if TYPE_CHECKING:  # annotations only: importing avalanche at runtime happens inside functions
    from avalanche.benchmarks.scenarios.generic_scenario import CLScenario

TextExperience = tuple[str | TaskSpec, Any, Any, Sequence[str] | None]
AvalancheStrategy = Literal["naive", "replay", "ewc", "lwf"]
AVALANCHE_STRATEGIES = ("ewc", "lwf", "naive", "replay")
ADAPTER_NAME = "shared"
#: Logit given to the columns a task's head does not have when a mini-batch mixes tasks with
#: different label counts (Avalanche's ``IncrementalClassifier`` masks with the same value).
#: Avalanche's ``MultiTaskModule`` fills them with 0, which can win the argmax.
_EXP_ACCURACY = re.compile(r"^Top1_Acc_Exp/eval_phase/test_stream/Task\d+/Exp(\d+)$")


# --- benchmark ---------------------------------------------------------------------


def task_specs(experiences: Sequence[TextExperience]) -> list[TaskSpec]:
    """The single-label :class:`TaskSpec` of each ``(task, train_rows, test_rows, labels)`` entry.

    ``task`` is a name (``labels`` required) or a ``TaskSpec`` (``labels`` ``None`` or equal).
    """
    if isinstance(experiences, (str, bytes)) or not len(experiences):
        raise ValueError("experiences must be a non-empty list of (task_name, train_rows, test_rows, labels).")
    specs = []
    for i, entry in enumerate(experiences):
        if not isinstance(entry, (tuple, list)) or len(entry) != 4:
            raise ValueError(
                f"Experience {i} must be a (task_name, train_rows, test_rows, labels) tuple. Got {entry!r:.80}."
            )
        task, _, _, labels = entry
        spec = task if isinstance(task, TaskSpec) else TaskSpec(task, labels=labels)
        if labels is not None and tuple(str(x) for x in labels) != spec.labels:
            raise ValueError(
                f"Experience {i}: labels {list(labels)} differ from TaskSpec {spec.name!r}'s {list(spec.labels)}."
            )
        if spec.problem_type != "single_label":
            raise ValueError(
                f"Avalanche benchmarks hold class targets: task {spec.name!r} is {spec.problem_type!r}; "
                "only single_label tasks can be exported."
            )
        specs.append(spec)
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"Task names must be unique in a stream. Got {names}.")
    return specs


def export_benchmark(
    experiences: Sequence[TextExperience], backbone: Backbone, *, seq_len: int | None = None
) -> CLScenario:
    """Build a task-incremental Avalanche ``CLScenario``: experience ``t`` has task label ``t``.

    Rows are read with :func:`cmtl.data.read_examples`, tokenized with ``backbone``'s tokenizer
    and padded to ONE length for the whole stream, so Avalanche's default collate (and replay,
    which concatenates mini-batches of different experiences) can stack them. Each sample is
    ``(x, y, t)``: ``x`` (3, L) long = token ids, attention mask, token type ids; ``y`` the label
    index within its task (heads are per task, so targets are not offset); ``t`` the task label.

    Args:
        experiences: ``(task, train_rows, test_rows, labels)`` per task, in stream order.
        backbone: Supplies the tokenizer (and its truncation length).
        seq_len: Pad length; ``None`` uses the longest tokenized row of the stream.

    Returns:
        A ``CLScenario`` with ``train_stream`` and ``test_stream`` of T experiences each, whose
        datasets are ``TaskAwareSupervisedClassificationDataset`` with ``targets`` and
        ``targets_task_labels``.
    """
    from avalanche.benchmarks.scenarios.dataset_scenario import benchmark_from_datasets
    from avalanche.benchmarks.scenarios.supervised import with_classes_timeline
    from avalanche.benchmarks.scenarios.task_aware import with_task_labels

    specs = task_specs(experiences)
    read = lambda rows, spec: encode(read_examples(rows, spec), spec, backbone.tokenize)  # noqa: E731
    encoded = {
        "train": [read(entry[1], spec) for entry, spec in zip(experiences, specs)],
        "test": [read(entry[2], spec) for entry, spec in zip(experiences, specs)],
    }
    longest = max(max(e.lengths()) for split in encoded.values() for e in split)
    if seq_len is None:
        seq_len = longest
    elif seq_len < longest:
        raise ValueError(
            f"seq_len={seq_len} is shorter than the longest tokenized row ({longest} tokens). Pass seq_len >= "
            f"{longest}, or None; to cut texts shorter, lower BackboneConfig.max_length."
        )
    pad_id = backbone.pad_id
    streams = {split: [_dataset(e, t, seq_len, pad_id) for t, e in enumerate(encs)] for split, encs in encoded.items()}
    return with_classes_timeline(with_task_labels(benchmark_from_datasets(**streams)))


def _dataset(encoded: Encoded, task: int, seq_len: int, pad_id: int):
    from avalanche.benchmarks.utils import ConstantSequence, DataAttribute, TaskLabels
    from avalanche.benchmarks.utils.classification_dataset import TaskAwareSupervisedClassificationDataset

    n = len(encoded)
    _, inputs, targets = next(batches(encoded, list(range(n)), n, pad_id, torch.device("cpu")))
    extra = seq_len - inputs["input_ids"].shape[1]
    ids = F.pad(inputs["input_ids"], (0, extra), value=pad_id)  # (N, L)
    mask = F.pad(inputs["attention_mask"], (0, extra), value=0)
    types = F.pad(inputs.get("token_type_ids", torch.zeros_like(inputs["input_ids"])), (0, extra), value=0)
    x = torch.stack([ids, mask, types], dim=1)  # (N, 3, L)
    return TaskAwareSupervisedClassificationDataset(
        [torch.utils.data.TensorDataset(x, targets)],
        data_attributes=[DataAttribute(targets.tolist(), "targets"), TaskLabels(ConstantSequence(task, n))],
    )


# --- model -------------------------------------------------------------------------


def build_model(
    backbone: Backbone,
    specs: Sequence[TaskSpec],
    adapter: AdapterConfig | None = None,
    *,
    head_dropout: float = 0.1,
    seed: int = 0,
) -> nn.Module:
    """A ``TaskIncrementalModel``: ``backbone`` frozen, ONE LoRA adapter shared by all tasks, a head per task.

    The adapter is injected into ``backbone.encoder`` in place, so a backbone serves one
    model (or registry) at a time.

    Raises:
        ValueError: ``backbone`` already carries LoRA layers.
    """
    if any("lora_" in name for name, _ in backbone.encoder.named_parameters()):
        raise ValueError(
            "This backbone already carries LoRA layers (another model or registry uses it). "
            "Load a fresh one with cmtl.core.backbone.load_backbone for each model."
        )
    with seeded(seed):  # peft draws A and cmtl draws the heads from the global RNG
        return _model_class()(backbone, list(specs), adapter or AdapterConfig(), head_dropout)


def __getattr__(name: str):
    # The class subclasses Avalanche's MultiTaskModule, so it is built on first use.
    if name == "TaskIncrementalModel":
        return _model_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@functools.cache
def _model_class() -> type:
    from avalanche.models import MultiTaskModule

    class TaskIncrementalModel(MultiTaskModule):
        """Frozen cmtl backbone + one shared LoRA adapter + one :class:`TaskHead` per task.

        ``forward(x, task_labels)`` takes ``x`` (B, 3, L) as built by :func:`export_benchmark` and
        returns logits (B, max labels); columns beyond a task's labels hold :data:`cmtl.core.tasks.MASKED_LOGIT`.
        """

        def __init__(self, backbone: Backbone, specs: list[TaskSpec], adapter: AdapterConfig, head_dropout: float):
            super().__init__()
            self.specs = specs
            self.backbone = backbone
            self.bank = AdapterBank(backbone.encoder)
            self.adapter = self.bank.add(ADAPTER_NAME, adapter)
            self.bank.activate(ADAPTER_NAME)
            self.bank.parameters(ADAPTER_NAME)  # the adapter trains; the backbone stays frozen
            self.encoder = backbone.encoder  # a submodule, so model.parameters() holds the LoRA tensors
            self.heads = nn.ModuleList(TaskHead(backbone.hidden_size, s.num_outputs, head_dropout) for s in specs)
            self.heads.to(backbone.device)
            self.max_class_label = max(s.num_outputs for s in specs)
            self._token_types = "token_type_ids" in backbone.tokenizer.model_input_names

        @property
        def task_names(self) -> list[str]:
            return [s.name for s in self.specs]

        def train(self, mode: bool = True):
            # The backbone stays in eval() (as in cmtl training): only adapter dropout and heads switch.
            super().train(mode)
            self.encoder.eval()
            self.bank.set_training(ADAPTER_NAME, mode)
            return self

        def adaptation(self, experience) -> None:
            # Heads are fixed at construction; remember trained tasks for forward_all_tasks (LwF).
            if self.training:
                self.known_train_tasks_labels |= set(experience.task_labels)

        def embed(self, x: torch.Tensor) -> torch.Tensor:
            """Pooled embeddings (B, H) of ``x`` (B, 3, L), cut to the batch's longest row."""
            # export_benchmark pads on the right, so the longest row's mask sum is the width.
            width = max(int(x[:, 1].sum(1).max()), 1)
            inputs = {"input_ids": x[:, 0, :width], "attention_mask": x[:, 1, :width]}
            if self._token_types:
                inputs["token_type_ids"] = x[:, 2, :width]
            return self.backbone.embed(**inputs)

        def forward_single_task(self, x: torch.Tensor, task_label: int) -> torch.Tensor:
            return self.heads[task_label](self.embed(x))

        def forward_all_tasks(self, x: torch.Tensor) -> dict[int, torch.Tensor]:
            pooled = self.embed(x)  # the adapter is shared: encode once for every head
            return {t: self.heads[t](pooled) for t in sorted(self.known_train_tasks_labels)}

        def forward(self, x: torch.Tensor, task_labels) -> Any:
            if task_labels is None:
                return self.forward_all_tasks(x)
            if isinstance(task_labels, int):
                return self.forward_single_task(x, task_labels)
            return route_to_heads(self.embed(x), task_labels, self.heads.__getitem__, self.max_class_label)

        def forward_for(self, task: int) -> Forward:
            """Task ``task``'s forward on cmtl's padded batches, for :func:`cmtl.training.evaluation.predict_logits`."""
            head = self.heads[task]
            return lambda inputs: head(self.backbone.embed(**inputs))

        def parameters_added_per_task(self, *, in_bytes: bool = False) -> list[int]:
            """Parameters (or their bytes) each task adds to what is stored; the first brings the shared adapter."""
            size = (lambda p: p.numel() * p.element_size()) if in_bytes else (lambda p: p.numel())
            counts = [sum(size(p) for p in head.parameters()) for head in self.heads]
            counts[0] += sum(size(p) for n, p in self.encoder.named_parameters() if "lora_" in n)
            return counts

        def trainable_parameters_per_task(self) -> list[int]:
            """Parameters trained during each task's experience: the shared adapter and that task's head
            (as cmtl's shared-adapter strategies count them)."""
            lora = sum(p.numel() for n, p in self.encoder.named_parameters() if "lora_" in n)
            return [lora + sum(p.numel() for p in head.parameters()) for head in self.heads]

    TaskIncrementalModel.__module__ = __name__
    TaskIncrementalModel.__qualname__ = "TaskIncrementalModel"
    return TaskIncrementalModel


# --- strategies --------------------------------------------------------------------


@dataclass(kw_only=True, frozen=True)
class AvalancheConfig:
    """How :func:`run_strategy` trains and evaluates.

    Args:
        epochs: Passes over each experience's training data.
        batch_size: Training mini-batch size.
        eval_batch_size: Evaluation mini-batch size.
        learning_rate: AdamW learning rate.
        weight_decay: AdamW weight decay.
        seed: Seeds data order through Avalanche's RNG manager (Python, NumPy and torch global RNGs).
        device: Where Avalanche puts the model and batches; ``None`` keeps the model's device.
        measure_b: Evaluate once before any training, giving ``b`` for FWT.
        mem_size: Replay buffer size ("replay" only).
        ewc_lambda: EWC penalty weight ("ewc" only).
        lwf_alpha: LwF distillation weight ("lwf" only).
        lwf_temperature: LwF softmax temperature ("lwf" only).
    """

    epochs: int = 1
    batch_size: int = 16
    eval_batch_size: int = 64
    learning_rate: float = 1e-3
    weight_decay: float = 0.01
    seed: int = 0
    device: str | None = None
    measure_b: bool = True
    mem_size: int = 200
    ewc_lambda: float = 1.0
    lwf_alpha: float = 1.0
    lwf_temperature: float = 2.0

    def __post_init__(self) -> None:
        for key in ("epochs", "batch_size", "eval_batch_size", "mem_size"):
            value = getattr(self, key)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"AvalancheConfig.{key} must be a positive integer. Got {value!r}.")
        for key in ("learning_rate", "lwf_temperature"):
            if not getattr(self, key) > 0:
                raise ValueError(f"AvalancheConfig.{key} must be > 0. Got {getattr(self, key)!r}.")
        for key in ("weight_decay", "ewc_lambda", "lwf_alpha"):
            value = getattr(self, key)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"AvalancheConfig.{key} must be a finite number >= 0. Got {value!r}.")


@dataclass(frozen=True, kw_only=True)
class AvalancheRun:
    """What :func:`run_strategy` measured. Rows are indexed by training experience.

    Attributes:
        R: Avalanche's ``Top1_Acc_Exp`` on every test experience after each training experience.
        b: The same before any training (``None`` unless ``measure_b``).
        stream_forgetting, stream_bwt: Avalanche's ``StreamForgetting`` / ``StreamBWT`` after each
            training experience (the mean over experiences trained before the current one).
        experience_forgetting, experience_bwt: Avalanche's per-experience values after the last one.
        stream_accuracy: ``Top1_Acc_Stream`` after each training experience.
    """

    strategy: str
    task_names: tuple[str, ...]
    R: tuple[tuple[float, ...], ...]
    b: tuple[float, ...] | None
    stream_forgetting: tuple[float, ...]
    stream_bwt: tuple[float, ...]
    experience_forgetting: dict[int, float]
    experience_bwt: dict[int, float]
    stream_accuracy: tuple[float, ...]
    seconds_per_experience: tuple[float, ...]
    trainable_parameters_per_task: tuple[int, ...]
    bytes_per_task: tuple[int, ...]

    def report(self) -> ContinualReport:
        """cmtl's metrics (ACC, BWT, FWT, Chaudhry forgetting) of this run."""
        return ContinualReport.from_matrix(
            self.R, self.task_names, b=self.b, seconds_per_experience=self.seconds_per_experience,
            trainable_parameters_per_task=self.trainable_parameters_per_task, bytes_per_task=self.bytes_per_task,
        )


class _MemoryLogger:
    """Keeps the metric values of each ``eval`` call, in order (an Avalanche logger by duck typing)."""

    def __init__(self) -> None:
        self.evals: list[dict[str, Any]] = []
        self._current: dict[str, Any] = {}

    def log_metrics(self, metric_values) -> None:
        self._current.update((m.name, m.value) for m in metric_values)

    def after_eval(self, strategy, metric_values) -> None:
        self.evals.append(self._current)
        self._current = {}


def run_strategy(
    name: AvalancheStrategy,
    benchmark: CLScenario,
    model: nn.Module,
    config: AvalancheConfig | None = None,
    *,
    after_experience: Callable[[int], None] | None = None,
) -> AvalancheRun:
    """Train ``model`` on ``benchmark``'s train stream with an Avalanche strategy; evaluate after each experience.

    After every training experience the whole test stream is evaluated through an
    ``EvaluationPlugin`` with ``accuracy_metrics``, ``forgetting_metrics`` and ``bwt_metrics``
    (experience and stream level) and an in-memory logger.

    Args:
        name: ``"naive"``, ``"replay"``, ``"ewc"`` or ``"lwf"`` (Avalanche's own strategy classes).
        benchmark: A scenario from :func:`export_benchmark`.
        model: A model from :func:`build_model`.
        config: Training settings.
        after_experience: Called with the experience index after its evaluation, model in eval().
    """
    if name not in AVALANCHE_STRATEGIES:
        raise ValueError(
            f"The 'name' parameter of run_strategy must be one of {list(AVALANCHE_STRATEGIES)}. Got {name!r} instead."
        )
    test_stream = benchmark.test_stream
    T = len(test_stream)
    if len(benchmark.train_stream) != T or len(model.task_names) != T:
        raise ValueError(
            f"The benchmark has {len(benchmark.train_stream)} train and {T} test experiences and the model "
            f"{len(model.task_names)} task heads; all three must match (build both from the same experiences)."
        )
    from avalanche.evaluation.metrics import accuracy_metrics, bwt_metrics, forgetting_metrics
    from avalanche.training import EWC, LwF, Naive, Replay
    from avalanche.training.determinism.rng_manager import RNGManager
    from avalanche.training.plugins import EvaluationPlugin

    config = config or AvalancheConfig()
    RNGManager.set_random_seeds(config.seed)
    logger = _MemoryLogger()
    evaluator = EvaluationPlugin(
        accuracy_metrics(experience=True, stream=True),
        forgetting_metrics(experience=True, stream=True),
        bwt_metrics(experience=True, stream=True),
        loggers=[logger],
    )
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=config.learning_rate, weight_decay=config.weight_decay
    )
    strategy_cls, extra = {
        "naive": (Naive, {}),
        "replay": (Replay, {"mem_size": config.mem_size}),
        "ewc": (EWC, {"ewc_lambda": config.ewc_lambda}),
        "lwf": (LwF, {"alpha": config.lwf_alpha, "temperature": config.lwf_temperature}),
    }[name]
    strategy = strategy_cls(
        model=model, optimizer=optimizer, criterion=nn.CrossEntropyLoss(), train_mb_size=config.batch_size,
        train_epochs=config.epochs, eval_mb_size=config.eval_batch_size, evaluator=evaluator,
        device=config.device or next(model.parameters()).device,
        **extra,
    )

    def accuracies() -> tuple[float, ...]:
        found = {int(m.group(1)): float(v) for k, v in logger.evals[-1].items() if (m := _EXP_ACCURACY.match(k))}
        return tuple(found[j] for j in range(T))

    b = None
    if config.measure_b:
        strategy.eval(test_stream)
        b = accuracies()
    R, seconds, stream_f, stream_b, stream_acc = [], [], [], [], []
    for i, experience in enumerate(benchmark.train_stream):
        started = time.perf_counter()
        strategy.train(experience)
        seconds.append(time.perf_counter() - started)
        strategy.eval(test_stream)
        R.append(accuracies())
        last = logger.evals[-1]
        stream_f.append(float(last["StreamForgetting/eval_phase/test_stream"]))
        stream_b.append(float(last["StreamBWT/eval_phase/test_stream"]))
        stream_acc.append(float(next(v for k, v in last.items() if k.startswith("Top1_Acc_Stream/eval_phase/test"))))
        if after_experience is not None:
            model.eval()
            after_experience(i)
    per_exp = {
        kind: {int(k.rsplit("Exp", 1)[1]): float(v) for k, v in logger.evals[-1].items() if k.startswith(f"{kind}/")}
        for kind in ("ExperienceForgetting", "ExperienceBWT")
    }
    return AvalancheRun(
        strategy=name,
        task_names=tuple(model.task_names),
        R=tuple(R),
        b=b,
        stream_forgetting=tuple(stream_f),
        stream_bwt=tuple(stream_b),
        experience_forgetting=per_exp["ExperienceForgetting"],
        experience_bwt=per_exp["ExperienceBWT"],
        stream_accuracy=tuple(stream_acc),
        seconds_per_experience=tuple(seconds),
        trainable_parameters_per_task=tuple(model.trainable_parameters_per_task()),
        bytes_per_task=tuple(model.parameters_added_per_task(in_bytes=True)),
    )


def run_avalanche_stream(name: str, experiences: Sequence, kind: str, backbone_config: Any = None,
                         config: Any = None, *, device: str = "auto") -> ContinualReport:
    """Run Avalanche's own strategy ``name`` on a loaded cmtl stream with the budget of a ``cmtl bench`` run.

    Args:
        name: ``"naive"``, ``"replay"``, ``"ewc"`` or ``"lwf"``.
        experiences: :class:`cmtl.benchmarks.scenarios.Experience` objects (task-incremental).
        backbone_config: :class:`cmtl.core.backbone.BackboneConfig` of the backbone to load.
        config: :class:`cmtl.benchmarks.learners.StrategyConfig`: epochs, batch size, learning rate, seed, replay
            budget and penalty weights carry over.
    """
    from cmtl.benchmarks.learners import StrategyConfig
    from cmtl.core.backbone import load_backbone

    if kind != "task-incremental":
        raise ValueError(f"Avalanche strategies run here on task-incremental scenarios only, not {kind}.")
    config = config or StrategyConfig()
    backbone = load_backbone(backbone_config, device=device)
    stream = [(e.spec, e.train, e.test, None) for e in experiences]
    model = build_model(backbone, task_specs(stream), config.adapter, head_dropout=config.training.head_dropout,
                        seed=config.training.seed)
    t = config.training
    run = run_strategy(name, export_benchmark(stream, backbone), model, AvalancheConfig(
        epochs=t.epochs, batch_size=t.batch_size, eval_batch_size=t.eval_batch_size, learning_rate=t.learning_rate,
        weight_decay=t.weight_decay, seed=t.seed, device=str(backbone.device), mem_size=config.replay_budget,
        ewc_lambda=config.ewc_lambda, lwf_alpha=config.lwf_lambda, lwf_temperature=config.lwf_temperature))
    return run.report()

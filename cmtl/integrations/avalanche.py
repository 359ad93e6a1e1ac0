"""Avalanche 0.6 bridge: cmtl text tasks as a task-incremental benchmark, a LoRA model its
strategies can train, and a runner that returns the accuracy matrix with Avalanche's own metrics.

The only cmtl module that imports ``avalanche`` (with :mod:`~cmtl.integrations.avalanche_model`), and only
inside functions: importing Avalanche takes seconds, and its QP-solver warning is silenced there
(:func:`~cmtl.integrations.avalanche_model.import_avalanche`)::

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

import math
import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Literal, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cmtl._config import check_seed, plain_numbers
from cmtl.benchmarks.metrics import ContinualReport
from cmtl.core.backbone import Backbone
from cmtl.core.tasks import TaskSpec, unanswered
from cmtl.data import Encoded, batches, encode, read_examples
from cmtl.integrations import avalanche_model
from cmtl.integrations.avalanche_model import build_model as build_model  # re-exported: av.build_model
from cmtl.integrations.avalanche_model import import_avalanche
from cmtl.training.loop import adamw

if TYPE_CHECKING:  # annotations only: importing avalanche at runtime happens inside functions
    from avalanche.benchmarks.scenarios.generic_scenario import CLScenario

TextExperience = tuple[str | TaskSpec, Any, Any, Sequence[str] | None]
AvalancheStrategy = Literal["naive", "replay", "ewc", "lwf"]
AVALANCHE_STRATEGIES = ("naive", "replay", "ewc", "lwf")  # cmtl bench runs them as "avl-<name>"
ADAPTER_NAME = avalanche_model.ADAPTER_NAME
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
        raise ValueError(f"Task names must be unique in a stream. Got {names}. This bridge exports a task-incremental "
                         "benchmark (one task label and head per experience); a stream that repeats one task over "
                         "new domains or new classes (domain- or class-incremental) cannot be exported as one.")
    return specs


def export_benchmark(
    experiences: Sequence[TextExperience], backbone: Backbone, *, seq_len: int | None = None,
    validation: Sequence[Any] | None = None,
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
        validation: Validation rows per experience, in stream order: adds a ``valid_stream``, which
            :func:`run_strategy` uses to stop and keep the best epoch (``AvalancheConfig.patience``).

    Returns:
        A ``CLScenario`` with ``train_stream`` and ``test_stream`` (and ``valid_stream``) of T
        experiences each, whose datasets are ``TaskAwareSupervisedClassificationDataset`` with
        ``targets`` and ``targets_task_labels``; ``cmtl_task_specs`` holds the experiences' specs.
    """
    import_avalanche()
    from avalanche.benchmarks.scenarios.dataset_scenario import benchmark_from_datasets
    from avalanche.benchmarks.scenarios.supervised import with_classes_timeline
    from avalanche.benchmarks.scenarios.task_aware import with_task_labels

    specs = task_specs(experiences)
    read = lambda rows, spec: encode(read_examples(rows, spec), spec, backbone.tokenize)  # noqa: E731
    encoded = {
        "train": [read(entry[1], spec) for entry, spec in zip(experiences, specs)],
        "test": [read(entry[2], spec) for entry, spec in zip(experiences, specs)],
    }
    if validation is not None:
        if len(validation) != len(experiences):
            raise ValueError(f"validation holds {len(validation)} entries for {len(experiences)} experiences: give "
                             "one set of validation rows per experience, in stream order.")
        encoded["valid"] = [read(rows, spec) for rows, spec in zip(validation, specs)]
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
    scenario = with_classes_timeline(with_task_labels(benchmark_from_datasets(**streams)))
    scenario.cmtl_task_specs = tuple(specs)  # what run_strategy checks a model's heads against
    return scenario


def _dataset(encoded: Encoded, task: int, seq_len: int, pad_id: int):
    import_avalanche()
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


# --- model: cmtl/integrations/avalanche_model.py ------------------------------------


def __getattr__(name: str):
    if name == "TaskIncrementalModel":  # built on first use: it subclasses Avalanche's MultiTaskModule
        return avalanche_model.model_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --- strategies --------------------------------------------------------------------


@dataclass(kw_only=True, frozen=True)
class AvalancheConfig:
    """How :func:`run_strategy` trains and evaluates.

    Args:
        epochs: Passes over each experience's training data (at most, with ``patience``).
        patience: With a benchmark that has a ``valid_stream`` (``export_benchmark(validation=...)``):
            score the experience's validation rows after every epoch, stop after ``patience`` epochs
            without a better accuracy, and end the experience with the best epoch's weights (before
            any strategy plugin sees them) — cmtl's own budget rule (:class:`cmtl.TrainConfig`).
            ``None`` trains every epoch and keeps the last.
        batch_size: Training mini-batch size.
        eval_batch_size: Evaluation mini-batch size.
        learning_rate: AdamW learning rate.
        head_learning_rate: AdamW learning rate of the model's task heads when it should differ from
            ``learning_rate`` (which then drives the adapter); ``None``: the same rate everywhere.
        weight_decay: AdamW weight decay.
        reset_optimizer_state: Start every experience with fresh AdamW moment estimates, as cmtl's own
            strategies do (they build a new optimiser per experience). ``False`` (Avalanche's default)
            carries them over from the previous experience, and the shared weights then forget much
            less (on ``text5``, Naive's BWT −0.035 kept against −0.161 reset; docs/results.md).
        seed: Seeds data order through Avalanche's RNG manager (Python, NumPy and torch global RNGs).
        device: Where Avalanche puts the model and batches; ``None`` keeps the model's device.
        measure_b: Evaluate once before any training, giving ``b`` for FWT.
        mem_size: Replay buffer size ("replay" only).
        ewc_lambda: EWC penalty weight ("ewc" only).
        lwf_alpha: LwF distillation weight ("lwf" only).
        lwf_temperature: LwF softmax temperature ("lwf" only).
    """

    epochs: int = 1
    patience: int | None = None
    batch_size: int = 16
    eval_batch_size: int = 64
    learning_rate: float = 1e-3
    head_learning_rate: float | None = None
    weight_decay: float = 0.01
    reset_optimizer_state: bool = False
    seed: int = 0
    device: str | None = None
    measure_b: bool = True
    mem_size: int = 200
    ewc_lambda: float = 1.0
    lwf_alpha: float = 1.0
    lwf_temperature: float = 2.0

    def __post_init__(self) -> None:
        plain_numbers(self)
        for key in ("epochs", "batch_size", "eval_batch_size", "mem_size"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"AvalancheConfig.{key} must be a positive integer. Got {value!r}.")
        if self.patience is not None and (isinstance(self.patience, bool) or not isinstance(self.patience, int)
                                          or self.patience < 1):
            raise ValueError(f"AvalancheConfig.patience must be a positive integer or None. Got {self.patience!r}.")
        check_seed(self.seed, "AvalancheConfig")
        for key in ("learning_rate", "lwf_temperature"):
            if not getattr(self, key) > 0:
                raise ValueError(f"AvalancheConfig.{key} must be > 0. Got {getattr(self, key)!r}.")
        if self.head_learning_rate is not None and not self.head_learning_rate > 0:
            raise ValueError(f"AvalancheConfig.head_learning_rate must be > 0 or None. Got {self.head_learning_rate!r}.")
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
        validation: With ``AvalancheConfig.patience``, the validation accuracy after each epoch, per
            training experience (its length is the epochs trained); ``None`` otherwise.
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
    validation: tuple[tuple[float, ...], ...] | None = None

    def report(self) -> ContinualReport:
        """cmtl's metrics (ACC, BWT, FWT, Chaudhry forgetting) of this run."""
        return ContinualReport.from_matrix(
            self.R, self.task_names, b=self.b, seconds_per_experience=self.seconds_per_experience,
            trainable_parameters_per_task=self.trainable_parameters_per_task, bytes_per_task=self.bytes_per_task,
        )


def best_epoch_plugin(valid_stream, patience: int, batch_size: int):
    """An Avalanche plugin that gives a strategy cmtl's budget rule: after each training epoch it scores the
    current experience's validation rows (``valid_stream[i]``), stops after ``patience`` epochs without a
    better accuracy, and at the end of the experience puts back the best epoch's trainable weights.

    Strategies list the caller's plugins before their own (EWC's Fisher, LwF's snapshot, replay's buffer
    update), so those see the restored weights."""
    import_avalanche()
    from avalanche.core import SupervisedPlugin

    class BestEpoch(SupervisedPlugin):
        def __init__(self) -> None:
            super().__init__()
            self.best: tuple[float, dict[str, torch.Tensor]] | None = None
            self.waited = 0
            self.history: list[list[float]] = []  # validation accuracy after each epoch, per experience

        def before_training_exp(self, strategy, **kwargs) -> None:
            self.best, self.waited = None, 0
            self.history.append([])

        def after_training_epoch(self, strategy, **kwargs) -> None:
            score = self._accuracy(strategy.model, valid_stream[strategy.experience.current_experience].dataset,
                                   strategy.device)
            self.history[-1].append(score)
            if self.best is None or score > self.best[0]:
                trained = {n: p.detach().clone() for n, p in strategy.model.named_parameters() if p.requires_grad}
                self.best, self.waited = (score, trained), 0
            else:
                self.waited += 1
                if self.waited >= patience:
                    strategy.stop_training()

        def after_training_exp(self, strategy, **kwargs) -> None:
            if self.best is not None:
                params = dict(strategy.model.named_parameters())
                with torch.no_grad():
                    for name, value in self.best[1].items():
                        params[name].copy_(value)

        @staticmethod
        def _accuracy(model: nn.Module, dataset, device) -> float:
            was_training = model.training
            model.eval()
            correct = total = 0
            with torch.no_grad():
                for x, y, t in torch.utils.data.DataLoader(dataset, batch_size=batch_size):
                    logits = model(x.to(device), int(t[0])).float().cpu()
                    correct += int(((logits.argmax(-1) == y) & ~unanswered(logits)).sum())  # NaN rows: wrong
                    total += len(y)
            model.train(was_training)
            return correct / max(total, 1)

    return BestEpoch()


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
    progress: Callable[[int, tuple[float, ...], float], None] | None = None,
    plugins: Sequence[Any] = (),
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
        progress: Called after each experience's evaluation with its index, the accuracy on every
            experience of the test stream and the seconds its training took.
        plugins: More Avalanche plugins (``avalanche.core.SupervisedPlugin``) for the strategy, e.g. a
            logger; they run after the budget rule's, which has then put the best epoch's weights back.
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
    exported = getattr(benchmark, "cmtl_task_specs", None)
    if exported is not None and [(s.name, s.labels) for s in exported] != [(s.name, s.labels) for s in model.specs]:
        raise ValueError(
            f"The model's heads {model.task_names} (labels {[list(s.labels) for s in model.specs]}) do not match "
            f"the benchmark's experiences {[s.name for s in exported]} (labels {[list(s.labels) for s in exported]}): "
            "experience t trains and is scored through head t. Build both from the same experiences, in the "
            "same order: build_model(backbone, task_specs(stream)) beside export_benchmark(stream, backbone).")
    import_avalanche()
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
    optimizer = adamw([p for p in model.parameters() if p.requires_grad], config.learning_rate, config.weight_decay,
                      heads=list(model.heads.parameters()), head_learning_rate=config.head_learning_rate)
    strategy_cls, extra = {
        "naive": (Naive, {}),
        "replay": (Replay, {"mem_size": config.mem_size}),
        "ewc": (EWC, {"ewc_lambda": config.ewc_lambda}),
        "lwf": (LwF, {"alpha": config.lwf_alpha, "temperature": config.lwf_temperature}),
    }[name]
    best = None
    if config.patience is not None:
        if getattr(benchmark, "valid_stream", None) is None:
            raise ValueError("AvalancheConfig.patience needs validation data: build the benchmark with "
                             "export_benchmark(..., validation=[rows per experience]), or set patience=None.")
        best = best_epoch_plugin(benchmark.valid_stream, config.patience, config.eval_batch_size)
    strategy = strategy_cls(
        model=model, optimizer=optimizer, criterion=nn.CrossEntropyLoss(), train_mb_size=config.batch_size,
        train_epochs=config.epochs, eval_mb_size=config.eval_batch_size, evaluator=evaluator,
        device=config.device or next(model.parameters()).device,
        plugins=([] if best is None else [best]) + list(plugins),
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
        strategy.train(experience, reset_optimizer_state=config.reset_optimizer_state)
        seconds.append(time.perf_counter() - started)
        strategy.eval(test_stream)
        R.append(accuracies())
        if progress is not None:
            progress(i, R[-1], seconds[-1])
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
        validation=None if best is None else tuple(tuple(h) for h in best.history),
    )

"""The error contract: one message style for bad parameters, typed errors that subclass the built-ins,
every config's bad input refused with that message, and every config's dict round trip."""

from __future__ import annotations

import dataclasses
import json
import re
import typing

import pytest

from cmtl import (
    AdapterConfig,
    AnalyticConfig,
    BackboneConfig,
    CmtlError,
    MemoryConfig,
    MergeConfig,
    MonitorConfig,
    RegistryError,
    TaskExistsError,
    TaskSpec,
    TrainConfig,
    UpdateConfig,
)
from cmtl.benchmarks.learners import StrategyConfig
from cmtl.benchmarks.scenarios import ExperienceSpec, Scenario
from cmtl.errors import EntryExistsError, InvalidParameterError, WriteConflictError, bad_param
from cmtl.multitask.config import MultiTaskConfig
from cmtl.serving.server import ServeConfig

# --- the helper ------------------------------------------------------------------------------------


def test_bad_param_names_the_parameter_the_owner_the_rule_and_the_value():
    assert (bad_param("epochs", "TrainConfig", "be a positive integer", 0)
            == "The 'epochs' parameter of TrainConfig must be a positive integer; got 0 instead.")
    assert (bad_param("pooling", "BackboneConfig", "be one of ['cls', 'mean']", "max")
            == "The 'pooling' parameter of BackboneConfig must be one of ['cls', 'mean']; got 'max' instead.")


def test_bad_param_appends_the_fix():
    message = bad_param("labels", "TaskSpec 't'", "be a list", "ab", "Pass labels=['a', 'b'].")
    assert message == "The 'labels' parameter of TaskSpec 't' must be a list; got 'ab' instead. Pass labels=['a', 'b']."


@pytest.mark.parametrize("error, builtins", [
    (InvalidParameterError, (ValueError,)),
    (EntryExistsError, (ValueError,)),
    (TaskExistsError, (ValueError,)),
    (WriteConflictError, (RegistryError, RuntimeError)),
])
def test_typed_errors_subclass_the_builtin_callers_catch(error, builtins):
    assert issubclass(error, CmtlError)
    for builtin in builtins:
        assert issubclass(error, builtin)
    with pytest.raises(builtins[0], match="x"):  # `except ValueError` keeps working
        raise error("x")


# --- every config's bad input ----------------------------------------------------------------------

TWO = (ExperienceSpec(name="a", corpus="trec6"), ExperienceSpec(name="b", corpus="sms_spam"))


def _scenario(**kwargs) -> Scenario:
    return Scenario(**{"name": "s", "kind": "task-incremental", "experiences": TWO, **kwargs})


def _spec(**kwargs) -> TaskSpec:
    return TaskSpec(**{"name": "t", "labels": ["a", "b"], **kwargs})


# (make, bad kwargs, parameter, owner, rule, the value the message shows)
BAD = {
    "TrainConfig.epochs": (TrainConfig, {"epochs": 0}, "epochs", "TrainConfig", "be a positive integer", 0),
    "TrainConfig.max_steps": (TrainConfig, {"max_steps": 1.5}, "max_steps", "TrainConfig", "be a positive integer",
                              1.5),
    "TrainConfig.length_grouping": (TrainConfig, {"length_grouping": -1}, "length_grouping", "TrainConfig",
                                    "be an integer >= 0", -1),
    "TrainConfig.learning_rate": (TrainConfig, {"learning_rate": 0.0}, "learning_rate", "TrainConfig", "be > 0", 0.0),
    "TrainConfig.head_learning_rate": (TrainConfig, {"head_learning_rate": -1e-3}, "head_learning_rate", "TrainConfig",
                                       "be > 0 or None", -1e-3),
    "TrainConfig.probe_margin": (TrainConfig, {"probe_margin": -1.0}, "probe_margin", "TrainConfig",
                                 "be a finite number >= 0", -1.0),
    "TrainConfig.lr_schedule": (TrainConfig, {"lr_schedule": "cosine"}, "lr_schedule", "TrainConfig",
                                "be one of ['linear', 'constant']", "cosine"),
    "TrainConfig.warmup_ratio": (TrainConfig, {"warmup_ratio": 1.0}, "warmup_ratio", "TrainConfig", "be in [0, 1)",
                                 1.0),
    "TrainConfig.head_dropout": (TrainConfig, {"head_dropout": -0.1}, "head_dropout", "TrainConfig", "be in [0, 1)",
                                 -0.1),
    "AdapterConfig.r": (AdapterConfig, {"r": 0}, "r", "AdapterConfig", "be a positive integer (the LoRA rank)", 0),
    "AdapterConfig.alpha": (AdapterConfig, {"alpha": 0}, "alpha", "AdapterConfig", "be > 0", 0),
    "AdapterConfig.dropout": (AdapterConfig, {"dropout": 1.0}, "dropout", "AdapterConfig", "be in [0, 1)", 1.0),
    "BackboneConfig.pooling": (BackboneConfig, {"pooling": "max"}, "pooling", "BackboneConfig",
                               "be one of ['cls', 'last', 'mean'] or None", "max"),
    "BackboneConfig.dtype": (BackboneConfig, {"dtype": "int8"}, "dtype", "BackboneConfig",
                             "be one of ['float32', 'bfloat16', 'float16', 'auto']", "int8"),
    "BackboneConfig.num_hidden_layers": (BackboneConfig, {"num_hidden_layers": 0}, "num_hidden_layers",
                                         "BackboneConfig", "be >= 1 or None", 0),
    "BackboneConfig.max_length": (BackboneConfig, {"max_length": 4}, "max_length", "BackboneConfig",
                                  "be >= 8 (tokens)", 4),
    "MemoryConfig.buffer": (MemoryConfig, {"buffer": "fifo"}, "buffer", "MemoryConfig",
                            "be one of ['reservoir', 'class_balanced', 'task_balanced']", "fifo"),
    "MemoryConfig.budget": (MemoryConfig, {"budget": True}, "budget", "MemoryConfig", "be a positive integer", True),
    "MemoryConfig.holdout": (MemoryConfig, {"holdout": 0}, "holdout", "MemoryConfig", "be a positive integer", 0),
    "UpdateConfig.replay_ratio": (UpdateConfig, {"replay_ratio": -1}, "replay_ratio", "UpdateConfig",
                                  "be finite and >= 0", -1),
    "UpdateConfig.penalty": (UpdateConfig, {"penalty": "l2"}, "penalty", "UpdateConfig",
                             "be one of ['none', 'ewc', 'lwf']", "l2"),
    "UpdateConfig.penalty_weight": (UpdateConfig, {"penalty_weight": -1.0}, "penalty_weight", "UpdateConfig",
                                    "be finite and >= 0, or None", -1.0),
    "UpdateConfig.temperature": (UpdateConfig, {"temperature": 0}, "temperature", "UpdateConfig",
                                 "be finite and > 0", 0),
    "UpdateConfig.fisher_examples": (UpdateConfig, {"fisher_examples": 0}, "fisher_examples", "UpdateConfig",
                                     "be a positive integer", 0),
    "UpdateConfig.tolerance": (UpdateConfig, {"tolerance": -0.1}, "tolerance", "UpdateConfig", "be >= 0", -0.1),
    "UpdateConfig.validation_fraction": (UpdateConfig, {"validation_fraction": 1.0}, "validation_fraction",
                                         "UpdateConfig", "be in (0, 1)", 1.0),
    "MergeConfig.method": (MergeConfig, {"method": "svd"}, "method", "MergeConfig",
                           "be one of ['linear', 'ties', 'dare', 'dare_ties', 'peft_linear', 'peft_ties', "
                           "'peft_dare_ties', 'peft_ties_svd']", "svd"),
    "MergeConfig.scale": (MergeConfig, {"scale": -0.5}, "scale", "MergeConfig", "be in [0, 10] or None", -0.5),
    "MergeConfig.selection_fraction": (MergeConfig, {"selection_fraction": 0.0}, "selection_fraction",
                                       "MergeConfig", "be in (0, 1)", 0.0),
    "MergeConfig.density": (MergeConfig, {"density": 0.0}, "density", "MergeConfig", "be in (0, 1]", 0.0),
    "MergeConfig.drop": (MergeConfig, {"drop": 1.0}, "drop", "MergeConfig", "be in [0, 1)", 1.0),
    "MergeConfig.rank": (MergeConfig, {"rank": 0}, "rank", "MergeConfig", "be a positive integer, 'auto' or None", 0),
    "MergeConfig.rank_tolerance": (MergeConfig, {"rank_tolerance": 0.0}, "rank_tolerance", "MergeConfig",
                                   "be in (0, 1)", 0.0),
    "MonitorConfig.alpha": (MonitorConfig, {"alpha": 1.5}, "alpha", "MonitorConfig", "be in (0, 1)", 1.5),
    "MonitorConfig.permutations": (MonitorConfig, {"permutations": 50}, "permutations", "MonitorConfig",
                                   "be an integer >= 1/alpha = 100 for the p-value to reach below alpha", 50),
    "MonitorConfig.min_samples": (MonitorConfig, {"min_samples": 4}, "min_samples", "MonitorConfig",
                                  "be an integer >= 5", 4),
    "MonitorConfig.max_samples": (MonitorConfig, {"max_samples": 10}, "max_samples", "MonitorConfig",
                                  "be an integer >= min_samples = 20", 10),
    "MultiTaskConfig.sampling_schedule": (MultiTaskConfig, {"sampling_schedule": 3}, "sampling_schedule",
                                          "MultiTaskConfig", "be a function (step, total_steps) -> weights per task",
                                          3),
    "MultiTaskConfig.steps": (MultiTaskConfig, {"steps": 0}, "steps", "MultiTaskConfig",
                              "be a positive integer or None", 0),
    "MultiTaskConfig.pass_overhead": (MultiTaskConfig, {"pass_overhead": -1}, "pass_overhead", "MultiTaskConfig",
                                      "be an integer >= 0 (tokens) or None", -1),
    "ServeConfig.max_texts": (ServeConfig, {"max_texts": 0}, "max_texts", "ServeConfig", "be a positive integer", 0),
    "ServeConfig.max_wait_ms": (ServeConfig, {"max_wait_ms": -1.0}, "max_wait_ms", "ServeConfig",
                                "be a finite number >= 0", -1.0),
    "TaskSpec.problem_type": (_spec, {"problem_type": "ranking"}, "problem_type", "TaskSpec 't'",
                              "be one of ['single_label', 'multi_label', 'regression']", "ranking"),
    "TaskSpec.label_encoding": (_spec, {"label_encoding": "idx"}, "label_encoding", "TaskSpec 't'",
                                "be one of ['value', 'index']", "idx"),
    "TaskSpec.labels a string": (_spec, {"labels": "ab"}, "labels", "TaskSpec 't'",
                                 "be a list of label names, e.g. TaskSpec('t', labels=['neg', 'pos'])", "ab"),
    "TaskSpec.labels duplicate": (_spec, {"labels": ["a", "a"]}, "labels", "TaskSpec 't'",
                                  "not hold duplicate labels", ["a", "a"]),
    "TaskSpec.labels one": (_spec, {"labels": ["a"]}, "labels", "TaskSpec 't'",
                            "hold at least 2 labels for a single-label task", ["a"]),
    "TaskSpec.threshold": (_spec, {"threshold": 1.0}, "threshold", "TaskSpec 't'", "be in (0, 1)", 1.0),
    "Scenario.kind": (_scenario, {"kind": "online"}, "kind", "Scenario 's'",
                      "be one of ['task-incremental', 'domain-incremental', 'class-incremental']", "online"),
    "Scenario.experiences one": (_scenario, {"experiences": TWO[:1]}, "experiences", "Scenario 's'",
                                 "hold at least 2 experiences", ["a"]),
    "Scenario.experiences duplicate": (_scenario, {"experiences": (TWO[0], TWO[0])}, "experiences", "Scenario 's'",
                                       "not hold duplicate names", ["a", "a"]),
    "Scenario.task": (_scenario, {"kind": "domain-incremental"}, "task", "Scenario 's'",
                      "name the one task of a domain-incremental scenario", None),
    "Scenario.random_orders": (_scenario, {"random_orders": (1, None)}, "random_orders", "Scenario 's'",
                               "hold distinct integer seeds in [0, 2**62)", [1, None]),
    "Scenario.random_orders repeated": (_scenario, {"random_orders": (1, 2, 1)}, "random_orders", "Scenario 's'",
                                        "hold distinct integer seeds in [0, 2**62)", [1, 2, 1]),
    "Scenario.max_eval": (_scenario, {"max_eval": 0}, "max_eval", "Scenario 's'", "be >= 1", 0),
    # Each was read as given: a negative fisher_examples cut rows off the Fisher's sample and left it unaveraged
    # (F times N), 0 gave EWC a zero Fisher (seq-ft under another name), a negative λ pushed away from the anchor.
    "StrategyConfig.replay_budget": (StrategyConfig, {"replay_budget": 0}, "replay_budget", "StrategyConfig",
                                     "be a positive integer", 0),
    "StrategyConfig.fisher_examples": (StrategyConfig, {"fisher_examples": -1}, "fisher_examples", "StrategyConfig",
                                       "be a positive integer", -1),
    "StrategyConfig.ewc_lambda": (StrategyConfig, {"ewc_lambda": -1000.0}, "ewc_lambda", "StrategyConfig",
                                  "be a finite number >= 0", -1000.0),
    "StrategyConfig.lwf_lambda": (StrategyConfig, {"lwf_lambda": float("nan")}, "lwf_lambda", "StrategyConfig",
                                  "be a finite number >= 0", float("nan")),
    "StrategyConfig.lwf_temperature": (StrategyConfig, {"lwf_temperature": 0.0}, "lwf_temperature", "StrategyConfig",
                                       "be > 0", 0.0),
    "StrategyConfig.single_learning_rate": (StrategyConfig, {"single_learning_rate": -5e-5}, "single_learning_rate",
                                            "StrategyConfig", "be > 0", -5e-5),
}


SEEDED = {"TrainConfig": TrainConfig, "MemoryConfig": MemoryConfig, "MergeConfig": MergeConfig,
          "MonitorConfig": MonitorConfig, "AnalyticConfig": AnalyticConfig, "Scenario 's'": _scenario}
# None seeded the replay buffers and held-out samples from the clock (a different sample on every run, silently);
# torch refuses the others only once training has started.
for (owner, make), seed in zip(SEEDED.items(), (None, 1.5, -1, True, "3", 2**62)):
    BAD[f"{owner}.seed"] = (make, {"seed": seed}, "seed", owner, "be an integer in [0, 2**62)", seed)


@pytest.mark.parametrize("case", list(BAD.values()), ids=list(BAD))
def test_every_config_refuses_bad_input_with_the_helpers_message(case):
    make, kwargs, name, owner, must, got = case
    with pytest.raises(InvalidParameterError, match=f"^{re.escape(bad_param(name, owner, must, got))}"):
        make(**kwargs)


def test_every_validated_config_has_a_bad_input_case():
    covered = {case[0] for case in BAD.values()}
    assert {TrainConfig, AdapterConfig, BackboneConfig, MemoryConfig, UpdateConfig, MergeConfig, MonitorConfig,
            MultiTaskConfig, ServeConfig} <= covered and {_spec, _scenario} <= covered


# --- every config's dict round trip -----------------------------------------------------------------

#: Non-default values the field's type cannot suggest (a None default, a tuple, a name).
OVERRIDES: dict[type, dict[str, typing.Any]] = {
    TrainConfig: {"max_steps": 40, "eval_every": 5, "head_learning_rate": 3e-3, "probe_margin": 1.0,
                  "ema_decay": 0.98},
    AdapterConfig: {"target_modules": ("value", "query"), "layers": (1, 0)},
    BackboneConfig: {"name_or_path": "/models/encoder", "num_hidden_layers": 2, "pooling": "last",
                     "dtype": "bfloat16"},
    UpdateConfig: {"penalty_weight": 5.0},
    MergeConfig: {"scale": 0.5, "rank": 4, "method": "dare_ties"},  # reads both density and drop
    TaskSpec: {"name": "topic-v2", "labels": ("x", "y", "z"), "text_pair_column": "pair"},
    MultiTaskConfig: {"sampler": "proportional", "size_cap": 100, "weights": {"a": 2.0}, "primary": "a",
                      "schedule": "switch", "switch_step": 10, "tag_every": 5, "steps": 50, "eval_every": 10},
}
#: Fields left at their default: another value would not survive to_dict (a function is recorded by its
#: name) or would conflict with the other non-defaults (uncertainty weighting and an MT2ST schedule; the knobs
#: of the schedules other than Switch; the temperature, read by the temperature sampler only; epochs, read
#: without steps only).
KEEP_DEFAULT: dict[type, set[str]] = {MultiTaskConfig: {"sampling_schedule", "weighting", "eta", "nu",
                                                        "switch_patience", "temperature", "epochs"},
                                      UpdateConfig: {"temperature"},  # LwF's; the other penalty is EWC
                                      TrainConfig: {"probe_init"}}  # probe_margin and probe_start need the probe


def _other_value(cls: type, field: dataclasses.Field, hint: typing.Any) -> typing.Any:
    """A valid value other than the field's default, from its type (or :data:`OVERRIDES`)."""
    if field.name in OVERRIDES.get(cls, {}):
        return OVERRIDES[cls][field.name]
    default = field.default
    if typing.get_origin(hint) is typing.Literal:
        return next(choice for choice in typing.get_args(hint) if choice != default)
    if isinstance(default, bool):
        return not default
    if isinstance(default, int):
        return default + 1
    if isinstance(default, float):
        return default / 2
    if isinstance(default, str):
        return default + "_x"
    raise AssertionError(f"No non-default value for {cls.__name__}.{field.name}: add one to OVERRIDES.")


def _non_default(cls: type) -> typing.Any:
    hints = typing.get_type_hints(cls)
    keep = KEEP_DEFAULT.get(cls, set())
    kwargs = {f.name: _other_value(cls, f, hints[f.name]) for f in dataclasses.fields(cls)
              if f.name != "_" and f.init and f.name not in keep}
    obj = cls(**kwargs)
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING and f.name not in keep:
            assert getattr(obj, f.name) != f.default, f"{cls.__name__}.{f.name} kept its default"
    return obj


ROUND_TRIP = [TrainConfig, AdapterConfig, MemoryConfig, TaskSpec]  # the configs with to_dict and from_dict
TO_DICT_ONLY = [BackboneConfig, UpdateConfig, MergeConfig, MultiTaskConfig]  # loaded as cls(**d)


def test_the_round_trip_lists_are_complete():
    every = [TrainConfig, AdapterConfig, BackboneConfig, MemoryConfig, UpdateConfig, MergeConfig, MultiTaskConfig,
             MonitorConfig, ServeConfig, TaskSpec]
    assert [c for c in every if hasattr(c, "to_dict") and hasattr(c, "from_dict")] == ROUND_TRIP
    assert [c for c in every if hasattr(c, "to_dict") and not hasattr(c, "from_dict")] == TO_DICT_ONLY


@pytest.mark.parametrize("cls", ROUND_TRIP, ids=lambda c: c.__name__)
def test_to_dict_from_dict_round_trips_through_json(cls):
    for obj in (_non_default(cls), cls(**({"name": "t"} if cls is TaskSpec else {}))):
        stored = json.loads(json.dumps(obj.to_dict(), sort_keys=True))
        assert cls.from_dict(stored) == obj


@pytest.mark.parametrize("cls", TO_DICT_ONLY, ids=lambda c: c.__name__)
def test_to_dict_is_the_constructors_keywords(cls):
    for obj in (_non_default(cls), cls()):
        assert cls(**json.loads(json.dumps(obj.to_dict(), sort_keys=True))) == obj


def _as_numpy(value: typing.Any) -> typing.Any:
    """``value`` with its numbers as numpy scalars (as values computed with numpy or read from a DataFrame are)."""
    import numpy as np

    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):
        return np.int64(value)
    if isinstance(value, float):
        return np.float32(value)
    if isinstance(value, tuple) and all(isinstance(v, int) for v in value):
        return tuple(np.int64(v) for v in value)
    return value


@pytest.mark.parametrize("cls", ROUND_TRIP + TO_DICT_ONLY + [MonitorConfig, ServeConfig, AnalyticConfig],
                         ids=lambda c: c.__name__)
def test_numpy_numbers_are_taken_as_python_numbers(cls):
    """A numpy int was refused as 'not a positive integer' (np.int64(3) is no int); a numpy float32 was kept,
    trained a whole task, and then failed writing the manifest (not JSON serialisable)."""
    hints = typing.get_type_hints(cls)
    keep = KEEP_DEFAULT.get(cls, set())
    kwargs = {f.name: _as_numpy(_other_value(cls, f, hints[f.name])) for f in dataclasses.fields(cls)
              if f.name != "_" and f.init and f.name not in keep}
    obj = cls(**kwargs)
    for name in kwargs:
        value = getattr(obj, name)
        for v in value if isinstance(value, tuple) else (value,):
            assert type(v).__module__ == "builtins", f"{cls.__name__}.{name} kept {type(v).__name__}"
    json.dumps(dataclasses.asdict(obj) if not hasattr(obj, "to_dict") else obj.to_dict())


def test_a_strategy_config_takes_numpy_numbers_too():
    strategy = StrategyConfig(replay_budget=_as_numpy(100), ewc_lambda=_as_numpy(10.0))
    assert type(strategy.replay_budget) is int and type(strategy.ewc_lambda) is float

"""Several tasks trained together: sampling, loss weights, MT2ST schedules, TAG affinities."""

from cmtl.core.adapters import TaskLoRA
from cmtl.multitask.joint import (
                                  MultiTaskConfig,
                                  MultiTaskResult,
                                  UncertaintyWeighting,
                                  diminish,
                                  group_score,
                                  grouped_forward,
                                  sampling_probabilities,
                                  select_groups,
                                  switch,
                                  train_multitask,
)

__all__ = ["MultiTaskConfig", "MultiTaskResult", "TaskLoRA", "UncertaintyWeighting", "diminish", "group_score",
           "grouped_forward", "sampling_probabilities", "select_groups", "switch", "train_multitask"]

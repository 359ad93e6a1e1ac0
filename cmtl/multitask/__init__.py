"""Several tasks trained together: sampling, loss weights, MT2ST schedules, TAG affinities."""

from cmtl.core.adapters import TaskLoRA
from cmtl.multitask.affinity import group_score, select_groups
from cmtl.multitask.config import MultiTaskConfig, MultiTaskResult
from cmtl.multitask.joint import grouped_forward, train_multitask
from cmtl.multitask.schedules import UncertaintyWeighting, diminish, sampling_probabilities, switch

__all__ = ["MultiTaskConfig", "MultiTaskResult", "TaskLoRA", "UncertaintyWeighting", "diminish", "group_score",
           "grouped_forward", "sampling_probabilities", "select_groups", "switch", "train_multitask"]

"""Task arithmetic: merging LoRA adapters (linear, TIES, DARE, peft's methods) and refitting heads."""

from cmtl.merging.methods import (METHODS, PEFT_METHODS, MergeConfig, dare, lora_deltas, merge_deltas, refactorise,
                                  refit_head, smallest_rank, ties, to_lora_state, trim)

__all__ = ["METHODS", "MergeConfig", "PEFT_METHODS", "dare", "lora_deltas", "merge_deltas", "refactorise",
           "refit_head", "smallest_rank", "ties", "to_lora_state", "trim"]

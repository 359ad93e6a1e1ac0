"""Data in: user examples with label names (:mod:`.examples`), then padded tensor batches (:mod:`.batching`)."""

from cmtl.data.batching import (
                                Encoded,
                                batches,
                                encode,
                                length_grouped,
                                length_sorted,
                                padding_chunks,
                                seeded_order,
                                token_budget_chunks,
)
from cmtl.data.examples import SUFFIXES, Examples, as_texts, read_examples, read_file, spec_for_data

__all__ = ["Encoded", "Examples", "SUFFIXES", "as_texts", "batches", "encode", "length_grouped", "length_sorted",
           "padding_chunks", "read_examples", "read_file", "seeded_order", "spec_for_data", "token_budget_chunks"]

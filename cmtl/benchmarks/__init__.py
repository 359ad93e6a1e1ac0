"""Continual-learning benchmarks on real text: corpora, scenarios, learners, metrics and the runner."""

from cmtl.benchmarks.corpora import CORPORA, corpus_info, load_corpus
from cmtl.benchmarks.metrics import ContinualReport, acc, bwt, forgetting, fwt
from cmtl.benchmarks.scenarios import Scenario

__all__ = ["CORPORA", "ContinualReport", "Scenario", "acc", "bwt", "corpus_info", "forgetting", "fwt", "load_corpus"]

"""Continual-learning metrics against hand-computed values (METHODS.md formulas)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cmtl.benchmarks.metrics import (
    ContinualReport,
    acc,
    accuracy_matrix,
    avalanche_bwt,
    avalanche_forgetting,
    bwt,
    forgetting,
    fwt,
    plot_heatmap,
)

R3 = [[0.90, 0.10, 0.20],
      [0.80, 0.95, 0.30],
      [0.70, 0.85, 0.92]]
B3 = [0.50, 0.40, 0.25]

# The best accuracy on tasks 0 and 1 is not on the diagonal: Chaudhry's forgetting and
# Avalanche's (first minus last) differ here.
R4 = [[0.6, 0.2, 0.1, 0.3],
      [0.8, 0.7, 0.2, 0.1],
      [0.5, 0.9, 0.8, 0.4],
      [0.4, 0.6, 0.7, 0.9]]
B4 = [0.5, 0.5, 0.5, 0.5]


def test_three_tasks_by_hand():
    assert acc(R3) == pytest.approx((0.70 + 0.85 + 0.92) / 3)             # 0.82333
    assert bwt(R3) == pytest.approx(((0.70 - 0.90) + (0.85 - 0.95)) / 2)  # -0.15
    assert fwt(R3, B3) == pytest.approx(((0.10 - 0.40) + (0.30 - 0.25)) / 2)  # -0.125
    f = forgetting(R3)
    assert f.per_task == pytest.approx((0.90 - 0.70, 0.95 - 0.85))  # (0.2, 0.1)
    assert f.mean == pytest.approx(0.15)


def test_four_tasks_by_hand():
    assert acc(R4) == pytest.approx(0.65)
    assert bwt(R4) == pytest.approx(-0.4 / 3)
    assert fwt(R4, B4) == pytest.approx((-0.3 - 0.3 - 0.1) / 3)
    f = forgetting(R4)
    assert f.per_task == pytest.approx((0.8 - 0.4, 0.9 - 0.6, 0.8 - 0.7))  # max over rows 0..2
    assert f.mean == pytest.approx(0.8 / 3)


def test_avalanche_variants_by_hand():
    last = avalanche_forgetting(R4)
    assert last.per_experience == pytest.approx({0: 0.2, 1: 0.1, 2: 0.1})  # R[j][j] - R[3][j]
    assert last.stream == pytest.approx(0.4 / 3)
    mid = avalanche_forgetting(R4, after=2)  # the experience just trained (2) is left out
    assert mid.per_experience == pytest.approx({0: 0.6 - 0.5, 1: 0.7 - 0.9})
    assert mid.stream == pytest.approx(-0.05)
    assert avalanche_bwt(R4, after=2).stream == pytest.approx(0.05)
    assert avalanche_bwt(R4).per_experience == pytest.approx({0: -0.2, 1: -0.1, 2: -0.1})
    assert avalanche_forgetting(R3, after=1) == ({0: pytest.approx(0.1)}, pytest.approx(0.1))
    # Nothing trained before: Avalanche's empty mean is 0.0.
    assert avalanche_forgetting(R3, after=0) == ({}, 0.0)
    assert avalanche_bwt(R3, after=0) == ({}, 0.0)


def test_avalanche_bwt_after_the_last_row_is_gem_bwt():
    for R in (R3, R4):
        assert avalanche_bwt(R).stream == pytest.approx(bwt(R))


def test_one_task():
    assert acc([[0.7]]) == pytest.approx(0.7)
    with pytest.raises(ValueError, match=r"BWT needs at least 2 tasks; the accuracy matrix is 1×1"):
        bwt([[0.7]])
    with pytest.raises(ValueError, match="FWT needs at least 2 tasks"):
        fwt([[0.7]], [0.5])
    with pytest.raises(ValueError, match="Forgetting needs at least 2 tasks"):
        forgetting([[0.7]])
    assert avalanche_forgetting([[0.7]]) == ({}, 0.0)
    report = ContinualReport.from_matrix([[0.7]], ["only"])
    assert report.acc == pytest.approx(0.7)
    assert report.bwt is None and report.fwt is None and report.forgetting is None and report.mean_forgetting is None


@pytest.mark.parametrize(
    ("R", "message"),
    [
        ([[0.1, 0.2, 0.3]], r"square T×T .* Got shape \(1, 3\)"),
        ([], r"Got shape \(0,\)"),
        (np.zeros((0, 0)), r"T >= 1 .* Got shape \(0, 0\)"),
        ([[0.1, 0.2], [0.3]], "must be a T×T table of numbers"),
        ([["a", "b"], ["c", "d"]], "must be a T×T table of numbers"),
        ([[0.1, 0.2], [float("nan"), 0.4]], r"finite values. R\[1\]\[0\] is nan"),
        ([[0.1, float("inf")], [0.3, 0.4]], r"R\[0\]\[1\] is inf"),
    ],
)
def test_invalid_matrices(R, message):
    with pytest.raises(ValueError, match=message):
        acc(R)


def test_invalid_arguments():
    with pytest.raises(ValueError, match=r"b must hold one value per task, T = 3. Got 2 values"):
        fwt(R3, [0.1, 0.2])
    with pytest.raises(ValueError, match=r"b must be a list of T = 3 numbers. Got \['x', 0.2, 0.3\]"):
        fwt(R3, ["x", 0.2, 0.3])
    with pytest.raises(ValueError, match=r"b must hold finite values"):
        fwt(R3, [0.1, float("nan"), 0.2])
    with pytest.raises(ValueError, match=r"after must be a row index in 0..2. Got 3"):
        avalanche_forgetting(R3, after=3)
    with pytest.raises(ValueError, match=r"task_names must name each of the T = 3 tasks. Got \['a'\]"):
        ContinualReport.from_matrix(R3, ["a"])
    with pytest.raises(ValueError, match=r"seconds_per_experience must hold one value per task, T = 3. Got 1"):
        ContinualReport.from_matrix(R3, ["a", "b", "c"], seconds_per_experience=[1.0])


def test_accuracy_matrix_copies():
    source = np.eye(2)
    arr = accuracy_matrix(source)
    arr[0, 0] = 5.0
    assert source[0, 0] == 1.0 and arr.dtype == np.float64


def test_report_round_trips_through_json():
    report = ContinualReport.from_matrix(
        R3, ["spam", "trec", "news"], b=B3, seconds_per_experience=[1.5, 2.0, 2.5],
        trainable_parameters_per_task=[1000, 66, 66], bytes_per_task=[4000, 264, 264],
    )
    assert report.acc == pytest.approx(0.823333, abs=1e-6)
    assert report.bwt == pytest.approx(-0.15) and report.fwt == pytest.approx(-0.125)
    assert report.forgetting == pytest.approx((0.2, 0.1)) and report.mean_forgetting == pytest.approx(0.15)
    d = json.loads(json.dumps(report.to_dict()))
    assert d["R"] == [list(row) for row in R3]
    assert d["task_names"] == ["spam", "trec", "news"] and d["bytes_per_task"] == [4000, 264, 264]
    assert ContinualReport(**{k: _tuples(v) for k, v in d.items()}) == report


def _tuples(value):
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def test_markdown_table():
    report = ContinualReport.from_matrix(R3, ["spam", "trec", "news"], b=B3, seconds_per_experience=[1, 2, 3])
    text = report.to_markdown()
    lines = text.splitlines()
    assert lines[0] == "| after \\ on | spam | trec | news |"
    assert lines[2] == "| spam | 0.900 | 0.100 | 0.200 |"
    assert "| before training (b) | 0.500 | 0.400 | 0.250 |" in lines
    assert "ACC 0.823 · BWT -0.150 · FWT -0.125 · forgetting 0.150 (Chaudhry; Avalanche's StreamForgetting 0.150)" \
        in lines
    assert "seconds per task: spam=1, trec=2, news=3" in lines
    assert "BWT –" in ContinualReport.from_matrix([[1.0]], ["x"]).to_markdown()


def test_the_two_forgetting_measures_are_named_apart_where_they_differ():
    # Task 0 scores 0.5 right after its training, 0.9 after task 1, 0.6 at the end.
    R = [[0.5, 0.0, 0.0], [0.9, 0.8, 0.0], [0.6, 0.8, 0.7]]
    report = ContinualReport.from_matrix(R, ["a", "b", "c"])
    assert report.mean_forgetting == pytest.approx((0.3 + 0.0) / 2)  # Chaudhry: best earlier row − last
    assert report.stream_forgetting == pytest.approx((-0.1 + 0.0) / 2)  # Avalanche: right after training − last
    assert "forgetting 0.150 (Chaudhry; Avalanche's StreamForgetting -0.050)" in report.to_markdown()


def test_heatmap_png(tmp_path):
    path = plot_heatmap(R4, ["a", "b", "c", "d"], tmp_path / "r.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["r.png"]  # no temp file left behind
    with pytest.raises(ValueError, match="names must name each of the T = 4 tasks"):
        plot_heatmap(R4, ["a"], tmp_path / "x.png")

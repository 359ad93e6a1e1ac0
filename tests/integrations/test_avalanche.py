"""The Avalanche 0.6 bridge: export, the shared-adapter multi-head model, and the metric cross-check."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from cmtl import BackboneConfig, TaskSpec
from cmtl.benchmarks.metrics import avalanche_bwt, avalanche_forgetting, bwt
from cmtl.core.backbone import load_backbone
from cmtl.core.tasks import MASKED_LOGIT
from cmtl.data import encode, read_examples
from cmtl.integrations import avalanche as av
from cmtl.training.evaluation import compute_metrics, predict_logits
from tests.conftest import QV, toy_sentiment

CPU = torch.device("cpu")


def _pad(backbone) -> int:
    return backbone.tokenizer.pad_token_id


def _flip(rows):
    return [{**r, "label": {"pos": "neg", "neg": "pos"}[r["label"]]} for r in rows]


def _three(rows):
    return [{**r, "label": "c" if "movie" in r["text"] else ("a" if r["label"] == "pos" else "b")} for r in rows]


# Three tasks on one toy vocabulary: sentiment, the same with labels swapped (interference on the
# shared adapter), and a three-label task (heads of different widths in one model).
STREAM = [
    ("sent", toy_sentiment(16), toy_sentiment(12, 1), ["neg", "pos"]),
    ("flip", _flip(toy_sentiment(16, 2)), _flip(toy_sentiment(10, 3)), ["neg", "pos"]),
    ("three", _three(toy_sentiment(16, 4)), _three(toy_sentiment(14, 5)), ["a", "b", "c"]),
]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # A 32-wide model gains nothing from intra-op threads, and two OpenMP threads on shared
    # cores spin-wait: measured 0.3 s -> 10 s per strategy run on a busy 2-core machine.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def backbone(tiny_config):
    return load_backbone(tiny_config, device="cpu")


@pytest.fixture(scope="module")
def benchmark(tiny_backbone):
    return av.export_benchmark(STREAM, load_backbone(BackboneConfig(name_or_path=tiny_backbone, max_length=64), "cpu"))


def test_importing_cmtl_does_not_import_avalanche():
    code = "import sys, cmtl, cmtl.benchmarks.metrics, cmtl.integrations.avalanche; print('avalanche' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_export_builds_a_task_incremental_scenario(benchmark, backbone):
    from avalanche.benchmarks.scenarios.generic_scenario import CLScenario

    assert isinstance(benchmark, CLScenario)
    assert len(benchmark.train_stream) == len(benchmark.test_stream) == 3
    lengths = set()
    for t, (name, train, test, labels) in enumerate(STREAM):
        spec = TaskSpec(name, labels=labels)
        for exp, rows in ((benchmark.train_stream[t], train), (benchmark.test_stream[t], test)):
            data = exp.dataset
            assert exp.current_experience == t and exp.task_label == t and exp.task_labels == [t]
            assert len(data) == len(rows)
            assert set(data.targets_task_labels.uniques) == {t}
            assert list(data.targets) == spec.encode_labels([r["label"] for r in rows]).tolist()
            x, y, task = data[0]
            ids = backbone.tokenize([rows[0]["text"]])["input_ids"][0]
            assert x.dtype == torch.long and x.shape[0] == 3 and task == t and int(y) == list(data.targets)[0]
            assert x[0, : len(ids)].tolist() == ids and int(x[1].sum()) == len(ids)
            assert set(x[0, len(ids):].tolist()) <= {backbone.tokenizer.pad_token_id}
            lengths.add(x.shape[1])
    assert len(lengths) == 1  # one pad length for the whole stream: replay mixes experiences


def test_export_takes_specs_and_examples(backbone):
    # The shape of a cmtl.benchmarks.scenarios.Experience: (e.spec, e.train, e.test, None).
    spec = TaskSpec("pairs", labels=["no", "yes"], text_pair_column="hypothesis")
    words = ["good", "bad"] * 3
    rows = [{"text": f"a {w} story", "hypothesis": w, "label": ["no", "yes"][i % 2]} for i, w in enumerate(words)]
    train = read_examples(rows, spec)
    bench = av.export_benchmark([(spec, train, rows[:2], None)], backbone)
    x, y, t = bench.train_stream[0].dataset[1]
    assert len(bench.train_stream[0].dataset) == 6 and int(y) == 1 and t == 0
    assert int(x[2].sum()) > 0  # the pair's second segment keeps its token type ids


def test_export_errors(backbone):
    train, test = toy_sentiment(4), toy_sentiment(4, 1)
    with pytest.raises(ValueError, match="non-empty list"):
        av.export_benchmark([], backbone)
    with pytest.raises(ValueError, match=r"Experience 0 must be a \(task_name, train_rows, test_rows, labels\) tuple"):
        av.export_benchmark([("sent", train, test)], backbone)
    with pytest.raises(ValueError, match=r"Task names must be unique in a stream. Got \['a', 'a'\]"):
        av.task_specs([("a", train, test, ["neg", "pos"]), ("a", train, test, ["neg", "pos"])])
    with pytest.raises(ValueError, match="task 'm' is 'multi_label'; only single_label"):
        av.task_specs([(TaskSpec("m", labels=["x", "y"], problem_type="multi_label"), train, test, None)])
    with pytest.raises(ValueError, match=r"labels \['a', 'b'\] differ from TaskSpec 's'"):
        av.task_specs([(TaskSpec("s", labels=["neg", "pos"]), train, test, ["a", "b"])])
    with pytest.raises(ValueError, match=r"seq_len=2 is shorter than the longest tokenized row \(8 tokens\)"):
        av.export_benchmark([("sent", train, test, ["neg", "pos"])], backbone, seq_len=2)


def test_model_forward_matches_cmtl_batches(benchmark, backbone):
    from avalanche.models import MultiTaskModule

    model = av.build_model(backbone, av.task_specs(STREAM)).eval()
    assert isinstance(model, av.TaskIncrementalModel) and isinstance(model, MultiTaskModule)
    assert model.task_names == ["sent", "flip", "three"]
    lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert model.parameters_added_per_task() == [lora + 2 * 32 + 2, 2 * 32 + 2, 3 * 32 + 3]
    assert model.parameters_added_per_task(in_bytes=True) == [4 * n for n in model.parameters_added_per_task()]
    # Trained during each experience: the shared adapter and that task's head.
    assert model.trainable_parameters_per_task() == [lora + 2 * 32 + 2, lora + 2 * 32 + 2, lora + 3 * 32 + 3]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.startswith("heads.") for n in trainable)
    x0, t0 = _first(benchmark.test_stream[0].dataset, 4)
    x2, t2 = _first(benchmark.test_stream[2].dataset, 4)
    with torch.no_grad():
        mixed = model(torch.cat([x0, x2]), torch.cat([t0, t2]))  # (8, 3)
        alone = model(x0, 0)  # (4, 2)
    torch.testing.assert_close(mixed[:4, :2], alone)
    assert (mixed[:4, 2] == MASKED_LOGIT).all()
    spec = av.task_specs(STREAM)[0]
    enc = encode(read_examples(STREAM[0][2], spec), spec, backbone.tokenize)
    logits = predict_logits(model.forward_for(0), enc, batch_size=64, pad_id=_pad(backbone), device=CPU)
    torch.testing.assert_close(logits[:4], alone, atol=1e-5, rtol=1e-5)


def _first(dataset, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    items = [dataset[i] for i in range(n)]
    return torch.stack([x for x, _, _ in items]), torch.tensor([t for _, _, t in items])


def test_a_backbone_serves_one_model(backbone):
    av.build_model(backbone, av.task_specs(STREAM))
    with pytest.raises(ValueError, match="already carries LoRA layers"):
        av.build_model(backbone, av.task_specs(STREAM))


def test_run_strategy_errors(benchmark, backbone):
    with pytest.raises(ValueError, match=r"must be one of \['naive', 'replay', 'ewc', 'lwf'\]. Got 'gem' instead"):
        av.run_strategy("gem", benchmark, None)
    two_heads = av.build_model(backbone, av.task_specs(STREAM[:2]))
    with pytest.raises(ValueError, match="3 test experiences and the model 2 task heads; all three must match"):
        av.run_strategy("naive", benchmark, two_heads)
    with pytest.raises(ValueError, match=r"AvalancheConfig.mem_size must be a positive integer. Got 0"):
        av.AvalancheConfig(mem_size=0)
    with pytest.raises(ValueError, match=r"AvalancheConfig.epochs must be a positive integer. Got True"):
        av.AvalancheConfig(epochs=True)  # a bool is an int to Python
    with pytest.raises(ValueError, match=r"AvalancheConfig.patience must be a positive integer or None. Got True"):
        av.AvalancheConfig(patience=True)
    with pytest.raises(ValueError, match=r"AvalancheConfig.ewc_lambda must be a finite number >= 0. Got -1"):
        av.AvalancheConfig(ewc_lambda=-1.0)
    with pytest.raises(ValueError, match=r"'seed' parameter of AvalancheConfig must be an integer in \[0, 2\*\*62\)"):
        av.AvalancheConfig(seed=1.5)  # torch refused it only once the run had started


FAST = av.AvalancheConfig(batch_size=8, epochs=8, learning_rate=0.1, mem_size=8)


def _cmtl_accuracies(model, backbone) -> list[float]:
    """cmtl's own evaluation path: read, encode, dynamic-padded batches, compute_metrics."""
    out = []
    for t, spec in enumerate(av.task_specs(STREAM)):
        enc = encode(read_examples(STREAM[t][2], spec), spec, backbone.tokenize)
        logits = predict_logits(model.forward_for(t), enc, batch_size=5, pad_id=_pad(backbone), device=CPU)
        out.append(compute_metrics(spec, logits, enc.targets)["accuracy"])
    return out


def test_cross_check_with_avalanche_metrics(benchmark, backbone):
    model = av.build_model(backbone, av.task_specs(STREAM), adapter=QV)
    before = _cmtl_accuracies(model.eval(), backbone)
    rows: list[list[float]] = []
    run = av.run_strategy(
        "naive", benchmark, model, FAST, after_experience=lambda i: rows.append(_cmtl_accuracies(model, backbone))
    )
    R = run.R
    assert len(R) == 3 and all(len(row) == 3 for row in R)
    assert len(set(R)) > 1, "training changed no accuracy: the cross-check would be vacuous"
    # cmtl's evaluation of the same model gives Avalanche's per-experience accuracies.
    assert run.b == pytest.approx(before, abs=1e-6)
    for i in range(3):
        assert R[i] == pytest.approx(rows[i], abs=1e-6)
    # cmtl.benchmarks.metrics on R reproduce what Avalanche logged, after every experience.
    for i in range(3):
        assert run.stream_forgetting[i] == pytest.approx(avalanche_forgetting(R, after=i).stream, abs=1e-6)
        assert run.stream_bwt[i] == pytest.approx(avalanche_bwt(R, after=i).stream, abs=1e-6)
    assert run.experience_forgetting == pytest.approx(avalanche_forgetting(R).per_experience, abs=1e-6)
    assert run.experience_bwt == pytest.approx(avalanche_bwt(R).per_experience, abs=1e-6)
    assert run.stream_bwt[-1] == pytest.approx(bwt(R), abs=1e-6)  # = Lopez-Paz & Ranzato's BWT
    sizes = [len(r[2]) for r in STREAM]
    assert run.stream_accuracy[-1] == pytest.approx(sum(a * n for a, n in zip(R[-1], sizes)) / sum(sizes), abs=1e-6)
    report = run.report()
    assert report.task_names == ("sent", "flip", "three") and report.bwt == pytest.approx(run.stream_bwt[-1])
    assert report.fwt is not None and len(report.seconds_per_experience) == 3
    assert report.bytes_per_task == tuple(model.parameters_added_per_task(in_bytes=True))
    assert report.trainable_parameters_per_task == tuple(model.trainable_parameters_per_task())


@pytest.mark.parametrize("name", av.AVALANCHE_STRATEGIES)
def test_every_strategy_runs(name, benchmark, backbone):
    model = av.build_model(backbone, av.task_specs(STREAM))
    config = av.AvalancheConfig(batch_size=8, epochs=1, learning_rate=0.05, mem_size=8, measure_b=False)
    run = av.run_strategy(name, benchmark, model, config)
    assert run.strategy == name and run.b is None
    assert len(run.R) == 3 and all(0.0 <= v <= 1.0 for row in run.R for v in row)
    assert run.stream_forgetting[-1] == pytest.approx(avalanche_forgetting(run.R).stream, abs=1e-6)
    assert all(p.requires_grad == ("lora_" in n or n.startswith("heads.")) for n, p in model.named_parameters())


def test_head_learning_rate_drives_the_heads_only(benchmark, backbone):
    model = av.build_model(backbone, av.task_specs(STREAM))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    config = av.AvalancheConfig(batch_size=8, epochs=1, learning_rate=0.05, head_learning_rate=1e-12,
                                measure_b=False)
    av.run_strategy("naive", benchmark, model, config)
    after = dict(model.named_parameters())
    moved = {n: not torch.allclose(after[n].detach(), b, atol=1e-8) for n, b in before.items()}
    assert any(m for n, m in moved.items() if "lora_" in n)  # the adapter trains at learning_rate
    assert not any(m for n, m in moved.items() if n.startswith("heads."))  # the heads barely move
    with pytest.raises(ValueError, match=r"AvalancheConfig.head_learning_rate must be > 0 or None. Got 0"):
        av.AvalancheConfig(head_learning_rate=0.0)


def test_optimizer_state_carries_over_unless_reset(benchmark, tiny_config):
    """Avalanche keeps AdamW's moment estimates from one experience to the next; ``reset_optimizer_state``
    starts every experience without them, as cmtl's own loop does. Seen by a caller's plugin."""
    from avalanche.core import SupervisedPlugin

    class StateAtStart(SupervisedPlugin):
        def __init__(self) -> None:
            super().__init__()
            self.held: list[int] = []  # parameters with AdamW state when each experience starts

        def before_training_exp(self, strategy, **kwargs) -> None:
            self.held.append(sum(1 for state in strategy.optimizer.state.values() if state))

    held = {}
    for reset in (False, True):
        model = av.build_model(load_backbone(tiny_config, device="cpu"), av.task_specs(STREAM))
        recorder = StateAtStart()
        config = av.AvalancheConfig(batch_size=8, epochs=1, learning_rate=0.05, measure_b=False,
                                    reset_optimizer_state=reset)
        av.run_strategy("naive", benchmark, model, config, plugins=[recorder])
        held[reset] = recorder.held
    lora = sum(1 for n, _ in model.named_parameters() if "lora_" in n)
    assert held[True] == [0, 0, 0]
    # Kept: the shared adapter's state and every earlier head's (weight and bias).
    assert held[False] == [0, lora + 2, lora + 4]


VALID = [toy_sentiment(12, 7), _flip(toy_sentiment(12, 8)), _three(toy_sentiment(12, 9))]


def _valid_accuracy(model, backbone, t: int) -> float:
    spec = av.task_specs(STREAM)[t]
    enc = encode(read_examples(VALID[t], spec), spec, backbone.tokenize)
    logits = predict_logits(model.forward_for(t), enc, batch_size=5, pad_id=_pad(backbone), device=CPU)
    return compute_metrics(spec, logits, enc.targets)["accuracy"]


def test_patience_stops_on_validation_and_keeps_the_best_epoch(backbone, tiny_backbone):
    """Avalanche's strategies get cmtl's budget rule: best epoch on validation kept, stopped by patience."""
    bench = av.export_benchmark(STREAM, backbone, validation=VALID)
    assert len(bench.valid_stream) == 3 and len(bench.valid_stream[2].dataset) == 12
    model = av.build_model(backbone, av.task_specs(STREAM), adapter=QV)
    final: list[float] = []
    # A large learning rate makes validation accuracy jump around, so the best epoch is rarely the last.
    config = av.AvalancheConfig(batch_size=4, epochs=8, learning_rate=0.3, patience=2, measure_b=False)
    run = av.run_strategy("naive", bench, model, config,
                          after_experience=lambda i: final.append(_valid_accuracy(model, backbone, i)))
    assert run.validation is not None and len(run.validation) == 3
    for t, history in enumerate(run.validation):
        best = max(range(len(history)), key=lambda k: (history[k], -k))  # the first best epoch
        assert final[t] == pytest.approx(history[best], abs=1e-6)  # its weights were put back
        assert len(history) == min(8, best + 1 + 2)  # stopped 2 epochs after it, or at the cap
    assert any(len(h) < 8 for h in run.validation) and any(h[-1] < max(h) for h in run.validation), \
        "the run never stopped early or never fell back: the test would not see the rule"


def test_patience_needs_a_validation_stream(benchmark, backbone):
    model = av.build_model(backbone, av.task_specs(STREAM))
    with pytest.raises(ValueError, match="patience needs validation data"):
        av.run_strategy("naive", benchmark, model, av.AvalancheConfig(patience=2))
    with pytest.raises(ValueError, match="validation holds 2 entries for 3 experiences"):
        av.export_benchmark(STREAM, backbone, validation=VALID[:2])
    with pytest.raises(ValueError, match="patience must be a positive integer or None"):
        av.AvalancheConfig(patience=0)


def test_avalanche_imported_through_cmtl_prints_no_qp_solver_warning():
    """qpsolvers warns on import when no QP solver is installed (only GEM needs one); cmtl silences that one
    warning where it imports Avalanche, so `cmtl bench --strategy avl-*` does not print it."""
    def stderr(code: str) -> str:
        out = subprocess.run([sys.executable, "-W", "always", "-c", code], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        return out.stderr

    if "QP solver" not in stderr("import avalanche"):
        pytest.skip("a QP solver is installed here: qpsolvers has nothing to warn about")
    through_cmtl = stderr("from cmtl.integrations.avalanche_model import model_class\n"
                          "model_class()\nimport avalanche.training")
    assert "QP solver" not in through_cmtl, through_cmtl


def test_run_strategy_refuses_a_model_built_for_another_order(benchmark, backbone):
    """Experience t of an exported benchmark trains and is scored through head t, and the run's columns are
    named after the model's heads: a model built from the same tasks in another order trained each task on
    another's head and labelled every column of R with the wrong task."""
    swapped = av.build_model(backbone, av.task_specs([STREAM[1], STREAM[0], STREAM[2]]))
    with pytest.raises(ValueError, match=r"heads \['flip', 'sent', 'three'\].*benchmark's experiences "
                                         r"\['sent', 'flip', 'three'\]"):
        av.run_strategy("naive", benchmark, swapped, av.AvalancheConfig(epochs=1, measure_b=False))

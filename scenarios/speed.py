"""Benchmark: how fast cmtl trains and evaluates LoRA adapters, against the tools users would
otherwise reach for (issue "fast adapter training").

Training — the same task (real data, same backbone, same LoRA config, epochs, batch size,
learning rate and seed), one validation pass per epoch, timed from raw rows to a trained adapter:

* ``cmtl``          — ``Registry.add_task`` with the shipped defaults (frozen-layer cache on);
* ``cmtl-plain``    — the same with the cache turned off (``cache_frozen_mb=0``);
* ``cmtl-grouped``  — the defaults plus length-grouped batches (``length_grouping=4``);
* ``hf-peft``       — Hugging Face ``Trainer`` + peft ``get_peft_model`` on
  ``AutoModelForSequenceClassification`` (task_type SEQ_CLS), dynamic padding;
* ``avalanche``     — Avalanche 0.6 ``Naive`` training cmtl's LoRA model
  (:mod:`cmtl.integrations.avalanche`), with the same warm-up/decay schedule.

Evaluation — the test splits of all five ``text5`` tasks, raw texts to accuracy, through the same LoRA
(on the layers ``--adapt`` names): cmtl ``Registry.evaluate`` per task, ``Trainer.predict`` per task,
Avalanche ``eval`` on the stream.

Every measurement runs in its own process (clean peak memory), the ways interleaved,
``--repeats`` times; medians are reported. Writes ``results.json`` and ``results.md`` to ``--out``.

    python scenarios/speed.py                          # all layers adapted, then the top half only
    python scenarios/speed.py --adapt top-half --repeats 5
    python scenarios/speed.py --layers 2 --max-train 64 --repeats 1   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

TRAIN_WAYS = ("cmtl", "cmtl-plain", "cmtl-grouped", "hf-peft", "avalanche")
EVAL_WAYS = ("cmtl", "hf-peft", "avalanche")
TEXT5 = ("bbc_news", "trec6", "sms_spam", "rotten_tomatoes", "fine_foods")
TARGET_MODULES = ("query", "value")


def _settings(args) -> dict:
    """The options a run's results depend on (recorded, and checked before another run writes into --out)."""
    return {k: v for k, v in vars(args).items() if k not in ("out", "worker", "phase", "way")}


# --- one measurement (runs in a worker process) ---------------------------------------


def _rows(corpus: str, split: str, n: int):
    from cmtl.benchmarks.corpora import load_corpus

    data = load_corpus(corpus)[split]
    return data.select(range(min(n, len(data))))


def _labels(corpus: str) -> list[str]:
    from cmtl.benchmarks.corpora import corpus_info

    return list(corpus_info(corpus).labels)


def _adapted_layers(args, num_layers: int) -> tuple[int, ...] | None:
    return None if args.adapt == "all" else tuple(range(num_layers // 2, num_layers))


def _adapter(args, num_layers: int):
    """The LoRA every way trains and evaluates (peft's twin: :func:`_hf_model`), not the library's default."""
    from cmtl import AdapterConfig

    return AdapterConfig(r=8, alpha=16, dropout=0.1, target_modules=TARGET_MODULES,
                         layers=_adapted_layers(args, num_layers))


def _num_layers(args) -> int:
    from transformers import AutoConfig

    from cmtl.core.backbone import DEFAULT_BACKBONE, resolve_path

    full = AutoConfig.from_pretrained(resolve_path(DEFAULT_BACKBONE), local_files_only=True).num_hidden_layers
    return args.layers or full


def _peak_mb(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _lr_lambda(total: int, warmup_ratio: float):
    warmup = int(total * warmup_ratio)  # the same schedule as cmtl.training.loop.get_lr
    return lambda step: (step + 1) / warmup if step < warmup else max(0.0, (total - step) / max(1, total - warmup))


def train_cmtl(args, variant: str, workdir: Path) -> dict:
    from cmtl import BackboneConfig, Registry, TaskSpec, TrainConfig

    spec = TaskSpec("task", labels=_labels(args.task))
    train, val = _rows(args.task, "train", args.max_train), _rows(args.task, "validation", args.max_eval)
    reg = Registry.create(workdir / "reg", BackboneConfig(num_hidden_layers=args.layers), device=args.device)
    adapter = _adapter(args, reg.backbone.num_layers)
    training = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.lr, patience=None,
                           seed=args.seed, progress=False, length_grouping=4 if variant == "grouped" else 0,
                           cache_frozen_mb=0 if variant == "plain" else TrainConfig().cache_frozen_mb)
    started = time.perf_counter()
    reg.add_task(spec, train, validation=val, adapter=adapter, training=training)
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "examples": len(train) * args.epochs,
            "accuracy": reg.evaluate("task", val)["accuracy"], "peak_mb": _peak_mb(reg.backbone.device.type)}


def _hf_model(args, num_labels: int, layers):
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from cmtl.core.backbone import DEFAULT_BACKBONE, resolve_path

    path = resolve_path(DEFAULT_BACKBONE)
    extra = {"num_hidden_layers": args.layers} if args.layers else {}
    config = AutoConfig.from_pretrained(path, num_labels=num_labels, local_files_only=True, **extra)
    torch.manual_seed(args.seed)
    model = AutoModelForSequenceClassification.from_pretrained(path, config=config, local_files_only=True)
    lora = LoraConfig(task_type=TaskType.SEQ_CLS, r=8, lora_alpha=16, lora_dropout=0.1,
                      target_modules=list(TARGET_MODULES), layers_to_transform=list(layers) if layers else None)
    return get_peft_model(model, lora)


def _hf_tokenize(tokenizer, rows, labels: list[str]):
    ids = {label: i for i, label in enumerate(labels)}

    def prep(batch):
        enc = tokenizer(batch["text"], truncation=True, max_length=256)
        enc["labels"] = [ids[label] for label in batch["label"]]
        return enc

    # keep_in_memory and no cache file: every repeat tokenizes, as a first run would.
    return rows.map(prep, batched=True, remove_columns=rows.column_names, keep_in_memory=True,
                    load_from_cache_file=False)


def _hf_trainer(args, model, tokenizer, workdir: Path, train=None, val=None):
    import numpy as np
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    targs = TrainingArguments(
        output_dir=str(workdir / "hf"), per_device_train_batch_size=args.batch_size, per_device_eval_batch_size=64,
        num_train_epochs=args.epochs, learning_rate=args.lr, weight_decay=0.01, warmup_steps=0.06,
        lr_scheduler_type="linear", max_grad_norm=1.0, eval_strategy="epoch" if val is not None else "no",
        save_strategy="no", logging_strategy="no", report_to="none", seed=args.seed, disable_tqdm=True,
        use_cpu=args.device == "cpu", dataloader_num_workers=0,
    )
    accuracy = lambda p: {"accuracy": float((np.argmax(p.predictions, -1) == p.label_ids).mean())}  # noqa: E731
    return Trainer(model=model, args=targs, train_dataset=train, eval_dataset=val,
                   data_collator=DataCollatorWithPadding(tokenizer), compute_metrics=accuracy)


def train_hf(args, workdir: Path) -> dict:
    from transformers import AutoTokenizer

    from cmtl.core.backbone import DEFAULT_BACKBONE, resolve_path

    labels = _labels(args.task)
    train, val = _rows(args.task, "train", args.max_train), _rows(args.task, "validation", args.max_eval)
    model = _hf_model(args, len(labels), _adapted_layers(args, _num_layers(args)))
    tokenizer = AutoTokenizer.from_pretrained(resolve_path(DEFAULT_BACKBONE), local_files_only=True)
    started = time.perf_counter()
    train_ds, val_ds = _hf_tokenize(tokenizer, train, labels), _hf_tokenize(tokenizer, val, labels)
    trainer = _hf_trainer(args, model, tokenizer, workdir, train_ds, val_ds)
    trainer.train()
    seconds = time.perf_counter() - started
    device = "cuda" if next(model.parameters()).is_cuda else "cpu"
    return {"seconds": seconds, "examples": len(train) * args.epochs,
            "accuracy": trainer.evaluate()["eval_accuracy"], "peak_mb": _peak_mb(device)}


def _avalanche_strategy(args, model, optimizer, plugins=()):
    from avalanche.evaluation.metrics import accuracy_metrics
    from avalanche.training import Naive
    from avalanche.training.plugins import EvaluationPlugin

    evaluator = EvaluationPlugin(accuracy_metrics(experience=True), loggers=[])
    return Naive(model=model, optimizer=optimizer, criterion=torch.nn.CrossEntropyLoss(),
                 train_mb_size=args.batch_size, train_epochs=args.epochs, eval_mb_size=64,
                 device=model.backbone.device, evaluator=evaluator, eval_every=1, plugins=list(plugins))


def train_avalanche(args, workdir: Path) -> dict:
    from avalanche.training.determinism.rng_manager import RNGManager
    from avalanche.training.plugins import LRSchedulerPlugin

    from cmtl import BackboneConfig, TaskSpec
    from cmtl.core.backbone import load_backbone
    from cmtl.integrations import avalanche as av

    spec = TaskSpec("task", labels=_labels(args.task))
    train, val = _rows(args.task, "train", args.max_train), _rows(args.task, "validation", args.max_eval)
    backbone = load_backbone(BackboneConfig(num_hidden_layers=args.layers), device=args.device)
    model = av.build_model(backbone, [spec], _adapter(args, backbone.num_layers), seed=args.seed)
    RNGManager.set_random_seeds(args.seed)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.01)
    total = -(-len(train) // args.batch_size) * args.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(total, 0.06))
    strategy = _avalanche_strategy(args, model, optimizer,
                                   [LRSchedulerPlugin(scheduler, reset_lr=False, step_granularity="iteration")])
    started = time.perf_counter()
    bench = av.export_benchmark([(spec, train, val, None)], backbone)
    strategy.train(bench.train_stream[0], eval_streams=[bench.test_stream])
    seconds = time.perf_counter() - started
    metrics = strategy.eval(bench.test_stream)
    accuracy = next(v for k, v in metrics.items() if k.startswith("Top1_Acc_Exp/eval_phase/test_stream"))
    return {"seconds": seconds, "examples": len(train) * args.epochs, "accuracy": float(accuracy),
            "peak_mb": _peak_mb(backbone.device.type)}


def eval_cmtl(args, workdir: Path) -> dict:
    from cmtl import BackboneConfig, Registry, TaskSpec, TrainConfig

    reg = Registry.create(workdir / "reg", BackboneConfig(num_hidden_layers=args.layers), device=args.device)
    tests = {}
    for corpus in TEXT5:  # adapters barely trained: throughput does not depend on the weights
        reg.add_task(TaskSpec(corpus.replace("_", "-"), labels=_labels(corpus)), _rows(corpus, "train", 16),
                     adapter=_adapter(args, reg.backbone.num_layers), training=TrainConfig(max_steps=1, progress=False))
        tests[corpus.replace("_", "-")] = _rows(corpus, "test", args.max_eval)
    started = time.perf_counter()
    for task, rows in tests.items():
        reg.evaluate(task, rows)
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "texts": sum(len(r) for r in tests.values()),
            "peak_mb": _peak_mb(reg.backbone.device.type)}


def eval_hf(args, workdir: Path) -> dict:
    from transformers import AutoTokenizer

    from cmtl.core.backbone import DEFAULT_BACKBONE, resolve_path

    tokenizer = AutoTokenizer.from_pretrained(resolve_path(DEFAULT_BACKBONE), local_files_only=True)
    layers = _adapted_layers(args, _num_layers(args))
    models = {corpus: _hf_model(args, len(_labels(corpus)), layers) for corpus in TEXT5}
    tests = {corpus: _rows(corpus, "test", args.max_eval) for corpus in TEXT5}
    started = time.perf_counter()
    for corpus, rows in tests.items():
        trainer = _hf_trainer(args, models[corpus], tokenizer, workdir)
        trainer.predict(_hf_tokenize(tokenizer, rows, _labels(corpus)))
    seconds = time.perf_counter() - started
    device = "cuda" if next(models[TEXT5[0]].parameters()).is_cuda else "cpu"
    return {"seconds": seconds, "texts": sum(len(r) for r in tests.values()), "peak_mb": _peak_mb(device)}


def eval_avalanche(args, workdir: Path) -> dict:
    from cmtl import BackboneConfig, TaskSpec
    from cmtl.core.backbone import load_backbone
    from cmtl.integrations import avalanche as av

    backbone = load_backbone(BackboneConfig(num_hidden_layers=args.layers), device=args.device)
    specs = [TaskSpec(c.replace("_", "-"), labels=_labels(c)) for c in TEXT5]
    model = av.build_model(backbone, specs, _adapter(args, backbone.num_layers), seed=args.seed)
    tests = {corpus: _rows(corpus, "test", args.max_eval) for corpus in TEXT5}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    strategy = _avalanche_strategy(args, model, optimizer)
    started = time.perf_counter()
    # Avalanche needs a train split per experience: one row each, so tokenizing it costs nothing.
    bench = av.export_benchmark([(s, rows.select([0]), rows, None) for s, rows in zip(specs, tests.values())], backbone)
    strategy.eval(bench.test_stream)
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "texts": sum(len(r) for r in tests.values()), "peak_mb": _peak_mb(backbone.device.type)}


def measure(args) -> dict:
    """One measurement, in this process."""
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        if args.phase == "train":
            if args.way.startswith("cmtl"):
                return train_cmtl(args, args.way.partition("-")[2] or "default", workdir)
            return {"hf-peft": train_hf, "avalanche": train_avalanche}[args.way](args, workdir)
        return {"cmtl": eval_cmtl, "hf-peft": eval_hf, "avalanche": eval_avalanche}[args.way](args, workdir)


# --- the benchmark (main process) -----------------------------------------------------


def run(args, echo=print) -> dict:
    """Every (phase, way) ``args.repeats`` times, interleaved, each in a fresh process; medians and ratios."""
    from cmtl.benchmarks.results import write_results

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else (
        "cpu" if args.device == "auto" else args.device)
    results = {"task": args.task, "max_train": args.max_train, "max_eval": args.max_eval, "epochs": args.epochs,
               "batch_size": args.batch_size, "learning_rate": args.lr, "layers": args.layers, "adapt": args.adapt,
               "lora": {"r": 8, "alpha": 16, "dropout": 0.1, "target_modules": list(TARGET_MODULES)},
               "device": device, "machine": _machine(device), "torch_threads": torch.get_num_threads(),
               "date": time.strftime("%Y-%m-%d"), "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
               "settings": _settings(args),
               "runs": {"train": {}, "eval": {}}}
    plan = [("train", way) for way in args.ways] + ([("eval", way) for way in EVAL_WAYS] if args.eval else [])
    for repeat in range(args.repeats):
        for phase, way in plan:
            result = _spawn(args, phase, way, device)
            results["runs"][phase].setdefault(way, []).append(result)
            rate = result["examples" if phase == "train" else "texts"] / result["seconds"]
            echo(f"[{repeat + 1}/{args.repeats}] {phase} {way}: {result['seconds']:.1f} s, {rate:.1f}/s"
                 + (f", accuracy {result['accuracy']:.4f}" if "accuracy" in result else ""))
            write_results(out, results)
    results["summary"] = summarise(results)
    write_results(out, results, to_markdown(results))
    return results


def _spawn(args, phase: str, way: str, device: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--phase", phase, "--way", way, "--device", device,
           "--task", args.task, "--max-train", str(args.max_train), "--max-eval", str(args.max_eval),
           "--epochs", str(args.epochs), "--batch-size", str(args.batch_size), "--lr", str(args.lr),
           "--seed", str(args.seed), "--adapt", args.adapt] + (["--layers", str(args.layers)] if args.layers else [])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{phase} {way} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _machine(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"{platform.machine()} {platform.processor() or ''}, {os.cpu_count()} CPU cores".replace(" ,", ",")


def summarise(results: dict) -> dict:
    """Median rate, time, memory and accuracy per way, and cmtl's speed-ups over each baseline."""
    summary = {}
    for phase, unit in (("train", "examples"), ("eval", "texts")):
        rows = {}
        for way, runs in results["runs"][phase].items():
            rows[way] = {
                "per_second": statistics.median(r[unit] / r["seconds"] for r in runs),
                "seconds": statistics.median(r["seconds"] for r in runs),
                "peak_mb": statistics.median(r["peak_mb"] for r in runs),
                "repeats": len(runs),
            }
            if "accuracy" in runs[0]:
                rows[way]["accuracy"] = statistics.median(r["accuracy"] for r in runs)
        for baseline in ("hf-peft", "avalanche"):
            if baseline in rows:
                for row in rows.values():
                    row[f"vs_{baseline}"] = row["per_second"] / rows[baseline]["per_second"]
        summary[phase] = rows
    return summary


def to_markdown(results: dict) -> str:
    s = results["summary"]
    layers = "all" if results["adapt"] == "all" else "top half"
    lines = [
        f"Task `{results['task']}` ({results['max_train']} training, {results['max_eval']} validation examples), "
        f"{results['epochs']} epochs, batch {results['batch_size']}, lr {results['learning_rate']}, LoRA r=8 "
        f"alpha=16 on query/value of {layers} layers, backbone layers: {results['layers'] or 'all'}. "
        f"{results['machine']} ({results['device']}, {results['torch_threads']} torch threads), {results['date']}, "
        f"medians of {max(r['repeats'] for r in s['train'].values())} interleaved runs, each in its own process.",
        "",
        "| training | examples/s | wall s | peak MiB | val. accuracy | × HF Trainer + PEFT | × Avalanche Naive |",
        "|---|---|---|---|---|---|---|",
    ]
    ratio = lambda r, key: f"{r[key]:.2f}×" if key in r else "–"  # noqa: E731
    for way, r in s["train"].items():
        lines.append(f"| {way} | {r['per_second']:.1f} | {r['seconds']:.1f} | {r['peak_mb']:.0f} | "
                     f"{r['accuracy']:.4f} | {ratio(r, 'vs_hf-peft')} | {ratio(r, 'vs_avalanche')} |")
    if s.get("eval"):
        lines += ["", "| evaluation, 5 text5 test sets | texts/s | wall s | peak MiB | × HF Trainer + PEFT | "
                      "× Avalanche Naive |", "|---|---|---|---|---|---|"]
        for way, r in s["eval"].items():
            lines.append(f"| {way} | {r['per_second']:.1f} | {r['seconds']:.1f} | {r['peak_mb']:.0f} | "
                         f"{ratio(r, 'vs_hf-peft')} | {ratio(r, 'vs_avalanche')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None, echo=print) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--task", default="rotten_tomatoes", help="corpus to train on (cmtl.benchmarks.corpora.CORPORA)")
    p.add_argument("--max-train", type=int, default=600)
    p.add_argument("--max-eval", type=int, default=300, help="validation examples; test examples per text5 task")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layers", type=int, default=None, help="use only the first N backbone layers")
    p.add_argument("--adapt", choices=["all", "top-half"], default="all", help="which layers LoRA adapts")
    p.add_argument("--ways", default=",".join(TRAIN_WAYS), help=f"training ways, from {','.join(TRAIN_WAYS)}")
    p.add_argument("--no-eval", dest="eval", action="store_false", help="skip the evaluation measurement")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu or cuda")
    p.add_argument("--out", default=None, help="default runs/bench/speed-<adapt>")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--phase", choices=["train", "eval"], help=argparse.SUPPRESS)
    p.add_argument("--way", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(measure(args)))
        return
    args.ways = [w for w in args.ways.split(",") if w]
    unknown = sorted(set(args.ways) - set(TRAIN_WAYS))
    if unknown:
        p.error(f"unknown ways {unknown}; choose from {list(TRAIN_WAYS)}")
    args.out = args.out or f"runs/bench/speed-{args.adapt}"
    from cmtl.benchmarks.results import check_same_run

    check_same_run(args.out, _settings(args))
    results = run(args, echo=echo)
    echo(to_markdown(results))


if __name__ == "__main__":
    main()

"""Benchmark: serving many task adapters from one backbone (issue "serving").

Throughput (in process, no HTTP): batches of real text5 test texts, each row for one of K
task adapters (K = 1, 4, 16 by default), raw texts to logits, five ways:

* ``base``        — the backbone alone, no adapter (the physical limit);
* ``cmtl``        — :class:`cmtl.serving.engine.InferenceEngine`, one forward with gathered LoRA factors;
* ``one-adapter`` — the engine with every row on one adapter (what a merged entry costs);
* ``loop``        — one forward per task present in the batch (``Registry.predict_proba``);
* ``peft-mixed``  — peft's mixed-batch forward (``adapter_names=[...]``) on the same adapters.

Load (over HTTP, loopback only): ``cmtl serve`` in a subprocess, ``--requests`` requests of one
text each at ``--concurrency``, mixed tasks; p50/p99 latency and errors. Then again while a task is
swapped to a new version mid-run (``--swap``): the new version was trained beforehand and is made
current halfway through, so the server hot-swaps under load.

    python scenarios/serving.py                       # both parts, 6-layer MiniLM
    python scenarios/serving.py --layers 2 --requests 500 --adapters 1,4   # a quick look
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

TEXT5 = ("bbc_news", "trec6", "sms_spam", "rotten_tomatoes", "fine_foods")


def _settings(args) -> dict:
    """The options a run's results depend on (recorded, and checked before another run writes into --out)."""
    return {k: v for k, v in vars(args).items() if k not in ("out",)}


def build_registry(root: Path, k: int, layers: int | None, device: str):
    """A registry with ``k`` tasks (labels of the text5 corpora in turn), each trained a few steps."""
    from cmtl import BackboneConfig, Registry, TaskSpec, TrainConfig
    from cmtl.benchmarks.corpora import corpus_info, load_corpus

    reg = Registry.create(root, BackboneConfig(num_hidden_layers=layers), device=device)
    for i in range(k):
        corpus = TEXT5[i % len(TEXT5)]
        reg.add_task(TaskSpec(f"task{i:02d}", labels=list(corpus_info(corpus).labels)),
                     load_corpus(corpus)["train"].select(range(32)),
                     training=TrainConfig(max_steps=4, learning_rate=5e-3, progress=False, seed=i))
    return reg


def texts_pool(n: int) -> list[str]:
    from cmtl.benchmarks.corpora import load_corpus

    per = -(-n // len(TEXT5))
    texts = [t for c in TEXT5 for t in load_corpus(c)["test"].select(range(per))["text"]]
    order = np.random.default_rng(0).permutation(len(texts))
    return [texts[i] for i in order[:n]]


def _timed(fn, batches, warmup: int = 2) -> dict:
    for b in batches[:warmup]:
        fn(*b)
    latencies = []
    started = time.perf_counter()
    for b in batches:
        t = time.perf_counter()
        fn(*b)
        latencies.append(time.perf_counter() - t)
    total = time.perf_counter() - started
    rows = sum(len(b[1]) for b in batches)
    return {"texts_per_s": rows / total, "p50_ms": 1000 * float(np.percentile(latencies, 50)),
            "p99_ms": 1000 * float(np.percentile(latencies, 99))}


def throughput(args, k: int, workdir: Path, echo=print) -> dict:
    """Every way on the same batches of K mixed tasks."""
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    from cmtl import Registry, store
    from cmtl.core.backbone import load_backbone
    from cmtl.data import Encoded, batches, token_budget_chunks
    from cmtl.serving.engine import InferenceEngine

    root = workdir / f"reg{k}"
    build_registry(root, k, args.layers, args.device)
    reg = Registry.open(root, device=args.device)
    engine = InferenceEngine(root, device=args.device, max_batch_size=args.batch_size,
                             max_batch_tokens=args.batch_tokens)
    tasks = reg.tasks()
    pool = texts_pool(args.batch_size * args.batches)
    work = [([tasks[(i * args.batch_size + j) % k] for j in range(args.batch_size)],
             pool[i * args.batch_size:(i + 1) * args.batch_size]) for i in range(args.batches)]
    plain = load_backbone(reg.backbone.config, device=args.device)

    @torch.inference_mode()
    def padded_forward(backbone, texts):  # the same length bucketing as the engine's
        enc = Encoded(backbone.tokenize(texts)["input_ids"], None, None)
        for chunk in token_budget_chunks(enc, args.batch_size, args.batch_tokens):
            _, inputs, _ = next(batches(enc, chunk, len(chunk), backbone.pad_id, backbone.device))
            backbone.embed(**inputs)

    # peft's mixed batches: the same adapters in a PeftModel, rows routed with adapter_names.
    peft_backbone = load_backbone(reg.backbone.config, device=args.device)
    model = None
    for task in tasks:
        record = reg._version_record(task, reg.current(task).version)
        state = store.read_tensors(store.version_dir(root, task, 1) / "adapter.safetensors",
                                   record["files"]["adapter.safetensors"])
        config = LoraConfig(r=record["adapter"]["r"], lora_alpha=record["adapter"]["alpha"],
                            target_modules=record["adapter"]["target_modules"])
        if model is None:
            model = get_peft_model(peft_backbone.encoder, config, adapter_name=task)
        else:
            model.add_adapter(task, config)
        set_peft_model_state_dict(model, state, adapter_name=task)
    model.eval()

    @torch.inference_mode()
    def peft_mixed(task_rows, texts):
        enc = Encoded(peft_backbone.tokenize(texts)["input_ids"], None, None)
        for chunk in token_budget_chunks(enc, args.batch_size, args.batch_tokens):
            idx, inputs, _ = next(batches(enc, chunk, len(chunk), peft_backbone.pad_id, peft_backbone.device))
            out = model(**inputs, adapter_names=[task_rows[i] for i in idx])
            peft_backbone.pool(out.last_hidden_state, inputs["attention_mask"])

    def loop(task_rows, texts):
        for task in dict.fromkeys(task_rows):
            reg.predict_proba(task, [x for x, t in zip(texts, task_rows) if t == task])

    ways = {
        "base": lambda task_rows, texts: padded_forward(plain, texts),
        "cmtl": lambda task_rows, texts: engine.logits(task_rows, texts),
        "one-adapter": lambda task_rows, texts: engine.logits([tasks[0]] * len(texts), texts),
        "loop": loop,
        "peft-mixed": peft_mixed,
    }
    results = {}
    for repeat in range(args.repeats):  # interleaved repeats; medians below
        for name, fn in ways.items():
            results.setdefault(name, []).append(_timed(fn, work))
    summary = {name: {key: statistics.median(r[key] for r in runs) for key in runs[0]}
               for name, runs in results.items()}
    base = summary["base"]["texts_per_s"]
    for name, row in summary.items():
        row["vs_base"] = row["texts_per_s"] / base
    summary["cmtl"]["vs_peft_mixed"] = summary["cmtl"]["texts_per_s"] / summary["peft-mixed"]["texts_per_s"]
    echo(f"K={k}: " + ", ".join(f"{n} {r['texts_per_s']:.0f}/s" for n, r in summary.items()))
    return summary


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _load(url: str, requests: list[dict], concurrency: int, on_half=None) -> dict:
    import httpx

    latencies: list[float] = []
    errors: list[str] = []
    versions: list[tuple[float, str, int | None]] = []
    queue: asyncio.Queue = asyncio.Queue()
    for i, r in enumerate(requests):
        queue.put_nowait((i, r))
    half = len(requests) // 2
    swapped_at: list[float] = []

    async def worker(client):
        while not queue.empty():
            i, body = queue.get_nowait()
            if i == half and on_half is not None:
                swapped_at.append(time.perf_counter())
                await asyncio.get_running_loop().run_in_executor(None, on_half)
                swapped_at.append(time.perf_counter())
            t = time.perf_counter()
            try:
                resp = await client.post(f"{url}/v1/predict", json=body)
                if resp.status_code != 200:
                    errors.append(f"{resp.status_code} {resp.text[:200]}")
                else:
                    versions.append((t, body["task"], resp.json()["version"]))
            except Exception as exc:  # noqa: BLE001 - count every failure
                errors.append(repr(exc))
            latencies.append(time.perf_counter() - t)

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    started = time.perf_counter()
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    total = time.perf_counter() - started
    return {"requests": len(requests), "errors": len(errors), "error_samples": errors[:5],
            "requests_per_s": len(requests) / total, "p50_ms": 1000 * float(np.percentile(latencies, 50)),
            "p99_ms": 1000 * float(np.percentile(latencies, 99)), "seconds": total,
            "versions": versions, "swapped_at": swapped_at}


def load_test(args, workdir: Path, echo=print) -> dict:
    """``cmtl serve`` on loopback; a plain run, then one with a hot swap halfway."""
    import httpx

    from cmtl import Registry, TrainConfig
    from cmtl.benchmarks.corpora import load_corpus

    root = workdir / "serve-reg"
    reg = build_registry(root, 4, args.layers, args.device)
    # The swap target: v2 of task00, trained on more data now, made current halfway through the run.
    reg.update_task("task00", load_corpus(TEXT5[0])["train"].select(range(32, 96)),
                    training=TrainConfig(max_steps=4, learning_rate=5e-3, progress=False), promote=False)
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "cmtl.cli", "serve", str(root), "--port", str(port),
                             "--device", args.device, "--poll-seconds", "0.5"],
                            env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        pool = texts_pool(512)
        tasks = reg.tasks()
        requests = [{"task": tasks[i % len(tasks)], "texts": [pool[i % len(pool)]]} for i in range(args.requests)]
        results = {}
        for name, on_half in (("plain", None), ("hot-swap", lambda: Registry.open(root, device="cpu").rollback(
                "task00", 2))):
            run = asyncio.run(_load(url, requests, args.concurrency, on_half))
            if on_half is not None:
                done = run["swapped_at"][-1] + 2 * 0.5 + 1.0  # two polls and a margin after the swap
                late = [v for t, task, v in run["versions"] if task == "task00" and t > done]
                run["after_swap"] = {"requests": len(late), "from_v2": sum(v == 2 for v in late)}
            run.pop("versions")
            results[name] = run
            echo(f"load {name}: {run['requests']} requests, {run['errors']} errors, "
                 f"{run['requests_per_s']:.0f}/s, p50 {run['p50_ms']:.0f} ms, p99 {run['p99_ms']:.0f} ms"
                 + (f", after swap {run['after_swap']}" if "after_swap" in run else ""))
        metrics = httpx.get(f"{url}/metrics").text
        results["batch_rows_mean"] = _histogram_mean(metrics, "cmtl_batch_rows")
        return results
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _histogram_mean(text: str, name: str) -> float:
    values = {line.split()[0]: float(line.split()[-1]) for line in text.splitlines() if line.startswith(name)}
    return values[f"{name}_sum"] / max(values[f"{name}_count"], 1)


def to_markdown(results: dict) -> str:
    lines = [f"{results['machine']} ({results['device']}, {results['torch_threads']} torch threads), "
             f"{results['date']}, backbone layers: {results['layers'] or 'all'}, batch {results['batch_size']} "
             f"(at most {results.get('batch_tokens', '–')} padded tokens per forward), "
             f"{results['batches']} batches of real text5 test texts, medians of {results['repeats']} runs.", ""]
    if results.get("throughput"):
        lines += ["| adapters | way | texts/s | p50 ms/batch | p99 ms/batch | × base |", "|---|---|---|---|---|---|"]
        for k, summary in results["throughput"].items():
            for way, r in summary.items():
                lines.append(f"| {k} | {way} | {r['texts_per_s']:.1f} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} | "
                             f"{r['vs_base']:.2f} |")
    if results.get("load"):
        lines += ["", "| load run | requests | errors | requests/s | p50 ms | p99 ms | after swap |",
                  "|---|---|---|---|---|---|---|"]
        for name in ("plain", "hot-swap"):
            r = results["load"][name]
            swap = r.get("after_swap")
            after = "" if swap is None else f"{swap['from_v2']}/{swap['requests']} task00 answers from v2"
            lines.append(f"| {name} | {r['requests']} | {r['errors']} | {r['requests_per_s']:.0f} | {r['p50_ms']:.0f} | "
                         f"{r['p99_ms']:.0f} | {after} |")
        lines.append(f"\nMean rows per server batch: {results['load']['batch_rows_mean']:.1f}.")
    return "\n".join(lines)


def main(argv: list[str] | None = None, echo=print) -> dict:
    from cmtl.benchmarks.results import check_same_run, write_results

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--adapters", default="1,4,16", help="numbers of task adapters to mix")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--batch-tokens", type=int, default=4096, help="padded tokens per forward, at most")
    p.add_argument("--batches", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--layers", type=int, default=None, help="use only the first N backbone layers")
    p.add_argument("--requests", type=int, default=10_000)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--skip", choices=["throughput", "load"], default=None)
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu or cuda")
    p.add_argument("--out", default="runs/bench/serving")
    args = p.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    out = Path(args.out)
    check_same_run(out, _settings(args))
    out.mkdir(parents=True, exist_ok=True)
    results = {"settings": _settings(args), "device": args.device, "layers": args.layers, "batch_size": args.batch_size,
               "batch_tokens": args.batch_tokens, "batches": args.batches,
               "repeats": args.repeats, "torch_threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d"),
               "machine": torch.cuda.get_device_name() if args.device == "cuda"
               else f"{platform.machine()}, {os.cpu_count()} CPU cores",
               "command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
               "throughput": {}, "load": None}
    with tempfile.TemporaryDirectory() as tmp:
        if args.skip != "throughput":
            for k in (int(x) for x in args.adapters.split(",")):
                results["throughput"][str(k)] = throughput(args, k, Path(tmp), echo)
                write_results(out, results)
        if args.skip != "load":
            results["load"] = load_test(args, Path(tmp), echo)
    write_results(out, results, to_markdown(results))
    echo(to_markdown(results))
    return results


if __name__ == "__main__":
    main()

"""The HTTP service, started for real (`cmtl serve` in a subprocess on a free loopback port) and
spoken to over HTTP: answers, every limit and error, metrics, and hot swap under concurrent load."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from cmtl import Registry
from cmtl.serving.server import ServeConfig
from tests.conftest import FAST, toy_sentiment

TEXTS = ["the movie was great", "an awful plot", "a goal and the day"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(served, tmp_path_factory):
    """(base URL, registry folder) of a running `cmtl serve` on a copy of the served registry."""
    root = tmp_path_factory.mktemp("serving") / "reg"
    shutil.copytree(served, root)
    port = _free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    # The server's log goes to a file: a pipe that nobody reads fills up (an access-log line per request)
    # and then blocks the server.
    log = root.parent / "serve.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cmtl.cli", "serve", str(root), "--port", str(port), "--device", "cpu",
             "--max-texts", "8", "--max-chars", "200", "--max-batch-size", "16", "--poll-seconds", "0.2"],
            env=env, stdout=out, stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"cmtl serve exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.3)
    else:
        proc.kill()
        raise RuntimeError("cmtl serve did not become healthy within 120 s")
    yield url, root
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


def test_predict_matches_the_registry(server, served):
    url, _ = server
    reg = Registry.open(served, device="cpu")
    r = httpx.post(f"{url}/v1/predict", json={"task": "topic", "texts": TEXTS})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["task"] == "topic" and body["version"] == 1
    assert [p["label"] for p in body["predictions"]] == reg.predict("topic", TEXTS)
    probs = body["predictions"][0]["probabilities"]
    assert set(probs) == {"sport", "food", "music"} and abs(sum(probs.values()) - 1) < 1e-5
    merged = httpx.post(f"{url}/v1/predict", json={"task": "sentiment", "texts": TEXTS, "merge": "both"}).json()
    assert [p["label"] for p in merged["predictions"]] == reg.predict("sentiment", TEXTS, merge="both")
    assert merged["merge"] == "both" and merged["version"] is None


def test_predict_all_tasks_and_listing(server):
    url, _ = server
    body = httpx.post(f"{url}/v1/predict/all", json={"texts": TEXTS[:2]}).json()
    assert set(body["results"]) == {"sentiment", "topic", "upper"}
    assert all(len(rows) == 2 for rows in body["results"].values())
    listing = httpx.get(f"{url}/v1/tasks").json()
    assert [t["name"] for t in listing["tasks"]] == ["sentiment", "topic", "upper"]
    assert listing["merges"] == {"both": ["sentiment", "topic"]}
    assert httpx.get(f"{url}/openapi.json").json()["paths"]["/v1/predict"]


def test_docs_pages_need_no_network(server):
    """/docs and /redoc load every script and style from the server itself: no CDN, so they render offline."""
    url, _ = server
    for page, needs in (("docs", ("swagger-ui-bundle.js", "swagger-ui.css")), ("redoc", ("redoc.standalone.js",))):
        html = httpx.get(f"{url}/{page}")
        assert html.status_code == 200
        assets = re.findall(r'(?:src|href)=["\']([^"\']+)["\']', html.text) + re.findall(
            r"url: ?'([^']+)'", html.text)
        assert not [a for a in assets if "://" in a or a.startswith("//")], assets
        for name in needs:
            asset = next(a for a in assets if a.endswith(name))
            got = httpx.get(f"{url}{asset}")
            assert got.status_code == 200 and len(got.content) > 10_000, asset


@pytest.mark.parametrize("payload, status, says", [
    ({"task": "nope", "texts": ["x"]}, 404, "No task 'nope'"),
    ({"task": "upper", "texts": ["x"], "merge": "both"}, 404, "No task 'upper' in merge 'both'"),
    ({"task": "sentiment", "texts": ["x"], "merge": "gone"}, 404, "No merged entry 'gone'"),
    ({"task": "sentiment", "texts": ["x"] * 9}, 413, "9 texts in one request; the limit is 8"),
    ({"task": "sentiment", "texts": ["ok", "y" * 201]}, 413, "longer than 200 characters"),
    ({"task": "sentiment", "texts": []}, 422, "at least 1"),
    ({"task": "sentiment", "texts": [3]}, 422, "string"),
    ({"texts": ["x"]}, 422, "missing"),
    ({"task": "sentiment", "texts": "not a list"}, 422, "list"),
])
def test_bad_requests_get_clear_errors(server, payload, status, says):
    url, _ = server
    r = httpx.post(f"{url}/v1/predict", json=payload)
    assert r.status_code == status, r.text
    assert says in r.text
    if status == 404:
        assert r.json()["tasks"] == ["sentiment", "topic", "upper"]
    assert httpx.get(f"{url}/healthz").json()["status"] == "ok"  # the server lives on


def test_malformed_json_and_wrong_methods(server):
    url, _ = server
    r = httpx.post(f"{url}/v1/predict", content=b'{"task": "sentiment", "texts": [', 
                   headers={"content-type": "application/json"})
    assert r.status_code == 422
    assert httpx.post(f"{url}/v1/predict/all", content=b"\xff\xfe", headers={"content-type": "application/json"}
                      ).status_code == 422
    assert httpx.get(f"{url}/v1/predict").status_code == 405
    assert httpx.get(f"{url}/nowhere").status_code == 404
    assert httpx.get(f"{url}/healthz").status_code == 200


def test_metrics_count_requests_latency_batches_and_tasks(server):
    url, _ = server
    httpx.post(f"{url}/v1/predict", json={"task": "sentiment", "texts": TEXTS})
    text = httpx.get(f"{url}/metrics").text
    assert 'cmtl_requests_total{endpoint="/v1/predict",status="200"}' in text
    assert 'cmtl_request_seconds_bucket{endpoint="/v1/predict",le="0.5"}' in text
    assert "cmtl_batch_rows_count" in text
    assert 'cmtl_task_texts_total{task="sentiment"}' in text


def test_concurrent_requests_share_batches(server):
    url, _ = server

    def one(i: int) -> int:
        with httpx.Client() as client:
            return client.post(f"{url}/v1/predict", json={"task": ["sentiment", "topic"][i % 2],
                                                           "texts": [TEXTS[i % 3]]}).status_code

    threads, codes = [], []
    for i in range(24):
        threads.append(threading.Thread(target=lambda i=i: codes.append(one(i))))
        threads[-1].start()
    for t in threads:
        t.join()
    assert codes == [200] * 24
    lines = [line for line in httpx.get(f"{url}/metrics").text.splitlines() if line.startswith("cmtl_batch_rows_")]
    count = float(next(line for line in lines if line.startswith("cmtl_batch_rows_count")).split()[-1])
    total = float(next(line for line in lines if line.startswith("cmtl_batch_rows_sum")).split()[-1])
    assert total / count > 1  # some batches held rows of several requests


def test_hot_swap_under_load_fails_no_request(server):
    url, root = server
    stop = threading.Event()
    seen: list[list[int]] = [[] for _ in range(4)]
    errors: list[str] = []

    def hammer(k: int) -> None:
        with httpx.Client(timeout=30) as client:
            while not stop.is_set():
                try:
                    r = client.post(f"{url}/v1/predict", json={"task": "sentiment", "texts": TEXTS})
                except httpx.HTTPError as exc:  # a timeout is a failed request too, not a dead worker
                    errors.append(f"{type(exc).__name__}: {exc}")
                    continue
                if r.status_code != 200:
                    errors.append(r.text)
                else:
                    seen[k].append(r.json()["version"])

    workers = [threading.Thread(target=hammer, args=(k,)) for k in range(4)]
    for w in workers:
        w.start()
    try:
        reg = Registry.open(root, device="cpu")
        result = reg.update_task("sentiment", toy_sentiment(32, 5, positive=["grand"], negative=["bleak"]),
                                 validation=toy_sentiment(16, 6, positive=["grand"], negative=["bleak"]),
                                 training=FAST, promote=True)
        assert result.version.version == 2
        deadline = time.time() + 30
        while time.time() < deadline and not all(s and s[-1] == 2 for s in seen):
            time.sleep(0.2)
        time.sleep(0.5)
    finally:
        stop.set()
        for w in workers:
            w.join()
    assert errors == []
    for versions in seen:
        assert 1 in versions and versions[-1] == 2
        assert versions == sorted(versions)  # once a client saw v2, it never got v1 again
    after = httpx.post(f"{url}/v1/predict", json={"task": "sentiment", "texts": TEXTS}).json()
    assert [p["label"] for p in after["predictions"]] == reg.predict("sentiment", TEXTS)
    assert httpx.get(f"{url}/v1/tasks").json()["tasks"][0]["version"] == 2


@pytest.mark.parametrize("bad", [{"max_texts": 0}, {"max_batch_size": -1}, {"max_wait_ms": -1.0},
                                 {"max_wait_ms": float("inf")}, {"poll_seconds": float("inf")},
                                 {"poll_seconds": float("nan")}])
def test_serve_config_rejects_bad_limits(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        ServeConfig(**bad)


def test_serve_cli_fails_clearly_without_a_registry(tmp_path):
    out = subprocess.run([sys.executable, "-m", "cmtl.cli", "serve", str(tmp_path / "none"), "--port",
                          str(_free_port())], capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                         timeout=120)
    assert out.returncode == 1 and "error:" in out.stderr
    assert Path(tmp_path / "none").exists() is False

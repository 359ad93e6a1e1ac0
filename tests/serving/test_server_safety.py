"""The HTTP service against a hostile client and a broken registry: a bad manifest does not stop hot
swapping and /healthz says so, a request is answered from one snapshot, /metrics cannot be grown by
random URLs, a lone surrogate is a 422, every response conforms to the app's own OpenAPI schema
(schemathesis), and an oversized body is refused before it is read."""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from cmtl import Registry
from cmtl.errors import RegistryError
from cmtl.serving.engine import InferenceEngine
from cmtl.serving.server import ServeConfig, create_app

TEXTS = ["the movie was great", "an awful plot"]


@pytest.fixture
def root(served, tmp_path) -> Path:
    """A copy of the served registry (three tasks, one merge) that a test may break."""
    copy = tmp_path / "reg"
    shutil.copytree(served, copy)
    return copy


def _edit_manifest(root: Path, change) -> int:
    """Apply ``change`` to registry.json as another process would, bumping its generation; return it."""
    path = root / "registry.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    manifest["generation"] += 1
    tmp = path.with_name("manifest.tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True))
    os.replace(tmp, path)
    return manifest["generation"]


def _wait_for(get, done, timeout: float = 10.0):
    """Call ``get()`` until ``done(result)``; return the last result (the caller asserts on it)."""
    deadline = time.monotonic() + timeout
    while True:
        result = get()
        if done(result) or time.monotonic() > deadline:
            return result
        time.sleep(0.05)


def _set_current(task: str, version: int):
    return lambda manifest: manifest["tasks"][task].__setitem__("current", version)


# --- item 6: a bad manifest does not stop hot swapping -----------------------------------------


def test_engine_refuses_a_current_version_that_does_not_exist(root):
    engine = InferenceEngine(root, device="cpu")
    before = engine.snapshot
    _edit_manifest(root, _set_current("sentiment", 99))
    with pytest.raises(RegistryError, match="99"):  # not a bare StopIteration from a next(...)
        engine.refresh()
    assert engine.snapshot is before
    assert engine.predict(["sentiment"], TEXTS[:1])[0]["version"] == 1


def test_a_bad_manifest_keeps_the_last_snapshot_reports_it_and_a_fixed_one_is_picked_up(root):
    app = create_app(root, ServeConfig(poll_seconds=0.05), device="cpu")
    with TestClient(app) as client:
        first = client.get("/healthz").json()
        assert first["status"] == "ok"
        bad = _edit_manifest(root, _set_current("sentiment", 99))
        health = _wait_for(lambda: client.get("/healthz"), lambda r: r.json()["status"] != "ok")
        body = health.json()
        assert health.status_code == 200, "still answering, from the last good snapshot"
        assert body["status"] == "degraded" and body["stale"] is True
        assert body["generation"] == first["generation"] and body["generation_on_disk"] == bad
        assert "99" in body["error"] and str(root) not in health.text  # why, without the registry's path
        assert body["stale_seconds"] >= 0
        r = client.post("/v1/predict", json={"task": "sentiment", "texts": TEXTS})
        assert r.status_code == 200 and r.json()["version"] == 1
        metrics = client.get("/metrics").text
        assert "cmtl_registry_stale 1.0" in metrics

        fixed = _edit_manifest(root, _set_current("sentiment", 1))
        health = _wait_for(lambda: client.get("/healthz"), lambda r: r.json()["generation"] == fixed)
        assert health.json() == {"status": "ok", "generation": fixed, "tasks": 3, "stale": False,
                                 "generation_on_disk": None, "error": None, "stale_seconds": None}
        assert "cmtl_registry_stale 0.0" in client.get("/metrics").text
        # and hot swap still works after the failure: a real update is picked up
        Registry.open(root, device="cpu").remove_task("upper")
        health = _wait_for(lambda: client.get("/healthz"), lambda r: r.json()["tasks"] == 2)
        assert health.json()["tasks"] == 2 and health.json()["status"] == "ok"


# --- item 7: one request, one snapshot -------------------------------------------------------


@pytest.mark.parametrize("path, payload", [
    ("/v1/predict/all", {"texts": TEXTS}),
    ("/v1/predict", {"task": "upper", "texts": TEXTS}),
])
def test_a_task_removed_during_a_request_still_answers_it(root, path, payload):
    """Another process removes a task after the request was accepted but before its batch runs."""
    engine = InferenceEngine(root, device="cpu")
    predict, removed = engine.predict, []

    def remove_then_predict(*args, **kwargs):
        if not removed:
            Registry.open(root, device="cpu").remove_task("upper")
            assert engine.refresh() is True  # the engine's newest snapshot no longer has 'upper'
            removed.append(True)
        return predict(*args, **kwargs)

    engine.predict = remove_then_predict
    with TestClient(create_app(engine, ServeConfig(poll_seconds=3600))) as client:
        r = client.post(path, json=payload)
        assert removed and r.status_code == 200, r.text
        body = r.json()
        rows = body["results"]["upper"] if path.endswith("all") else body["predictions"]
        assert len(rows) == 2 and rows[0]["task"] == "upper"
        if path.endswith("all"):
            assert set(body["results"]) == {"sentiment", "topic", "upper"}
        # the next request sees the registry without it
        assert client.post("/v1/predict", json={"task": "upper", "texts": TEXTS}).status_code == 404
        assert set(client.post("/v1/predict/all", json={"texts": TEXTS}).json()["results"]) == {"sentiment", "topic"}


# --- item 9: /metrics is bounded -------------------------------------------------------------


def _series(metrics_text: str) -> list[str]:
    return [line.rsplit(" ", 1)[0] for line in metrics_text.splitlines() if line and not line.startswith("#")]


def test_random_urls_do_not_grow_the_metrics(served):
    rng = random.Random(0)
    with TestClient(create_app(served, ServeConfig(poll_seconds=3600), device="cpu")) as client:
        for _ in range(2):  # every series the requests below touch exists after the first round
            client.get("/metrics")
            client.get("/v1/not-a-route")
            client.post("/v1/predict", json={"task": "sentiment", "texts": TEXTS})
            client.post("/v1/predict", json={"task": "nope", "texts": TEXTS})  # a 404 on a real route
        before = _series(client.get("/metrics").text)
        for _ in range(2000):
            path = "/" + "/".join(f"{rng.getrandbits(40):x}" for _ in range(rng.randint(1, 4)))
            assert client.get(path).status_code == 404
        after = client.get("/metrics").text
    assert sorted(_series(after)) == sorted(before)  # the same series; only their values grew
    assert 'cmtl_requests_total{endpoint="unmatched",status="404"} 2002.0' in after
    assert 'cmtl_requests_total{endpoint="/v1/predict",status="200"} 2.0' in after
    assert 'cmtl_requests_total{endpoint="/v1/predict",status="404"} 2.0' in after


# --- item 10: a lone surrogate -------------------------------------------------------------


@pytest.mark.parametrize("path, body", [
    ("/v1/predict", b'{"task": "sentiment", "texts": ["fine", "bad \\ud800 text"]}'),
    ("/v1/predict/all", b'{"texts": ["\\udfff"]}'),
])
def test_a_lone_surrogate_is_a_422_that_says_why(served, path, body):
    with TestClient(create_app(served, ServeConfig(poll_seconds=3600), device="cpu"),
                    raise_server_exceptions=False) as client:
        r = client.post(path, content=body, headers={"content-type": "application/json"})
        assert r.status_code == 422, r.text
        (issue,) = r.json()["detail"]
        assert issue["loc"] == ["body", "texts"] and "lone surrogate" in issue["msg"]
        assert client.post(path, content=body.replace(b"\\ud800", b"\\ud83d\\ude00").replace(b"\\udfff", b"ok"),
                           headers={"content-type": "application/json"}).status_code == 200  # a real pair is fine


def test_engine_refuses_a_lone_surrogate_with_a_data_error(served):
    from cmtl.errors import DataError

    engine = InferenceEngine(served, device="cpu")
    with pytest.raises(DataError, match="lone surrogate"):
        engine.predict(["sentiment"], ["\ud800"])


# --- item 11: responses conform to the app's own schema --------------------------------------


def test_error_responses_are_declared_and_shaped_as_declared(served):
    with TestClient(create_app(served, ServeConfig(max_texts=4, poll_seconds=3600), device="cpu")) as client:
        schema = client.get("/openapi.json").json()
        responses = schema["paths"]["/v1/predict"]["post"]["responses"]
        assert {"200", "400", "404", "413", "422", "500"} <= set(responses)
        assert {"200", "400", "413", "422"} <= set(schema["paths"]["/v1/predict/all"]["post"]["responses"])
        texts = schema["components"]["schemas"]["PredictRequest"]["properties"]["texts"]
        assert texts["maxItems"] == 4 and texts["items"]["maxLength"] == 20_000  # the limits, documented
        r = client.post("/v1/predict", json={"task": "sentiment", "texts": []})
        (issue,) = r.json()["detail"]
        assert r.status_code == 422 and issue["loc"] == ["body", "texts"] and issue["type"] == "too_short"
        assert isinstance(issue["ctx"], dict) and "input" not in issue
        r = client.post("/v1/predict", content=b'{"texts": [', headers={"content-type": "application/json"})
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", 11]


@contextlib.contextmanager
def _live(app):
    """``app`` served by uvicorn on a free loopback port in a thread; yields (host, port)."""
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.05)
    try:
        yield "127.0.0.1", port
    finally:
        server.should_exit = True
        thread.join(timeout=30)


SCHEMATHESIS_CONFIG = """
[checks.negative_data_rejection]
# 413 is how this API rejects too many or too long texts (limits the schema declares as maxItems/maxLength).
expected-statuses = [400, 404, 405, 413, 415, 422]

[[operations]]
include-path = "/v1/predict"
include-method = "POST"
# Whether a task takes text pairs is the registry's to say, not the schema's: text_pairs sent for a task on
# single texts (or left out for one on pairs) is a 422 that names the task, in a body the schema allows.
checks.positive_data_acceptance.expected-statuses = [200, 404, 422]
"""


def test_schemathesis_finds_no_failures(served, tmp_path):
    """Every operation, up to 100 schema-derived cases each plus the examples and coverage phases (~300
    requests, deterministic), on loopback: no server error, and every status, content type, header and
    body as the schema declares."""
    config = tmp_path / "schemathesis.toml"
    config.write_text(SCHEMATHESIS_CONFIG)
    app = create_app(served, ServeConfig(max_texts=8, max_chars=200, poll_seconds=3600), device="cpu")
    with _live(app) as (host, port):
        out = subprocess.run(
            [str(Path(sys.executable).parent / "schemathesis"), "--config-file", str(config), "run",
             f"http://{host}:{port}/openapi.json", "--checks", "all", "--max-examples", "100",
             "--generation-deterministic", "--workers", "1", "--continue-on-failure", "--no-color",
             "--request-timeout", "30"],
            capture_output=True, text=True, timeout=300, cwd=tmp_path,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-2000:]
    assert "No issues found" in out.stdout or " passed" in out.stdout, out.stdout[-2000:]


# --- item 12: the body limit ---------------------------------------------------------------


def _http(host: str, port: int, head: bytes, chunks=(), timeout: float = 10.0) -> tuple[bytes, bool]:
    """Send ``head`` then each chunk (stopping if the server stops reading); return (the response, whether
    the server closed the connection after it)."""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(head)
        for chunk in chunks:
            try:
                sock.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError):
                break
        response = b""
        try:
            while True:
                data = sock.recv(65536)
                if not data:
                    return response, True
                response += data
        except ConnectionResetError:
            return response, True
        except socket.timeout:
            return response, False


def test_a_large_body_is_refused_before_it_is_read(served):
    limit = 64 * 1024
    app = create_app(served, ServeConfig(max_body_bytes=limit, poll_seconds=3600), device="cpu")
    with _live(app) as (host, port):
        # Content-Length says 50 MB: refused at once, though no byte of the body was sent.
        start = time.monotonic()
        response, closed = _http(host, port, b"POST /v1/predict HTTP/1.1\r\nHost: x\r\n"
                                             b"Content-Type: application/json\r\nContent-Length: 50000000\r\n\r\n")
        assert response.startswith(b"HTTP/1.1 413"), response[:200]
        assert b"50000000 bytes (Content-Length); the limit is 65536 bytes" in response
        assert closed and time.monotonic() - start < 5

        # Chunked: refused once the bytes received pass the limit, while the client has more to send.
        chunk = b'"' + b"x" * (16 * 1024) + b'",'
        chunks = [b"%x\r\n%s\r\n" % (len(chunk), chunk)] * 8  # 128 KiB, and no final chunk: never complete
        response, closed = _http(host, port, b"POST /v1/predict/all HTTP/1.1\r\nHost: x\r\nContent-Type: "
                                             b"application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
                                             b"b\r\n{\"texts\": [\r\n", chunks)
        assert response.startswith(b"HTTP/1.1 413"), response[:200]
        assert b"passed 65536 bytes while being read" in response and closed

        # Under the limit, chunked or not, requests are served as before.
        body = json.dumps({"task": "sentiment", "texts": TEXTS}).encode()
        response, _ = _http(host, port, b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                                        b"Connection: close\r\nTransfer-Encoding: chunked\r\n\r\n"
                                        + b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body))
        assert response.startswith(b"HTTP/1.1 200"), response[:300]
        import httpx

        assert httpx.post(f"http://{host}:{port}/v1/predict", json={"task": "sentiment", "texts": TEXTS}
                          ).status_code == 200
        r = httpx.post(f"http://{host}:{port}/v1/predict", json={"task": "sentiment", "texts": ["x" * limit]})
        assert r.status_code == 413 and "the limit is 65536 bytes" in r.json()["detail"]
        metrics = httpx.get(f"http://{host}:{port}/metrics").text
        assert 'cmtl_requests_total{endpoint="/v1/predict",status="413"}' in metrics


def test_serve_config_checks_the_body_limit():
    assert ServeConfig().max_body_bytes == 16 * 1024 * 1024
    with pytest.raises(ValueError, match="max_body_bytes"):
        ServeConfig(max_body_bytes=0)


def test_a_merge_still_serves_a_task_removed_after_it(root):
    """Item 8, serving side: the engine answers through a merge from the specs the merge recorded, as the
    Python API does, after one of its member tasks is removed."""
    engine = InferenceEngine(root, device="cpu")
    reg = Registry.open(root, device="cpu")
    reg.remove_task("topic")
    assert engine.refresh() is True and "topic" not in engine.snapshot.tasks
    served = engine.predict(["topic", "sentiment"], TEXTS, merges=["both", "both"])
    fresh = Registry.open(root, device="cpu")
    assert [row["label"] for row in served] == (fresh.predict("topic", TEXTS[:1], merge="both")
                                                + fresh.predict("sentiment", TEXTS[1:], merge="both"))


# --- round 2, D3: a registry re-created at the same path -------------------------------------


def _recreate(root: Path, backbone: str, flip: bool) -> Registry:
    """Delete the registry at ``root`` and build a new one there with one task 'sentiment' (labels
    swapped if ``flip``): the generation it reaches is the one the deleted registry had."""
    from cmtl import BackboneConfig, TaskSpec
    from tests.conftest import FAST, toy_sentiment

    shutil.rmtree(root)
    reg = Registry.create(root, BackboneConfig(name_or_path=backbone, max_length=64), device="cpu")
    swap = {"pos": "neg", "neg": "pos"} if flip else {"pos": "pos", "neg": "neg"}
    rows = [{"text": r["text"], "label": swap[r["label"]]} for r in toy_sentiment(48)]
    reg.add_task(TaskSpec("sentiment", labels=["neg", "pos"]), rows, training=FAST)
    return reg


@pytest.fixture
def one_task(sentiment_registry, tmp_path) -> Path:
    copy = tmp_path / "reg"
    shutil.copytree(sentiment_registry, copy)
    return copy


def test_engine_picks_up_a_recreated_registry_of_the_same_generation(one_task):
    engine = InferenceEngine(one_task, device="cpu")
    generation = engine.snapshot.generation
    fresh = _recreate(one_task, Registry.open(one_task, device="cpu").backbone.config.name_or_path, flip=True)
    assert json.loads((one_task / "registry.json").read_text())["generation"] == generation  # the trap
    assert engine.refresh() is True
    assert [row["label"] for row in engine.predict(["sentiment"] * 2, TEXTS)] == fresh.predict("sentiment", TEXTS)
    assert engine.refresh() is False  # unchanged since


def test_engine_refuses_a_recreated_registry_on_another_backbone(one_task, other_tiny_backbone):
    from cmtl.errors import BackboneMismatchError

    engine = InferenceEngine(one_task, device="cpu")
    before, answers = engine.snapshot, engine.predict(["sentiment"] * 2, TEXTS)
    fresh = _recreate(one_task, other_tiny_backbone, flip=True)
    with pytest.raises(BackboneMismatchError, match="weights hash"):
        engine.refresh()
    fresh.rollback("sentiment", 1)  # a further write: a newer generation, still the other backbone
    with pytest.raises(BackboneMismatchError, match="weights hash"):
        engine.refresh()
    assert engine.snapshot is before and engine.predict(["sentiment"] * 2, TEXTS) == answers


def test_server_reports_a_recreated_registry_on_another_backbone_as_degraded(one_task, other_tiny_backbone):
    app = create_app(one_task, ServeConfig(poll_seconds=0.05), device="cpu")
    with TestClient(app) as client:
        first = client.get("/healthz").json()
        answers = client.post("/v1/predict", json={"task": "sentiment", "texts": TEXTS}).json()
        _recreate(one_task, other_tiny_backbone, flip=True)
        # (while the registry is re-created the poller may also see no registry at all, for a moment)
        health = _wait_for(lambda: client.get("/healthz"), lambda r: "Backbone" in (r.json()["error"] or ""))
        body = health.json()
        assert body["status"] == "degraded" and body["stale"] is True, body
        assert body["error"].startswith("BackboneMismatchError") and body["generation"] == first["generation"]
        assert client.post("/v1/predict", json={"task": "sentiment", "texts": TEXTS}).json() == answers


# --- round 2, D8: an unknown field is a 422, not ignored ---------------------------------------


@pytest.mark.parametrize("path, body, field", [
    ("/v1/predict", {"task": "sentiment", "texts": TEXTS, "merg": "both"}, "merg"),  # a typo of 'merge'
    ("/v1/predict/all", {"texts": TEXTS, "task": "sentiment"}, "task"),
])
def test_an_unknown_request_field_is_a_422_naming_it(served, path, body, field):
    with TestClient(create_app(served, ServeConfig(poll_seconds=3600), device="cpu")) as client:
        r = client.post(path, json=body)
        assert r.status_code == 422, r.text
        (issue,) = r.json()["detail"]
        assert issue["loc"] == ["body", field] and issue["type"] == "extra_forbidden"
        schema = client.get("/openapi.json").json()["components"]["schemas"]
        assert schema["PredictRequest"]["additionalProperties"] is False
        assert schema["PredictAllRequest"]["additionalProperties"] is False


# --- round 2, D7: a port out of range --------------------------------------------------------


@pytest.mark.parametrize("port", [99999, -1, 65536, "8000"])
def test_serve_refuses_a_port_out_of_range(tmp_path, port):
    from cmtl.serving.server import serve

    with pytest.raises(ValueError, match=rf"port must be an integer in 0\.\.65535 .*Got {port!r}"):
        serve(tmp_path / "no-registry", port=port)  # refused before anything is loaded


# --- tasks on text pairs ---------------------------------------------------------------------


def test_a_task_on_text_pairs_is_served_with_text_pairs(tmp_path, tiny_backbone):
    """/v1/tasks listed tasks on text pairs, but /v1/predict had no field for the second texts, so every request
    for one was a 422. It answers as Registry.predict does, and a missing or extra text_pairs says why."""
    import dataclasses

    from cmtl import BackboneConfig, TaskSpec
    from tests.conftest import FAST, toy_sentiment

    rows = [{"text": r["text"], "second": r["text"][::-1], "label": r["label"]} for r in toy_sentiment(32)]
    reg = Registry.create(tmp_path / "reg", BackboneConfig(name_or_path=tiny_backbone, max_length=64), device="cpu")
    one_epoch = dataclasses.replace(FAST, epochs=1)
    reg.add_task(TaskSpec("pairs", labels=["neg", "pos"], text_pair_column="second"), rows, rows[:8], training=one_epoch)
    reg.add_task(TaskSpec("single", labels=["neg", "pos"]), toy_sentiment(32), training=one_epoch)
    texts, seconds = ["a great film", "an awful film"], ["mlif taerg a", "the same"]
    with TestClient(create_app(reg.root, ServeConfig(poll_seconds=3600), device="cpu")) as client:
        listed = {t["name"]: t["text_pair"] for t in client.get("/v1/tasks").json()["tasks"]}
        assert listed == {"pairs": True, "single": False}
        r = client.post("/v1/predict", json={"task": "pairs", "texts": texts, "text_pairs": seconds})
        assert r.status_code == 200, r.text
        served = [[p["probabilities"][label] for label in ("neg", "pos")] for p in r.json()["predictions"]]
        expected = reg.predict_proba("pairs", texts, seconds)
        assert [p for row in served for p in row] == pytest.approx(expected.ravel().tolist(), abs=1e-5)
        assert expected.tolist() != reg.predict_proba("pairs", texts, texts).tolist()  # the second texts count
        for body, says in [({"task": "pairs", "texts": texts}, "takes text pairs: send text_pairs"),
                           ({"task": "pairs", "texts": texts, "text_pairs": seconds[:1]}, "one per text (2)"),
                           ({"task": "single", "texts": texts, "text_pairs": seconds}, "leave text_pairs out")]:
            r = client.post("/v1/predict", json=body)
            assert r.status_code == 422 and says in r.json()["detail"][0]["msg"], r.text


def test_an_engine_given_to_create_app_is_not_served_with_other_batch_limits(served):
    # The engine chunks every forward by its own limits: a ServeConfig asking for others got them only in the
    # batcher's row count (max_batch_size) or not at all (max_batch_tokens).
    engine = InferenceEngine(served, device="cpu", max_batch_size=64, max_batch_tokens=4096)
    for knob in ({"max_batch_size": 8}, {"max_batch_tokens": 512}):
        with pytest.raises(ValueError, match=f"{next(iter(knob))}.*InferenceEngine"):
            create_app(engine, ServeConfig(**knob))
    create_app(engine, ServeConfig(max_texts=4))  # the limits the engine does not hold apply as given
    own = InferenceEngine(served, device="cpu", max_batch_size=8, max_batch_tokens=512)
    create_app(own)  # without a config, the engine's limits are the app's
    create_app(own, ServeConfig(poll_seconds=3600))  # and with one that leaves them out


def test_an_engine_given_to_create_app_is_not_served_on_another_device(served):
    # The engine holds the backbone on its own device; create_app(engine, device="cuda") used to be accepted and
    # served on the engine's CPU without a word.
    engine = InferenceEngine(served, device="cpu")
    for device in ("cuda", "meta", "cuda:1"):
        with pytest.raises(ValueError, match=rf"device.*engine's own \('cpu'\).*got {device!r}"):
            create_app(engine, device=device)
    create_app(engine)  # "auto", the default: the engine's device
    create_app(engine, device="cpu")  # the engine's own, named


def test_the_task_listing_names_a_multi_label_tasks_threshold(tmp_path, tiny_backbone):
    """/v1/predict gives a multi-label task's probabilities and the labels on at its threshold, but /v1/tasks did
    not say the threshold: a client deciding from the probabilities used 0.5 whatever the task set."""
    import dataclasses

    from cmtl import BackboneConfig, TaskSpec
    from tests.conftest import FAST, toy_sentiment

    rows = [{"text": r["text"], "label": [r["label"]]} for r in toy_sentiment(32)]
    reg = Registry.create(tmp_path / "reg", BackboneConfig(name_or_path=tiny_backbone, max_length=64), device="cpu")
    one_epoch = dataclasses.replace(FAST, epochs=1)
    reg.add_task(TaskSpec("tags", labels=["neg", "pos"], problem_type="multi_label", threshold=0.3), rows,
                 training=one_epoch)
    reg.add_task(TaskSpec("single", labels=["neg", "pos"]), toy_sentiment(32), training=one_epoch)
    with TestClient(create_app(reg.root, ServeConfig(poll_seconds=3600), device="cpu")) as client:
        listed = {t["name"]: t["threshold"] for t in client.get("/v1/tasks").json()["tasks"]}
    assert listed == {"tags": 0.3, "single": None}

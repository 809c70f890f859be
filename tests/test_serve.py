"""``holst serve`` over real HTTP: endpoints, parity with the pipeline, batching, limits, auth, 503, SSE."""

from __future__ import annotations

import http.client
import io
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from PIL import Image

from holst.config import ConfigError, ServeConfig
from holst.pipeline import Text2ImagePipeline
from holst.serve.app import make_server, png_bytes


@pytest.fixture(scope="module")
def pipe():
    return Text2ImagePipeline.from_random("tiny", seed=0)


class Server:
    """A server on a free loopback port, served from a background thread."""

    def __init__(self, pipe, **config):
        self.httpd = make_server(pipe, ServeConfig(port=0, **config))
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def request(self, method, path, body=None, headers=None, raw=None, timeout=60):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        hdrs = {"Content-Type": "application/json", **(headers or {})}
        conn.request(method, path, body=data, headers=hdrs)
        resp = conn.getresponse()
        payload = resp.read()
        conn.close()
        return resp.status, dict(resp.getheaders()), payload

    def json(self, method, path, body=None, headers=None):
        status, hdrs, payload = self.request(method, path, body, headers)
        return status, hdrs, json.loads(payload)

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def server(pipe):
    s = Server(pipe, batch_window_ms=5)
    yield s
    s.close()


def test_health_openapi_and_page(server, pipe):
    status, _, health = server.json("GET", "/health")
    assert status == 200 and health["status"] == "ok"
    assert health["image_size"] == pipe.image_size and health["auth_required"] is False
    assert health["components"] == ["tokenizer", "vqgan", "dalle", "clip", "superres"]
    status, _, schema = server.json("GET", "/openapi.json")
    assert status == 200 and schema["openapi"].startswith("3.")
    assert {"/v1/generate", "/v1/generate/stream", "/health", "/v1/images/{image_id}.png"} <= set(schema["paths"])
    props = schema["components"]["schemas"]["GenerateRequest"]["properties"]
    assert props["num_images"]["maximum"] == ServeConfig().max_images_per_request
    assert schema["components"]["schemas"]["GenerateRequest"]["required"] == ["prompt"]
    status, hdrs, page = server.request("GET", "/")
    assert status == 200 and hdrs["Content-Type"].startswith("text/html") and b"/v1/generate/stream" in page
    assert server.request("GET", "/static/../app.py")[0] == 404
    assert server.json("GET", "/nope")[0] == 404


def test_generate_json_matches_the_pipeline(server, pipe):
    status, _, res = server.json("POST", "/v1/generate", {"prompt": "красный круг", "num_images": 3, "seed": 21})
    assert status == 200, res
    direct = pipe("красный круг", 3, seed=21)
    assert [im["seed"] for im in res["images"]] == direct.seeds
    assert [im["clip_score"] for im in res["images"]] == pytest.approx(direct.clip_scores)
    for im, expected in zip(res["images"], direct.images):
        status, hdrs, data = server.request("GET", im["url"])
        assert status == 200 and hdrs["Content-Type"] == "image/png"
        assert data == png_bytes(expected)
    assert server.request("GET", res["grid_url"])[0] == 200
    assert res["settings"]["num_images"] == 3
    # Accept: image/png answers with the best image itself.
    status, hdrs, data = server.request("POST", "/v1/generate", {"prompt": "красный круг", "num_images": 3, "seed": 21},
                                        headers={"Accept": "image/png"})
    assert status == 200 and hdrs["Content-Type"] == "image/png" and hdrs["X-Seed"] == str(direct.seeds[0])
    assert Image.open(io.BytesIO(data)).size == (pipe.image_size, pipe.image_size)
    assert server.request("GET", "/v1/images/unknown.png")[0] == 404
    assert res["warnings"] == []
    status, _, long = server.json("POST", "/v1/generate", {"prompt": "красный синий " * 30, "num_images": 1})
    assert status == 200 and "cut off" in long["warnings"][0]


@pytest.mark.parametrize("body, status, words", [
    ({"prompt": ""}, 422, "empty"), ({"prompt": "   "}, 422, "empty"), ({}, 422, "prompt"),
    ({"prompt": "кот", "num_images": 999}, 422, "num_images"), ({"prompt": "кот", "num_images": 0}, 422, "num_images"),
    ({"prompt": "кот", "top_p": 1.5}, 422, "top_p"), ({"prompt": "кот", "colour": "red"}, 422, "unknown"),
    ({"prompt": "кот", "seed": "x"}, 422, "seed"), ({"prompt": "кот", "upscale": 64}, 422, "upscale"),
    ({"prompt": "к" * 600}, 422, "characters"), ({"prompt": "кот", "num_images": 2, "rerank": 3}, 422, "rerank"),
    ([1, 2], 400, "object")])
def test_invalid_requests(server, body, status, words):
    got, _, res = server.json("POST", "/v1/generate", body)
    assert got == status and words in res["error"]


def test_body_limits(server):
    status, hdrs, payload = server.request("POST", "/v1/generate", raw=b"{" + b" " * 20000 + b"}")
    assert status == 413 and b"at most" in payload
    assert server.request("POST", "/v1/generate", raw=b"not json")[0] == 400


def test_token_required_and_checked(pipe):
    with pytest.raises(ConfigError, match="token"):
        ServeConfig(host="0.0.0.0")
    s = Server(pipe, token="s3cret-token", batch_window_ms=0)
    try:
        assert s.json("GET", "/health")[2]["auth_required"] is True
        status, hdrs, _ = s.json("POST", "/v1/generate", {"prompt": "кот", "num_images": 1})
        assert status == 401 and hdrs["WWW-Authenticate"] == "Bearer"
        bad = {"Authorization": "Bearer wrong-token"}
        assert s.json("POST", "/v1/generate", {"prompt": "кот", "num_images": 1}, bad)[0] == 401
        good = {"Authorization": "Bearer s3cret-token"}
        assert s.json("POST", "/v1/generate", {"prompt": "кот", "num_images": 1}, good)[0] == 200
        # A refused body is never read as the next request on a kept-alive connection.
        conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=30)
        body = json.dumps({"prompt": "кот", "num_images": 1})
        conn.request("POST", "/v1/generate", body=body, headers={"Content-Type": "application/json"})
        first = conn.getresponse()
        first.read()
        assert first.status == 401
        if first.getheader("Connection") != "close":
            conn.request("POST", "/v1/generate", body=body, headers={"Content-Type": "application/json", **good})
            assert conn.getresponse().status == 200
        conn.close()
        conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=30)
        conn.request("POST", "/v1/generate", body=body, headers={"Content-Type": "application/json"})
        conn.getresponse().read()
        conn.request("POST", "/v1/generate", body=body, headers={"Content-Type": "application/json", **good})
        assert conn.getresponse().status == 200  # http.client reconnects after Connection: close
        conn.close()
    finally:
        s.close()


def test_requests_that_arrive_together_share_a_batch(pipe):
    s = Server(pipe, batch_window_ms=400, max_batch_images=16)
    try:
        prompts = [f"кот {w}" for w in ("красный", "синий", "зелёный", "белый")]
        with ThreadPoolExecutor(4) as ex:
            results = list(ex.map(lambda p: s.json("POST", "/v1/generate", {"prompt": p, "num_images": 2, "seed": 5}),
                                  prompts))
        assert all(r[0] == 200 for r in results)
        health = s.json("GET", "/health")[2]
        assert health["batches_run"] < len(prompts) and health["images_made"] == 8
        for p, (_, _, res) in zip(prompts, results):  # batching does not change any image
            direct = pipe(p, 2, seed=5)
            assert [im["seed"] for im in res["images"]] == direct.seeds
            assert s.request("GET", res["images"][0]["url"])[2] == png_bytes(direct.images[0])
    finally:
        s.close()


def test_full_queue_answers_503_with_retry_after(pipe, monkeypatch):
    s = Server(pipe, max_queue=1, batch_window_ms=0, retry_after_s=7)
    release = threading.Event()
    original = s.httpd.worker.pipe.sample_codes

    def slow_sample(*args, **kwargs):
        release.wait(30)
        return original(*args, **kwargs)

    monkeypatch.setattr(s.httpd.worker.pipe, "sample_codes", slow_sample)
    try:
        with ThreadPoolExecutor(2) as ex:
            first = ex.submit(s.json, "POST", "/v1/generate", {"prompt": "кот", "num_images": 1})
            _wait_for(lambda: s.json("GET", "/health")[2]["busy"])
            second = ex.submit(s.json, "POST", "/v1/generate", {"prompt": "пёс", "num_images": 1})
            _wait_for(lambda: s.json("GET", "/health")[2]["queue_depth"] == 1)
            status, hdrs, res = s.json("POST", "/v1/generate", {"prompt": "дом", "num_images": 1})
            assert status == 503 and hdrs["Retry-After"] == "7" and "queue is full" in res["error"]
            release.set()
            assert first.result()[0] == 200 and second.result()[0] == 200
        assert s.json("GET", "/health")[2]["rejected_busy"] == 1
        assert s.json("POST", "/v1/generate", {"prompt": "дом", "num_images": 1})[0] == 200
    finally:
        release.set()
        s.close()


def test_event_stream_sends_previews_then_the_result(server, pipe):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.request("POST", "/v1/generate/stream", body=json.dumps({"prompt": "кот", "num_images": 2, "seed": 1}),
                 headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("Content-Type").startswith("text/event-stream")
    events = []
    for block in resp.read().decode().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.split("\n") if ": " in line and not line.startswith(":"))
        if "event" in lines:
            events.append((lines["event"], json.loads(lines["data"])))
    conn.close()
    names = [n for n, _ in events]
    assert names[0] == "queued" and names[-1] == "result" and "started" in names
    previews = [d for n, d in events if n == "preview"]
    D = pipe.dalle.config.image_tokens_per_dim
    assert [p["step"] for p in previews] == list(range(D, D * D + 1, D))  # one per image row
    assert all(len(p["images"]) == 2 and p["images"][0]["data_url"].startswith("data:image/png;base64,")
               for p in previews)
    assert [im["seed"] for im in events[-1][1]["images"]] == pipe("кот", 2, seed=1).seeds


def test_many_concurrent_clients_only_succeed_or_get_503(pipe):
    s = Server(pipe, max_queue=8, batch_window_ms=10, max_connections=64)
    try:
        def client(i):
            return [s.request("POST", "/v1/generate", {"prompt": f"кот {i}", "num_images": 1})[0] for _ in range(3)]

        with ThreadPoolExecutor(24) as ex:
            codes = [c for batch in ex.map(client, range(24)) for c in batch]
        assert set(codes) <= {200, 503} and codes.count(200) > 0
        assert s.json("GET", "/health")[2]["queue_depth"] == 0
        assert len(s.httpd.store) <= s.httpd.config.max_stored_images
    finally:
        s.close()


def _wait_for(cond, timeout=20.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.02)
    raise AssertionError("condition not met in time")


def test_open_connections_are_capped(pipe):
    import socket

    s = Server(pipe, max_connections=1, retry_after_s=2)
    try:
        idle = socket.create_connection(("127.0.0.1", s.port))  # holds the only handler slot
        _wait_for(lambda: s.httpd.open_connections == 1)
        status, hdrs, payload = s.request("GET", "/health")
        assert status == 503 and hdrs["Retry-After"] == "2" and b"too many open connections" in payload
        idle.close()
        _wait_for(lambda: s.httpd.open_connections == 0)
        assert s.request("GET", "/health")[0] == 200
    finally:
        s.close()

"""``holst serve`` over real HTTP on loopback: endpoints, parity with the pipeline, batching, limits, auth,
503, SSE, the fuzz cases that broke the old standard-library server, slow clients, and the CLI."""

from __future__ import annotations

import base64
import contextlib
import http.client
import io
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from holst.config import ConfigError, ServeConfig
from holst.pipeline import Text2ImagePipeline
from holst.serve.app import make_server, png_bytes


@pytest.fixture(scope="module")
def pipe():
    return Text2ImagePipeline.from_random("tiny", seed=0)


class Connection(http.client.HTTPConnection):
    """http.client with TCP_NODELAY: it writes headers and body apart, and Nagle + delayed ACK cost 40 ms."""

    def connect(self):
        super().connect()
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class Server:
    """A server on a free loopback port, served from a background thread."""

    def __init__(self, pipe, **config):
        self.httpd = make_server(pipe, ServeConfig(port=0, **config)).start()
        self.port = self.httpd.port

    def request(self, method, path, body=None, headers=None, raw=None, timeout=60):
        conn = Connection("127.0.0.1", self.port, timeout=timeout)
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

    def raw(self, data: bytes, timeout=10.0) -> bytes:
        """Send bytes on a fresh socket, return everything the server sends until it closes or goes quiet."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as sock:
            sock.sendall(data)
            chunks = []
            try:
                while chunk := sock.recv(65536):
                    chunks.append(chunk)
                    if b"\r\n\r\n" in b"".join(chunks) and _complete(b"".join(chunks)):
                        break
            except TimeoutError:
                pass
            return b"".join(chunks)

    def close(self):
        self.httpd.close()


def _read_all(sock: socket.socket) -> bytes:
    """Everything until the server closes the connection."""
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def _complete(reply: bytes) -> bool:
    head, _, body = reply.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return len(body) >= int(line.split(b":")[1])
    return False


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
    request = schema["components"]["schemas"]["GenerateRequest"]  # generated from the pydantic model
    num_images = request["properties"]["num_images"]["anyOf"][0]
    assert num_images["maximum"] == ServeConfig().max_images_per_request and num_images["type"] == "integer"
    assert request["required"] == ["prompt"] and request["additionalProperties"] is False
    assert request["properties"]["prompt"]["maxLength"] == ServeConfig().max_prompt_chars
    ref = schema["paths"]["/v1/generate"]["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    assert ref == "#/components/schemas/GenerateRequest"
    assert "GenerateResult" in schema["components"]["schemas"] and "ErrorReply" in schema["components"]["schemas"]
    status, hdrs, page = server.request("GET", "/")
    assert status == 200 and hdrs["content-type"].startswith("text/html") and b"/v1/generate/stream" in page
    assert server.request("GET", "/static/index.html")[2] == page
    assert server.request("GET", "/static/../app.py")[0] == 404
    assert server.json("GET", "/nope")[0] == 404
    assert server.request("HEAD", "/health")[0] == 200


def test_generate_json_matches_the_pipeline(server, pipe):
    status, _, res = server.json("POST", "/v1/generate", {"prompt": "красный круг", "num_images": 3, "seed": 21})
    assert status == 200, res
    direct = pipe("красный круг", 3, seed=21)
    assert [im["seed"] for im in res["images"]] == direct.seeds
    assert [im["clip_score"] for im in res["images"]] == pytest.approx(direct.clip_scores)
    for im, expected in zip(res["images"], direct.images):
        status, hdrs, data = server.request("GET", im["url"])
        assert status == 200 and hdrs["content-type"] == "image/png"
        assert data == png_bytes(expected)
    assert server.request("GET", res["grid_url"])[0] == 200
    assert res["settings"]["num_images"] == 3
    # Accept: image/png answers with the best image itself.
    status, hdrs, data = server.request("POST", "/v1/generate", {"prompt": "красный круг", "num_images": 3, "seed": 21},
                                        headers={"Accept": "image/png"})
    assert status == 200 and hdrs["content-type"] == "image/png" and hdrs["x-seed"] == str(direct.seeds[0])
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
    ({"prompt": "кот", "num_images": True}, 422, "num_images"), ({"prompt": "кот", "image_prompt": "@@"}, 422,
                                                                "image_prompt"),
    ({"prompt": "кот", "image_prompt_rows": 2}, 422, "image_prompt"), ([1, 2], 400, "object")])
def test_invalid_requests(server, body, status, words):
    got, _, res = server.json("POST", "/v1/generate", body)
    assert got == status and words in res["error"] and res["status"] == status


def test_replies_encode_any_text():
    from holst.serve.schemas import dumps

    reply = json.loads(dumps({"error": "a\ud800b", "x": float("nan"), "y": [float("inf"), 1.5]}))
    assert reply == {"error": "a\ud800b", "x": None, "y": [None, 1.5]}


def test_body_limits(server):
    cap = ServeConfig().max_body_bytes
    status, hdrs, payload = server.request("POST", "/v1/generate", raw=b"{" + b" " * (cap + 10) + b"}")
    assert status == 413 and b"at most" in payload
    assert server.request("POST", "/v1/generate", raw=b"not json")[0] == 400
    # A chunked body (no Content-Length) is capped while it is read: the 413 may come, and the server
    # close, before the client has sent the rest, so the client keeps reading after a broken pipe.
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")
        chunk = b"{" + b" " * 1000
        try:
            for _ in range(cap // 1000 + 2):
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            sock.sendall(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass
        reply = b""
        with contextlib.suppress(ConnectionResetError):
            while b"\r\n" not in reply and (data := sock.recv(4096)):
                reply += data
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
    assert server.request("POST", "/v1/generate", raw=b"not json")[0] == 400  # and it keeps answering


# --------------------------------------------------------------------------------------------
# What broke the old server: every case gets its 4xx, valid JSON, and the server keeps answering
# --------------------------------------------------------------------------------------------

DIGITS_4301 = b"7" * 4301
FUZZ_CASES = [
    ("POST", "/v1/generate", b'{"prompt": "\\ud800"}', 422, "prompt"),
    ("POST", "/v1/generate", b'{"prompt": "a\\udfff b"}', 422, "prompt"),
    ("POST", "/v1/generate/stream", b'{"prompt": "\\ud83d"}', 422, "prompt"),
    ("POST", "/v1/generate", b'{"prompt": "\\ud800", "colour": 1}', 422, "unknown"),
    ("POST", "/v1/generate", b'{"\\ud800": 1}', 422, "unknown"),
    ("POST", "/v1/generate", b'{"prompt": "a", "seed": ' + DIGITS_4301 + b"}", 422, "seed"),
    ("POST", "/v1/generate", b'{"prompt": "a", "x": [' + DIGITS_4301 + b"]}", 422, "unknown"),
    ("POST", "/v1/generate", b"[" + DIGITS_4301 + b"]", 400, "object"),
    ("POST", "/v1/generate", b'{"prompt": "a", "top_p": ' + b"9" * 400 + b"}", 422, "top_p"),
    ("POST", "/v1/generate", b'{"prompt": "a", "temperature": 1' + b"0" * 399 + b".5}", 422, "temperature"),
    ("POST", "/v1/generate", b'{"prompt": "a", "guidance_scale": 0.' + b"0" * 398 + b"1}", 422, "guidance_scale"),
    ("POST", "/v1/generate", b'{"prompt": "a", "guidance_scale": 1e400}', 422, "guidance_scale"),
    ("POST", "/v1/generate", b'{"prompt": "a", "top_p": NaN}', 400, "NaN"),
    ("POST", "/v1/generate", b'{"prompt": "a", "x": ' + b"[" * 5000 + b"]" * 5000 + b"}", 422, "nested"),
    ("POST", "/v1/generate", b"[" * 100000, 422, "nested"),
    ("POST", "/v1/generate", b'{"prompt": "a"' + b"\xff\xfe}", 400, "UTF-8"),
    ("GET", "/static/%00", None, 404, "static"),
    ("GET", "/static/a%00b.html", None, 404, "static"),
    ("GET", "/v1/images/%00.png", None, 404, "image"),
    *[(m, "/health", None, 405, "not allowed") for m in ("DELETE", "PUT", "PATCH", "OPTIONS", "TRACE", "BREW")],
    ("GET", "/v1/generate", None, 405, "allowed: POST"),
    ("DELETE", "/v1/generate", b"{}", 405, "not allowed"),
]


@pytest.mark.parametrize("method, path, raw, status, words", FUZZ_CASES)
def test_fuzz_cases_get_their_4xx_and_the_server_keeps_answering(server, method, path, raw, status, words):
    got, hdrs, payload = server.request(method, path, raw=raw)
    reply = json.loads(payload)  # valid JSON, never an empty reply
    assert got == status and reply["status"] == status and words in reply["error"], reply
    assert hdrs["content-type"] == "application/json"
    if status == 405:
        assert "allow" in hdrs
    assert server.request("GET", "/health")[0] == 200


@pytest.mark.parametrize("data", [
    b"GET /\xff\xfe HTTP/1.1\r\nHost: x\r\n\r\n",
    b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Length: " + DIGITS_4301 + b"\r\n\r\n{}",
    b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999999999999\r\n\r\n{}",
    b"GET /health HTTP/1.1\r\nHost: x\r\nX-Bad\x00: 1\r\n\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 64,  # a TLS hello on the plain port
])
def test_malformed_http_gets_a_4xx(server, data):
    reply = server.raw(data)
    assert reply.startswith(b"HTTP/1.1 4"), reply[:200]
    assert server.request("GET", "/health")[0] == 200


def test_no_traceback_for_client_mistakes_or_hang_ups(pipe, caplog):
    s = Server(pipe, batch_window_ms=0)
    try:
        with caplog.at_level(logging.DEBUG):
            for method, path, raw, _, _ in FUZZ_CASES:
                s.request(method, path, raw=raw)
            s.raw(b"GET /\xff HTTP/1.1\r\nHost: x\r\n\r\n")
            _, _, res = s.json("POST", "/v1/generate", {"prompt": "кот", "num_images": 2, "seed": 1})
            for path in (res["images"][0]["url"], "/", "/openapi.json"):  # hang up before reading the reply
                for _ in range(5):
                    with socket.create_connection(("127.0.0.1", s.port)) as sock:
                        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            with socket.create_connection(("127.0.0.1", s.port)) as sock:  # hang up mid-body
                sock.sendall(b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"pro")
            with socket.create_connection(("127.0.0.1", s.port)) as sock:  # hang up mid-stream
                body = b'{"prompt": "\xd0\xba\xd0\xbe\xd1\x82", "num_images": 2}'
                sock.sendall(b"POST /v1/generate/stream HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
                sock.recv(100)
            time.sleep(0.5)
            assert s.request("GET", "/health")[0] == 200
        bad = [r for r in caplog.records if r.exc_info or "Traceback" in r.getMessage()
               or r.levelno >= logging.ERROR]
        assert not bad, [r.getMessage() for r in bad]
    finally:
        s.close()


# A body the fuzzer builds: mostly the real fields with any JSON value, sometimes junk keys or raw bytes.
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.integers(min_value=10**30, max_value=10**60)
    | st.floats(allow_nan=False) | st.text(max_size=20)
    | st.sampled_from(["\ud800", "a\udfffb", "", " ", "\x00", "кот", "1e400"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8)
FIELDS = ["prompt", "num_images", "top_k", "top_p", "temperature", "guidance_scale", "seed", "rerank", "upscale",
          "image_prompt", "image_prompt_rows"]
BODIES = st.one_of(
    st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=8), JSON_VALUES, max_size=6)
    .map(lambda d: json.dumps(d).encode()),
    st.dictionaries(st.sampled_from(FIELDS), JSON_VALUES, max_size=4)
    .map(lambda d: json.dumps({"prompt": "кот", **d, "num_images": 1}).encode()),
    JSON_VALUES.map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=64),
    st.tuples(st.sampled_from([b"1", b"-0.5", b"1e999", b"9" * 5000, b"0." + b"0" * 500 + b"1"]),
              st.sampled_from(FIELDS)).map(lambda t: b'{"prompt": "a", "%s": %s}' % (t[1].encode(), t[0])),
)


def test_fuzzed_bodies_never_get_a_5xx_or_an_empty_reply(pipe):
    s = Server(pipe, batch_window_ms=0, max_images_per_request=2)
    conn = [Connection("127.0.0.1", s.port, timeout=60)]
    seen = {"n": 0}

    @settings(max_examples=500, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(body=BODIES, path=st.sampled_from(["/v1/generate", "/v1/generate/stream"]))
    def check(body, path):
        seen["n"] += 1
        try:
            conn[0].request("POST", path, body=body, headers={"Content-Type": "application/json"})
            resp = conn[0].getresponse()
        except (http.client.HTTPException, OSError):  # the server closed a kept-alive connection: retry fresh
            conn[0].close()
            conn[0] = Connection("127.0.0.1", s.port, timeout=60)
            conn[0].request("POST", path, body=body, headers={"Content-Type": "application/json"})
            resp = conn[0].getresponse()
        payload = resp.read()
        assert resp.status < 500 and payload, (body[:200], resp.status, payload[:200])
        if resp.status == 200 and path.endswith("stream"):
            assert b"event: result" in payload, payload[-300:]
        else:
            reply = json.loads(payload)
            assert (resp.status == 200 and "images" in reply) or (reply["status"] == resp.status and reply["error"])
        if resp.getheader("connection") == "close":
            conn[0].close()

    try:
        check()
        assert seen["n"] >= 500
        assert s.request("GET", "/health")[0] == 200
    finally:
        conn[0].close()
        s.close()


# --------------------------------------------------------------------------------------------
# Slow clients
# --------------------------------------------------------------------------------------------


def test_300_trickling_sockets_from_one_address_do_not_stop_health(pipe):
    s = Server(pipe, header_timeout_s=2.0, max_connections_per_client=16)
    stop = threading.Event()
    socks = []
    try:
        for _ in range(300):
            sock = socket.create_connection(("127.0.0.1", s.port))
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
            socks.append(sock)

        def trickle():
            while not stop.is_set():
                for sock in socks:
                    try:
                        sock.send(b"X-Slow: 1\r\n")
                    except OSError:
                        pass
                stop.wait(0.3)

        thread = threading.Thread(target=trickle, daemon=True)
        thread.start()
        time.sleep(0.5)  # the trickle is under way (a fresh connection is never evicted: it may still send)
        times = []
        for _ in range(15):  # probes from the same address as the 300 sockets
            t0 = time.monotonic()
            status = s.request("GET", "/health", timeout=1.0)[0]
            times.append(time.monotonic() - t0)
            assert status == 200
            time.sleep(0.2)
        assert max(times) < 1.0, times
        stats = s.httpd.state.stats
        assert stats.refused + stats.evicted >= 300 - 16 and stats.evicted > 0
        # Past the header deadline the trickling sockets that are left are closed too.
        _wait_for(lambda: stats.timed_out > 0, timeout=5)
    finally:
        stop.set()
        for sock in socks:
            sock.close()
        s.close()


def test_header_and_body_deadlines(pipe):
    s = Server(pipe, header_timeout_s=1.0, body_timeout_s=1.0)
    try:
        with socket.create_connection(("127.0.0.1", s.port), timeout=5) as sock:
            t0 = time.monotonic()
            sock.sendall(b"GET /health HTTP/1.1\r\n")
            for _ in range(20):  # a header line every 0.2 s never completes the request
                time.sleep(0.2)
                try:
                    sock.sendall(b"X-Slow: 1\r\n")
                except OSError:
                    break
            reply = _read_all(sock)
            assert reply.startswith(b"HTTP/1.1 408") and b"headers" in reply and time.monotonic() - t0 < 3.0
        with socket.create_connection(("127.0.0.1", s.port), timeout=5) as sock:  # idle, sends nothing
            assert sock.recv(100) == b""  # closed after the deadline, not kept forever
        with socket.create_connection(("127.0.0.1", s.port), timeout=5) as sock:
            sock.sendall(b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 100\r\n\r\n{\"prompt\"")
            reply = _read_all(sock)
            assert reply.startswith(b"HTTP/1.1 408") and b"body" in reply
        assert s.request("GET", "/health")[0] == 200
    finally:
        s.close()


def test_open_connections_are_capped(pipe):
    s = Server(pipe, max_connections=1, retry_after_s=2)
    try:
        idle = socket.create_connection(("127.0.0.1", s.port))  # holds the only slot
        _wait_for(lambda: s.httpd.open_connections == 1)
        status, hdrs, payload = s.request("GET", "/health")
        assert status == 503 and hdrs["Retry-After"] == "2" and b"too many open connections" in payload
        idle.close()
        _wait_for(lambda: s.httpd.open_connections == 0)
        assert s.request("GET", "/health")[0] == 200
    finally:
        s.close()


# --------------------------------------------------------------------------------------------
# Queue, batching, auth, streaming
# --------------------------------------------------------------------------------------------


def test_token_required_and_checked(pipe):
    with pytest.raises(ConfigError, match="token"):
        ServeConfig(host="0.0.0.0")
    s = Server(pipe, token="s3cret-token", batch_window_ms=0)
    try:
        assert s.json("GET", "/health")[2]["auth_required"] is True
        status, hdrs, _ = s.json("POST", "/v1/generate", {"prompt": "кот", "num_images": 1})
        assert status == 401 and hdrs["www-authenticate"] == "Bearer"
        bad = {"Authorization": "Bearer wrong-token"}
        assert s.json("POST", "/v1/generate", {"prompt": "кот", "num_images": 1}, bad)[0] == 401
        latin1 = {"Authorization": "Bearer \xe9\xff-token"}  # not ASCII, not the token
        assert s.json("POST", "/v1/generate", {"prompt": "кот", "num_images": 1}, latin1)[0] == 401
        good = {"Authorization": "Bearer s3cret-token"}
        assert s.json("POST", "/v1/generate", {"prompt": "кот", "num_images": 1}, good)[0] == 200
        # A refused body is never read as the next request on a kept-alive connection.
        conn = Connection("127.0.0.1", s.port, timeout=30)
        body = json.dumps({"prompt": "кот", "num_images": 1})
        for headers, expected in (({}, 401), (good, 200), ({}, 401), (good, 200)):
            conn.request("POST", "/v1/generate", body=body, headers={"Content-Type": "application/json", **headers})
            resp = conn.getresponse()
            resp.read()
            assert resp.status == expected
        conn.close()
        schema = s.json("GET", "/openapi.json")[2]
        assert schema["paths"]["/v1/generate"]["post"]["security"] == [{"bearer": []}]
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


def test_batched_guidance_and_image_prompts_equal_the_pipeline(pipe):
    """Seed invariance to batch size through the server: guidance + image prompts, batched with others."""
    s = Server(pipe, batch_window_ms=500, max_batch_images=16)
    rng = __import__("random").Random(0)
    pictures = [Image.new("RGB", (pipe.image_size, pipe.image_size), (rng.randrange(256), 40 * i, 200))
                for i in range(3)]
    for im in pictures:
        im.putpixel((1, 1), (255, 255, 255))
    encoded = ["data:image/png;base64," + base64.b64encode(png_bytes(im)).decode() for im in pictures]
    jobs = [("красный круг", 1, 3, 0), ("синий квадрат", 3, 11, 1), ("зелёный", 2, 40, 2)]
    try:
        def call(job):
            prompt, n, seed, k = job
            body = {"prompt": prompt, "num_images": n, "seed": seed, "guidance_scale": 3.0, "image_prompt": encoded[k]}
            return s.json("POST", "/v1/generate", body)

        with ThreadPoolExecutor(3) as ex:
            results = list(ex.map(call, jobs))
        assert all(r[0] == 200 for r in results), results
        assert s.json("GET", "/health")[2]["batches_run"] < len(jobs)  # they shared a batch
        for (prompt, n, seed, k), (_, _, res) in zip(jobs, results):
            direct = pipe(prompt, n, seed=seed, guidance_scale=3.0, image_prompt=pictures[k])
            assert [im["seed"] for im in res["images"]] == direct.seeds
            got = [s.request("GET", im["url"])[2] for im in res["images"]]
            assert got == [png_bytes(im) for im in direct.images]
        # Without guidance it is another batch key and other images.
        _, _, plain = s.json("POST", "/v1/generate", {"prompt": "красный круг", "num_images": 1, "seed": 3,
                                                      "image_prompt": encoded[0]})
        assert plain["images"][0]["seed"] == 3
        assert s.request("GET", plain["images"][0]["url"])[2] == png_bytes(
            pipe("красный круг", 1, seed=3, image_prompt=pictures[0]).images[0])
    finally:
        s.close()


def _slow_sampling(monkeypatch, worker, release=None, per_step=0.0):
    """Make the worker's sampling wait for ``release`` and/or sleep ``per_step`` s per token."""
    original = worker.pipe.sample_codes

    def slow(*args, progress=None, **kwargs):
        if release is not None:
            release.wait(30)

        def slowed(*a):
            time.sleep(per_step)
            return progress(*a)

        return original(*args, progress=slowed if progress and per_step else progress, **kwargs)

    monkeypatch.setattr(worker.pipe, "sample_codes", slow)


def test_full_queue_answers_503_with_retry_after(pipe, monkeypatch):
    s = Server(pipe, max_queue=1, batch_window_ms=0, retry_after_s=7)
    release = threading.Event()
    _slow_sampling(monkeypatch, s.httpd.worker, release=release)
    try:
        with ThreadPoolExecutor(2) as ex:
            first = ex.submit(s.json, "POST", "/v1/generate", {"prompt": "кот", "num_images": 1})
            _wait_for(lambda: s.json("GET", "/health")[2]["busy"])  # /health answers while a batch runs
            second = ex.submit(s.json, "POST", "/v1/generate", {"prompt": "пёс", "num_images": 1})
            _wait_for(lambda: s.json("GET", "/health")[2]["queue_depth"] == 1)
            status, hdrs, res = s.json("POST", "/v1/generate", {"prompt": "дом", "num_images": 1})
            assert status == 503 and hdrs["retry-after"] == "7" and "queue is full" in res["error"]
            release.set()
            assert first.result()[0] == 200 and second.result()[0] == 200
        assert s.json("GET", "/health")[2]["rejected_busy"] == 1
        assert s.json("POST", "/v1/generate", {"prompt": "дом", "num_images": 1})[0] == 200
    finally:
        release.set()
        s.close()


def _events(payload: bytes) -> list[tuple[str, dict]]:
    events = []
    for block in payload.decode().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.split("\n") if ": " in line and not line.startswith(":"))
        if "event" in lines:
            events.append((lines["event"], json.loads(lines["data"])))
    return events


def test_event_stream_sends_previews_then_the_result(server, pipe):
    status, hdrs, payload = server.request("POST", "/v1/generate/stream", {"prompt": "кот", "num_images": 2, "seed": 1})
    assert status == 200 and hdrs["content-type"].startswith("text/event-stream")
    events = _events(payload)
    names = [n for n, _ in events]
    assert names[0] == "queued" and names[-1] == "result" and "started" in names
    previews = [d for n, d in events if n == "preview"]
    D = pipe.dalle.config.image_tokens_per_dim
    assert [p["step"] for p in previews] == list(range(D, D * D + 1, D))  # one per image row
    assert all(len(p["images"]) == 2 and p["images"][0]["data_url"].startswith("data:image/png;base64,")
               for p in previews)
    assert [im["seed"] for im in events[-1][1]["images"]] == pipe("кот", 2, seed=1).seeds


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_hangs_up_alone_in_its_batch_cancels_it(pipe, monkeypatch, stream):
    s = Server(pipe, batch_window_ms=0)
    _slow_sampling(monkeypatch, s.httpd.worker, per_step=0.1)  # 16 tokens: 1.6 s per batch
    try:
        body = json.dumps({"prompt": "кот", "num_images": 2}).encode()
        path = b"/v1/generate/stream" if stream else b"/v1/generate"
        with socket.create_connection(("127.0.0.1", s.port), timeout=10) as sock:
            sock.sendall(b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (path, len(body), body))
            _wait_for(lambda: s.json("GET", "/health")[2]["busy"])
        _wait_for(lambda: s.json("GET", "/health")[2]["cancelled_batches"] == 1, timeout=5)
        health = s.json("GET", "/health")[2]
        assert health["images_made"] == 0 and health["batches_run"] == 0 and not health["busy"]
        assert s.json("POST", "/v1/generate", {"prompt": "кот", "num_images": 1})[0] == 200  # the worker lives on
    finally:
        s.close()


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


# --------------------------------------------------------------------------------------------
# `holst serve` as a subprocess
# --------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start_serve(port: int, args: list[str], env: dict | None = None) -> tuple[subprocess.Popen, Server]:
    """`holst serve ARGS --device cpu --threads 1` as a subprocess, and a client once /health answers 200."""
    proc = subprocess.Popen([sys.executable, "-m", "holst", "serve", *args, "--device", "cpu", "--threads", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    s = Server.__new__(Server)
    s.port = port

    def up():
        try:
            return s.request("GET", "/health", timeout=2)[0] == 200
        except OSError:
            assert proc.poll() is None, proc.stderr.read().decode()
            return False

    try:
        _wait_for(up, timeout=90)
    except BaseException:
        proc.kill()
        proc.communicate(timeout=30)
        raise
    return proc, s


def test_cli_refuses_a_public_host_without_a_token():
    env = {k: v for k, v in os.environ.items() if k != "HOLST_TOKEN"}
    proc = subprocess.run([sys.executable, "-m", "holst", "serve", "--host", "0.0.0.0"], capture_output=True,
                          text=True, timeout=120, env=env)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "token" in lines[0] and "Traceback" not in proc.stderr


def test_cli_serves_with_holst_token_and_config(tmp_path, pipe):
    model = tmp_path / "model"
    pipe.save_pretrained(model)
    port = _free_port()
    (tmp_path / "serve.yaml").write_text(f"port: {port}\nmax_queue: 3\nmax_images_per_request: 2\n")
    env = {**os.environ, "HOLST_TOKEN": "env-token-123"}
    proc, s = _start_serve(port, ["--model", str(model), "--config", str(tmp_path / "serve.yaml")], env=env)
    try:
        health = s.json("GET", "/health")[2]
        assert health["auth_required"] is True and health["queue_capacity"] == 3
        assert health["limits"]["max_images_per_request"] == 2
        body = {"prompt": "кот", "num_images": 1, "seed": 4}
        assert s.json("POST", "/v1/generate", body)[0] == 401
        status, _, res = s.json("POST", "/v1/generate", body, {"Authorization": "Bearer env-token-123"})
        assert status == 200 and res["images"][0]["seed"] == 4
        assert s.request("GET", res["images"][0]["url"])[2] == png_bytes(pipe("кот", 1, seed=4).images[0])
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert proc.returncode in (0, -15) and b"Traceback" not in err, err.decode()[-2000:]


def test_cli_workers_share_one_port(tmp_path, pipe):
    model = tmp_path / "model"
    pipe.save_pretrained(model)
    port = _free_port()
    proc, s = _start_serve(port, ["--model", str(model), "--port", str(port), "--workers", "2"])
    try:
        status, _, res = s.json("POST", "/v1/generate", {"prompt": "кот", "num_images": 1, "seed": 4})
        assert status == 200 and s.request("GET", res["images"][0]["url"])[0] in (200, 404)  # a store per worker
    finally:
        proc.send_signal(2)  # SIGINT, as Ctrl-C
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0 and b"Traceback" not in err, err.decode()[-2000:]
    assert b"2 worker processes" in err

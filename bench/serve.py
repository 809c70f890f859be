"""Benchmark ``holst serve``: throughput and p50/p99 latency under 1, 8 and 50 concurrent clients.

Runs the real server as a subprocess (``holst serve`` on a free loopback port), drives it with
threaded HTTP clients (each POSTs /v1/generate for one image, then GETs the PNG), and samples the
server's resident memory during each phase. The baseline, measured in the same run, is the same
pipeline called directly in this process, one image at a time. Prints one JSON document.

    .venv/bin/python bench/serve.py                         # random 'emoji'-shaped pipeline, 1/8/50 clients
    .venv/bin/python bench/serve.py --model models/default  # the shipped model
    .venv/bin/python bench/serve.py --quick                 # a few seconds per phase (smoke test)
    PYTHONPATH=/tmp/old-checkout .venv/bin/python /tmp/old-checkout/bench/serve.py   # an older stack

A 503 (queue full) is the documented answer to overload: it is counted, the client waits its
Retry-After (capped by --backoff) and goes on. Every other non-200 answer counts as a failure.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

WORDS = ("красный синий зелёный жёлтый кот собака дом дерево круг квадрат звезда солнце на фоне большой маленький "
         "red blue cat dog house tree star sun").split()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    """Resident memory of a process in MiB (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    k = min(len(values) - 1, max(0, round(q / 100.0 * (len(values) - 1))))
    return values[k]


def call(port: int, method: str, path: str, body: dict | None = None, timeout: float = 300.0
         ) -> tuple[int, dict, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        data = None if body is None else json.dumps(body).encode()
        conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


def run_phase(port: int, pid: int, clients: int, duration: float, backoff: float, seed: int) -> dict:
    """``clients`` threads loop for ``duration`` seconds; returns counts, throughput, latency, memory."""
    stop_at = time.monotonic() + duration
    lock = threading.Lock()
    latencies: list[float] = []
    counts = {"ok": 0, "busy_503": 0, "failed": 0}
    failures: list[str] = []

    def client(i: int) -> None:
        rng = random.Random(seed * 1000 + i)
        while time.monotonic() < stop_at:
            prompt = " ".join(rng.choice(WORDS) for _ in range(3))
            t0 = time.perf_counter()
            try:
                status, headers, payload = call(port, "POST", "/v1/generate", {"prompt": prompt, "num_images": 1})
                if status == 200:
                    url = json.loads(payload)["images"][0]["url"]
                    img_status, _, png = call(port, "GET", url)
                    if img_status != 200 or not png.startswith(b"\x89PNG"):
                        status = img_status if img_status != 200 else 599
            except OSError as e:
                status, headers, payload = -1, {}, str(e).encode()
            elapsed = time.perf_counter() - t0
            with lock:
                if status == 200:
                    counts["ok"] += 1
                    latencies.append(elapsed)
                elif status == 503:
                    counts["busy_503"] += 1
                else:
                    counts["failed"] += 1
                    failures.append(f"{status}: {payload[:200]!r}")
            if status == 503:
                time.sleep(min(float(headers.get("Retry-After", 1)), backoff))

    memory = [rss_mb(pid)]
    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    t_start = time.perf_counter()
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        time.sleep(min(5.0, max(0.1, duration / 12)))
        memory.append(rss_mb(pid))
    for t in threads:
        t.join()
    wall = time.perf_counter() - t_start
    return {
        "clients": clients, "duration_s": round(wall, 2), **counts,
        "throughput_images_per_s": round(counts["ok"] / wall, 3),
        "latency_p50_s": round(percentile(latencies, 50), 4), "latency_p99_s": round(percentile(latencies, 99), 4),
        "latency_mean_s": round(statistics.fmean(latencies), 4) if latencies else None,
        "server_rss_mb_start": round(memory[0], 1), "server_rss_mb_end": round(memory[-1], 1),
        "server_rss_mb_max": round(max(memory), 1),
        # growth over the second half of the phase: ~0 once allocator arenas and the image store are warm
        "server_rss_mb_second_half_growth": round(memory[-1] - memory[len(memory) // 2], 1),
        "server_rss_mb_timeline": [round(m, 1) for m in memory], "failures_sample": failures[:5],
    }


def baseline_direct(model: str, duration: float, threads: int) -> dict:
    """The same pipeline called in this process, one image per call, for ``duration`` seconds."""
    import torch

    from holst.pipeline import Text2ImagePipeline

    torch.set_num_threads(threads)
    pipe = Text2ImagePipeline.from_pretrained(model)
    rng = random.Random(0)
    pipe("кот", 1, seed=0)  # warm-up
    latencies = []
    end = time.monotonic() + duration
    while time.monotonic() < end:
        t0 = time.perf_counter()
        pipe(" ".join(rng.choice(WORDS) for _ in range(3)), 1, seed=rng.randrange(2**31))
        latencies.append(time.perf_counter() - t0)
    return {"calls": len(latencies), "images_per_s": round(len(latencies) / sum(latencies), 3),
            "latency_p50_s": round(percentile(latencies, 50), 4), "latency_p99_s": round(percentile(latencies, 99), 4)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="pipeline directory (default: a random pipeline of --preset)")
    parser.add_argument("--preset", default="emoji", help="random pipeline preset when --model is not given")
    parser.add_argument("--clients", default="1,8,50", help="comma-separated concurrency levels")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per phase below 50 clients")
    parser.add_argument("--duration-50", type=float, default=60.0, help="seconds of the 50-client phase")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the server and the baseline")
    parser.add_argument("--max-queue", type=int, default=64)
    parser.add_argument("--max-batch-images", type=int, default=16)
    parser.add_argument("--backoff", type=float, default=1.0, help="cap on the Retry-After wait after a 503 (s)")
    parser.add_argument("--quick", action="store_true", help="4 s phases (a smoke test)")
    args = parser.parse_args()
    if args.quick:
        args.duration, args.duration_50 = 4.0, 6.0

    tmp = tempfile.TemporaryDirectory(prefix="holst-bench-serve-")
    model = args.model
    if model is None:
        from holst.pipeline import Text2ImagePipeline

        model = os.path.join(tmp.name, args.preset)
        Text2ImagePipeline.from_random(args.preset, seed=0).save_pretrained(model)

    port = free_port()
    cmd = [sys.executable, "-m", "holst", "serve", "--model", model, "--port", str(port), "--device", "cpu",
           "--threads", str(args.threads), "--max-queue", str(args.max_queue),
           "--max-batch-images", str(args.max_batch_images)]
    log = open(os.path.join(tmp.name, "server.log"), "w+b")  # a file, not a pipe: a full pipe would stall it
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log)
    import importlib.util

    # Which stack answers (run an older checkout with PYTHONPATH=<its root> to measure the old one).
    stack = "fastapi+uvicorn" if importlib.util.find_spec("holst.serve.guard") else "http.server (stdlib)"
    result: dict = {"bench": "serve", "machine": f"{os.cpu_count()}-core CPU", "stack": stack,
                    "model": args.model or f"random:{args.preset}", "threads": args.threads,
                    "max_queue": args.max_queue, "max_batch_images": args.max_batch_images}
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if call(port, "GET", "/health", timeout=5)[0] == 200:
                    break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                raise RuntimeError(f"server did not start: {log.read().decode()[-2000:]}")
            time.sleep(0.2)
        call(port, "POST", "/v1/generate", {"prompt": "кот", "num_images": 1})  # warm-up
        result["server_rss_mb_after_warmup"] = round(rss_mb(server.pid), 1)
        phases = []
        for i, n in enumerate(int(c) for c in args.clients.split(",")):
            duration = args.duration_50 if n >= 50 else args.duration
            phases.append(run_phase(port, server.pid, n, duration, args.backoff, seed=i))
        result["phases"] = phases
        health = json.loads(call(port, "GET", "/health")[2])
        result["server"] = {k: health[k] for k in ("batches_run", "images_made", "requests_served", "rejected_busy")}
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()
    result["baseline_direct_pipeline"] = baseline_direct(model, args.duration, args.threads)
    base = result["baseline_direct_pipeline"]["images_per_s"]
    for p in result["phases"]:
        p["throughput_vs_direct"] = round(p["throughput_images_per_s"] / base, 3) if base else None
    result["failed_requests"] = sum(p["failed"] for p in result["phases"])
    print(json.dumps(result, indent=2, ensure_ascii=False))
    tmp.cleanup()
    return 0 if result["failed_requests"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

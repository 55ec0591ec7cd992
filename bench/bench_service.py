"""Bounded load test of the HTTP service on the loopback interface; prints a markdown table.

For each endpoint (``/caption``: a 128 px PNG scene, beam 3; ``/generate``: 64 frames of MIDI)
and each concurrency (default 1, 8, 32): a fixed number of requests (``--requests``) sent by
that many concurrent clients, stopped early at ``--max-seconds``; reported are requests/s, p50
and p99 latency, the errors and the 5xx answers, and for captions the mean adaptive batch size
the server formed (``X-BBService-Batch-Size``). The exit status is 1 when any request failed.

Without ``--url`` it starts ``bbservice serve`` on 127.0.0.1 and a free port itself (export
folders from ``--music-export``/``--caption-export``, default ``artifacts/exports/*`` where they
exist, else the BentoML model store), waits for ``/readyz`` and stops it at the end.
``--compare-batching`` measures the captions a second time on a server started with
``BBSERVICE_MAX_BATCH=1`` (no batching).

    python bench/bench_service.py [--requests 200] [--max-seconds 60] [--concurrency 1 8 32]
        [--endpoints caption generate] [--url http://127.0.0.1:3000] [--compare-batching]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import httpx
import numpy as np
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def scene_png(seed: int, size: int = 128) -> bytes:
    """A few coloured shapes on a light background (like the training scenes)."""
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", (size, size), (235, 235, 230))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(1, 4))):
        x, y = rng.integers(8, size - 40, 2)
        r = int(rng.integers(12, 30))
        colour = tuple(int(c) for c in rng.integers(0, 255, 3))
        box = (int(x), int(y), int(x) + r, int(y) + r)
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


@dataclass
class Result:
    endpoint: str
    concurrency: int
    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    server_errors: int = 0
    batch_sizes: list[int] = field(default_factory=list)
    seconds: float = 0.0
    first_error: str = ""

    def row(self, label: str = "") -> str:
        n = len(self.latencies)
        lat = sorted(self.latencies)
        p50 = statistics.median(lat) * 1000 if lat else float("nan")
        p99 = lat[min(n - 1, int(round(0.99 * (n - 1))))] * 1000 if lat else float("nan")
        rps = n / self.seconds if self.seconds else 0.0
        batch = f"{statistics.mean(self.batch_sizes):.2f}" if self.batch_sizes else "-"
        return (
            f"| {self.endpoint}{label} | {self.concurrency} | {n} | {rps:.1f} | {p50:.1f} | "
            f"{p99:.1f} | {self.errors} | {self.server_errors} | {batch} |"
        )


def request_for(endpoint: str, i: int, images: list[bytes]) -> dict:
    if endpoint == "caption":
        return {
            "url": "/caption",
            "files": {"image": (f"scene{i}.png", images[i % len(images)], "image/png")},
            "data": {"beam_size": "3"},
        }
    return {"url": "/generate", "json": {"frames": 64, "seed": i % 16, "temperature": 1.0}}


async def run_level(
    base: str, endpoint: str, concurrency: int, n: int, max_seconds: float
) -> Result:
    images = [scene_png(s) for s in range(8)]
    result = Result(endpoint, concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base, timeout=120, limits=limits) as client:
        for i in range(min(4, n)):  # warm the connections and the server's code paths
            await client.post(**request_for(endpoint, i, images))
        counter = iter(range(n))
        start = time.perf_counter()
        deadline = start + max_seconds

        async def worker() -> None:
            for i in counter:
                if time.perf_counter() > deadline:
                    return
                t0 = time.perf_counter()
                try:
                    r = await client.post(**request_for(endpoint, i, images))
                except httpx.HTTPError as err:
                    result.errors += 1
                    result.first_error = result.first_error or repr(err)
                    continue
                result.latencies.append(time.perf_counter() - t0)
                if r.status_code >= 500:
                    result.server_errors += 1
                if r.status_code != 200:
                    result.errors += 1
                    result.first_error = result.first_error or f"{r.status_code} {r.text[:200]}"
                elif "x-bbservice-batch-size" in r.headers:
                    result.batch_sizes.append(int(r.headers["x-bbservice-batch-size"]))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        result.seconds = time.perf_counter() - start
    return result


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def server(args: argparse.Namespace, extra_env: dict[str, str]):
    """A ``bbservice serve`` process on 127.0.0.1 and a free port, ready; stopped on exit."""
    port = free_port()
    command = [sys.executable, "-m", "bbservice.cli", "serve", "--port", str(port)]
    for kind in ("music", "caption"):
        folder = getattr(args, f"{kind}_export")
        if folder:
            command += [f"--{kind}-export", folder]
    env = dict(os.environ, BENTOML_DO_NOT_TRACK="True", **extra_env)
    log = tempfile.NamedTemporaryFile(prefix="bench-serve-", suffix=".log", delete=False)
    proc = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + args.start_timeout
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = Path(log.name).read_text(errors="replace")[-2000:]
                raise SystemExit(f"bench: the server did not become ready:\n{tail}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                    break
            time.sleep(0.25)
        yield base
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        log.close()
        os.unlink(log.name)


def describe(base: str) -> str:
    info = httpx.post(f"{base}/models", timeout=30).json()
    parts = []
    for kind, m in info["models"].items():
        cfg = m.get("model_config", {})
        size = f"H={cfg.get('hidden_size')}"
        if kind == "caption":
            size += f", {cfg.get('encoder')} at {cfg.get('image_size')} px"
            size += f", V={m.get('vocabulary_size')}"
        providers = sorted({p for ps in m.get("providers", {}).values() for p in ps})
        parts.append(f"{kind}: {m.get('gate_family')} ({size}; {', '.join(providers)})")
    return "; ".join(parts)


def measure(base: str, args, endpoints: list[str], label: str = "") -> list[Result]:
    results = []
    for endpoint in endpoints:
        for c in args.concurrency:
            r = asyncio.run(run_level(base, endpoint, c, args.requests, args.max_seconds))
            print(r.row(label), flush=True)
            if r.first_error:
                print(f"|   first error: {r.first_error} |", flush=True)
            results.append(r)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="an already running service (loopback only)")
    parser.add_argument("--music-export", default=None)
    parser.add_argument("--caption-export", default=None)
    parser.add_argument("--requests", type=int, default=200, help="requests per level")
    parser.add_argument("--max-seconds", type=float, default=60.0, help="time cap per level")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument(
        "--endpoints", nargs="+", default=["caption", "generate"], choices=["caption", "generate"]
    )
    parser.add_argument("--compare-batching", action="store_true")
    parser.add_argument("--start-timeout", type=float, default=180.0)
    args = parser.parse_args(argv)
    if args.requests < 1 or args.max_seconds <= 0 or min(args.concurrency) < 1:
        parser.error("--requests, --max-seconds and --concurrency must be positive")
    for kind in ("music", "caption"):
        default = ROOT / "artifacts" / "exports" / kind
        if getattr(args, f"{kind}_export") is None and (default / "manifest.json").is_file():
            setattr(args, f"{kind}_export", str(default))

    header = (
        "| endpoint | concurrency | requests | req/s | p50 ms | p99 ms | errors | 5xx | "
        "mean batch |\n|---|---|---|---|---|---|---|---|---|"
    )
    results: list[Result] = []
    if args.url:
        host = urlparse(args.url).hostname
        if host not in LOOPBACK:
            parser.error(f"--url must be a loopback address ({', '.join(sorted(LOOPBACK))})")
        print(describe(args.url), "\n\n" + header)
        results += measure(args.url, args, args.endpoints)
    else:
        with server(args, {}) as base:
            print(describe(base), "\n\n" + header)
            results += measure(base, args, args.endpoints)
        if args.compare_batching and "caption" in args.endpoints:
            with server(args, {"BBSERVICE_MAX_BATCH": "1"}) as base:
                results += measure(base, args, ["caption"], " (no batching)")
    failed = sum(r.errors + r.server_errors for r in results)
    if failed:
        print(f"\nbench: {failed} failed requests", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

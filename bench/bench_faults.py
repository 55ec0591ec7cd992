"""Fault benchmark of the HTTP service on the loopback interface (issue 13); stops by itself.

Starts ``bbservice serve`` on 127.0.0.1 and a free port, with its own temporary BentoML home
whose model store holds the tiny test models (or ``--music-export``/``--caption-export``), and
runs four scenarios, each bounded in time (``--seconds``) and request count (``--max-requests``):

1. ``mixed``: ``--clients`` clients send mean captions (50 %), music (30 %, 64 frames, mean
   gates) and stochastic captions (20 %, 8 passes) for ``--seconds``.
2. ``flood``: the same, plus ``--flood-clients`` clients sending only stochastic requests
   (captions and music) as fast as they are answered; 429 (queue full) is their expected
   refusal. Mean-caption p99 here is compared with ``mixed`` (goal: at most 3x).
3. ``kill``: the mixed load again (a new connection per request); a third of the way in, the
   serving worker process is killed with SIGKILL. Measured: whether BentoML starts a new
   worker, the seconds until ``/readyz`` answers 200 again, and what happened to the requests
   (in flight on the killed worker, sent during the outage, sent after it).
4. ``corrupt``: the server is stopped, one graph file of the caption model is corrupted in the
   model store, and the server started again (``BBSERVICE_READY=any``): the caption model must
   be refused at load with a clear reason (``/models``, its 503s) and music must keep serving
   under the mixed load.

Per scenario and request kind: requests, answered, p50/p99 of the 200s (ms), 429, other 4xx,
5xx and transport errors. Prints a table, writes JSON (``--out``), exits 1 when a goal is
missed: a 5xx that is the server's own fault (the corrupt model's documented 503s excepted) or
an accepted request left without an answer (requests in flight on the killed worker excepted),
or mean-caption p99 under the flood above 3x its p99 without.

    python bench/bench_faults.py [--quick] [--seconds 60] [--clients 32] [--flood-clients 32]
        [--max-requests 200000] [--out bench-faults.json] [--music-export DIR --caption-export DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from bench_service import scene_png  # noqa: E402

KINDS = ("caption", "caption_stochastic", "music", "music_stochastic")
MIX = (("caption", 0.5), ("music", 0.3), ("caption_stochastic", 0.2))
FLOOD = ("caption_stochastic", "music_stochastic")


# -- requests and their outcomes ---------------------------------------------------------------


def request_for(kind: str, i: int, images: list[bytes]) -> dict:
    if kind.startswith("caption"):
        data = {"beam_size": "3"}
        if kind == "caption_stochastic":
            data.update(mode="stochastic", samples="8", beam_size="2", seed=str(i % 4))
        files = {"image": (f"scene{i}.png", images[i % len(images)], "image/png")}
        return {"url": "/caption", "files": files, "data": data}
    body = {"frames": 64, "seed": i % 16}
    if kind == "music_stochastic":
        body["mode"] = "stochastic"
    return {"url": "/generate", "json": body}


@dataclass
class Outcome:
    kind: str
    start: float  # seconds since the scenario started
    seconds: float
    status: int | None  # None: no HTTP answer (transport error)
    error: str = ""
    flood: bool = False


@dataclass
class Scenario:
    name: str
    outcomes: list[Outcome] = field(default_factory=list)
    notes: dict = field(default_factory=dict)

    def rows(self) -> list[dict]:
        rows = []
        for kind in KINDS:
            mine = [o for o in self.outcomes if o.kind == kind]
            if not mine:
                continue
            ok = sorted(o.seconds for o in mine if o.status == 200)
            rows.append(
                {
                    "scenario": self.name,
                    "kind": kind,
                    "requests": len(mine),
                    "ok": len(ok),
                    "p50_ms": round(statistics.median(ok) * 1000, 1) if ok else None,
                    "p99_ms": round(percentile(ok, 0.99) * 1000, 1) if ok else None,
                    "429": sum(o.status == 429 for o in mine),
                    "other_4xx": sum(
                        o.status is not None and 400 <= o.status < 500 and o.status != 429
                        for o in mine
                    ),
                    "5xx": sum(o.status is not None and o.status >= 500 for o in mine),
                    "no_answer": sum(o.status is None for o in mine),
                }
            )
        return rows


def percentile(sorted_values: list[float], q: float) -> float:
    n = len(sorted_values)
    return sorted_values[min(n - 1, int(round(q * (n - 1))))]


async def load(
    base: str,
    seconds: float,
    clients: int,
    flood_clients: int,
    max_requests: int,
    images: list[bytes],
    during=None,
) -> list[Outcome]:
    """Mixed clients (and flood clients) until ``seconds`` or ``max_requests`` are spent;
    ``during(t0)`` runs alongside (the kill), and then every request opens its own connection:
    a kept-alive connection dies with the process that held it, and a request written to one
    after the kill is lost before any worker could accept it (a client retries those)."""
    outcomes: list[Outcome] = []
    budget = iter(range(max_requests))
    keepalive = None if during is None else 0
    limits = httpx.Limits(
        max_connections=clients + flood_clients + 4, max_keepalive_connections=keepalive
    )
    timeout = httpx.Timeout(120.0, connect=30.0)
    async with httpx.AsyncClient(base_url=base, timeout=timeout, limits=limits) as client:
        t0 = time.perf_counter()
        deadline = t0 + seconds

        async def one(kind: str, i: int, flood: bool) -> None:
            start = time.perf_counter()
            try:
                r = await client.post(**request_for(kind, i, images))
                status, error = r.status_code, (r.text[:200] if r.status_code != 200 else "")
            except httpx.HTTPError as err:
                status, error = None, f"{type(err).__name__}: {err}"[:200]
            end = time.perf_counter()
            outcomes.append(Outcome(kind, start - t0, end - start, status, error, flood))

        async def mixed(seed: int) -> None:
            rng = random.Random(seed)
            kinds, weights = zip(*MIX, strict=True)
            for i in budget:
                if time.perf_counter() > deadline:
                    return
                await one(rng.choices(kinds, weights)[0], i, False)

        async def flooding(seed: int) -> None:
            for i in budget:
                if time.perf_counter() > deadline:
                    return
                await one(FLOOD[(i + seed) % 2], i, True)

        tasks = [mixed(k) for k in range(clients)] + [flooding(k) for k in range(flood_clients)]
        if during is not None:
            tasks.append(during(t0))
        await asyncio.gather(*tasks)
    return outcomes


# -- the server --------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``bbservice serve`` on 127.0.0.1 and a free port, from the temporary model store."""

    def __init__(self, env: dict[str, str], log: Path, start_timeout: float) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "bbservice.cli", "serve", "--port", str(self.port)]
        self.log = log.open("ab")
        self.proc = subprocess.Popen(
            command,
            cwd=ROOT,
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        start = time.monotonic()
        while not self.ready():
            if self.proc.poll() is not None or time.monotonic() - start > start_timeout:
                self.stop()
                tail = log.read_text(errors="replace")[-3000:]
                raise SystemExit(f"bench: the server did not become ready:\n{tail}")
            time.sleep(0.25)
        self.start_seconds = time.monotonic() - start

    def ready(self) -> bool:
        with contextlib.suppress(httpx.HTTPError):
            return httpx.get(f"{self.base}/readyz", timeout=2).status_code == 200
        return False

    def workers(self) -> list[int]:
        """PIDs of BentoML's serving worker processes (children running the service)."""
        import psutil

        found = []
        for child in psutil.Process(self.proc.pid).children(recursive=True):
            with contextlib.suppress(psutil.Error):
                if "_bentoml_impl.worker.service" in " ".join(child.cmdline()):
                    found.append(child.pid)
        return found

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.log.close()


# -- scenarios ---------------------------------------------------------------------------------


def warm_up(server: Server, images: list[bytes]) -> None:
    """One request of each kind first: the PyTorch models of mode=stochastic load on first use
    (or after readiness), which is start-up, not load."""
    with httpx.Client(base_url=server.base, timeout=300) as client:
        for i, kind in enumerate(KINDS):
            r = client.post(**request_for(kind, i, images))
            if r.status_code != 200:
                raise SystemExit(f"bench: warm-up {kind} answered {r.status_code}: {r.text[:300]}")


def run_load(server: Server, name: str, args, images, flood: int = 0, during=None) -> Scenario:
    outcomes = asyncio.run(
        load(server.base, args.seconds, args.clients, flood, args.max_requests, images, during)
    )
    return Scenario(name, outcomes)


def kill_scenario(server: Server, args, images) -> Scenario:
    notes: dict = {}

    async def kill(t0: float) -> None:
        await asyncio.sleep(args.seconds / 3)
        workers = server.workers()
        notes["killed_pids"] = workers
        if not workers:
            notes["error"] = "no serving worker process found"
            return
        killed_at = time.perf_counter()
        for pid in workers:
            os.kill(pid, signal.SIGKILL)
        notes["killed_at_s"] = round(killed_at - t0, 3)
        # readiness and a new worker, polled until back or the scenario's time is long over
        seen_down = False
        async with httpx.AsyncClient(timeout=2) as probe:
            while time.perf_counter() - killed_at < max(120.0, args.seconds * 2):
                try:
                    ok = (await probe.get(f"{server.base}/readyz")).status_code == 200
                except httpx.HTTPError:
                    ok = False
                seen_down = seen_down or not ok
                new = [p for p in server.workers() if p not in workers]
                if new and "new_worker_after_s" not in notes:
                    notes["new_worker_after_s"] = round(time.perf_counter() - killed_at, 2)
                    notes["new_pids"] = new
                if ok and new:
                    notes["ready_again_after_s"] = round(time.perf_counter() - killed_at, 2)
                    notes["ready_again_at_s"] = round(time.perf_counter() - t0, 3)
                    break
                await asyncio.sleep(0.1)
        notes["readyz_seen_down"] = seen_down

    scenario = run_load(server, "kill", args, images, during=kill)
    scenario.notes = notes
    return scenario


def corrupt_store_entry(home: Path) -> Path:
    """Flip bytes in the middle of the caption model's step graph inside the model store."""
    graphs = sorted((home / "models" / "bbservice-caption").glob("*/caption_step*.onnx"))
    if not graphs:
        raise SystemExit(f"bench: no caption graph in the model store under {home}")
    target = graphs[0]
    data = bytearray(target.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(b ^ 0xFF for b in data[middle : middle + 64])
    target.write_bytes(bytes(data))
    return target


# -- setup, report -----------------------------------------------------------------------------


def fill_store(args, home: Path) -> dict[str, str]:
    """Save the exports into the temporary model store (in a subprocess: BENTOML_HOME)."""
    if args.music_export and args.caption_export:
        exports = {"music": args.music_export, "caption": args.caption_export}
    else:
        sys.path.insert(0, str(ROOT / "tests"))
        from test_service import tiny_exports  # the tiny models the tests use

        exports = {k: str(v) for k, v in tiny_exports().items()}
    code = (
        "import json, sys; from pathlib import Path; from export.onnx_export import save_to_store\n"
        "tags = {k: save_to_store(k, Path(f), json.loads((Path(f) / 'manifest.json').read_text()))"
        " for k, f in json.loads(sys.argv[1]).items()}\nprint(json.dumps(tags))\n"
    )
    env = dict(os.environ, BENTOML_HOME=str(home), BENTOML_DO_NOT_TRACK="True")
    proc = subprocess.run(
        [sys.executable, "-c", code, json.dumps(exports)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if proc.returncode != 0:
        raise SystemExit(f"bench: could not fill the model store:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def print_table(rows: list[dict]) -> None:
    cols = [
        "scenario",
        "kind",
        "requests",
        "ok",
        "p50_ms",
        "p99_ms",
        "429",
        "other_4xx",
        "5xx",
        "no_answer",
    ]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for row in rows:
        print("| " + " | ".join("-" if row[c] is None else str(row[c]) for c in cols) + " |")


def judge(scenarios: dict[str, Scenario]) -> dict:
    """The goals: no 5xx of the server's own fault, every accepted request answered, and the
    mean-caption p99 under the flood at most 3x its p99 without."""
    faults, unanswered, in_flight, outage = 0, 0, 0, 0
    for name, sc in scenarios.items():
        killed = sc.notes.get("killed_at_s")
        back = sc.notes.get("ready_again_at_s", float("inf"))
        for o in sc.outcomes:
            if name == "corrupt" and o.kind.startswith("caption") and o.status == 503:
                continue  # the documented refusal of the corrupted model
            if o.status is not None and o.status >= 500:
                faults += 1
            if o.status is None:
                if killed is not None and o.start <= killed <= o.start + o.seconds:
                    in_flight += 1  # on the killed worker: excepted by the goal
                else:
                    unanswered += 1
                    outage += killed is not None and killed < o.start <= back

    def p99(name: str) -> float | None:
        ok = sorted(
            o.seconds for o in scenarios[name].outcomes if o.kind == "caption" and o.status == 200
        )
        return percentile(ok, 0.99) if ok else None

    base, flood = p99("mixed"), p99("flood")
    ratio = round(flood / base, 2) if base and flood else None
    return {
        "server_5xx": faults,
        "unanswered": unanswered,
        "unanswered_sent_during_the_outage": outage,
        "in_flight_on_the_killed_worker": in_flight,
        "mean_caption_p99_flood_over_mixed": ratio,
        "passed": faults == 0 and unanswered == 0 and ratio is not None and ratio <= 3.0,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10 s per scenario")
    parser.add_argument("--seconds", type=float, default=None, help="per scenario (default 60)")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--flood-clients", type=int, default=32)
    parser.add_argument("--max-requests", type=int, default=200_000, help="per scenario")
    parser.add_argument("--music-export", default=None)
    parser.add_argument("--caption-export", default=None)
    parser.add_argument("--start-timeout", type=float, default=240.0)
    parser.add_argument("--out", default="bench-faults.json", help="JSON results")
    args = parser.parse_args(argv)
    args.seconds = args.seconds or (10.0 if args.quick else 60.0)
    if args.seconds <= 0 or args.clients < 1 or args.flood_clients < 0 or args.max_requests < 1:
        parser.error("--seconds, --clients and --max-requests must be positive")
    if bool(args.music_export) != bool(args.caption_export):
        parser.error("give both --music-export and --caption-export, or neither")

    tmp = Path(tempfile.mkdtemp(prefix="bench-faults-"))
    home = tmp / "bentoml"
    log = tmp / "server.log"
    tags = fill_store(args, home)
    env = {k: v for k, v in os.environ.items() if not k.startswith("BBSERVICE_")}
    env.update(BENTOML_HOME=str(home), BENTOML_DO_NOT_TRACK="True", BBSERVICE_DEVICE="cpu")
    images = [scene_png(s) for s in range(8)]
    scenarios: dict[str, Scenario] = {}
    info: dict = {
        "models": tags,
        "seconds": args.seconds,
        "clients": args.clients,
        "flood_clients": args.flood_clients,
        "cpus": os.cpu_count(),
    }
    print(
        f"bench_faults: {args.clients} clients x {args.seconds:g} s per scenario "
        f"(+{args.flood_clients} flood clients); models {tags}; log {log}",
        flush=True,
    )

    server = Server(env, log, args.start_timeout)
    try:
        info["start_seconds"] = round(server.start_seconds, 1)
        warm_up(server, images)
        for name, flood in (("mixed", 0), ("flood", args.flood_clients)):
            scenarios[name] = run_load(server, name, args, images, flood=flood)
            print(f"  {name}: {len(scenarios[name].outcomes)} requests", flush=True)
        scenarios["kill"] = kill_scenario(server, args, images)
        print(f"  kill: {scenarios['kill'].notes}", flush=True)
    finally:
        server.stop()

    target = corrupt_store_entry(home)
    server = Server(dict(env, BBSERVICE_READY="any"), log, args.start_timeout)
    try:
        models = httpx.post(f"{server.base}/models", timeout=30).json()
        caption = models["models"]["caption"]
        r = httpx.post(
            f"{server.base}/caption", timeout=30, files={"image": ("a.png", images[0], "image/png")}
        )
        scenarios["corrupt"] = run_load(server, "corrupt", args, images)
        scenarios["corrupt"].notes = {
            "corrupted": str(target.relative_to(home)),
            "caption_state": caption["state"],
            "caption_error": caption["error"],
            "caption_answer": [r.status_code, r.json().get("error")],
            "music_state": models["models"]["music"]["state"],
            "readyz": httpx.get(f"{server.base}/readyz", timeout=5).status_code,
            "livez": httpx.get(f"{server.base}/livez", timeout=5).status_code,
        }
        print(f"  corrupt: {scenarios['corrupt'].notes}", flush=True)
    finally:
        server.stop()

    rows = [row for sc in scenarios.values() for row in sc.rows()]
    print()
    print_table(rows)
    verdict = judge(scenarios)
    print(f"\nkill: {json.dumps(scenarios['kill'].notes)}")
    print(f"goals: {json.dumps(verdict)}")
    result = {
        "info": info,
        "rows": rows,
        "notes": {k: sc.notes for k, sc in scenarios.items()},
        "goals": verdict,
        "first_errors": {
            k: sorted(
                {
                    f"{o.kind} {o.status} {o.error}"
                    for o in sc.outcomes
                    if o.status not in (200, 429)
                }
            )[:10]
            for k, sc in scenarios.items()
        },
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0 if verdict["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())

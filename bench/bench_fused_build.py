"""Cold build and warm load time of the fused kernels (bbservice/fused/build.py).

Builds ``kernels.cpp`` into an empty temporary cache (what a fresh machine or CI pays once),
then loads the cached library in a new process (what every later process pays).

    python bench/bench_fused_build.py
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import tempfile
import time

LOAD = "from bbservice.fused import build; assert build.load() is not None"


def run(cache: str) -> tuple[float, float]:
    """(wall s, CPU s of the children) of one process that loads the kernels."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    env = {**os.environ, "BBSERVICE_CACHE": cache}
    subprocess.run([sys.executable, "-c", LOAD], check=True, env=env)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    with tempfile.TemporaryDirectory() as cache:
        cold_wall, cold_cpu = run(cache)
        warm_wall, warm_cpu = run(cache)
    print(f"cold (compile + load): {cold_wall:6.1f} s wall, {cold_cpu:6.1f} s CPU")
    print(f"warm (cached library): {warm_wall:6.1f} s wall, {warm_cpu:6.1f} s CPU")
    print("(both include starting Python and importing torch)")


if __name__ == "__main__":
    main()

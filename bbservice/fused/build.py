"""Build (once) and load the fused CPU kernels of ``kernels.cpp``.

The source includes no torch headers, so one ``g++ -O3 -fopenmp`` call builds it in a few
seconds; the shared library is cached under ``$BBSERVICE_CACHE`` (default
``~/.cache/bbservice/fused``), keyed by a hash of the source, the flags and the compiler, and
later processes load it in milliseconds. Without a compiler (or if the build fails) the cells
run eager and one line of warning says why.

The library is linked against ``libgomp.so.1``; torch's own copy is already loaded in the
process, so both share one OpenMP runtime and thread pool.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

SOURCE = Path(__file__).with_name("kernels.cpp")
_lock = threading.Lock()
_state: dict[str, object] = {}


def cache_dir() -> Path:
    root = os.environ.get("BBSERVICE_CACHE") or Path.home() / ".cache" / "bbservice"
    return Path(root) / "fused"


def compiler() -> str | None:
    """The C++ compiler to use: ``$CXX``, else ``g++`` or ``c++`` on the PATH."""
    for name in (os.environ.get("CXX"), "g++", "c++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _flags() -> list[str]:
    import torch

    flags = ["-O3", "-std=c++17", "-shared", "-fPIC", "-fopenmp"]
    flags += ["-fno-math-errno", "-fno-trapping-math"]  # lets loops with sqrt/floor vectorise
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        flags.append("-march=x86-64-v3")  # AVX2 + FMA: 8 floats per instruction
    return flags


def library_path(cxx: str) -> Path:
    """Where the library built by ``cxx`` from the current source and flags lives."""
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256()
    for part in (SOURCE.read_bytes(), " ".join(_flags()).encode(), version.encode()):
        key.update(part)
    return cache_dir() / f"bbfused_{key.hexdigest()[:16]}.so"


def build(cxx: str, target: Path) -> None:
    """Compile ``kernels.cpp`` to ``target`` (atomically: a temp file, then a rename)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=target.parent, suffix=".so", delete=False) as tmp:
        tmp_path = Path(tmp.name)
    try:
        cmd = [cxx, *_flags(), str(SOURCE), "-o", str(tmp_path)]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{result.stderr[-2000:]}")
        os.replace(tmp_path, target)
    finally:
        tmp_path.unlink(missing_ok=True)


def load() -> ctypes.CDLL | None:
    """The kernels' library (built on first use), or ``None`` with a one-line warning."""
    with _lock:
        if "lib" in _state:
            return _state["lib"]  # type: ignore[return-value]
        lib, why = None, None
        cxx = compiler()
        if cxx is None:
            why = "no C++ compiler (g++/c++) found"
        else:
            try:
                path = library_path(cxx)
                if not path.exists():
                    build(cxx, path)
                lib = ctypes.CDLL(str(path))
            except (OSError, RuntimeError) as err:
                why = f"building {SOURCE.name} failed ({str(err).splitlines()[0][:200]})"
        if lib is None:
            warnings.warn(
                f"bbservice: fused gate kernels unavailable, running eager: {why}", stacklevel=3
            )
        _state["lib"], _state["why"] = lib, why
        return lib


def unavailable_reason() -> str | None:
    """Why :func:`load` gave ``None`` (the text of its warning); ``None`` when the kernels
    loaded or :func:`load` has not run yet."""
    return _state.get("why")  # type: ignore[return-value]

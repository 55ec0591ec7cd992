"""``bbservice serve``: the BentoML service over HTTP (``bentoml serve`` of ``BBService``).

The process becomes ``bentoml serve`` (signals such as Ctrl-C reach it directly). Models come
from the BentoML model store (``bbservice export music|caption ...`` puts them there) unless
``--music-export`` / ``--caption-export`` name export folders; ``--bento TAG`` serves a built
bento instead of the source. ``GET /readyz`` turns 200 once the served models pass a warm-up
inference (``BBSERVICE_READY``).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path

from bbservice.errors import ConfigError

SERVICE = "bbservice.service:BBService"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=3000, help="port (default 3000)")
    parser.add_argument(
        "--music-export", metavar="DIR", help="music export folder instead of the model store"
    )
    parser.add_argument(
        "--caption-export", metavar="DIR", help="caption export folder instead of the model store"
    )
    parser.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default=None,
        help="ONNX Runtime device (default: auto = CUDA when onnxruntime-gpu offers it)",
    )
    parser.add_argument(
        "--precision", choices=("fp32", "fp16", "int8"), default=None, help="graph variant"
    )
    parser.add_argument(
        "--bento", metavar="TAG", default=None, help="serve a built bento (e.g. bbservice:latest)"
    )


def build_command(args: argparse.Namespace) -> tuple[list[str], dict[str, str]]:
    """The ``bentoml serve`` command line and its environment (checked, not run)."""
    if not 1 <= args.port <= 65535:
        raise ConfigError(f"--port must be in 1..65535, got {args.port}")
    if importlib.util.find_spec("bentoml") is None:
        raise ConfigError("serving needs BentoML: pip install 'bbservice[serve]'")
    env = dict(os.environ)
    env.setdefault("BENTOML_DO_NOT_TRACK", "True")
    for kind in ("music", "caption"):
        folder = getattr(args, f"{kind}_export")
        if folder:
            if not (Path(folder) / "manifest.json").is_file():
                raise ConfigError(f"--{kind}-export '{folder}' is not an export folder")
            env[f"BBSERVICE_{kind.upper()}_EXPORT"] = str(Path(folder).resolve())
    if args.device:
        env["BBSERVICE_DEVICE"] = args.device
    if args.precision:
        env["BBSERVICE_PRECISION"] = args.precision
    target = args.bento or SERVICE
    command = [sys.executable, "-m", "bentoml", "serve", target]
    command += ["--host", args.host, "--port", str(args.port)]
    return command, env


def run(args: argparse.Namespace) -> int:
    command, env = build_command(args)
    print(
        f"bbservice: serving on http://{args.host}:{args.port} "
        "(ready when GET /readyz answers 200; API docs at /)",
        file=sys.stderr,
        flush=True,
    )
    os.execve(command[0], command, env)
    return 0  # pragma: no cover - execve does not return

"""``bbservice sweep SWEEP.toml``: data sets × gate families × seeds, N jobs at a time.

A sweep file (``configs/sweeps/*.toml``)::

    name = "music_lstm_bbeta5"                 # results go to ROOT/results/NAME/
    config = "../music/{dataset}_{family}.toml"  # one checked-in config per row (relative to
    datasets = ["jsb", "nottingham"]             # this file)
    families = ["lstm", "bbeta5"]
    seeds = [1, 2, 3]
    mc_samples = 10        # Monte-Carlo passes of the test evaluation (stochastic families)
    baseline = "lstm"      # the paired difference treatment − baseline per seed
    treatment = "bbeta5"

Every job is ``bbservice train music --config ROW.toml --seed S --out ROOT/NAME`` then
``bbservice eval music --checkpoint ROOT/NAME --samples S --json ROOT/NAME/eval.json``, in a
subprocess with one thread (``OMP_NUM_THREADS=1``: torch's intra-op pool follows it), its
output in ``ROOT/NAME/train.log`` / ``eval.log``. Run names are ``DATASET_FAMILY_sSEED``, so
two sweeps that share rows share their runs. Resumable: a run with ``eval.json`` is done and
skipped; one whose training finished (``summary.json``) is only evaluated; every other run is
trained with ``--resume-if-present``: one with a ``last/`` checkpoint (or a checkpoint swap cut
short by a kill) continues after its last finished epoch, anything else starts fresh. A finished
run that trained to its epoch cap is extended when the row's config now allows more epochs: it
resumes from ``last/`` to the new cap (or an early stop) and is evaluated again. The root is
``--root``, else ``$BBSERVICE_RUNS``, else ``~/bbservice-runs`` (outside the work tree).

At the end (and with ``--report-only`` without training) the results table and the curves
picture are written from the finished runs (:mod:`training.run_compare`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from pathlib import Path

from bbservice.errors import ConfigError, DataError
from bbservice.gates import GATE_FAMILIES, GateConfig, make_gate
from training import run_compare, run_config
from training.train_music import MusicTrainConfig

log = logging.getLogger(__name__)

RUNS_ENV = "BBSERVICE_RUNS"
DEFAULT_ROOT = "~/bbservice-runs"


@dataclass(frozen=True)
class SweepSpec:
    """A parsed sweep file (see the module docstring)."""

    name: str
    config: str
    datasets: tuple[str, ...]
    families: tuple[str, ...]
    seeds: tuple[int, ...]
    mc_samples: int = 10
    split: str = "test"
    baseline: str = "lstm"
    treatment: str = "bbeta5"
    base_dir: Path = Path(".")

    def config_path(self, dataset: str, family: str) -> Path:
        return (self.base_dir / self.config.format(dataset=dataset, family=family)).resolve()

    def jobs(self, root: Path) -> list[Job]:
        return [
            Job(
                name=f"{dataset}_{family}_s{seed}",
                config=self.config_path(dataset, family),
                family=family,
                seed=seed,
                run_dir=root / f"{dataset}_{family}_s{seed}",
            )
            for seed in self.seeds  # seed-major: the first seed of every row finishes first
            for dataset in self.datasets
            for family in self.families
        ]


_LISTS = {"datasets": str, "families": str, "seeds": int}


def load_spec(path: str | Path) -> SweepSpec:
    """Read and check a sweep file: keys, types, families, and that every row config exists."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise ConfigError(f"sweep file '{path}': {err}") from err
    known = [f.name for f in fields(SweepSpec) if f.name != "base_dir"]
    for key in data:
        if key not in known:
            raise ConfigError(f"unknown key '{key}' in {path}; valid keys: {', '.join(known)}")
    for key in ("name", "config", *_LISTS):
        if key not in data:
            raise ConfigError(f"sweep file '{path}' needs '{key}'")
    for key, kind in _LISTS.items():
        value = data[key]
        if not isinstance(value, list) or not value or not all(type(v) is kind for v in value):
            raise ConfigError(f"'{key}' in {path} must be a non-empty list of {kind.__name__}")
        data[key] = tuple(value)
    for key in ("name", "config", "split", "baseline", "treatment"):
        if key in data and not isinstance(data[key], str):
            raise ConfigError(f"'{key}' in {path} must be a string")
    if type(data.get("mc_samples", 0)) is not int or data.get("mc_samples", 0) < 0:
        raise ConfigError(f"'mc_samples' in {path} must be an integer >= 0")
    bad = [f for f in data["families"] if f not in GATE_FAMILIES]
    if bad:
        raise ConfigError(f"unknown families {bad} in {path}; choose from {GATE_FAMILIES}")
    spec = SweepSpec(**data, base_dir=path.resolve().parent)
    missing = [
        str(spec.config_path(d, f))
        for d in spec.datasets
        for f in spec.families
        if not spec.config_path(d, f).is_file()
    ]
    if missing:
        raise ConfigError(f"sweep '{path}': config files missing: {', '.join(missing)}")
    return spec


@dataclass(frozen=True)
class Job:
    """One training run of a sweep and its evaluation."""

    name: str
    config: Path
    family: str
    seed: int
    run_dir: Path

    @property
    def eval_json(self) -> Path:
        return self.run_dir / run_compare.EVAL_FILE

    def status(self) -> str:
        """``extend`` (finished at an epoch cap that the row's config now raises), ``done``
        (evaluated), ``trained`` (evaluate only), ``resume`` or ``new``."""
        if self.epochs_to_extend() is not None:
            return "extend"
        if self.eval_json.is_file():
            return "done"
        if (self.run_dir / "summary.json").is_file() and (self.run_dir / "best").is_dir():
            return "trained"
        if any((self.run_dir / d / "trainer.pt").is_file() for d in ("last", ".last.old")):
            return "resume"  # .last.old: a kill cut the swap of last/; training recovers it
        return "new"

    def epochs_to_extend(self) -> tuple[int, int] | None:
        """``(ran, wanted)`` when the finished run trained to its epoch cap (``ran`` epochs, no
        early stop) and the row's config now asks for ``wanted`` > ``ran``: training it again
        with ``--resume-if-present`` continues from ``last/`` (exact resume), so raising
        ``epochs`` in a protocol file extends the runs instead of starting them again."""
        summary, saved = self.run_dir / "summary.json", self.run_dir / "last" / "config.json"
        if not (summary.is_file() and saved.is_file()):
            return None
        try:
            config = json.loads(saved.read_text())
            train, ran = config["train"], config["metrics"]["epoch"]
            best = json.loads(summary.read_text())["best_epoch"]
        except (OSError, ValueError, KeyError, TypeError):
            return None  # not a run this sweep wrote: left alone
        if run_compare.stopped_early(train, ran, best):
            return None  # nothing to extend
        wanted = run_config.read_toml(self.config).get("epochs", MusicTrainConfig.epochs)
        if type(wanted) is not int:
            raise ConfigError(f"'epochs' in {self.config} must be an integer, got {wanted!r}")
        return (ran, wanted) if wanted > ran else None

    def train_argv(self) -> list[str]:
        argv = ["train", "music", "--config", str(self.config), "--seed", str(self.seed)]
        return [*argv, "--out", str(self.run_dir), "--resume-if-present"]

    def eval_argv(self, mc_samples: int, split: str = "test") -> list[str]:
        stochastic = make_gate(GateConfig(family=self.family)).stochastic
        samples = mc_samples if stochastic else 0  # deterministic gates: MC = mean gates
        return [
            "eval", "music", "--checkpoint", str(self.run_dir), "--split", split,
            "--samples", str(samples), "--seed", "0", "--json", str(self.eval_json),
        ]  # fmt: skip


# A runner executes one ``bbservice`` command line, its output appended to ``log``; returns
# the exit status.
Runner = Callable[[Sequence[str], Path], int]


def subprocess_runner(threads: int = 1) -> Runner:
    """Each command in its own ``python -m bbservice.cli`` process with ``threads`` threads."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
    }  # the log is not a terminal: no progress bars, one line per epoch

    def run(argv: Sequence[str], log_path: Path) -> int:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("a") as fh:
            fh.write(f"$ bbservice {' '.join(argv)}\n")
            fh.flush()
            cmd = [sys.executable, "-m", "bbservice.cli", *argv]
            return subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env).returncode

    return run


def run_job(job: Job, runner: Runner, mc_samples: int, split: str = "test") -> str:
    """Train (or resume) and evaluate one job; returns its final status or ``failed``."""
    status = job.status()
    if status == "done":
        return "done"
    started = time.perf_counter()
    job.run_dir.mkdir(parents=True, exist_ok=True)
    if status == "extend":
        log.info("extend %s: %d -> %d epochs (resuming)", job.name, *job.epochs_to_extend())
        # Without its summary and evaluation the run reads as killed ("resume") until the
        # longer training and its evaluation finish, so a kill now loses nothing.
        job.eval_json.unlink(missing_ok=True)
        (job.run_dir / "summary.json").unlink()
        status = "resume"
    if status in ("new", "resume"):
        log.info("start %s%s", job.name, " (resuming)" if status == "resume" else "")
        if runner(job.train_argv(), job.run_dir / "train.log") != 0:
            log.error("FAILED training %s (see %s)", job.name, job.run_dir / "train.log")
            return "failed"
    if runner(job.eval_argv(mc_samples, split), job.run_dir / "eval.log") != 0 or (
        not job.eval_json.is_file()
    ):
        log.error("FAILED evaluating %s (see %s)", job.name, job.run_dir / "eval.log")
        return "failed"
    log.info("done %s (%.1f min)", job.name, (time.perf_counter() - started) / 60)
    return "done"


def run_sweep(
    spec: SweepSpec,
    root: Path,
    jobs: int = 2,
    runner: Runner | None = None,
    report_only: bool = False,
) -> dict[str, str]:
    """Run every job not yet done (``jobs`` at a time), then write the report.

    Returns the final status of every job by name. The report covers the sweep's finished
    runs: ``ROOT/results/NAME/results.md`` and ``curves.png``.
    """
    if jobs < 1:
        raise ConfigError("--jobs must be >= 1")
    runner = runner or subprocess_runner()
    todo = spec.jobs(root)
    statuses = {job.name: job.status() for job in todo}
    if not report_only:
        lock = threading.Lock()

        def work(job: Job) -> None:
            result = run_job(job, runner, spec.mc_samples, spec.split)
            with lock:
                statuses[job.name] = result

        pending = [job for job in todo if statuses[job.name] != "done"]
        log.info(
            "sweep %s: %d runs, %d done, %d to run, %d at a time, in %s",
            spec.name, len(todo), len(todo) - len(pending), len(pending), jobs, root,
        )  # fmt: skip
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            list(pool.map(work, pending))
    finished = [run_compare.read_run(job.run_dir) for job in todo if job.eval_json.is_file()]
    if finished:
        out = root / "results" / spec.name
        table = run_compare.write_report(
            finished, out, spec.baseline, spec.treatment, spec.mc_samples
        )
        print(table, end="")
        print(f"wrote {out / 'results.md'} and {out / 'curves.png'}")
    else:
        log.warning("sweep %s: no finished runs to report yet", spec.name)
    return statuses


def default_root() -> Path:
    return Path(os.environ.get(RUNS_ENV) or DEFAULT_ROOT).expanduser()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sweep", help="sweep file (configs/sweeps/*.toml)")
    parser.add_argument(
        "--root",
        default=None,
        help=f"folder of the run folders (default: ${RUNS_ENV} or {DEFAULT_ROOT})",
    )
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument(
        "--report-only", action="store_true", help="only write the table and the picture"
    )
    parser.add_argument("--dry-run", action="store_true", help="list the jobs and their status")


def run(args: argparse.Namespace) -> int:
    spec = load_spec(args.sweep)
    root = Path(args.root).expanduser() if args.root else default_root()
    if args.dry_run:
        for job in spec.jobs(root):
            print(f"{job.status():8s} {job.name}: bbservice {' '.join(job.train_argv())}")
        return 0
    if args.threads < 1:
        raise ConfigError("--threads must be >= 1")
    statuses = run_sweep(spec, root, args.jobs, subprocess_runner(args.threads), args.report_only)
    failed = sorted(name for name, status in statuses.items() if status == "failed")
    if failed:
        raise DataError(f"{len(failed)} run(s) failed: {', '.join(failed)} (see their logs)")
    return 0

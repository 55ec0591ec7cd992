"""``bbservice runs compare RUN_DIR...``: the results table and the validation-curve picture.

A run folder is what ``bbservice train music`` writes (``best/config.json``,
``metrics.jsonl``), optionally with the ``eval.json`` of ``bbservice eval music --json``
(the sweep runner writes it: test NLL with mean gates and Monte-Carlo gates). Runs are
grouped by (data set, gate family); each group gives mean ± standard deviation over its seeds
(sample standard deviation, n − 1), and for a baseline/treatment pair of families (default
``lstm`` / ``bbeta5``) the paired per-seed difference treatment − baseline on the seeds both
have. The picture has one panel per data set, a colour per family and a line per seed.

    bbservice runs compare ~/bbservice-runs --out results/   # a folder of runs, or run folders
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from bbservice.errors import DataError

EVAL_FILE = "eval.json"
LATE_EPOCHS = 10  # the convergence check: validation gain over a run's last 10 epochs


def stopped_early(train: dict, epochs_run: int, best_epoch: int) -> bool:
    """Whether a finished run ended by early stopping rather than at its epoch cap.

    ``train`` is the ``train`` section of the run's saved config (``epochs``, ``early_stop``):
    fewer epochs than the cap, or the cap falling on the epoch where ``early_stop`` epochs
    without a validation gain would have stopped it anyway.
    """
    early_stop = train.get("early_stop") or 0
    if epochs_run < train.get("epochs", epochs_run):
        return True
    return bool(early_stop) and epochs_run - best_epoch >= early_stop


def late_gain(curve: Sequence[tuple[int, float]], last: int = LATE_EPOCHS) -> float | None:
    """How much the best validation NLL fell over the last ``last`` epochs of ``curve``
    ((epoch, NLL) pairs): best of all epochs against best before them, ``>= 0``; ``None`` for
    a curve of ``last`` epochs or fewer. Near 0: converged; clearly above 0: still improving."""
    if len(curve) <= last:
        return None
    nlls = [nll for _, nll in sorted(curve)]
    return min(nlls[:-last]) - min(nlls)


@dataclass(frozen=True)
class RunResult:
    """What the table needs from one finished run (NLLs in nats per frame, on test)."""

    name: str
    dataset: str
    family: str
    seed: int
    nll_mean_gates: float
    nll_monte_carlo: float | None  # None: not evaluated (or a deterministic family)
    best_epoch: int
    epochs_run: int
    valid_nll: float
    train_seconds: float  # wall time of the training epochs (Σ metrics.jsonl epoch_seconds)
    curve: tuple[tuple[int, float], ...] = ()  # (epoch, validation NLL)
    stopped_early: bool | None = None  # None: the saved config does not say the epoch cap

    @property
    def late_gain(self) -> float | None:
        """Validation gain over the last ``LATE_EPOCHS`` epochs (see :func:`late_gain`)."""
        return late_gain(self.curve)

    @property
    def nll_best_estimate(self) -> float:
        """Monte-Carlo NLL where there is one, else mean gates (deterministic families)."""
        return self.nll_monte_carlo if self.nll_monte_carlo is not None else self.nll_mean_gates


@dataclass(frozen=True)
class Stat:
    """Mean and sample standard deviation (``None`` for a single value) of ``n`` values."""

    mean: float
    std: float | None
    n: int

    def format(self, digits: int = 3, signed: bool = False) -> str:
        mean = f"{self.mean:{'+' if signed else ''}.{digits}f}"
        return mean if self.std is None else f"{mean} ± {self.std:.{digits}f}"


def mean_std(values: Iterable[float]) -> Stat:
    values = list(values)
    if not values:
        raise ValueError("mean_std of no values")
    std = statistics.stdev(values) if len(values) > 1 else None
    return Stat(statistics.fmean(values), std, len(values))


@dataclass(frozen=True)
class GroupRow:
    """One (data set, family) row: statistics over seeds."""

    dataset: str
    family: str
    seeds: tuple[int, ...]
    nll_mean_gates: Stat
    nll_monte_carlo: Stat | None
    best_epoch: Stat
    epochs_run: Stat
    train_minutes: Stat
    stopped_early: int = 0  # how many of the seeds' runs ended by early stopping
    late_gain: Stat | None = None  # None: a run too short (or not saying) to tell


@dataclass(frozen=True)
class PairRow:
    """Per-seed differences treatment − baseline on one data set (negative: treatment better)."""

    dataset: str
    seeds: tuple[int, ...]
    mean_gates: tuple[float, ...]
    best_estimate: tuple[float, ...]  # MC where a family has it, else mean gates

    @property
    def mean_gates_stat(self) -> Stat:
        return mean_std(self.mean_gates)

    @property
    def best_estimate_stat(self) -> Stat:
        return mean_std(self.best_estimate)


def summarise(runs: Sequence[RunResult]) -> list[GroupRow]:
    """Rows by (data set, family), seeds in order; a family's MC only if every seed has one."""
    groups: dict[tuple[str, str], list[RunResult]] = defaultdict(list)
    for run in runs:
        groups[(run.dataset, run.family)].append(run)
    rows = []
    for (dataset, family), members in sorted(groups.items()):
        members.sort(key=lambda r: r.seed)
        seeds = tuple(r.seed for r in members)
        if len(set(seeds)) != len(seeds):
            names = [r.name for r in members]
            raise DataError(f"{dataset} {family}: the same seed twice among runs {names}")
        mcs = [r.nll_monte_carlo for r in members]
        gains = [r.late_gain for r in members]
        rows.append(
            GroupRow(
                dataset=dataset,
                family=family,
                seeds=seeds,
                nll_mean_gates=mean_std(r.nll_mean_gates for r in members),
                nll_monte_carlo=None if None in mcs else mean_std(mcs),
                best_epoch=mean_std(r.best_epoch for r in members),
                epochs_run=mean_std(r.epochs_run for r in members),
                train_minutes=mean_std(r.train_seconds / 60 for r in members),
                stopped_early=sum(bool(r.stopped_early) for r in members),
                late_gain=None if None in gains else mean_std(gains),
            )
        )
    return rows


def paired_differences(
    runs: Sequence[RunResult], baseline: str = "lstm", treatment: str = "bbeta5"
) -> list[PairRow]:
    """treatment − baseline per seed, on every data set where both have a common seed."""
    by_key = {(r.dataset, r.family, r.seed): r for r in runs}
    rows = []
    for dataset in sorted({r.dataset for r in runs}):
        seeds = sorted(
            s
            for (d, f, s) in by_key
            if d == dataset and f == treatment and (dataset, baseline, s) in by_key
        )
        if not seeds:
            continue
        pairs = [(by_key[(dataset, treatment, s)], by_key[(dataset, baseline, s)]) for s in seeds]
        rows.append(
            PairRow(
                dataset=dataset,
                seeds=tuple(seeds),
                mean_gates=tuple(t.nll_mean_gates - b.nll_mean_gates for t, b in pairs),
                best_estimate=tuple(t.nll_best_estimate - b.nll_best_estimate for t, b in pairs),
            )
        )
    return rows


def format_table(
    rows: Sequence[GroupRow],
    pairs: Sequence[PairRow] = (),
    baseline: str = "lstm",
    treatment: str = "bbeta5",
    mc_samples: int | None = None,
) -> str:
    """The markdown results: one row per (data set, family), then the paired differences."""
    mc_head = f"test NLL (MC, S={mc_samples})" if mc_samples else "test NLL (MC)"
    lines = [
        f"| data | gates | seeds | test NLL (mean gates) | {mc_head} | best epoch | epochs run "
        f"| early-stopped | valid gain, last {LATE_EPOCHS} epochs | train time (min) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        mc = r.nll_monte_carlo.format() if r.nll_monte_carlo else "—"
        gain = r.late_gain.format() if r.late_gain else "—"
        lines.append(
            f"| {r.dataset} | {r.family} | {', '.join(map(str, r.seeds))} | "
            f"**{r.nll_mean_gates.format()}** | {mc} | {r.best_epoch.format(1)} | "
            f"{r.epochs_run.format(1)} | {r.stopped_early}/{len(r.seeds)} | {gain} | "
            f"{r.train_minutes.format(1)} |"
        )
    lines.append("")
    lines.append("Mean ± sample standard deviation over seeds; NLL in nats per frame on test.")
    lines.append(
        "Early-stopped: runs that ended by early stopping, not at the epoch cap. Valid gain: "
        f"how much the best validation NLL fell over a run's last {LATE_EPOCHS} epochs "
        "(near 0: converged)."
    )
    if pairs:
        lines += [
            "",
            f"Paired by seed, `{treatment}` − `{baseline}` (negative: `{treatment}` better):",
            "",
            "| data | seeds | per seed (mean gates) | mean ± std | per seed (MC where a family "
            "has it) | mean ± std |",
            "|---|---|---|---|---|---|",
        ]
        for p in pairs:
            lines.append(
                f"| {p.dataset} | {', '.join(map(str, p.seeds))} | "
                f"{', '.join(f'{d:+.3f}' for d in p.mean_gates)} | "
                f"**{p.mean_gates_stat.format(signed=True)}** | "
                f"{', '.join(f'{d:+.3f}' for d in p.best_estimate)} | "
                f"**{p.best_estimate_stat.format(signed=True)}** |"
            )
    return "\n".join(lines) + "\n"


def plot_curves(runs: Sequence[RunResult], path: Path) -> None:
    """Validation NLL against epoch: a panel per data set, a colour per family, a line per seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = sorted({r.dataset for r in runs})
    families = sorted({r.family for r in runs})
    colours = {f: plt.get_cmap("tab10")(i % 10) for i, f in enumerate(families)}
    fig, axes = plt.subplots(
        1, max(len(datasets), 1), figsize=(5 * max(len(datasets), 1), 4), dpi=100, squeeze=False
    )
    for ax, dataset in zip(axes[0], datasets, strict=False):
        labelled = set()
        for run in sorted((r for r in runs if r.dataset == dataset), key=lambda r: r.name):
            if not run.curve:
                continue
            epochs, values = zip(*run.curve, strict=True)
            label = None if run.family in labelled else run.family
            labelled.add(run.family)
            ax.plot(epochs, values, color=colours[run.family], lw=1, alpha=0.8, label=label)
        ax.set_title(dataset)
        ax.set_xlabel("epoch")
        ax.set_ylabel("validation NLL")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


# -- reading run folders ------------------------------------------------------------------------


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise DataError(f"cannot read '{path}': {err}") from err


def family_label(model: dict) -> str:
    """The gate family, with the prior's λ where there is one (``bbeta5+kl1``)."""
    gate = model["gate"]
    kl = gate.get("kl_weight") or 0
    return gate["family"] + (f"+kl{kl:g}" if kl else "")


def read_run(run_dir: str | Path) -> RunResult:
    """A finished run folder (``best/config.json`` with its final metrics)."""
    run_dir = Path(run_dir)
    config = _read_json(run_dir / "best" / "config.json")
    metrics = config.get("metrics", {})
    if "test_nll" not in metrics and not (run_dir / EVAL_FILE).exists():
        raise DataError(f"run '{run_dir}' has not finished (no test NLL and no {EVAL_FILE})")
    records = []
    if (run_dir / "metrics.jsonl").exists():
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        records = [json.loads(line) for line in lines if line.strip()]
    mc = None
    if (run_dir / EVAL_FILE).exists():
        evaluation = _read_json(run_dir / EVAL_FILE)
        nll, mc = evaluation["nll_mean_gates"], evaluation.get("nll_monte_carlo")
    else:
        nll = metrics["test_nll"]
    best_epoch = int(metrics.get("best_epoch", metrics.get("epoch", 0)))
    # last/ holds the config of the final epoch: the cap the run really trained under
    last = run_dir / "last" / "config.json"
    train = (_read_json(last) if last.is_file() else config).get("train", {})
    return RunResult(
        name=run_dir.name,
        dataset=config.get("data", {}).get("name", config["train"]["data"]),
        family=family_label(config["model"]),
        seed=int(config["train"]["seed"]),
        nll_mean_gates=float(nll),
        nll_monte_carlo=None if mc is None else float(mc),
        best_epoch=best_epoch,
        epochs_run=len(records),
        valid_nll=float(metrics["valid_nll"]),
        train_seconds=float(sum(r.get("epoch_seconds", 0.0) for r in records)),
        curve=tuple(
            (int(r["epoch"]), float(r["valid_nll"]))
            for r in records
            if r.get("valid_nll") is not None and math.isfinite(r["valid_nll"])
        ),
        stopped_early=stopped_early(train, len(records), best_epoch) if "epochs" in train else None,
    )


def is_run(path: Path) -> bool:
    return (path / "best" / "config.json").is_file()


def find_runs(paths: Iterable[str | Path]) -> list[Path]:
    """Run folders among ``paths`` and their direct children."""
    found = []
    for path in map(Path, paths):
        if is_run(path):
            found.append(path)
        elif path.is_dir():
            found += sorted(p for p in path.iterdir() if is_run(p))
        else:
            raise DataError(f"'{path}' is neither a run folder nor a folder of runs")
    return found


def write_report(
    runs: Sequence[RunResult],
    out: Path,
    baseline: str = "lstm",
    treatment: str = "bbeta5",
    mc_samples: int | None = None,
) -> str:
    """``out/results.md`` and ``out/curves.png``; returns the markdown."""
    if not runs:
        raise DataError("no finished runs to compare")
    table = format_table(
        summarise(runs), paired_differences(runs, baseline, treatment), baseline, treatment,
        mc_samples,
    )  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(table)
    plot_curves(runs, out / "curves.png")
    return table


# -- command line -------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", help="run folders, or folders holding run folders")
    parser.add_argument("--out", default="compare", help="where results.md and curves.png go")
    parser.add_argument("--baseline", default="lstm", help="family of the paired difference")
    parser.add_argument("--treatment", default="bbeta5", help="family compared to the baseline")


def run(args: argparse.Namespace) -> int:
    results = []
    for path in find_runs(args.runs):
        try:
            results.append(read_run(path))
        except DataError as err:
            print(f"skipping: {err}")
    print(write_report(results, Path(args.out), args.baseline, args.treatment), end="")
    print(f"wrote {Path(args.out) / 'results.md'} and {Path(args.out) / 'curves.png'}")
    return 0

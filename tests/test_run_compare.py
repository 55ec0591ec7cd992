"""Aggregation of finished runs: mean ± std over seeds, paired differences, table, picture."""

import json

import pytest

from bbservice.cli import main
from bbservice.errors import DataError
from training.run_compare import (
    RunResult,
    format_table,
    late_gain,
    mean_std,
    paired_differences,
    read_run,
    stopped_early,
    summarise,
    write_report,
)


def result(family, seed, nll, mc=None, dataset="D", best=5, seconds=120.0):
    return RunResult(
        name=f"{dataset}_{family}_s{seed}",
        dataset=dataset,
        family=family,
        seed=seed,
        nll_mean_gates=nll,
        nll_monte_carlo=mc,
        best_epoch=best,
        epochs_run=best + 2,
        valid_nll=nll,
        train_seconds=seconds,
        curve=((1, 9.0), (2, nll)),
    )


RUNS = [
    result("lstm", 1, 8.0, best=4),
    result("lstm", 2, 8.2, best=6),
    result("lstm", 3, 8.4, best=8),
    result("bbeta5", 1, 7.9, mc=7.8),
    result("bbeta5", 2, 8.3, mc=8.2),
    result("lstm", 1, 4.0, dataset="E"),
]


def test_mean_and_sample_std():
    stat = mean_std([8.0, 8.2, 8.4])
    assert stat.mean == pytest.approx(8.2) and stat.std == pytest.approx(0.2) and stat.n == 3
    assert stat.format() == "8.200 ± 0.200"
    single = mean_std([4.0])
    assert single.std is None and single.format() == "4.000"
    assert single.format(signed=True) == "+4.000" and stat.format(1, signed=True) == "+8.2 ± 0.2"
    with pytest.raises(ValueError):
        mean_std([])


def test_groups_by_data_and_family():
    rows = {(r.dataset, r.family): r for r in summarise(RUNS)}
    lstm, bbeta5 = rows[("D", "lstm")], rows[("D", "bbeta5")]
    assert lstm.seeds == (1, 2, 3) and lstm.nll_monte_carlo is None
    assert lstm.best_epoch.mean == 6 and lstm.best_epoch.std == pytest.approx(2.0)
    assert lstm.train_minutes.mean == pytest.approx(2.0)
    assert bbeta5.nll_mean_gates.mean == pytest.approx(8.1)
    assert bbeta5.nll_mean_gates.std == pytest.approx(0.2828427, abs=1e-6)
    assert bbeta5.nll_monte_carlo.mean == pytest.approx(8.0)
    with pytest.raises(DataError, match="same seed twice"):
        summarise([*RUNS, result("lstm", 2, 9.0)])


def test_paired_differences_on_common_seeds():
    (pair,) = paired_differences(RUNS, "lstm", "bbeta5")  # E has no bbeta5: no row
    assert pair.dataset == "D" and pair.seeds == (1, 2)
    assert pair.mean_gates == pytest.approx((-0.1, 0.1))
    assert pair.mean_gates_stat.mean == pytest.approx(0.0)
    assert pair.mean_gates_stat.std == pytest.approx(0.1414214, abs=1e-6)
    assert pair.best_estimate == pytest.approx((-0.2, 0.0))  # bbeta5 MC against lstm
    assert pair.best_estimate_stat.mean == pytest.approx(-0.1)


def test_report_table_and_picture(tmp_path):
    table = write_report(RUNS, tmp_path, mc_samples=10)
    assert "| D | lstm | 1, 2, 3 | **8.200 ± 0.200** | — | 6.0 ± 2.0 |" in table
    assert "| D | bbeta5 | 1, 2 | **8.100 ± 0.283** | 8.000 ± 0.283 |" in table
    assert "| E | lstm | 1 | **4.000** |" in table
    assert "| D | 1, 2 | -0.100, +0.100 | **+0.000 ± 0.141** | -0.200, +0.000 |" in table
    assert "test NLL (MC, S=10)" in table
    assert "| 0/3 | — |" in table  # the test runs' 2-epoch curves are too short to judge
    assert (tmp_path / "results.md").read_text() == table
    assert (tmp_path / "curves.png").stat().st_size > 1000


def test_stopped_early_against_the_epoch_cap():
    train = {"epochs": 50, "early_stop": 8}
    assert stopped_early(train, epochs_run=47, best_epoch=39)  # stopped before the cap
    assert stopped_early(train, epochs_run=50, best_epoch=42)  # the early stop fell on the cap
    assert not stopped_early(train, epochs_run=50, best_epoch=43)  # the cap cut it short
    assert not stopped_early({"epochs": 50, "early_stop": 0}, epochs_run=50, best_epoch=10)


def test_late_gain_says_whether_validation_still_improves():
    still_falling = [(e, 10.0 - 0.01 * e) for e in range(1, 31)]
    assert late_gain(still_falling) == pytest.approx(0.10)  # best of 1–20 against best of 1–30
    flat = [(e, max(9.0, 10.0 - 0.1 * e)) for e in range(1, 31)]
    assert late_gain(flat) == 0.0
    assert late_gain(still_falling[:10]) is None  # no epochs before the last 10
    assert late_gain(list(reversed(still_falling)), last=5) == pytest.approx(0.05)  # by epoch
    runs = [
        RunResult("a", "D", "f", 1, 8.0, None, 30, 30, 8.0, 60.0, tuple(still_falling), False),
        RunResult("b", "D", "f", 2, 8.0, None, 20, 28, 8.0, 60.0, tuple(flat), True),
    ]
    (row,) = summarise(runs)
    assert row.stopped_early == 1 and row.late_gain.mean == pytest.approx(0.05)
    assert "| 1/2 | 0.050 ± 0.071 |" in format_table([row])


def write_run(folder, family, seed, test_nll, with_eval):
    (folder / "best").mkdir(parents=True)
    config = {
        "kind": "music",
        "model": {"gate": {"family": family, "kl_weight": 0.0}},
        "train": {"seed": seed, "data": "jsb"},
        "data": {"name": "JSB_Chorales"},
        "metrics": {"best_epoch": 2, "valid_nll": 8.5, "test_nll": test_nll},
    }
    (folder / "best" / "config.json").write_text(json.dumps(config))
    lines = [{"epoch": e, "valid_nll": 9.0 - e / 10, "epoch_seconds": 30.0} for e in (1, 2, 3)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    if with_eval:
        evaluation = {"nll_mean_gates": test_nll + 0.01, "nll_monte_carlo": test_nll - 0.02}
        (folder / "eval.json").write_text(json.dumps(evaluation))


def test_read_run_and_the_compare_command(tmp_path, capsys):
    write_run(tmp_path / "runs" / "a", "lstm", 1, 8.4, with_eval=False)
    write_run(tmp_path / "runs" / "b", "bbeta5", 1, 8.3, with_eval=True)
    (tmp_path / "runs" / "not_a_run").mkdir()
    (tmp_path / "runs" / "b" / "last").mkdir()  # the final epoch's config says the cap
    last = {"train": {"epochs": 5, "early_stop": 0}, "metrics": {"epoch": 3}}
    (tmp_path / "runs" / "b" / "last" / "config.json").write_text(json.dumps(last))
    a, b = read_run(tmp_path / "runs" / "a"), read_run(tmp_path / "runs" / "b")
    assert a.stopped_early is None and b.stopped_early is True  # 3 epochs of at most 5
    assert (a.dataset, a.family, a.seed, a.nll_mean_gates, a.nll_monte_carlo) == (
        "JSB_Chorales", "lstm", 1, 8.4, None,
    )  # fmt: skip
    assert b.nll_mean_gates == pytest.approx(8.31) and b.nll_monte_carlo == pytest.approx(8.28)
    assert a.epochs_run == 3 and a.train_seconds == 90.0 and a.curve[-1] == (3, pytest.approx(8.7))
    out = tmp_path / "cmp"
    assert main(["runs", "compare", str(tmp_path / "runs"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| JSB_Chorales | 1 | -0.090 | **-0.090** | -0.120 | **-0.120** |" in printed
    assert (out / "curves.png").exists()
    assert main(["runs", "compare", str(tmp_path / "nope")]) == 2

"""The sweep runner: a tiny sweep end to end, skipping finished runs, resuming killed ones."""

import json
from pathlib import Path

import numpy as np
import pytest

from bbservice.cli import main
from bbservice.errors import ConfigError
from training import sweep

REPO = Path(__file__).resolve().parents[1]


def in_process(calls):
    """Runs each ``bbservice`` command line through the CLI in this process (no interpreter
    start-up per command: the subprocess runner is tested on its own below)."""

    def run(argv, log_path):
        calls.append(list(argv))
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("a") as fh:
            fh.write(f"$ bbservice {' '.join(argv)}\n")
        return main(list(argv))

    return run


@pytest.fixture
def tiny_sweep(tmp_path) -> Path:
    rng = np.random.default_rng(0)

    def song():
        root = int(rng.integers(48, 60))
        return [[root + k % 3 * 4, root + 12] for k in range(int(rng.integers(8, 14)))]

    data = {s: [song() for _ in range(n)] for s, n in (("train", 8), ("valid", 3), ("test", 3))}
    (tmp_path / "tiny.json").write_text(json.dumps(data))
    configs = tmp_path / "configs"
    (configs / "music").mkdir(parents=True)
    (configs / "music" / "protocol.toml").write_text(
        "layers = 1\nhidden = 6\nepochs = 2\nbatch_size = 4\nlr = 0.01\nmin_lr = 1e-4\n"
    )
    for family in ("lstm", "bbeta5"):
        row = f'extends = "protocol.toml"\ndata = "{tmp_path / "tiny.json"}"\ngate = "{family}"\n'
        (configs / "music" / f"tiny_{family}.toml").write_text(row)
    (configs / "sweep.toml").write_text(
        'name = "tiny"\nconfig = "music/{dataset}_{family}.toml"\ndatasets = ["tiny"]\n'
        'families = ["lstm", "bbeta5"]\nseeds = [1, 2]\nmc_samples = 2\n'
    )
    return configs / "sweep.toml"


def test_tiny_sweep_runs_skips_and_resumes(tiny_sweep, tmp_path, one_thread):
    spec = sweep.load_spec(tiny_sweep)
    root = tmp_path / "runs"
    killed = root / "tiny_lstm_s1"  # a run killed after its first epoch: only last/ counts
    row = str(spec.config_path("tiny", "lstm"))
    argv = ["train", "music", "--config", row, "--seed", "1", "--out", str(killed)]
    assert main([*argv, "--epochs", "1"]) == 0
    (killed / "summary.json").unlink()
    (killed / "last").rename(killed / ".last.old")  # killed between the renames of a swap
    first_epoch = (killed / "metrics.jsonl").read_text()
    assert spec.jobs(root)[0].status() == "resume"
    assert spec.jobs(root)[1].train_argv()[-1] == "--resume-if-present"  # a new run too

    calls = []
    statuses = sweep.run_sweep(spec, root, jobs=2, runner=in_process(calls))
    assert statuses == {f"tiny_{f}_s{s}": "done" for f in ("lstm", "bbeta5") for s in (1, 2)}
    assert len(calls) == 8  # 4 trainings, 4 evaluations
    assert "--resume-if-present" in (killed / "train.log").read_text()
    lines = (killed / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [1, 2] and lines[0] + "\n" == first_epoch
    lstm_eval = json.loads((killed / "eval.json").read_text())
    bbeta5_eval = json.loads((root / "tiny_bbeta5_s2" / "eval.json").read_text())
    assert "nll_monte_carlo" not in lstm_eval and bbeta5_eval["samples"] == 2
    report = root / "results" / "tiny"
    table = (report / "results.md").read_text()
    assert "| tiny | lstm | 1, 2 | **" in table and "| tiny | bbeta5 | 1, 2 | **" in table
    assert " ± " in table and "Paired by seed" in table
    assert (report / "curves.png").exists()

    again = []
    assert set(sweep.run_sweep(spec, root, runner=in_process(again)).values()) == {"done"}
    assert again == []  # everything finished: nothing runs


def test_sweep_file_errors(tiny_sweep):
    text = tiny_sweep.read_text()
    tiny_sweep.write_text(text + "epochs = 3\n")
    with pytest.raises(ConfigError, match="unknown key 'epochs'.*valid keys: name, config"):
        sweep.load_spec(tiny_sweep)
    tiny_sweep.write_text(text.replace('"bbeta5"]', '"bbeta5", "cifg"]'))
    with pytest.raises(ConfigError, match="config files missing: .*tiny_cifg.toml"):
        sweep.load_spec(tiny_sweep)
    tiny_sweep.write_text(text.replace("seeds = [1, 2]", 'seeds = ["1"]'))
    with pytest.raises(ConfigError, match="'seeds' .* list of int"):
        sweep.load_spec(tiny_sweep)


def test_checked_in_sweeps_name_existing_configs(tmp_path):
    for path in sorted((REPO / "configs" / "sweeps").glob("*.toml")):
        spec = sweep.load_spec(path)
        assert spec.seeds == (1, 2, 3) and "lstm" in spec.families and "bbeta5" in spec.families
        job = spec.jobs(tmp_path)[0]
        assert job.status() == "new" and job.train_argv()[:3] == ["train", "music", "--config"]


def test_subprocess_runner_logs_the_command_and_its_output(tmp_path):
    log = tmp_path / "job" / "x.log"
    status = sweep.subprocess_runner()(["runs", "compare", str(tmp_path / "nope")], log)
    text = log.read_text()
    assert status == 2 and text.startswith("$ bbservice runs compare")
    assert "neither a run folder nor a folder of runs" in text


def test_default_root_is_outside_the_work_tree(monkeypatch, tmp_path):
    monkeypatch.delenv(sweep.RUNS_ENV, raising=False)
    assert sweep.default_root() == Path("~/bbservice-runs").expanduser()
    monkeypatch.setenv(sweep.RUNS_ENV, str(tmp_path))
    assert sweep.default_root() == tmp_path


def test_raising_the_epoch_cap_extends_finished_runs(tiny_sweep, tmp_path, one_thread):
    tiny_sweep.write_text(tiny_sweep.read_text().replace("seeds = [1, 2]", "seeds = [1]"))
    protocol = tiny_sweep.parent / "music" / "protocol.toml"
    spec, root = sweep.load_spec(tiny_sweep), tmp_path / "runs"
    sweep.run_sweep(spec, root, runner=in_process([]))
    run = root / "tiny_bbeta5_s1"
    two_epochs = (run / "metrics.jsonl").read_text()
    assert [job.status() for job in spec.jobs(root)] == ["done", "done"]

    protocol.write_text(protocol.read_text().replace("epochs = 2", "epochs = 3"))
    assert [job.epochs_to_extend() for job in spec.jobs(root)] == [(2, 3), (2, 3)]
    calls = []
    statuses = sweep.run_sweep(spec, root, runner=in_process(calls))
    assert set(statuses.values()) == {"done"} and len(calls) == 4  # 2 trainings, 2 evaluations
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [1, 2, 3]
    assert "\n".join(lines[:2]) + "\n" == two_epochs  # continued, not trained again
    assert json.loads((run / "last" / "config.json").read_text())["train"]["epochs"] == 3
    assert [job.epochs_to_extend() for job in spec.jobs(root)] == [None, None]
    protocol.write_text(protocol.read_text().replace("epochs = 3", 'epochs = "4"'))
    with pytest.raises(ConfigError, match="'epochs' in .*tiny_lstm.toml must be an integer"):
        spec.jobs(root)[0].status()
    protocol.write_text(protocol.read_text().replace('epochs = "4"', "epochs = 3"))

    # A run that stopped early is finished whatever the cap: nothing to extend.
    protocol.write_text(protocol.read_text().replace("epochs = 3", "epochs = 5"))
    saved = json.loads((run / "last" / "config.json").read_text())
    saved["train"]["early_stop"], saved["metrics"]["epoch"] = 1, 3
    (run / "last" / "config.json").write_text(json.dumps(saved))
    summary = json.loads((run / "summary.json").read_text())
    (run / "summary.json").write_text(json.dumps({**summary, "best_epoch": 2}))
    assert sweep.Job("x", spec.config_path("tiny", "bbeta5"), "bbeta5", 1, run).status() == "done"

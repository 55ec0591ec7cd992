"""Print the markdown music results table from the run folders of bench/results_music.sh.

    python bench/results_table.py runs/results [--mc-samples 10]

For each run: gate family, parameters, best epoch, valid NLL, test NLL with mean gates and
(for stochastic families) with Monte-Carlo gates, and the seconds per training epoch.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from training.eval_music import evaluate

STOCHASTIC = {"g2", "beta", "bbeta3", "bbeta5"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path)
    parser.add_argument("--mc-samples", type=int, default=10)
    args = parser.parse_args()
    rows, baselines = [], {}
    for run in sorted(p for p in args.runs.iterdir() if (p / "summary.json").exists()):
        config = json.loads((run / "best" / "config.json").read_text())
        gate = config["model"]["gate"]
        name = gate["family"] + (f" + KL λ={gate['kl_weight']:g}" if gate["kl_weight"] else "")
        samples = args.mc_samples if gate["family"] in STOCHASTIC else 0
        result = evaluate(run, samples=samples, seed=0, device="cpu")
        records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        epoch_s = statistics.median(r["epoch_seconds"] for r in records)
        baselines[result["data"]] = result["trivial_baseline_nll"]
        mc = f"{result['nll_monte_carlo']:.3f}" if samples else "—"
        rows.append(
            f"| {result['data']} | {name} | {config['model']['hidden_size']} | "
            f"{config['parameters']:,} | {config['metrics']['best_epoch']} / {len(records)} | "
            f"{config['metrics']['valid_nll']:.3f} | **{result['nll_mean_gates']:.3f}** | {mc} | "
            f"{epoch_s:.1f} |"
        )
    print(
        "| data | gates | H | parameters | best epoch / run | valid NLL | test NLL (mean gates) "
        f"| test NLL (MC, S={args.mc_samples}) | s / epoch |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    print()
    for data, value in baselines.items():
        print(f"- {data}: frequency baseline (each key at its train frequency) {value:.3f}")


if __name__ == "__main__":
    main()

"""Learnability of the phantom: do its findings need the lateral view, and does its change need the prior?

The command line of `mlrg.learnability` (source: nbs/01b_learnability.ipynb, where the experiments are described):
small CNNs trained on the phantom's images against its ground truth (`phantom-truth.jsonl`) on the CPU (2 threads),
two models per experiment trained in lockstep on the same batches for the same epochs, within one time budget.

1. views: per observation, the frontal image alone vs frontal + lateral (ROC AUC on held-out patients, and the AUC
   of the positives visible only on the lateral view).
2. prior: the change of each tracked observation since the prior study, from the current frontal image alone vs
   current + prior (accuracy and balanced accuracy against the majority baselines).

Run: `python benchmarks/phantom_learnability.py --root DIR --budget-seconds 120 --size 128 --seed 0
--out benchmarks/results/phantom_learnability.json` (writes the JSON results, a PNG figure beside them, and prints a
table). Timings depend on the machine, so the epochs that fit the budget (and the numbers) do too.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mlrg.core import InputError, save_json


def main(argv=None):
    "Run the learnability check from the command line; returns the exit status (2 on bad input)."
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", required=True, help="a phantom folder (written by `mlrg phantom`)")
    ap.add_argument("--budget-seconds", type=float, default=120, help="training time of all four models together")
    ap.add_argument("--size", type=int, default=128, help="images are downsampled to size x size")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--min-positives", type=int, default=10, help="an observation needs this many positives and negatives in train"
    )
    ap.add_argument("--min-test-positives", type=int, default=5, help="... and this many in test")
    ap.add_argument("--out", default="benchmarks/results/phantom_learnability.json")
    ap.add_argument("--figure", default=None, help="PNG path of the figure (default: next to --out)")
    ap.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="budget in wall seconds, or in CPU seconds / 2 threads (the same compute on a busy machine)",
    )
    ap.add_argument(
        "--epochs",
        type=float,
        default=None,
        help="fixed epochs for all four models (default: as many as fit the budget; always equal within an experiment)",
    )
    ap.add_argument(
        "--max-majority-fraction",
        type=float,
        default=0.85,
        help="change task: leave out observations whose most frequent training change class exceeds this fraction",
    )
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)
    from mlrg.learnability import format_table, plot_learnability, run_learnability  # torch: after --help

    try:
        res = run_learnability(
            a.root,
            a.budget_seconds,
            a.size,
            a.seed,
            progress=not a.no_progress,
            min_positives=a.min_positives,
            min_test_positives=a.min_test_positives,
            clock=a.clock,
            epochs=a.epochs,
            max_majority_fraction=a.max_majority_fraction,
        )
    except InputError as e:
        print(f"phantom_learnability: error: {e}", file=sys.stderr)
        return 2
    print(format_table(res))
    save_json(res, a.out)  # run_learnability's results are JSON-safe (None for NaN)
    import matplotlib

    matplotlib.use("Agg")  # a script, not a notebook: write the PNG only
    fig = plot_learnability(res)
    png = Path(a.figure or Path(a.out).with_suffix(".png"))
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    print(f"saved {a.out} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""MLRG's ablations of stage 2 on the demo phantom, over several seeds: the full model; without the prior report and the
prior scan; without the auxiliary views; without the stage-1 initialisation. Every run has the same step budget and
settings (any FINETUNE option given here applies to all of them); each changes only what its flags name.

For each run the test split (written with best.pt, selected on val) is scored against the phantom's truth:
- ce14_truth: CE-14 micro-F1 of the generated reports' labels against the true labels, all test samples;
- long_acc_truth: longitudinal accuracy against the true changes, test samples with a prior study;
- lateral_only_recall: of the findings the phantom draws on the lateral view only, the share the generated report
  labels positive, on test samples whose anchor is a frontal image of a study that has a lateral one (the samples
  where only the auxiliary views can show such a finding).

The run folder must hold the demo phantom, prepared, and stage 1 (see benchmarks/finetune_demo.py). Runs are written to
RUN/finetune-ablation-<name>-seed<k>; a finished run is not repeated (its summary is read), so the script can be
stopped and rerun. Results: benchmarks/results/finetune_ablations.json (after every run), and a table of mean and
spread (sample standard deviation over seeds) per ablation.

    python benchmarks/finetune_ablations.py --run_dir RUN --seeds 0 1 2 --max_steps 640 --batch_size 32
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from mlrg.core import OBSERVATIONS, save_json
from mlrg.evaluate import load_truth
from mlrg.finetune import FINETUNE, finetune, score_records
from mlrg.labeler import label_reports

ABLATIONS = {
    "full": {},
    "no prior report + scan": {"use_prior_report": False, "use_prior_scan": False},
    "no auxiliary views": {"use_auxiliary_views": False},
    "no stage-1 init": {"stage1_init": False},
}
KEYS = ["ce14_truth", "long_acc_truth", "lateral_only_recall", "ce14", "bleu4", "cider", "temporal_f1"]
KEYS += ["contradictions"]


def lateral_only_recall(records, truth) -> dict:
    "Recall of lateral-only true findings in the generated reports, on frontal anchors of studies with a lateral image."
    image = {im["dicom_id"]: (r, im["projection"]) for r in truth.values() for im in r["images"]}
    hits = total = samples = 0
    chosen = [
        rec
        for rec in records
        if image[rec["id"]][1] == "frontal"
        and any(im["projection"] == "lateral" for im in image[rec["id"]][0]["images"])
    ]
    labels = label_reports([rec["generated"] for rec in chosen]) if chosen else []
    for rec, lab in zip(chosen, labels):
        st = image[rec["id"]][0]
        hidden = [o for o, f in st["findings"].items() if f["present"] and f["views"] == ["lateral"]]
        if hidden:
            samples += 1
        total += len(hidden)
        hits += sum(lab[OBSERVATIONS.index(o)] == 1 for o in hidden)
    return {
        "lateral_only_recall": float(hits / total) if total else float("nan"),
        "lateral_only_findings": total,
        "lateral_only_samples": samples,
    }


def score_run(summary, truth) -> dict:
    "The figures of one finished run, from its test predictions."
    recs = json.loads(Path(summary["test"]["predictions"]).read_text())
    allr, _ = score_records(recs, truth)
    prior, _ = score_records([r for r in recs if r["has_prior"]], truth)
    return {
        **{k: allr[k] for k in ("ce14_truth", "ce14", "bleu4", "cider", "temporal_f1", "contradictions")},
        "long_acc_truth": prior["long_acc_truth"],
        **lateral_only_recall(recs, truth),
        "best_step": summary["best_step"],
        "train_seconds": summary["train_seconds"],
        "global_step": summary["global_step"],
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    ap.add_argument("--run_dir", required=True)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--only", nargs="*", default=None, help="ablation names to run (default: all)")
    args, rest = ap.parse_known_args(argv)
    common = FINETUNE.cli(
        rest, prog="finetune_ablations.py"
    )  # every other option is a FINETUNE parameter, for every run
    truth = load_truth(Path(args.run_dir) / "mimic")
    out = Path(__file__).resolve().parent / "results" / "finetune_ablations.json"
    rows = []
    for name, flags in ABLATIONS.items():
        if args.only and name not in args.only:
            continue
        for seed in args.seeds:
            folder = Path(args.run_dir) / f"finetune-ablation-{name.replace(' ', '').replace('+', '_')}-seed{seed}"
            done = folder / "finetune_summary.json"
            t0 = time.perf_counter()
            if done.is_file():
                s = json.loads(done.read_text())
            else:
                s = finetune(
                    {
                        **common,
                        **flags,
                        "seed": seed,
                        "run_dir": args.run_dir,
                        "model_save_path": str(folder),
                        "test": True,
                    }
                )
            row = {
                "ablation": name,
                "seed": seed,
                **score_run(s, truth),
                "wall_seconds": round(time.perf_counter() - t0, 1),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
            save_json({"settings": {k: v for k, v in common.items()}, "ablations": ABLATIONS, "runs": rows}, out)
    df = pd.DataFrame(rows)
    agg = df.groupby("ablation", sort=False)[KEYS].agg(["mean", "std"])
    full = df[df.ablation == "full"][KEYS].mean() if (df.ablation == "full").any() else None
    pd.set_option("display.width", 220)
    print("\nmean and spread (sample std over seeds) of the test figures:")
    print(agg.round(3).to_string())
    if full is not None:
        print("\nchange from the full model (mean over seeds):")
        print((df.groupby("ablation", sort=False)[KEYS].mean() - full).round(3).to_string())
    save_json(
        {
            "settings": {k: v for k, v in common.items()},
            "ablations": ABLATIONS,
            "runs": rows,
            "mean": df.groupby("ablation", sort=False)[KEYS].mean().to_dict(orient="index"),
            "std": df.groupby("ablation", sort=False)[KEYS].std().to_dict(orient="index"),
        },
        out,
    )
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

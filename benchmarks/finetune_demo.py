"""Stage 2 on the demo phantom: train, then score the test split against the references and the phantom's truth, next to
the baselines (most frequent, nearest neighbour, copy the prior report, oracle); print the val curve (scores against
training seconds) and save everything as JSON in benchmarks/results/finetune_demo_<tag>.json.

The run folder must hold the demo phantom, prepared, and (for the stage-1 initialisation) stage 1:

    mlrg phantom --out RUN/mimic --preset demo
    mlrg prepare --mimic-root RUN/mimic --out RUN/prepared/annotation.json
    python -m mlrg.pretrain --run_dir RUN --image_size 128 --num_epochs 3 --batch_size 16  # or stage1_init false below

    python benchmarks/finetune_demo.py --run_dir RUN --tag cached --max_steps 1500 --eval_steps 250 \\
        [any FINETUNE --name value]

Each run writes to RUN/finetune-bench-<tag> (a rerun with the same settings continues it; --overwrite true moves it
aside)."""

import argparse
import json
import sys
import time
from pathlib import Path

import pandas as pd

from mlrg.core import save_json
from mlrg.data import read_annotation
from mlrg.evaluate import (
    copy_prior_baseline,
    load_truth,
    most_frequent_baseline,
    nearest_neighbour_baseline,
    oracle_baseline,
)
from mlrg.finetune import FINETUNE, baseline_records, finetune, score_records

KEYS = [
    "ce14_truth",
    "long_acc_truth",
    "ce14",
    "long_acc",
    "bleu4",
    "bleu1",
    "rouge_l",
    "cider",
    "temporal_f1",
    "contradictions",
    "bleu4+ce14",
]


def baselines(run_dir, seed=0) -> dict:
    "{method: {id: text}} of the baselines on the test split of `run_dir`, and the items, truth and image root."
    run = Path(run_dir)
    ann = read_annotation(run / "prepared" / "annotation.json")
    root = run / "mimic" / "files"
    items = ann["test"]
    truth = load_truth(run / "mimic")
    methods = {
        "most frequent": most_frequent_baseline(ann["train"], items),
        "nearest neighbour": nearest_neighbour_baseline(ann["train"], items, root),
        "copy prior report (NN otherwise)": copy_prior_baseline(ann["train"], items, root),
        "oracle (phantom writer)": oracle_baseline(items, truth, seed),
    }
    return methods, items, truth


def table(methods, items, truth) -> tuple:
    "Scores of every method on all test samples and on those with a prior."
    allr, prior = {}, {}
    for name, texts in methods.items():
        recs = baseline_records(items, texts)
        allr[name] = score_records(recs, truth)[0]
        prior[name] = score_records([r for r in recs if r["has_prior"]], truth)[0]
    return pd.DataFrame(allr).T, pd.DataFrame(prior).T


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    ap.add_argument("--run_dir", required=True)
    ap.add_argument("--tag", default="default")
    args, rest = ap.parse_known_args(argv)
    p = FINETUNE.cli(rest, prog="finetune_demo.py")  # every other option is a FINETUNE parameter
    p.update(
        run_dir=args.run_dir,
        model_save_path=p["model_save_path"] or str(Path(args.run_dir) / f"finetune-bench-{args.tag}"),
    )
    t0 = time.perf_counter()
    s = finetune(p)
    wall = time.perf_counter() - t0
    methods, items, truth = baselines(args.run_dir, p["seed"])
    preds = json.loads(Path(s["test"]["predictions"]).read_text())
    methods = {f"MLRG stage 2 ({args.tag})": {r["id"]: r["generated"] for r in preds}, **methods}
    t_all, t_prior = table(methods, items, truth)
    curve = pd.DataFrame(
        [
            {"step": r["step"], "train_s": r["seconds"], **{k: r.get(f"val_{k}") for k in KEYS + ["loss"]}}
            for r in s["curve"]
        ]
    )
    pd.set_option("display.width", 200)
    print(f"\nval curve ({s['select_metric']} picks best.pt; train_s excludes evaluation and the feature cache):")
    print(curve.round(3).to_string(index=False))
    print(f"\ntest, all {len(items)} samples:")
    print(t_all[KEYS].round(3).to_string())
    print(f"\ntest, the {sum(bool(it.get('prior_study')) for it in items)} samples with a prior:")
    print(t_prior[KEYS].round(3).to_string())
    print(
        f"\ntrain {s['train_seconds']:.0f} s ({s['global_step']} steps, {s['epochs']} epochs), wall {wall:.0f} s "
        f"(features cached: {s['model']['features_cached']}); best step {s['best_step']}"
    )
    out = Path(__file__).resolve().parent / "results" / f"finetune_demo_{args.tag}.json"
    save_json(
        {
            "tag": args.tag,
            "params": {k: v for k, v in p.items()},
            "wall_seconds": wall,
            "train_seconds": s["train_seconds"],
            "global_step": s["global_step"],
            "epochs": s["epochs"],
            "best_step": s["best_step"],
            "curve": curve.to_dict(orient="records"),
            "test_all": t_all.to_dict(orient="index"),
            "test_with_prior": t_prior.to_dict(orient="index"),
            "model": {k: s["model"][k] for k in ("parameters", "trainable", "features_cached")},
            "init": s["init"],
        },
        out,
    )
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

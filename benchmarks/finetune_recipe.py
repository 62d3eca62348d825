"""Controlled runs of stage 2's recipe on the demo phantom: the demo preset's stage 2 ("base") and variants that each
change one thing, over seeds and budgets (1 = the demo's step budget, 4 = four times it), scored on the test split
against the references and the phantom's truth. Finds which part of the recipe costs stage 2 its CE-14 and
longitudinal accuracy.

The run folder must hold the demo phantom, prepared, and stage 1 (`mlrg study --preset demo` leaves all three, or
see benchmarks/finetune_demo.py). Each run writes to RUN/recipe/<variant>-b<budget>-s<seed> and its row to
row.json there; a finished run is read back, not repeated, so the script can be stopped and rerun. Runs go `--jobs`
at a time, each on `--threads` CPU threads.

    python benchmarks/finetune_recipe.py --run_dir outputs/demo --seeds 0 1 --budgets 1 --jobs 2
    python benchmarks/finetune_recipe.py --run_dir outputs/demo --variants base prompt_memory --budgets 4

Results: benchmarks/results/finetune_recipe.json (every row, and mean / spread per variant and budget)."""

import argparse
import json
import multiprocessing as mp
import sys
import time
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from finetune_ablations import lateral_only_recall  # noqa: E402

from mlrg.core import save_json  # noqa: E402
from mlrg.data import read_annotation  # noqa: E402
from mlrg.evaluate import copy_prior_baseline, load_truth  # noqa: E402
from mlrg.finetune import FINETUNE, baseline_records, score_records  # noqa: E402
from mlrg.study import STUDY_PRESETS  # noqa: E402

# "base" is the demo's stage 2 before this benchmark (its budget and evaluation settings, every other value FINETUNE's
# default); the demo preset now adds the "combined_end_to_end" changes to it, at batch 16 ("combined_batch_16")
DEMO_NOW = dict(STUDY_PRESETS["demo"]["params"]["finetune"])
# the base's budget: 400 steps of 32 (3.5 epochs), the demo's until it took 800 of 16 (the same epochs:
# "combined_batch_16" below); every variant's steps scale it
BASE = dict(batch_size=32, num_epochs=100, max_steps=400, eval_steps=200, val_max_samples=200, val_num_beams=1)
# each variant changes one thing of the base; {} is the base itself
VARIANTS = {
    "base": {},
    "warmup_cosine": {"scheduler": "cosine", "warmup": 0.1},
    "warmup_cosine_2x_lr": {"scheduler": "cosine", "warmup": 0.1, "ft_lr": 2e-3, "pt_lr": 4e-4},
    "end_to_end": {"freeze_image_encoder": False, "cache_features": False},
    "prompt_memory": {"prior_path": "prompt"},  # every prompt token in the decoder's memory (once prompt_memory=True)
    "prior_decoder": {"prior_path": "decoder"},  # the prior report's tokens in the decoder's memory (CXRMate-style)
    "token_grid_4": {"token_grid": 4},  # 1 + 4x4 = 17 tokens per image (65 today)
    "decoder_3_layers": {"decoder_layers": 3},
    "decoder_1_layer": {"decoder_layers": 1},
    "dropout_0.1": {"dropout": 0.1},
    "batch_16": {"batch_size": 16, "steps_scale": 2},
}
# the changes together: what the demo preset now adds to the base (fewer image tokens, the prompt in the decoder's
# memory, warmup + cosine at twice the lr, the encoder trained), and the same with the encoder frozen
VARIANTS["combined_end_to_end"] = {k: v for k, v in DEMO_NOW.items() if k not in BASE}
VARIANTS["combined"] = {**VARIANTS["combined_end_to_end"], "freeze_image_encoder": True}
# the combined recipe without the prior study, and without the auxiliary views (MLRG's ablations of it)
NO_PRIOR = {"use_prior_report": False, "use_prior_scan": False}  # MLRG's two ablations, on any recipe
NO_AUXILIARY_VIEWS = {"use_auxiliary_views": False}
VARIANTS["combined_end_to_end_no_prior"] = {**VARIANTS["combined_end_to_end"], **NO_PRIOR}
VARIANTS["combined_end_to_end_no_auxiliary_views"] = {**VARIANTS["combined_end_to_end"], **NO_AUXILIARY_VIEWS}
# MLRG's thesis at small scale: stage 2 alone from scratch, given stage 1's training time as extra steps (stage 1 of the
# recipe run folder trained 75 s; at stage 2's 48.6 samples/s, 2 threads, that is 114 steps of 32: 514 steps)
VARIANTS["combined_end_to_end_no_stage1_equal_minutes"] = {
    **VARIANTS["combined_end_to_end"],
    "stage1_init": False,
    "steps_scale": 514 / 400,
}
# beyond the demo recipe: a copy mechanism over the prompt tokens in the decoder's memory (copy_prompt)
VARIANTS["combined_copy_prompt"] = {**VARIANTS["combined_end_to_end"], "copy_prompt": True}
# one change from the demo recipe each: the stage-1 weights at the new weights' lr (a single lr), 2 decoder heads of 64
# dimensions (8 of 16 today, as the plain yardstick of REFERENCE section 7)
VARIANTS["combined_single_lr"] = {**VARIANTS["combined_end_to_end"], "pt_lr": VARIANTS["combined_end_to_end"]["ft_lr"]}
VARIANTS["combined_decoder_heads_2"] = {**VARIANTS["combined_end_to_end"], "decoder_heads": 2}
# a wider decoder (256, 4 heads of 64: the yardstick's model A) reading the 128-wide memory through a projection
VARIANTS["combined_decoder_256"] = {**VARIANTS["combined_end_to_end"], "decoder_dim": 256, "decoder_heads": 4}
# beyond MLRG: the other views' and the prior image's tokens also in the decoder's memory (other_images), as the plain
# yardstick does, instead of only through the anchor's fused tokens
VARIANTS["combined_images_in_memory"] = {**VARIANTS["combined_end_to_end"], "other_images": "memory"}
# regularisation at the longer budgets, where the demo recipe overfits: dropout 0.1 (MLRG's) everywhere it applies, and
# the same without dropout on the attention weights (attention_dropout 0: a third faster on the CPU)
VARIANTS["combined_dropout_0.1"] = {**VARIANTS["combined_end_to_end"], "dropout": 0.1}
VARIANTS["combined_dropout_0.1_not_attention"] = {**VARIANTS["combined_dropout_0.1"], "attention_dropout": 0.0}
# the two knobs of the list not yet run against the demo recipe: decoder depth (2 blocks) and batch size (32
# until then; the same epochs, so 16 takes twice the steps and 64 half, at the same learning rates). combined_batch_16
# is the demo preset's stage 2 now
VARIANTS["combined_decoder_1_layer"] = {**VARIANTS["combined_end_to_end"], "decoder_layers": 1}
VARIANTS["combined_decoder_3_layers"] = {**VARIANTS["combined_end_to_end"], "decoder_layers": 3}
VARIANTS["combined_batch_16"] = {**VARIANTS["combined_end_to_end"], "batch_size": 16, "steps_scale": 2}
VARIANTS["combined_batch_8"] = {**VARIANTS["combined_end_to_end"], "batch_size": 8, "steps_scale": 4}
VARIANTS["combined_batch_64"] = {**VARIANTS["combined_end_to_end"], "batch_size": 64, "steps_scale": 0.5}
# MLRG's ablations of the demo now (batch 16): without the prior study, without the auxiliary views
VARIANTS["combined_batch_16_no_prior"] = {**VARIANTS["combined_batch_16"], **NO_PRIOR}
VARIANTS["combined_batch_16_no_auxiliary_views"] = {**VARIANTS["combined_batch_16"], **NO_AUXILIARY_VIEWS}
# twice the learning rates again (4e-3 new / 8e-4 stage 1), the warmup keeping the peak safe
VARIANTS["combined_lr_2x"] = {**VARIANTS["combined_end_to_end"], "ft_lr": 4e-3, "pt_lr": 8e-4}
# the demo recipe at the plain yardstick's epochs (REFERENCE section 7, model F: 6.2 epochs in 4 minutes, CE-14 0.607):
# 710 steps of 32, the schedule decaying to the end, so per-epoch learning compares at equal epochs
VARIANTS["combined_6_epochs"] = {**VARIANTS["combined_end_to_end"], "steps_scale": 710 / 400}
# stage 1's text side (the prompt encoder, which reads the prior report) at the new weights' lr, the image encoder at
# pt_lr: separates what the run from scratch (every weight at ft_lr) gained in longitudinal accuracy
VARIANTS["combined_text_lr"] = {**VARIANTS["combined_end_to_end"], "text_lr": VARIANTS["combined_end_to_end"]["ft_lr"]}
# the plain yardstick's recipe (REFERENCE section 7, model F) as far as FINETUNE's parameters reach, at its 6.2 epochs:
# no stage 1 (every weight new, one lr of 1.5e-3), every image's tokens in the decoder's memory, 2 decoder heads of 64,
# weight decay 0.01, 60 warmup steps of 710; what stays ours: MLRG's fused anchor tokens also in the memory, stage 1's
# architecture (a 2-layer prompt encoder against 1), beam 3 against greedy
YARDSTICK_PARTS = {"other_images": "memory", "decoder_heads": 2, "weight_decay": 0.01}
VARIANTS["yardstick_6_epochs"] = {
    **VARIANTS["combined_6_epochs"],
    **YARDSTICK_PARTS,
    "stage1_init": False,
    "ft_lr": 1.5e-3,
    "warmup": 60,
}
# the yardstick's parts that FINETUNE reaches, on the demo recipe (batch 16) with stage 1 kept: every image's tokens in
# the decoder's memory, 2 decoder heads of 64, weight decay 0.01; and the same without stage 1 (every weight new)
VARIANTS["combined_batch_16_yardstick_parts"] = {**VARIANTS["combined_batch_16"], **YARDSTICK_PARTS}
VARIANTS["combined_batch_16_yardstick_parts_no_stage1"] = {
    **VARIANTS["combined_batch_16_yardstick_parts"],
    "stage1_init": False,
}
# the yardstick with MLRG's multi-view fusion at 1 layer (3: stage 1's) and greedy decoding: for a run folder without
# stage 1 (its architecture would otherwise be stage 1's), e.g. links to a demo run folder's mimic/ and prepared/
VARIANTS["yardstick_6_epochs_fusion_1_greedy"] = {
    **VARIANTS["yardstick_6_epochs"],
    "image_size": 128,
    "token_grid": 4,
    "model_config": {"fusion_depth": 1},
    "num_beams": 1,
}
# beyond MLRG: the demo recipe with a findings head on the decoder's memory (finding_loss: its binary cross-entropy
# against the rule labeler's reading of the reference report, added to the token loss at this weight)
VARIANTS["combined_batch_16_finding_loss"] = {**VARIANTS["combined_batch_16"], "finding_loss": 1.0}
VARIANTS["combined_batch_16_finding_loss_3"] = {**VARIANTS["combined_batch_16"], "finding_loss": 3.0}
# MLRG's ablations of the demo with the findings head (the demo preset's stage 2 now)
VARIANTS["combined_batch_16_finding_loss_no_prior"] = {**VARIANTS["combined_batch_16_finding_loss"], **NO_PRIOR}
VARIANTS["combined_batch_16_finding_loss_no_auxiliary_views"] = {
    **VARIANTS["combined_batch_16_finding_loss"],
    **NO_AUXILIARY_VIEWS,
}
# at 4x the budget: the findings head with dropout (none on the attention weights), against the same without the head
VARIANTS["combined_dropout_0.1_not_attention_finding_loss"] = {
    **VARIANTS["combined_dropout_0.1_not_attention"],
    "finding_loss": 1.0,
}
# MLRG's thesis with the demo now: stage 2 alone from scratch given stage 1's 75 s as more steps (514 of 32 for 400)
VARIANTS["combined_batch_16_finding_loss_no_stage1_equal_minutes"] = {
    **VARIANTS["combined_batch_16_finding_loss"],
    "stage1_init": False,
    "steps_scale": 2 * 514 / 400,
}
KEYS = ["ce14", "ce14_truth", "long_acc_truth", "lateral_only_recall", "bleu4", "contradictions", "train_seconds"]


def demo_recipe() -> dict:
    "The base recipe's stage-2 parameters (over FINETUNE's defaults): the demo's stage 2 before this benchmark."
    return dict(BASE)


def run_params(run_dir, variant, budget, seed, threads) -> dict:
    "FINETUNE parameters of one run: the demo recipe, the variant's change, the budget's steps, the seed."
    change = dict(VARIANTS[variant])
    scale = change.pop("steps_scale", 1) * budget
    p = {**demo_recipe(), **change}
    p["max_steps"] = int(p["max_steps"] * scale)
    p["eval_steps"] = int(p["eval_steps"] * scale)
    folder = Path(run_dir) / "recipe" / f"{variant}-b{budget}-s{seed}"
    p.update(
        run_dir=str(run_dir), seed=seed, model_save_path=str(folder), num_threads=threads, test=True, progress=False
    )
    return FINETUNE.check(p)


def scores(records, truth) -> dict:
    "Test figures of `records`: CE-14 (references, truth), longitudinal vs truth, lateral-only recall, contradictions."
    allr, _ = score_records(records, truth)
    prior, _ = score_records([r for r in records if r["has_prior"]], truth)
    out = {k: allr.get(k) for k in ("ce14", "ce14_truth", "bleu4", "cider", "contradictions")}
    out["long_acc_truth"] = prior.get("long_acc_truth")
    out.update(lateral_only_recall(records, truth))
    return out


def one_run(args) -> dict:
    "Train and score one run (in a worker process); its row is saved beside its checkpoints."
    run_dir, variant, budget, seed, threads = args
    from mlrg.finetune import finetune

    p = run_params(run_dir, variant, budget, seed, threads)
    row_path = Path(p["model_save_path"]) / "row.json"
    if row_path.is_file():  # a finished run: scored again from its predictions (scores added since are filled in)
        row = json.loads(row_path.read_text())
        recs = json.loads((Path(p["model_save_path"]) / "test_predictions.json").read_text())
        row.update(scores(recs, load_truth(Path(run_dir) / "mimic")))
        return row
    t0 = time.perf_counter()
    s = finetune(p)
    recs = json.loads(Path(s["test"]["predictions"]).read_text())
    row = {
        "variant": variant,
        "budget": budget,
        "seed": seed,
        "change": VARIANTS[variant],
        **scores(recs, load_truth(Path(run_dir) / "mimic")),
        "train_seconds": s["train_seconds"],
        "global_step": s["global_step"],
        "epochs": s["epochs"],
        "best_step": s["best_step"],
        "wall_seconds": round(time.perf_counter() - t0, 1),
        "curve": s["curve"],
    }
    save_json(row, row_path)
    return row


def copy_prior_row(run_dir) -> dict:
    "Copying the prior report (nearest neighbour's report without a prior) on the test split, scored the same way."
    run = Path(run_dir)
    ann = read_annotation(run / "prepared" / "annotation.json")
    items = ann["test"]
    texts = copy_prior_baseline(ann["train"], items, run / "mimic" / "files")
    return {"variant": "copy prior report", **scores(baseline_records(items, texts), load_truth(run / "mimic"))}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    ap.add_argument("--run_dir", required=True)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--budgets", type=int, nargs="+", default=[1])
    ap.add_argument("--jobs", type=int, default=2, help="runs at a time")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run")
    args = ap.parse_args(argv)
    out = Path(__file__).resolve().parent / "results" / "finetune_recipe.json"
    previous = json.loads(out.read_text()).get("runs", []) if out.is_file() else []
    todo = [(args.run_dir, v, b, s, args.threads) for b in args.budgets for v in args.variants for s in args.seeds]
    rows = {(r["variant"], r["budget"], r["seed"]): r for r in previous}
    baseline = copy_prior_row(args.run_dir)
    print(json.dumps({k: baseline.get(k) for k in ["variant"] + KEYS}), flush=True)
    with mp.get_context("spawn").Pool(args.jobs) as pool:
        for row in pool.imap_unordered(one_run, todo):
            rows[(row["variant"], row["budget"], row["seed"])] = row
            print(json.dumps({k: row.get(k) for k in ["variant", "budget", "seed"] + KEYS}), flush=True)
            done = {"recipe": demo_recipe(), "variants": VARIANTS, "copy_prior": baseline, "runs": list(rows.values())}
            save_json(done, out)
    df = pd.DataFrame(list(rows.values()))
    keys = [k for k in KEYS if k in df and df[k].notna().any()]
    by_run = df.groupby(["budget", "variant"], sort=False)[keys]
    agg = by_run.agg(["mean", "std"])
    pd.set_option("display.width", 250)
    print("\nmean and spread (sample std over seeds) of the test figures:")
    print(agg.round(3).to_string())
    save_json(
        {
            "recipe": demo_recipe(),
            "variants": VARIANTS,
            "copy_prior": baseline,
            "runs": list(rows.values()),
            "mean": {f"{b}/{v}": r.to_dict() for (b, v), r in by_run.mean().iterrows()},
            "std": {f"{b}/{v}": r.to_dict() for (b, v), r in by_run.std().iterrows()},
        },
        out,
    )
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

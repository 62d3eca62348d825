"""Stage 1's recipe on the demo phantom: the demo preset's stage 1 ("demo") and variants of it, each scored by the val
linear probes at the best checkpoint (macro AUC over the 14 observations: `probe_auc_macro` on the image embedding,
`probe_encoder_auc_macro` on the image encoder's features, what a frozen encoder gives stage 2), with the time, the
val loss and the train loss (the val loss at the training batch size, so the two compare).

Times: `train_seconds` / `wall_seconds` are wall clock (training alone / the whole run), `cpu_train_seconds` /
`cpu_seconds` the process's CPU seconds (training alone / the whole run). On a busy machine a 1-thread run's CPU
seconds are what its wall time would be alone on a core; compare runs by them.

The run folder must hold the demo phantom and its prepared annotation (`mlrg study --preset demo` leaves both). Each
run writes to OUT/<variant>-s<seed> (OUT: --out, default RUN/pretrain-recipe), with links to RUN/prepared and
RUN/mimic, and its row to row.json there; a finished run is read back, not repeated, so the script can be stopped and
rerun. Runs go one at a time, each on `--threads` CPU threads. `--spec NAME=JSON` adds a variant on the command line.

    python benchmarks/pretrain_recipe.py --run_dir outputs/demo --variants demo recipe --threads 1
    python benchmarks/pretrain_recipe.py --run_dir outputs/demo --spec 'lr2e-3={"lr": 0.002}'

`--gap PRETRAIN_DIR` takes the val-vs-train loss gap of a finished stage-1 run apart instead (`loss_gap`): its best
checkpoint's losses on val and on as many train samples, by batch size, order and BatchNorm mode, each with chance.

    python benchmarks/pretrain_recipe.py --run_dir outputs/demo --gap outputs/demo/pretrain

Results: benchmarks/results/pretrain_recipe.json (every row) and a table of them; pretrain_loss_gap.json beside it."""

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from mlrg.core import read_jsonl, save_json
from mlrg.engine import load_checkpoint
import mlrg.pretrain
from mlrg.pretrain import PRETRAIN, PretrainEvaluator, build_pretrain, pretrain
from mlrg.study import STUDY_PRESETS

# each variant's parameters over the demo preset's stage 1 (STUDY_PRESETS["demo"]); {} is the demo's stage 1 itself
VARIANTS = {
    "demo": {},
    "init": {"max_steps": 1},  # one step: the probes of (nearly) the random initialisation
    "temp0.1": {"model_config": {"temperature": 0.1}},
    "px96": {"image_size": 96},
    "px96-e1-t0.05": {"image_size": 96, "model_config": {"temperature": 0.05}},
    "px96-e2-t0.05": {"image_size": 96, "num_epochs": 2, "model_config": {"temperature": 0.05}},  # recommended
    "px64-e3-t0.1": {"image_size": 64, "num_epochs": 3, "model_config": {"temperature": 0.1}},
    "px96-e4-t0.05": {"image_size": 96, "num_epochs": 4, "model_config": {"temperature": 0.05}},
}
KEYS = ["cpu_train_seconds", "cpu_seconds", "train_seconds", "wall_seconds", "probe_auc_macro"]
KEYS += ["probe_encoder_auc_macro", "val_loss", "train_loss", "i2t_R@10", "best_step"]


def demo_recipe() -> dict:
    "The demo study's stage-1 parameters (over PRETRAIN's defaults)."
    return dict(STUDY_PRESETS["demo"]["params"]["pretrain"])


def run_params(folder, variant, seed, threads) -> dict:
    "The pretrain parameters of one run: the demo's, the variant's, the seed, and the val batch of the training batch."
    p = {**demo_recipe(), **variant, "seed": seed, "num_threads": threads, "progress": False, "run_dir": str(folder)}
    if "model_config" in variant:
        p["model_config"] = {**demo_recipe().get("model_config", {}), **variant["model_config"]}
    p.setdefault("eval_batch_size", p.get("batch_size", PRETRAIN.defaults()["batch_size"]))
    return p


def train_loss_tail(metrics_path, frac=0.1) -> float:
    "The mean train loss over the last `frac` of the logged training records."
    tr = [r["train_loss"] for r in read_jsonl(metrics_path) if r.get("kind") == "train"]
    k = max(1, int(round(frac * len(tr))))
    return float(sum(tr[-k:]) / k) if tr else float("nan")


class CpuClock:
    """Process CPU seconds spent in `mlrg.pretrain.fit` and in the evaluator's calls, while in use. On a busy machine
    a 1-thread run's CPU seconds are what its wall time would be alone on a core."""

    def __enter__(self):
        self.fit = self.eval = 0.0
        self._fit, self._call = mlrg.pretrain.fit, PretrainEvaluator.__call__
        clock = self

        def fit(*a, **kw):
            t0 = time.process_time()
            try:
                return clock._fit(*a, **kw)
            finally:
                clock.fit += time.process_time() - t0

        def call(evaluator, *a, **kw):
            t0 = time.process_time()
            try:
                return clock._call(evaluator, *a, **kw)
            finally:
                clock.eval += time.process_time() - t0

        mlrg.pretrain.fit, PretrainEvaluator.__call__ = fit, call
        return self

    def __exit__(self, *exc):
        mlrg.pretrain.fit, PretrainEvaluator.__call__ = self._fit, self._call


def one_run(out, run_dir, name, variant, seed, threads) -> dict:
    "Run (or read back) one variant; its row."
    folder = Path(out) / f"{name}-s{seed}"
    row_path = folder / "row.json"
    if row_path.is_file():
        return json.loads(row_path.read_text())
    folder.mkdir(parents=True, exist_ok=True)
    for sub in ("prepared", "mimic"):
        link = folder / sub
        if not link.exists():
            link.symlink_to(Path(run_dir).resolve() / sub)
    p = run_params(folder, variant, seed, threads)
    t0, c0 = time.perf_counter(), time.process_time()
    with CpuClock() as cpu:
        s = pretrain(p)
    wall, cpu_all = time.perf_counter() - t0, time.process_time() - c0
    b = s["best"]
    row = {
        "variant": name,
        "seed": seed,
        "threads": threads,
        "params": variant,
        "train_seconds": s["train_seconds"],
        "wall_seconds": round(wall, 1),
        "cpu_train_seconds": round(cpu.fit - cpu.eval, 1),
        "cpu_eval_seconds": round(cpu.eval, 1),
        "cpu_seconds": round(cpu_all, 1),
        "global_step": s["global_step"],
        "best_step": s["best_step"],
        "probe_auc_macro": b.get("probe_auc_macro"),
        "probe_encoder_auc_macro": b.get("probe_encoder_auc_macro"),
        "val_loss": b.get("loss"),
        "val_loss_text": b.get("loss_text"),
        "val_loss_mpc": b.get("loss_mpc"),
        "train_loss": train_loss_tail(s["metrics"]),
        "eval_batch_size": s["params"]["eval_batch_size"],
        "i2t_R@10": b.get("i2t_R@10"),
        "curve": [
            (c["step"], c["probe_auc_macro"], c.get("probe_encoder_auc_macro"), c["val_loss"]) for c in s["curve"]
        ],
    }
    save_json(row, row_path)
    return row


def loss_gap(pretrain_dir, batch_sizes=(64, 16), threads=1) -> list:
    """The val-vs-train loss gap of a finished stage-1 run (`pretrain_dir` holds its summary and best.pt), taken apart:
    its best checkpoint's losses on the val split and on as many train samples, at each batch size, in annotation
    order or shuffled, in eval mode or train mode (BatchNorm on batch statistics, no update kept), each with the loss
    of uniform scores (chance: about the log of the candidates in a batch)."""
    torch.set_num_threads(threads)
    s = json.loads((Path(pretrain_dir) / "pretrain_summary.json").read_text())
    p = PRETRAIN.check({**s["params"], "linear_probe": False, "progress": False, "overwrite": False})
    parts = build_pretrain(p)
    parts.model.load_state_dict(load_checkpoint(Path(pretrain_dir) / "best.pt")["model"])
    n = len(parts.val_ds)
    tr_idx = np.sort(np.random.default_rng(0).choice(len(parts.train_ds), n, replace=False))

    def losses(ds, idx, bs, train_mode, chance):
        m = copy.deepcopy(parts.model).train(train_mode)
        if chance:
            m.config["temperature"] = 1e9  # every score ~0: the loss of uniform scores
        sums = {}
        with torch.no_grad():
            for i in range(0, len(idx), bs):
                out = m(parts.collate_fn([ds[j] for j in idx[i : i + bs]]))
                k = min(bs, len(idx) - i)
                for key in ("loss", "loss_text", "loss_mpc"):
                    if key in out:
                        sums[key] = sums.get(key, 0.0) + float(out[key]) * k
        return {k: v / len(idx) for k, v in sums.items()}

    rows = []
    for split, ds, base in (("val", parts.val_ds, np.arange(n)), ("train", parts.train_ds, tr_idx)):
        shuffled = np.random.default_rng(1).permutation(base)
        for bs in batch_sizes:
            for order, mode in (("annotation", "eval"), ("shuffled", "eval"), ("shuffled", "train")):
                idx = base if order == "annotation" else shuffled
                r = losses(ds, idx, bs, mode == "train", False)
                c = losses(ds, idx, bs, mode == "train", True)
                row = {"split": split, "batch": bs, "order": order, "mode": mode, **r}
                row.update({f"chance_{k}": v for k, v in c.items()}, below_chance=c["loss"] - r["loss"])
                rows.append(row)
                print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    ap.add_argument("--run_dir", required=True)
    ap.add_argument("--out", default=None, help="where the runs' folders go (default RUN/pretrain-recipe)")
    ap.add_argument("--variants", nargs="*", default=None, help="variant names (default: all, unless --spec)")
    ap.add_argument("--spec", nargs="*", default=[], help="NAME=JSON: a variant given here")
    ap.add_argument("--seeds", type=int, nargs="+", default=[PRETRAIN.defaults()["seed"]])
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run")
    ap.add_argument("--results", default=str(Path(__file__).resolve().parent / "results" / "pretrain_recipe.json"))
    ap.add_argument("--gap", default=None, help="a finished stage-1 folder: take its val-vs-train loss gap apart")
    args = ap.parse_args(argv)
    if args.gap:
        rows = loss_gap(args.gap, threads=args.threads)
        gap_out = Path(args.results).with_name("pretrain_loss_gap.json")
        save_json({"pretrain_dir": args.gap, "rows": rows}, gap_out)
        print(pd.DataFrame(rows).round(3).to_string(index=False))
        print(f"-> {gap_out}")
        return 0
    variants = dict(VARIANTS)
    for s in args.spec:
        name, _, js = s.partition("=")
        variants[name] = json.loads(js)
    names = args.variants if args.variants is not None else ([] if args.spec else list(VARIANTS))
    names += [s.partition("=")[0] for s in args.spec]
    unknown = [n for n in names if n not in variants]
    if unknown:
        ap.error(f"unknown variants {unknown}; known: {list(variants)}")
    out = args.out or str(Path(args.run_dir) / "pretrain-recipe")
    results = Path(args.results)
    old = json.loads(results.read_text())["runs"] if results.is_file() else []
    rows = {(r["variant"], r["seed"], r["threads"]): r for r in old}
    for name in names:
        for seed in args.seeds:
            row = one_run(out, args.run_dir, name, variants[name], seed, args.threads)
            rows[(name, seed, args.threads)] = row
            print(json.dumps({k: v for k, v in row.items() if k != "curve"}), flush=True)
            save_json({"recipe": demo_recipe(), "variants": variants, "runs": list(rows.values())}, results)
    df = pd.DataFrame(list(rows.values()))
    pd.set_option("display.width", 220)
    print(df[["variant", "seed", "threads", *KEYS]].round(3).to_string(index=False))
    print(f"-> {results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

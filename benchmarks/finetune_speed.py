"""Stage-2 speed on the CPU: reports/s of beam search with and without the key/value cache, and training samples/s with
model FLOPs per sample as a share of a matmul peak, all measured in the same run on the same threads.

- Generation: a trained stage-2 checkpoint writes the first --n test samples of the run folder with 3 beams (max length
  100, as MLRG), from pixels: images encoded, prompt fused, reports decoded; once with the cache (each step computes
  only the new token) and once without (each step reruns the whole prefix). reports/s = samples / wall seconds; the
  two must write the same reports.
- Training: the stage-2 model of the demo preset (its tokens per image, prior_path and encoder settings) as
  `mlrg.finetune` builds it for the run folder, six ways: encoder frozen with cached features (MLRG's design beside
  the demo), encoder frozen reading pixels, encoder trained (the demo's stage 2), the same with every image decoded at
  each read (no `image_cache_mb`: the first epoch's cost), with dropout 0.1 (MLRG's), and with dropout 0.1 but none
  on the attention weights (`attention_dropout 0`). Pixels are read from
  images decoded once beforehand unless said. One step = a batch from the
  DataLoader (data loading included, as `mlrg.engine.fit` runs it) + forward + backward + AdamW; samples/s = median over
  --steps steps after 2 warm-up steps. FLOPs per sample: torch.utils.flop_counter.FlopCounterMode over one forward +
  backward (matmuls, convolutions, attention; 2 FLOPs per multiply-add), over the batch size. Achieved FLOP/s = FLOPs
  per sample x samples/s, as a share of the best n x n fp32 matmul measured here (pretrain_throughput.matmul_peak).

    python benchmarks/finetune_speed.py --run_dir RUN --checkpoint RUN/finetune/best.pt --threads 2

Prints and saves JSON to benchmarks/results/finetune_speed.json.
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from mlrg.core import save_json, seed_everything
from mlrg.data import read_annotation
from mlrg.finetune import FINETUNE, build_finetune, dataset_for, load_report_model
from mlrg.report_model import generate_records
from mlrg.study import STUDY_PRESETS
from mlrg.inputs import image_root_for
from pretrain_throughput import matmul_peak  # same folder: one peak measurement for both stages

RESULTS = Path(__file__).parent / "results"
# the demo preset's stage-2 model and encoder settings (its budget and schedule do not change a step's cost)
DEMO_MODEL_KEYS = ("token_grid", "prior_path", "freeze_image_encoder")


def generation_speed(checkpoint, annotation, n, batch_size) -> dict:
    "reports/s of beam search with and without the key/value cache on the first `n` test samples."
    model, vocab, ck = load_report_model(checkpoint)
    items = read_annotation(annotation)["test"][:n]
    ds = dataset_for(ck, items, image_root_for(Path(annotation)), vocab)
    gen = {**ck["config"]["generation"], "num_beams": 3, "max_length": 100}
    out, texts = {}, {}
    for use_cache in (True, False):
        t0 = time.perf_counter()
        recs = generate_records(model, ds, None, batch_size, {**gen, "use_cache": use_cache}, with_loss=False)
        secs = time.perf_counter() - t0
        key = "cached" if use_cache else "uncached"
        texts[key] = [r["generated"] for r in recs]
        out[key] = {
            "reports_per_s": round(len(recs) / secs, 2),
            "seconds": round(secs, 2),
            "mean_words": round(sum(len(t.split()) for t in texts[key]) / len(recs), 1),
        }
    out["speedup"] = round(out["cached"]["reports_per_s"] / out["uncached"]["reports_per_s"], 2)
    out["same_reports"] = texts["cached"] == texts["uncached"]
    out.update(samples=len(items), batch_size=batch_size, beams=3, max_length=100, checkpoint=str(checkpoint))
    return out


def training_speed(run_dir, name, overrides, batch_size, steps, peak, image_cache=True) -> dict:
    """samples/s, FLOPs per sample and the share of the matmul peak of stage-2 training steps in one setting; with
    `image_cache` every training image is decoded once first (as after the first epoch), else every read decodes."""
    p = FINETUNE.check(
        run_dir=run_dir, batch_size=batch_size, progress=False, test=False, meteor=False, seed=0, **overrides
    )
    parts = build_finetune(p)
    model = parts.model.train()
    if parts.features is None:
        if image_cache:
            for i in range(len(parts.train_ds)):
                parts.train_ds[i]
        else:
            parts.train_ds.image_cache_bytes = 0
    seed_everything(0)
    loader = torch.utils.data.DataLoader(
        parts.train_ds, batch_size=batch_size, shuffle=True, collate_fn=parts.collate_fn, drop_last=True
    )
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-4)
    batches = iter(loader)
    with FlopCounterMode(display=False) as fc:
        model(next(batches))["loss"].backward()
    flops = fc.get_total_flops() / batch_size
    opt.zero_grad(set_to_none=True)
    times = []
    for step in range(steps + 2):
        t0 = time.perf_counter()
        batch = next(batches)
        loss = model(batch)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step >= 2:
            times.append(time.perf_counter() - t0)
    sps = batch_size / statistics.median(times)
    return {
        "setting": name,
        "features_cached": parts.features is not None,
        "images_decoded_once": parts.features is None and image_cache,
        "trainable_params_M": round(sum(q.numel() for q in model.parameters() if q.requires_grad) / 1e6, 2),
        "samples_per_s": round(sps, 2),
        "samples_per_s_best": round(batch_size / min(times), 2),
        "flops_per_sample_G": round(flops / 1e9, 3),
        "achieved_GFLOPs": round(flops * sps / 1e9, 2),
        "share_of_matmul_peak": round(flops * sps / peak, 4),
        "batch_size": batch_size,
        "steps": steps,
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    ap.add_argument("--run_dir", required=True, help="run folder with the demo phantom, prepared, and stage 1")
    ap.add_argument("--checkpoint", required=True, help="a trained stage-2 checkpoint for the generation speed")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n", type=int, default=64, help="test samples generated")
    ap.add_argument("--gen_batch_size", type=int, default=16)
    ap.add_argument("--batch_size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--matmul_n", type=int, default=2048)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    peak = matmul_peak(torch.device("cpu"), torch.float32, args.matmul_n)
    print(f"matmul peak ({args.matmul_n}^2, fp32, {args.threads} threads): {peak / 1e9:.1f} GFLOP/s", flush=True)
    gen = generation_speed(
        args.checkpoint, Path(args.run_dir) / "prepared" / "annotation.json", args.n, args.gen_batch_size
    )
    print("generation:", json.dumps(gen), flush=True)
    demo = {k: STUDY_PRESETS["demo"]["params"]["finetune"][k] for k in DEMO_MODEL_KEYS}
    train = [
        training_speed(args.run_dir, name, {**demo, **kw}, args.batch_size, args.steps, peak, cache)
        for name, kw, cache in (
            ("encoder frozen, cached features", {"freeze_image_encoder": True, "cache_features": True}, True),
            ("encoder frozen, pixels", {"freeze_image_encoder": True, "cache_features": False}, True),
            ("encoder trained (the demo's stage 2)", {}, True),
            ("encoder trained, every image decoded at each read", {}, False),
            ("encoder trained, dropout 0.1", {"dropout": 0.1}, True),
            ("encoder trained, dropout 0.1 but not on attention", {"dropout": 0.1, "attention_dropout": 0.0}, True),
        )
    ]
    for t in train:
        print("training:", json.dumps(t), flush=True)
    peak_after = matmul_peak(torch.device("cpu"), torch.float32, args.matmul_n)
    out = {
        "benchmark": "finetune_speed",
        "threads": args.threads,
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "load_average": os.getloadavg(),
        "matmul_peak_GFLOPs": round(peak / 1e9, 2),
        "matmul_peak_after_GFLOPs": round(peak_after / 1e9, 2),
        "generation": gen,
        "training": train,
    }
    save_json(out, RESULTS / "finetune_speed.json")
    print(f"-> {RESULTS / 'finetune_speed.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

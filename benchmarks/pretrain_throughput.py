"""Stage-1 training throughput, model FLOPs per sample and the share of a measured matmul peak.

CPU (default, demo settings): MLRGPretrainModel as `mlrg.pretrain` builds it for the demo run (small_cnn at 128 px,
mlrg mode with all three ablation flags on), a batch shaped like `mlrg.data.collate`'s for a typical phantom sample
(anchor + one auxiliary view + a prior image; a report of --text-len tokens). One step = forward + backward + AdamW.

- samples/s: median and best over --steps steps after 2 warm-up steps;
- FLOPs per sample: torch.utils.flop_counter.FlopCounterMode over one forward + backward, divided by the batch size
  (matmuls, convolutions and attention; 2 FLOPs per multiply-add; the optimizer and elementwise ops are not counted);
- achieved FLOP/s = FLOPs per sample x samples/s, as a share of a matmul peak measured in the same run and on the same
  threads (the best of several n x n fp32 matmuls, 2 n^3 FLOPs each);
- with --data_path: also the samples/s of `mlrg.pretrain.pretrain` itself (JPEG decoding and batching included) over
  --fit-steps steps, as `mlrg.engine.fit` logs it.

--device cuda: MIMIC-scale settings (518 px, a ViT-B/14-sized encoder: patch 14, width 768, depth 12, heads 12, frozen
as MLRG freezes RAD-DINO; fusion width 768; a 6-layer width-768 text encoder; batch 32; bf16 autocast): samples/s,
peak GPU memory, FLOPs per sample and the share of a bf16 matmul peak. Without a CUDA device it says so and exits 0.

    .venv/bin/python benchmarks/pretrain_throughput.py [--threads 2] [--data_path /tmp/pt/prepared/annotation.json]
    .venv/bin/python benchmarks/pretrain_throughput.py --device cuda

Prints and saves JSON to benchmarks/results/pretrain_throughput[_cuda].json.
"""

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from mlrg.core import read_jsonl, save_json, seed_everything
from mlrg.models import MLRGPretrainModel, dummy_batch

RESULTS = Path(__file__).parent / "results"


def make_batch(batch_size, image_size, text_len, vocab_size, seed, device):
    "Every sample: anchor (PA) + one auxiliary view (LATERAL) + a prior (PA); two samples per study."
    b = dummy_batch(batch_size, image_size, max_views=3, vocab_size=vocab_size, seed=seed)
    g = torch.Generator().manual_seed(seed)
    b["images"] = torch.randn(b["images"].shape, generator=g)
    b["image_mask"][:] = torch.tensor([True, True, False, True])
    b["images"][:, 2] = 0
    b["has_prior"][:] = True
    b["temporal_ids"][:] = torch.tensor([0, 0, 0, 1])
    b["view_ids"][:] = torch.tensor([1, 3, 0, 1])
    b["target_ids"] = torch.randint(9, vocab_size, (batch_size, text_len), generator=g)
    b["target_ids"][:, 0], b["target_ids"][:, -1] = 2, 3
    b["target_mask"] = torch.ones_like(b["target_ids"], dtype=torch.bool)
    b["study_id"] = [i // 2 for i in range(batch_size)]
    return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in b.items()}


def matmul_peak(device, dtype, n, reps=5):
    "Best FLOP/s of an n x n matmul on `device`."
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    a @ b
    sync()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def measure_model(cfg, args, device, amp):
    seed_everything(args.seed)
    model = MLRGPretrainModel(cfg).to(device).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    batch = make_batch(args.batch_size, cfg["image_size"], args.text_len, cfg["vocab_size"], args.seed, device)
    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp == "bf16")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with FlopCounterMode(display=False) as fc:
        with autocast():
            loss = model(batch)["loss"]
        loss.float().backward()
    flops = fc.get_total_flops()
    opt.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for step in range(args.steps + 2):
        sync()
        t0 = time.perf_counter()
        with autocast():
            loss = model(batch)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.float().backward()
        opt.step()
        sync()
        if step >= 2:
            times.append(time.perf_counter() - t0)
    out = {
        "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
        "trainable_params_M": round(sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6, 2),
        "samples_per_s_median": round(args.batch_size / statistics.median(times), 2),
        "samples_per_s_best": round(args.batch_size / min(times), 2),
        "flops_per_sample_G": round(flops / args.batch_size / 1e9, 3),
        "final_loss": round(float(loss.detach()), 4),
    }
    if device.type == "cuda":
        out["peak_memory_GiB"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return out


def measure_fit(args):
    "samples/s of the real stage-1 entry point (data loading included), as fit logs it."
    from mlrg.pretrain import pretrain

    with tempfile.TemporaryDirectory() as d:
        s = pretrain(
            data_path=args.data_path,
            image_size=args.image_size,
            batch_size=args.batch_size,
            max_steps=args.fit_steps,
            log_steps=args.fit_steps,
            linear_probe=False,
            progress=False,
            eval_batch_size=64,
            model_save_path=d,
            num_threads=args.threads,
        )
        rec = [r for r in read_jsonl(Path(d) / "metrics.jsonl") if r["kind"] == "train"][-1]
    return {"fit_samples_per_s": rec["samples_per_s"], "fit_steps": args.fit_steps, "data_path": args.data_path}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--image-size", type=int, default=None, help="default: 128 (cpu), 518 (cuda)")
    ap.add_argument("--batch-size", type=int, default=None, help="default: 16 (cpu), 32 (cuda)")
    ap.add_argument("--text-len", type=int, default=60, help="tokens per report, [BOS] and [EOS] included")
    ap.add_argument("--vocab-size", type=int, default=None, help="default: 270 (the demo phantom's), 10000 (cuda)")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--matmul-n", type=int, default=None, help="matmul size for the peak (default 2048 cpu, 8192 cuda)")
    ap.add_argument("--train-encoder", action="store_true", help="cuda: train the ViT instead of freezing it")
    ap.add_argument("--data_path", default=None, help="also time mlrg.pretrain itself on this annotation")
    ap.add_argument("--fit-steps", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    cuda = args.device == "cuda"
    out = Path(args.out) if args.out else RESULTS / f"pretrain_throughput{'_cuda' if cuda else ''}.json"
    if cuda and not torch.cuda.is_available():
        msg = "no CUDA device: torch.cuda.is_available() is False, nothing measured"
        print(msg)
        save_json(
            {"benchmark": "pretrain_throughput", "device": "cuda", "status": msg, "torch": torch.__version__}, out
        )
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if cuda else "cpu")
    args.image_size = args.image_size or (518 if cuda else 128)
    args.batch_size = args.batch_size or (32 if cuda else 16)
    vocab = args.vocab_size or (10000 if cuda else 270)
    if cuda:
        cfg = dict(
            image_encoder="small_vit",
            image_size=args.image_size,
            freeze_image_encoder=not args.train_encoder,
            image_encoder_kw=dict(patch_size=14, dim=768, depth=12, heads=12),
            d_model=768,
            proj_dim=512,
            fusion_heads=8,
            text_dim=768,
            text_depth=6,
            text_heads=12,
            vocab_size=vocab,
        )
        amp, peak_dtype, n = "bf16", torch.bfloat16, args.matmul_n or 8192
    else:
        cfg = dict(image_encoder="small_cnn", image_size=args.image_size, vocab_size=vocab)
        amp, peak_dtype, n = "none", torch.float32, args.matmul_n or 2048
    load_before = os.getloadavg()
    peak = matmul_peak(device, peak_dtype, n)
    res = measure_model(cfg, args, device, amp)
    achieved = res["flops_per_sample_G"] * 1e9 * res["samples_per_s_median"]
    res.update(
        {
            "achieved_GFLOP_per_s": round(achieved / 1e9, 2),
            "matmul_peak_GFLOP_per_s": round(peak / 1e9, 1),
            "matmul_peak_dtype": str(peak_dtype).replace("torch.", ""),
            "matmul_n": n,
            "share_of_matmul_peak": round(achieved / peak, 4),
        }
    )
    if args.data_path and not cuda:
        res.update(measure_fit(args))
    result = {
        "benchmark": "pretrain_throughput",
        "device": str(device) if not cuda else torch.cuda.get_device_name(0),
        "settings": {
            "image_size": args.image_size,
            "batch_size": args.batch_size,
            "text_len": args.text_len,
            "amp": amp,
            "images_per_sample": 3,
            "model": cfg,
        },
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "torch": torch.__version__,
        "python": platform.python_version(),
        "results": res,
    }
    for k, v in res.items():
        print(f"{k:>28}: {v}")
    save_json(result, out)
    print(f"saved {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

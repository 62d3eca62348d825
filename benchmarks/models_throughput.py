"""Training throughput of the stage-1 model (mlrg.models.MLRGPretrainModel) on the CPU.

One step = forward + backward + AdamW step on a random batch shaped like mlrg.data.collate's: every sample has 3 images
(anchor, one auxiliary view, a prior) at --image-size px and a --text-len-token report. Reports samples/s (median and
best over --steps steps after 2 warm-up steps) per image encoder, with the thread count and the load average (the
machine may be shared), as JSON: printed and saved to benchmarks/results/models_throughput.json.

    .venv/bin/python benchmarks/models_throughput.py [--encoders small_cnn small_vit] [--image-size 128] \\
        [--batch-size 16]

Target: > 50 samples/s for small_cnn / small_vit at 128 px on 2 cores."""

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from mlrg.core import save_json, seed_everything
from mlrg.models import MLRGPretrainModel, dummy_batch


def make_batch(batch_size, image_size, text_len, vocab_size, seed):
    b = dummy_batch(batch_size, image_size, max_views=2, vocab_size=vocab_size, seed=seed)
    g = torch.Generator().manual_seed(seed)
    b["images"] = torch.randn(b["images"].shape, generator=g)
    b["image_mask"][:] = True
    b["has_prior"][:] = True
    b["temporal_ids"][:, -1] = 1
    b["view_ids"][:, 0], b["view_ids"][:, 1], b["view_ids"][:, 2] = 1, 3, 1  # PA, LATERAL, prior PA
    b["target_ids"] = torch.randint(9, vocab_size, (batch_size, text_len), generator=g)
    b["target_ids"][:, 0], b["target_ids"][:, -1] = 2, 3
    b["target_mask"] = torch.ones_like(b["target_ids"], dtype=torch.bool)
    b["study_id"] = [i // 2 for i in range(batch_size)]
    return b


def measure(encoder, args):
    seed_everything(args.seed)
    model = MLRGPretrainModel(
        dict(vocab_size=args.vocab_size, image_encoder=encoder, image_size=args.image_size)
    ).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    batch = make_batch(args.batch_size, args.image_size, args.text_len, args.vocab_size, args.seed)
    times = []
    for step in range(args.steps + 2):
        t0 = time.perf_counter()
        loss = model(batch)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step >= 2:
            times.append(time.perf_counter() - t0)
    model.eval()
    fwd = []
    with torch.no_grad():
        for _ in range(3):
            t0 = time.perf_counter()
            model(batch)
            fwd.append(time.perf_counter() - t0)
    return {
        "encoder": encoder,
        "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 3),
        "train_samples_per_s_median": round(args.batch_size / statistics.median(times), 1),
        "train_samples_per_s_best": round(args.batch_size / min(times), 1),
        "eval_forward_samples_per_s": round(args.batch_size / statistics.median(fwd), 1),
        "images_per_sample": 3,
        "final_loss": round(loss.item(), 4),
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--encoders", nargs="+", default=["small_cnn", "small_vit"])
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--text-len", type=int, default=50, help="tokens per report, [BOS] and [EOS] included")
    ap.add_argument("--vocab-size", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "models_throughput.json"))
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    rows = []
    for enc in args.encoders:
        rows.append(measure(enc, args))
        print(rows[-1], flush=True)
    result = {
        "benchmark": "models_throughput",
        "image_size": args.image_size,
        "batch_size": args.batch_size,
        "text_len": args.text_len,
        "steps": args.steps,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "torch": torch.__version__,
        "python": platform.python_version(),
        "results": rows,
    }
    save_json(result, args.out)
    print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

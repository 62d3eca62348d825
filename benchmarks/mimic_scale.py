"""Memory and FLOPs of MLRG's own backbones at the paper's MIMIC-CXR settings: estimated anywhere, measured on a GPU.

The models are mlrg's stage-1 and stage-2 models built through the same code as `mlrg pretrain/finetune --preset mimic`,
from local folders of *random* weights of the real sizes (written once to --folders with `save_pretrained`): RAD-DINO
(Dinov2 ViT-B/14, 768 wide, 12 layers) at 518 px (1 + 1 + 37 x 37 = 1,371 tokens per image), CXR-BERT (BERT-base cut to
6 layers), DistilGPT2 (6 layers, 768, 12 heads, 1024 positions) with cross-attention, the GPT-2 vocabulary plus MLRG's 9
tokens (50,266), fusion width 768. Every sample has its anchor, two auxiliary views and a prior image (the worst case of
max_views=3; 4 images, of which the anchor's 1,371 tokens and its 1,371 fused tokens make the 2,742-token memory), a
200-token prompt and a 100-token report.

Estimate (any machine, CPU): one sample's forward + backward under bf16 autocast, as the GPU run does it.
- FLOPs per sample: torch.utils.flop_counter (matmuls, attention; 2 FLOPs per multiply-add), forward and backward.
- Activation memory per sample: the bytes of every tensor autograd saves for the backward pass (saved-tensor hooks;
  storages counted once), so frozen RAD-DINO (run without a graph) adds none. Attention layers that fall back to the
  explicit kernel on this machine save their (heads, queries, keys) matrices; fused kernels (flash / memory-efficient,
  as on a GPU) keep none, so the per-GPU figure is given both ways.
- Per GPU at batch B: fp32 weights + fp32 gradients and AdamW's two fp32 moments of the trainable weights + B x the
  activations. Not counted: the allocator's fragmentation, transient buffers of single kernels, CUDA context (~0.5 GiB).
With --device cuda (needs a GPU; CI never has one): the same models train on random batches at batch 32 (stage 1) and
14 (stage 2) with bf16 autocast and AdamW; samples/s (median of --steps steps), peak memory
(torch.cuda.max_memory_allocated) and MFU = FLOPs per sample x samples/s / --peak-tflops (H100/H200 dense bf16: 989).

    python benchmarks/mimic_scale.py                # estimate (CPU, ~2 minutes on 2 cores after the folders exist)
    python benchmarks/mimic_scale.py --device cuda  # measure on a GPU

Prints and saves JSON to benchmarks/results/mimic_scale[_cuda].json."""

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from mlrg.core import save_json, seed_everything
from mlrg.report_model import MLRGReportModel, report_model_config
from mlrg.decoder import gpt2_decoder_config
from mlrg.models import MLRGPretrainModel, dummy_batch, pretrain_config

RESULTS = Path(__file__).parent / "results"
VOCAB = 50_257 + 9  # GPT-2's tokens + [BOS] [PAD] [CLS] [SEP] [MASK] [EOS] [UNK] [NHI] [NHPR]
PAD, BOS, EOS = 50_258, 50_257, 50_262


def write_folders(root: Path) -> dict:
    "Folders of random weights of the real sizes, in the save_pretrained layout (written once)."
    import transformers as tr

    tr.utils.logging.set_verbosity_error()
    tr.utils.logging.disable_progress_bar()
    folders = {k: root / k for k in ("rad_dino", "cxr_bert", "distilgpt2")}
    if all((f / "config.json").is_file() for f in folders.values()):
        return folders
    torch.manual_seed(0)
    tr.Dinov2Model(
        tr.Dinov2Config(
            hidden_size=768,
            num_hidden_layers=12,
            num_attention_heads=12,
            intermediate_size=3072,
            patch_size=14,
            image_size=518,
            layerscale_value=1.0,
        )
    ).save_pretrained(folders["rad_dino"])
    (folders["rad_dino"] / "preprocessor_config.json").write_text(
        json.dumps({"image_mean": [0.5307] * 3, "image_std": [0.2583] * 3})
    )
    tr.BertModel(tr.BertConfig(vocab_size=30_522)).save_pretrained(
        folders["cxr_bert"]
    )  # BERT-base, 12 layers; cut to 6
    tr.GPT2LMHeadModel(tr.GPT2Config(n_layer=6)).save_pretrained(folders["distilgpt2"])  # DistilGPT2's sizes
    return folders


def stage1_model(f):
    return MLRGPretrainModel(
        pretrain_config(
            image_encoder="rad_dino",
            image_size=518,
            image_pretrained_path=str(f["rad_dino"]),
            freeze_image_encoder=True,
            text_encoder="cxr_bert",
            text_pretrained_path=str(f["cxr_bert"]),
            text_layers=6,
            vocab_size=VOCAB,
            pad_id=PAD,
            d_model=768,
            proj_dim=768,
        )
    )


def stage2_model(f):
    dec = {
        **gpt2_decoder_config(f["distilgpt2"]),
        "max_length": 100,
        "dropout": 0.1,
        "pad_id": PAD,
        "bos_id": BOS,
        "eos_id": EOS,
    }
    return MLRGReportModel(
        report_model_config(
            {
                "visual": dict(
                    image_encoder="rad_dino",
                    image_size=518,
                    image_pretrained_path=str(f["rad_dino"]),
                    freeze_image_encoder=True,
                    d_model=768,
                ),
                "prompt": dict(
                    encoder="cxr_bert",
                    pretrained_path=str(f["cxr_bert"]),
                    n_layers=6,
                    vocab_size=VOCAB,
                    pad_id=PAD,
                    max_len=512,
                ),
                "prompt_heads": 8,
                "decoder": dec,
                "dropout": 0.1,
            }
        )
    )


def batch_of(n, prompt_len=200, report_len=100, device="cpu"):
    "`n` samples with all 4 image slots used, a `prompt_len`-token prompt (2 segments) and a `report_len`-token report."
    b = dummy_batch(n, image_size=518, max_views=3, vocab_size=VOCAB, seed=0, max_text=4)
    b["image_mask"][:] = True
    b["has_prior"][:] = True
    b["view_ids"][:] = 1
    b["temporal_ids"][:, -1] = 1
    g = torch.Generator().manual_seed(0)
    b["prompt_ids"] = torch.randint(0, 50_257, (n, prompt_len), generator=g)
    b["prompt_mask"] = torch.ones(n, prompt_len, dtype=torch.bool)
    b["prompt_segments"] = (torch.arange(prompt_len) >= prompt_len // 2).long().expand(n, -1).clone()
    b["target_ids"] = torch.randint(0, 50_257, (n, report_len), generator=g)
    b["target_ids"][:, 0] = BOS
    b["target_mask"] = torch.ones(n, report_len, dtype=torch.bool)
    b["study_id"] = [f"s{i // 2}" for i in range(n)]
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in b.items()}


def estimate(model, batch, bf16=True) -> dict:
    "FLOPs and saved-activation bytes of one forward + backward of `batch` (one sample), and the model's weight counts."
    saved = {}

    def pack(t):
        try:
            key, n = t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()
        except (RuntimeError, NotImplementedError):
            key, n = id(t), t.numel() * t.element_size()
        # (1, heads, queries, keys) tensors of the attention layers that run without a fused kernel on this machine
        attn = t.ndim == 4 and t.shape[0] == 1 and t.shape[1] in (8, 12) and min(t.shape[2:]) > 1 and t.shape[-1] != 64
        saved[key] = (max(saved.get(key, (0, False))[0], n), attn)
        return t

    model.train()
    with FlopCounterMode(display=False) as fc, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(batch)["loss"]
        loss.float().backward()
    flops = fc.get_total_flops()
    enc = model.visual.image_encoder
    n_img = int(batch["image_mask"].sum())
    with (
        FlopCounterMode(display=False) as fe,
        torch.no_grad(),
        torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16),
    ):
        enc(torch.zeros(n_img, 1, enc.image_size, enc.image_size))
    params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    attn = sum(n for n, a in saved.values() if a)
    return {
        "flops_per_sample_T": flops / 1e12,
        "image_encoder_forward_T": fe.get_total_flops() / 1e12,
        "activations_per_sample_GiB": sum(n for n, _ in saved.values()) / 2**30,
        "of_which_attention_matrices_GiB": attn / 2**30,
        "params_M": params / 1e6,
        "trainable_M": trainable / 1e6,
    }


def per_gpu(est, batch_size) -> dict:
    """GiB per GPU at `batch_size`: fp32 weights, fp32 grads + AdamW moments of the trainable ones, activations; the
    total as measured here, and without the attention matrices (what fused attention kernels, as on a GPU, do not keep).
    """
    w = est["params_M"] * 1e6 * 4 / 2**30
    opt = est["trainable_M"] * 1e6 * (4 + 8) / 2**30
    act = est["activations_per_sample_GiB"] * batch_size
    fused = (est["activations_per_sample_GiB"] - est["of_which_attention_matrices_GiB"]) * batch_size
    return {
        "batch_size": batch_size,
        "weights_GiB": round(w, 2),
        "grads_and_adamw_GiB": round(opt, 2),
        "activations_GiB": round(act, 2),
        "total_GiB": round(w + opt + act, 2),
        "activations_fused_attention_GiB": round(fused, 2),
        "total_fused_attention_GiB": round(w + opt + fused, 2),
    }


def measure_cuda(model, batch_size, steps, peak_tflops, flops_per_sample) -> dict:
    "samples/s, peak memory and MFU of bf16 training steps on random batches of `batch_size` on the GPU."
    dev = torch.device("cuda")
    model = model.to(dev).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-5)
    b = batch_of(batch_size, device=dev)
    torch.cuda.reset_peak_memory_stats()
    times = []
    for step in range(steps + 2):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(b)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.float().backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        opt.step()
        torch.cuda.synchronize()
        if step >= 2:
            times.append(time.perf_counter() - t0)
    sps = batch_size / statistics.median(times)
    return {
        "batch_size": batch_size,
        "samples_per_s": round(sps, 2),
        "peak_memory_GiB": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "mfu": round(flops_per_sample * 1e12 * sps / (peak_tflops * 1e12), 3),
        "steps": steps,
        "final_loss": round(float(loss), 3),
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument(
        "--folders", default=str(RESULTS / "mimic_scale_random_backbones"), help="where the random real-size folders go"
    )
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="the GPU's dense bf16 peak (H100 / H200 SXM: 989)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        sys.exit("no CUDA device: torch.cuda.is_available() is False, nothing measured")
    f = write_folders(Path(args.folders))
    out = {
        "machine": {
            "platform": platform.platform(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name() if cuda else None,
        },
        "settings": {
            "image_size": 518,
            "tokens_per_image": 1371,
            "images_per_sample": 4,
            "visual_memory_tokens": 2742,
            "prompt_tokens": 200,
            "report_tokens": 100,
            "vocab": VOCAB,
            "amp": "bf16",
            "optimizer": "AdamW",
        },
    }
    for stage, build, bs in (("stage1", stage1_model, 32), ("stage2", stage2_model, 14)):
        seed_everything(9233)
        t0 = time.perf_counter()
        model = build(f)
        est = estimate(model, batch_of(1))
        est = {k: round(v, 3) if isinstance(v, float) else v for k, v in est.items()}
        out[stage] = {
            "estimate": est,
            "per_gpu": per_gpu(est, bs),
            "estimate_seconds": round(time.perf_counter() - t0, 1),
        }
        if cuda:
            out[stage]["measured"] = measure_cuda(model, bs, args.steps, args.peak_tflops, est["flops_per_sample_T"])
        print(stage, json.dumps(out[stage], indent=1), flush=True)
        model = None
    path = Path(args.out) if args.out else RESULTS / f"mimic_scale{'_cuda' if cuda else ''}.json"
    save_json(out, path)
    print("saved", path)


if __name__ == "__main__":
    main()

"""The official side of `benchmarks/compare_mlrg.py`: MLRG's own stage-1 and stage-2 modules on a tiny batch.

Run by compare_mlrg.py with the second virtualenv's Python (MLRG's pinned transformers, pytorch_lightning, ...), never
imported by mlrg. It reads the fixtures compare_mlrg.py wrote (`<work>/fixtures.json`), imports MLRG's code from
`--mlrg-root` (a checkout of MLRG's repository, read in place, never copied), and:

1. writes the tiny backbones' weights (Dinov2, BERT, GPT-2) into the folders whose config.json compare_mlrg.py wrote,
   with this venv's transformers (as the real hub folders were written by an older transformers);
2. builds MLRG's `Pretrain` and `Finetune` (models/model_pretrain_finetune_v0905_ablation.py) with the arguments of
   tools/utils.py's `setup_arguments` defaults, the MIMIC-CXR scripts' values and the tiny folders;
3. batches the annotation's train split with MLRG's own datasets and collate functions (MimiccxrPretrainDataset +
   PretrainDinov2CollateFn, MimiccxrFinetuneDataset + FinetuneDinov2CollateFn);
4. runs both modules in train mode (every dropout is 0, so the losses are deterministic; BatchNorm uses batch
   statistics, as in training) and records intermediate tensors by observing calls (forward hooks, and wrappers
   around bound methods that return what the method returned, and around the collate functions' Image.open to learn
   the order of the batch's images). Stage 2 first runs in eval mode, while BatchNorm's running statistics are the
   initial ones (the mlrg side does the same), and generates from that memory with
   `text_decoder.encoder_decoder.generate` (greedy, and MLRG's 3 beams, max_length 100). The [EOS] row of the
   decoder's tied token embedding is scaled by EOS_SCALE before the weights are saved, so that generated reports end
   at different lengths; `cvt2distilgpt2_path` is None (MLRG's other branch: distilgpt2 + resize_token_embeddings),
   since every weight is copied to mlrg's model anyway;
5. saves plain tensors, lists and strings to `--out` (torch.save, read back with weights_only=True).

MLRG's metric modules (tools.metrics.chexbert, .coco, .report_logger) pull in radgraph 0.0.9, allennlp, stanza,
pycocoevalcap's SPICE, ...: none of it is needed for a forward pass, so exactly these three modules are replaced in
`sys.modules` by stand-ins whose classes do nothing (`Finetune.__init__` only constructs them).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import types
from pathlib import Path

STUBBED_MODULES = {
    "tools.metrics.chexbert": ("RadGraphMetrics", "F1CheXbertMetrics"),
    "tools.metrics.coco": ("COCOCaptionMetrics",),
    "tools.metrics.report_logger": ("ReportLogger",),
}


EOS_SCALE = 3.0


class _NoMetric:
    "Stands in for MLRG's metric classes: constructed by Finetune.__init__, never used in a forward pass."

    def __init__(self, *args, **kwargs):
        pass


def stub_metric_modules():
    "Put stand-ins for MLRG's metric modules into sys.modules (see the module docstring)."
    for name, classes in STUBBED_MODULES.items():
        mod = types.ModuleType(name)
        for c in classes:
            setattr(mod, c, type(c, (_NoMetric,), {}))
        sys.modules[name] = mod


class _Logger:
    "MLRG's SetLogger writes to a file; nothing here needs its log."

    def info(self, message):
        pass


def write_backbones(fx, seed):
    "Random weights for the tiny backbone folders (config.json already written by compare_mlrg.py)."
    import torch
    import transformers as tr

    torch.manual_seed(seed)
    for key, cls in (("rad_dino", tr.Dinov2Model), ("cxr_bert", tr.BertModel), ("distilgpt2", tr.GPT2LMHeadModel)):
        folder = Path(fx["paths"][key])
        config = tr.AutoConfig.from_pretrained(str(folder))
        model = cls(config)
        model.save_pretrained(str(folder))
        # save_pretrained rewrites config.json with this version's keys; keep compare_mlrg.py's (plain) one
        (folder / "config.json").write_text(json.dumps(fx["configs"][key], indent=1))


def mlrg_args(fx, task):
    "MLRG's argument dict: setup_arguments' defaults, the MIMIC-CXR scripts' values, the tiny folders."
    p = fx["paths"]
    args = dict(
        # tools/utils.py setup_arguments defaults
        task=task,
        data_name="mimic_cxr",
        max_length=100,
        num_workers=0,
        is_save_checkpoint=False,
        is_multiview_learning=True,
        is_prior_scan=True,
        using_mpc_loss=True,
        using_local_loss=False,
        is_prior_report=True,
        is_indication=True,
        report_style="factual_serialization",
        text_encoder_num_layers=6,
        cross_modal_fusion_num_layers=1,
        multiview_fusion_num_layers=3,
        num_heads=8,
        pt_lr=5.0e-6,
        ft_lr=5.0e-5,
        temp=0.5,
        monitor_metric="RCB",
        epochs=50,
        batch_size=2,
        hidden_size=fx["hidden_size"],  # MLRG: 768; the tiny check: the tiny folders' width
        resume=None,
        load=None,
        seed=9233,
        num_gpus=1,
        num_beams=3,
        print_step=500,
        device="cpu",
        exp_dir_trial=str(Path(fx["work"]) / "official_exp"),
        # the tiny folders (MLRG joins ckpt_zoo_dir with each name)
        ann_path=p["annotation"],
        view_position_embed=p["view_positions"],
        images_dir=p["images"] + "/",
        rad_dino_path=p["rad_dino"],
        cxr_bert_path=p["cxr_bert"],
        bert_path=p["cxr_bert"],
        distilgpt2_path=p["distilgpt2"],
        # no cvt2distilgpt2 checkpoint: MLRG's other branch (distilgpt2 + resize_token_embeddings); every decoder
        # weight is copied to mlrg's model anyway
        cvt2distilgpt2_path=None,
        chexbert_path="unused",
        radgraph_path="unused",
    )
    if task == "pretrain":
        # script/MIMIC-CXR/run_cxr_pt_v0906_fs.sh, and setup_arguments' rule for pretraining
        args.update(pt_lr=5.0e-5, batch_size=32, monitor_metric="val_epoch_loss", monitor_mode="min")
    else:
        # script/MIMIC-CXR/run_cxr_ft_mlrg_v1011.sh
        args.update(using_mpc_loss=False, pt_lr=5.0e-6, ft_lr=5.0e-5, batch_size=14, monitor_mode="max")
    return args


def build_tokenizer(path):
    "MLRG's tokenizer, as main_v0926_ablation_study.py builds it."
    from transformers import GPT2TokenizerFast

    tokenizer = GPT2TokenizerFast.from_pretrained(path)
    tokenizer.add_special_tokens(
        {
            "bos_token": "[BOS]",
            "pad_token": "[PAD]",
            "cls_token": "[CLS]",
            "sep_token": "[SEP]",
            "mask_token": "[MASK]",
            "eos_token": "[EOS]",
            "unk_token": "[UNK]",
        }
    )
    tokenizer.add_tokens(["[NHI]", "[NHPR]"])
    return tokenizer


class Recorder:
    "Records what MLRG's code computes, without changing it: forward hooks and wrappers of bound methods."

    def __init__(self):
        self.calls = {}

    def add(self, key, value):
        self.calls.setdefault(key, []).append(value)

    def wrap(self, obj, name, key=None, keep_args=False):
        "Replace bound method obj.name by one that records (args and) the return value, then returns it unchanged."
        fn = getattr(obj, name)
        rec = self

        def wrapper(*args, **kwargs):
            out = fn(*args, **kwargs)
            rec.add(key or name, (args, kwargs, out) if keep_args else out)
            return out

        setattr(obj, name, wrapper)

    def hook(self, module, key, pre=False):
        if pre:
            module.register_forward_pre_hook(lambda m, args, kwargs: self.add(key, (args, kwargs)), with_kwargs=True)
        else:
            module.register_forward_hook(lambda m, args, out: self.add(key, out))


def record_image_opens(ds_module, rec):
    "Record the image paths MLRG's collate functions open, in order (the order of the batch's images)."
    real = ds_module.Image

    class _ImageProxy:
        def __getattr__(self, name):
            return getattr(real, name)

        @staticmethod
        def open(path, *a, **k):
            rec.add("image_paths", str(path))
            return real.open(path, *a, **k)

    ds_module.Image = _ImageProxy()


def detach(x):
    "Tensors detached onto the CPU (float32 kept), numpy arrays as lists, containers walked."
    import numpy as np
    import torch

    if torch.is_tensor(x):
        return x.detach().cpu().clone()
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, dict):
        return {str(k): detach(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [detach(v) for v in x]
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    if hasattr(x, "keys"):  # BatchEncoding
        return {str(k): detach(x[k]) for k in x.keys()}
    return str(x)


def rel_paths(paths, images_dir):
    root = str(Path(images_dir).resolve())
    return [os.path.relpath(str(Path(p).resolve()), root) for p in paths]


def run_pretrain(fx, tokenizer, out, ds_module):
    import pytorch_lightning as pl
    import torch
    from models.model_pretrain_finetune_v0905_ablation import Pretrain

    from tools.dataset.datasets_v0818_ab import MimiccxrPretrainDataset, PretrainDinov2CollateFn

    args = mlrg_args(fx, "pretrain")
    pl.seed_everything(fx["seed"])
    model = Pretrain(args, tokenizer, _Logger())
    out["pretrain_state"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    out["pretrain_trainable"] = [n for n, p in model.named_parameters() if p.requires_grad]
    out["pretrain_args"] = {k: v for k, v in args.items() if isinstance(v, (str, int, float, bool)) or v is None}
    ds = MimiccxrPretrainDataset(args, "train", tokenizer)
    collate = PretrainDinov2CollateFn(
        args["images_dir"], model.image_processor, args["is_multiview_learning"], args["is_prior_scan"]
    )
    rec = Recorder()
    record_image_opens(ds_module, rec)
    batch = collate([ds[i] for i in range(len(ds))])
    image_ids, images, reports, patient_ids, view_positions = batch
    rec.hook(model.image_encoder, "pixels", pre=True)
    rec.hook(model.image_projection, "image_projection")
    rec.hook(model.text_projection, "text_projection")
    rec.hook(model.ln_2, "ln_2")
    rec.wrap(model, "tokenization")
    rec.wrap(model, "multiview_fusion_network")
    rec.wrap(model, "multiple_positive_contrastive_learning")
    rec.wrap(model, "global_alignment_loss")
    model.eval()  # as Lightning's validation step, first, while BatchNorm's running statistics are the initial ones
    with torch.no_grad():
        eval_losses = model(images, reports, patient_ids, view_positions)
    opened = rec.calls.pop("image_paths")
    rec.calls.clear()
    model.train()  # as Lightning's training step (dropout 0 everywhere; BatchNorm on batch statistics)
    with torch.no_grad():
        losses = model(images, reports, patient_ids, view_positions)
    c = rec.calls
    out["stage1"] = detach(
        {
            "ids": list(image_ids),
            "reports": list(reports),
            "patient_ids": patient_ids,
            "view_positions": view_positions,
            "image_paths": rel_paths(opened, args["images_dir"]),
            "pixels": c["pixels"][0][0][0],
            "text_inputs": dict(c["tokenization"][0]),
            "projected": c["image_projection"][0],
            "text_projected": c["text_projection"][0],
            "after_ln_2": c["ln_2"][0],
            "fused": c["multiview_fusion_network"][0],
            "loss": losses["loss"].reshape(()),
            "instance_loss": losses["instance_loss"].reshape(()),
            "mpc_loss": losses["mpc_loss"].reshape(()),
            "eval_loss": eval_losses["loss"].reshape(()),
        }
    )


def run_finetune(fx, tokenizer, out, ds_module):
    import pytorch_lightning as pl
    import torch
    import transformers
    from models.model_pretrain_finetune_v0905_ablation import Finetune

    from tools.dataset.datasets_v0818_ab import FinetuneDinov2CollateFn, MimiccxrFinetuneDataset

    args = mlrg_args(fx, "finetune")
    pl.seed_everything(fx["seed"] + 1)
    model = Finetune(args, tokenizer, _Logger())
    with torch.no_grad():  # a larger [EOS] row (tied input/output embedding): reports end at different lengths, so
        # greedy and beam search's rules for finished hypotheses are exercised (the weights are copied to mlrg)
        model.text_decoder.encoder_decoder.decoder.transformer.wte.weight[tokenizer.eos_token_id] *= EOS_SCALE
    out["finetune_state"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    out["finetune_trainable"] = [n for n, p in model.named_parameters() if p.requires_grad]
    out["finetune_args"] = {k: v for k, v in args.items() if isinstance(v, (str, int, float, bool)) or v is None}
    ds = MimiccxrFinetuneDataset(args, "train", tokenizer)
    collate = FinetuneDinov2CollateFn(args, model.image_processor)
    rec = Recorder()
    record_image_opens(ds_module, rec)
    batch = collate([ds[i] for i in range(len(ds))])
    opened = rec.calls.pop("image_paths")
    image_ids, images, reports, patient_ids, view_positions, indications, prior_reports = batch
    rec.hook(model.image_encoder, "pixels", pre=True)
    rec.hook(model.image_projection, "image_projection")
    rec.hook(model.ln_3, "memory")
    rec.hook(model.fusion_multimodal[0], "prompt_fused")
    rec.hook(model.text_decoder.encoder_decoder.decoder, "decoder")
    rec.wrap(model, "tokenization")
    rec.wrap(model, "text_encoder_forward")
    rec.wrap(model, "multiview_fusion_network")
    rec.wrap(model, "obtain_decoder_input_ids")
    # generation as MLRG's validation and test do it (eval mode), from the memory of that mode; first, while
    # BatchNorm's running statistics are the initial ones (the mlrg side does the same)
    model.eval()
    with torch.no_grad():
        model(images, patient_ids, view_positions, indications, prior_reports, reports=None, mode="sample")
        memory = rec.calls["prompt_fused"][0][0]
        enc = transformers.modeling_outputs.BaseModelOutput(last_hidden_state=memory)
        gen = {}
        for name, beams in (("greedy", 1), ("beam3", args["num_beams"])):
            seqs = model.text_decoder.encoder_decoder.generate(
                max_length=args["max_length"],
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
                num_beams=beams,
                return_dict_in_generate=True,
                use_cache=True,
                encoder_outputs=enc,
            )["sequences"]
            gen[name] = seqs
    evaluated = {
        "eval_visual_memory": rec.calls["memory"][0],
        "eval_memory": memory,
        "generated": gen,
        "generated_text": {k: tokenizer.batch_decode(v, skip_special_tokens=True) for k, v in gen.items()},
    }
    rec.calls.clear()
    model.train()
    with torch.no_grad():
        loss = model(images, patient_ids, view_positions, indications, prior_reports, reports=reports, mode="train")
    c = rec.calls
    dec_in, dec_mask, labels = c["obtain_decoder_input_ids"][0]
    s2 = {
        "ids": list(image_ids),
        "reports": list(reports),
        "indications": list(indications),
        "prior_reports": list(prior_reports),
        "patient_ids": patient_ids,
        "view_positions": view_positions,
        "image_paths": rel_paths(opened, args["images_dir"]),
        "pixels": c["pixels"][0][0][0],
        "prompt_inputs": dict(c["tokenization"][0]),
        "report_inputs": dict(c["tokenization"][1]),
        "decoder_input_ids": dec_in,
        "decoder_attention_mask": dec_mask,
        "labels": labels,
        "prompt_embed": c["text_encoder_forward"][0],
        "projected": c["image_projection"][0],
        "fused": c["multiview_fusion_network"][0],
        "visual_memory": c["memory"][0],
        "memory": c["prompt_fused"][0][0],
        "logits": c["decoder"][0]["logits"],
        "loss": loss.reshape(()),
    }
    s2.update(evaluated)
    out["stage2"] = detach(s2)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mlrg-root", required=True, help="a checkout of MLRG's repository")
    ap.add_argument("--work", required=True, help="the folder compare_mlrg.py wrote (fixtures.json)")
    ap.add_argument("--out", required=True, help="where to save the official side's tensors")
    a = ap.parse_args(argv)
    import torch
    import transformers

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    torch.use_deterministic_algorithms(True, warn_only=True)
    fx = json.loads((Path(a.work) / "fixtures.json").read_text())
    root = str(Path(a.mlrg_root).resolve())
    sys.path.insert(0, root)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    stub_metric_modules()
    write_backbones(fx, fx["seed"])
    import tools.dataset.datasets_v0818_ab as ds_module

    tokenizer = build_tokenizer(fx["paths"]["distilgpt2"])
    out = {
        "versions": {
            "torch": str(torch.__version__),
            "transformers": str(transformers.__version__),
            "pytorch_lightning": str(__import__("pytorch_lightning").__version__),
            "numpy": str(__import__("numpy").__version__),
            "python": sys.version.split()[0],
        },
        "stubbed_modules": sorted(STUBBED_MODULES),
        "tokenizer_len": len(tokenizer),
        "special_ids": {
            t: tokenizer.convert_tokens_to_ids(t)
            for t in ("[BOS]", "[PAD]", "[CLS]", "[SEP]", "[MASK]", "[EOS]", "[UNK]", "[NHI]", "[NHPR]")
        },
    }
    run_pretrain(fx, tokenizer, out, ds_module)
    run_finetune(fx, tokenizer, out, ds_module)
    tmp = Path(a.out).with_suffix(".tmp")
    torch.save(out, tmp)
    os.replace(tmp, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A differential check of mlrg's `mimic` path against MLRG's own code (issue 17): same tiny backbones, same batch, same
weights; the losses, logits and generated tokens of both must agree.

    python benchmarks/compare_mlrg.py --mlrg-root DIR

run with the project's environment (mlrg with its hub extra: transformers, tokenizers), e.g. `.venv/bin/python`.
`--common-views` leaves the rare view positions out of the batch (see RARE_VIEWS); `--keep --work W` keeps the
fixtures, the official side's tensors (W/official.pt) and its log (W/official.log).

DIR is a local checkout of MLRG's repository (github.com/mk-runner/MLRG; checked at commit 03f63d1), made once with

    git clone https://github.com/mk-runner/MLRG DIR && git -C DIR checkout 03f63d1

It is read in place and never copied into this project.

What it does:

1. A second virtualenv (default ~/.cache/mlrg-official-venv, outside the repository; `--venv`) with MLRG's pinned
   versions where they matter for the model maths: transformers 4.43.3, pytorch_lightning 2.3.0, torchmetrics
   1.4.0.post0, einops 0.8.1, and torch 2.3.1 / torchvision 0.18.1 from PyPI. MLRG pins torch 2.3.1+cu118, which
   PyPI does not serve; PyPI's build of the same version (CUDA 12.1) runs on the CPU. numpy < 2, because torch 2.3
   was built against numpy 1 and MLRG calls torch.from_numpy. Measured here: 197 s to install, 5.4 GB. The other
   choice, the project's own torch in that venv, would run MLRG's code on a torch it never ran on; the point of the
   second venv is MLRG's own stack. It is built once: a stamp file holding the requirement list makes later runs
   skip it (change the list, and it is rebuilt). MLRG's metric modules (radgraph 0.0.9, allennlp, stanza, SPICE ...)
   are not installed: the official side puts stand-ins for tools.metrics.chexbert, .coco and .report_logger into
   sys.modules (see benchmarks/mlrg_official_side.py); nothing of them runs in a forward pass.
2. Tiny random backbones in a temporary folder: a Dinov2 folder standing in for RAD-DINO (BitImageProcessor
   preprocessor_config.json with RAD-DINO's mean/std and a small shortest edge / crop), a plain BERT folder standing in
   for CXR-BERT (and for MLRG's `bert_path`, the prompt-fusion layer's config), a DistilGPT2-shaped GPT-2 folder, a
   tiny GPT-2 byte-level BPE tokenizer trained on the fixture's texts (MLRG adds its 9 tokens to it, as
   main_v0926_ablation_study.py does, and so does mlrg), a view-position JSON in MLRG's form (its released file is not
   in its repository: this one has MIMIC-CXR's ViewPosition values), a handful of grayscale JPEG/PNG images in
   MIMIC-CXR-JPG's layout and an annotation in MLRG's schema (the batch is described at BATCH). Every dropout is 0.
3. The official side (benchmarks/mlrg_official_side.py, run by the second venv) builds MLRG's `Pretrain` and
   `Finetune` with a seed, batches the annotation with MLRG's datasets and collate functions, and saves its state
   dicts, losses, intermediate tensors and generations.
4. The mlrg side builds the stage-1 and stage-2 models from `PRETRAIN_PRESETS["mimic"]` / `FINETUNE_PRESETS["mimic"]`
   (only the backbone folders and the widths of the tiny backbones are overridden), batches the same annotation with
   mlrg's own reader, dataset and collate, copies the official weights through `NAME_MAP` (official name -> mlrg
   name, shapes checked), and computes the same quantities.
5. One JSON object is printed and written atomically to benchmarks/results/compare_mlrg.json: `stage1_loss`,
   `stage2_loss`, `stage2_logits` ({mlrg, official, max_abs_diff}), `greedy_tokens_equal` and `beam3_tokens_equal`
   (both decoders generate from the same memory tensor: the official eval-mode memory), `checks` (pixels, token ids,
   projected and fused tokens, embeddings, prompt embedding, visual memory, memory in train and eval mode), the name
   map's coverage, the versions on both sides, MLRG's commit and the tolerance. The exit code is 0 only when every
   max_abs_diff <= the tolerance (1e-4, fp32), the generated tokens are equal and the name map is complete.

Deliberate differences are run with mlrg's option set to MLRG's behaviour: stage 2's `dropout` is set to 0, because
MLRG takes the decoder's and the prompt-fusion layer's dropout from the folders' config.json (0 in the tiny folders,
0.1 in the real distilgpt2 and bert-base ones, which is the `mimic` preset's value), and `select_metric="loss"`
(RCB needs CheXbert and RadGraph weights; it changes no forward pass). Where mlrg has a parameter for MLRG's view
JSON (`view_vocab`, point 1.6; see VIEW_JSON_PARAMS), stage 1 gets the fixture's JSON, as a user passes MLRG's
released file. Everything else comes from the presets (the JSON's `diagnostics.*.preset_overrides` lists them).
It takes about 2 minutes on 2 CPU cores once the venv is built (that needs PyPI); no GPU, no download at run time.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULT = HERE / "results" / "compare_mlrg.json"
DEFAULT_VENV = Path.home() / ".cache" / "mlrg-official-venv"
MLRG_COMMIT = "03f63d1"
TOLERANCE = 1e-4

# MLRG's requirements.txt where they matter for the forward pass (see the module docstring for torch and numpy).
OFFICIAL_REQUIREMENTS = (
    "torch==2.3.1",
    "torchvision==0.18.1",
    "numpy<2",
    "transformers==4.43.3",
    "pytorch_lightning==2.3.0",
    "torchmetrics==1.4.0.post0",
    "einops==0.8.1",
    "pandas",
    "matplotlib",
    "PyYAML",
    "python-dateutil",
    "Pillow",
)

HIDDEN = 32  # MLRG's hidden_size (768) for the tiny check: the fusion width and the GPT-2 width
IMAGE_SIZE = 56  # RAD-DINO's 518 for the tiny Dinov2 (4 x 4 patches of 14)
IMAGE_DIM, TEXT_DIM = 48, 40  # RAD-DINO's and CXR-BERT's 768, different here so that a swapped width shows

# ---------------------------------------------------------------------------------------------------------------
# The second virtualenv


def ensure_venv(venv: Path, log=print) -> dict:
    "The official side's virtualenv, built unless its stamp file lists the same requirements; how long it took."
    venv = Path(venv).expanduser()
    stamp = venv / ".mlrg-official-stamp"
    want = "\n".join(OFFICIAL_REQUIREMENTS) + "\n"
    py = venv / "bin" / "python"
    if stamp.is_file() and stamp.read_text() == want and py.is_file():
        return {"path": str(venv), "built": False, "install_seconds": None}
    t0 = time.time()
    log(f"building the official side's virtualenv in {venv} (once; a few minutes) ...", file=sys.stderr)
    if venv.exists():
        shutil.rmtree(venv)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(py), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run(pip + list(OFFICIAL_REQUIREMENTS), check=True)
    stamp.write_text(want)
    return {"path": str(venv), "built": True, "install_seconds": round(time.time() - t0, 1)}


# ---------------------------------------------------------------------------------------------------------------
# Fixtures: images, annotation, tokenizer, backbone configs

PATIENTS = {
    # study: (subject, study id, [(dicom, view, (width, height), ext)])
    "A": ("10000001", "50000011", [("a1", "PA", (60, 77), "jpg"), ("a2", "LATERAL", (331, 256), "jpg")]),
    "A0": ("10000001", "50000001", [("a0", "PA", (64, 64), "png"), ("a0l", "LATERAL", (70, 61), "jpg")]),
    "B": (
        "10000002",
        "50000022",
        [("b1", "AP", (241, 300), "jpg"), ("b2", "LATERAL", (90, 70), "jpg"), ("b3", "LL", (59, 61), "png")],
    ),
    "B0": ("10000002", "50000002", [("b0", "", (66, 79), "jpg")]),  # no ViewPosition
    "C": ("10000003", "50000033", [("c1", "AP AXIAL", (75, 75), "jpg")]),  # rare views (RARE_VIEWS)
    "D": ("10000004", "50000044", [("d1", "PA", (57, 71), "jpg"), ("d2", "XTABLE LATERAL", (71, 57), "jpg")]),
    "D0": ("10000004", "50000004", [("d0", "PA", (62, 58), "png")]),
    "E": ("10000005", "50000055", [("e1", "AP", (64, 70), "jpg")]),
}
# Views MLRG's JSON gives a row each and mlrg pools (into "other"; "" into "unk"): the default batch has two of them
# (point 1.6); `--common-views` replaces them by PA / LATERAL / AP, to check everything else alone.
RARE_VIEWS = {"c1": "PA", "d2": "LATERAL", "b0": "AP"}
VIEW_POSITIONS_JSON = {  # MLRG's view-position file maps MIMIC-CXR's ViewPosition values to rows of vp_pos_embed
    "PA": 0,
    "AP": 1,
    "LATERAL": 2,
    "LL": 3,
    "AP AXIAL": 4,
    "PA LLD": 5,
    "AP LLD": 6,
    "AP RLD": 7,
    "PA RLD": 8,
    "LAO": 9,
    "RAO": 10,
    "LPO": 11,
    "XTABLE LATERAL": 12,
    "SWIMMERS": 13,
    "": 14,
}
LONG_FACTS = [  # long factual serializations: stage 1's text past 100 tokens, a prompt past 200 (truncation)
    f"{w} {x}"
    for w in ("no", "mild", "stable", "new")
    for x in (
        "pleural effusion",
        "focal consolidation",
        "pneumothorax",
        "pulmonary edema",
        "cardiomegaly",
        "atelectasis",
    )
] * 2
LONG_FINDINGS = " ".join(
    ["the lungs are clear without focal consolidation , effusion or pneumothorax ."] * 6
    + ["heart size is normal . mediastinal contours are unremarkable . no acute osseous abnormality ."] * 4
)
TEXTS = {
    "A": dict(
        findings="  Heart size is mildly enlarged. Small left pleural effusion, new since ___.  ",
        facts=["Heart size mildly enlarged ", " small left pleural effusion", "NEW since ___"],
        indication="  Dyspnea, evaluate for CHF. ",
    ),
    "A0": dict(
        findings="Heart size is normal. Lungs are clear.",
        facts=["heart size normal", "lungs clear"],
        indication="cough",
    ),
    "B": dict(
        findings=LONG_FINDINGS,
        facts=["lungs clear", "no focal consolidation", "no effusion", "no pneumothorax", "heart size normal"],
        indication="",  # empty: [NHI]
    ),
    "B0": dict(
        findings="Endotracheal tube in standard position. Bibasilar atelectasis.",
        facts=["endotracheal tube in standard position", "bibasilar atelectasis"] + LONG_FACTS + LONG_FACTS[:10],
        indication="intubated",
    ),
    "C": dict(
        findings="No acute cardiopulmonary process.",
        facts=["no acute cardiopulmonary process"],
        indication="Fever. " + "Cough and shortness of breath, evaluate for pneumonia. " * 20,  # past 200 tokens
    ),
    "D": dict(
        findings="Right lower lobe opacity concerning for pneumonia. Mild pulmonary edema.",
        facts=["right lower lobe opacity", "concerning for pneumonia", "mild pulmonary edema"] + LONG_FACTS[:20],
        indication="Cough and fever, ___ history.",
    ),
    "D0": dict(
        findings="Mild pulmonary edema. Cardiomegaly.",
        facts=["mild pulmonary edema", "cardiomegaly"],
        indication="shortness of breath",
    ),
    "E": dict(findings="Limited study.", facts=[], indication="line placement"),  # no facts: MLRG drops the item
}
# The batch, in order: (study, anchor dicom, prior study or (study, dicom) or None).
# 0, 1: the same study (two anchors: images de-duplicated, each anchor fused with the other), a prior image each (two
#       images of one prior study: MLRG fuses each anchor with both, since they carry the study's id).
# 2: a 3-view study, empty indication ([NHI]), a report past 101 tokens (MLRG's cut loses [EOS]), a prior report
#    past 200 prompt tokens.
# 3: a single-view study without a prior (no other image: the fusion bypass; no positive for the image-image loss),
#    an indication past 200 tokens (the pair's cut drops the indication's [SEP]); a rare view (RARE_VIEWS).
# 4: no factual serialization (MLRG drops the item from both stages).
# 5: a 2-view study whose second view (a rare one) is no anchor; stage-1 text past 100 tokens.
# 6: the prior study of items 0 and 1 as a current study: two images are in the batch twice, as current images of
#    their own study and as priors of a later one.
BATCH = [
    ("A", "a1", "A0"),
    ("A", "a2", ("A0", "a0l")),
    ("B", "b1", "B0"),
    ("C", "c1", None),
    ("E", "e1", None),
    ("D", "d1", "D0"),
    ("A0", "a0", None),
]


def image_rel(study, dicom):
    subject, sid, views = PATIENTS[study]
    ext = next(e for d, _, _, e in views if d == dicom)
    return f"p{subject[:2]}/p{subject}/s{sid}/{dicom}.{ext}"


def write_images(root: Path, seed: int):
    """Small grayscale images (smooth gradients plus noise; odd sizes, so resize and crop rounding matter; two JPEGs
    over 4x the crop, where a reduced-size JPEG decoding, PIL's draft, would change the pixels)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for study, (_, _, views) in PATIENTS.items():
        for dicom, _, (w, h), ext in views:
            yy, xx = np.mgrid[0:h, 0:w]
            base = 128 + 60 * np.sin(xx / rng.uniform(3, 9)) * np.cos(yy / rng.uniform(3, 9))
            img = np.clip(base + rng.normal(0, 25, (h, w)), 0, 255).astype(np.uint8)
            path = root / image_rel(study, dicom)
            path.parent.mkdir(parents=True, exist_ok=True)
            if ext == "jpg":
                Image.fromarray(img).save(path, quality=90)
            else:
                Image.fromarray(img).save(path)


def annotation_item(study, dicom, prior):
    subject, sid, views = PATIENTS[study]
    t = TEXTS[study]
    anchor_view = next(v for d, v, _, _ in views if d == dicom)
    aux = [(d, v) for d, v, _, _ in views if d != dicom]
    prior_study = None
    if prior is not None:  # a study (its first image) or (study, dicom)
        prior, pdicom = prior if isinstance(prior, tuple) else (prior, PATIENTS[prior][2][0][0])
        pd_, pv, _, _ = next(x for x in PATIENTS[prior][2] if x[0] == pdicom)
        prior_study = {
            "latest_study": {
                "image_path": image_rel(prior, pd_),
                "view_position": pv,
                "findings": TEXTS[prior]["findings"],
                "findings_factual_serialization": TEXTS[prior]["facts"],
                "study_id": int(PATIENTS[prior][1]),
            }
        }
    return {
        "id": dicom,
        "subject_id": int(subject),
        "study_id": int(sid),
        "findings": t["findings"],
        "findings_factual_serialization": t["facts"],
        "impression": "",
        "indication": t["indication"],
        "indication_pure": t["indication"],
        "anchor_scan": {"image_path": [image_rel(study, dicom)], "view_position": [anchor_view]},
        "auxiliary_references": {
            "image_path": [image_rel(study, d) for d, _ in aux],
            "view_position": [v for _, v in aux],
        },
        "prior_study": prior_study,
    }


def train_tokenizer(folder: Path):
    "A tiny GPT-2 byte-level BPE (vocab.json + merges.txt) trained on the fixture's texts, lower-cased as MLRG's."
    from tokenizers import ByteLevelBPETokenizer

    texts = []
    for t in TEXTS.values():
        texts += [t["findings"].lower(), t["indication"].lower()] + [f.lower() for f in t["facts"]]
    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator(texts * 3, vocab_size=420, min_frequency=2, special_tokens=["<|endoftext|>"])
    tok.save_model(str(folder))
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "GPT2Tokenizer",
                "model_max_length": 1024,
                "bos_token": "<|endoftext|>",
                "eos_token": "<|endoftext|>",
                "unk_token": "<|endoftext|>",
                "add_prefix_space": False,
            },
            indent=1,
        )
    )
    (folder / "special_tokens_map.json").write_text(
        json.dumps({k: "<|endoftext|>" for k in ("bos_token", "eos_token", "unk_token")})
    )


def backbone_configs():
    "config.json of the tiny Dinov2 (RAD-DINO), BERT (CXR-BERT, bert_path) and GPT-2 (DistilGPT2); dropouts 0."
    return {
        "rad_dino": {
            "model_type": "dinov2",
            "architectures": ["Dinov2Model"],
            "hidden_size": IMAGE_DIM,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "mlp_ratio": 4,
            "patch_size": 14,
            "image_size": IMAGE_SIZE,
            "num_channels": 3,
            "hidden_act": "gelu",
            "hidden_dropout_prob": 0.0,
            "attention_probs_dropout_prob": 0.0,
            "drop_path_rate": 0.0,
            "layer_norm_eps": 1e-6,
            "layerscale_value": 1.0,
            "qkv_bias": True,
            "use_swiglu_ffn": False,
            "initializer_range": 0.02,
        },
        "cxr_bert": {
            "model_type": "bert",
            "architectures": ["BertModel"],
            "vocab_size": 64,
            "hidden_size": TEXT_DIM,
            "num_hidden_layers": 7,  # cut to MLRG's 6 on both sides
            "num_attention_heads": 4,
            # also the prompt-fusion layer's FFN (MLRG reads it from bert_path: bert-base's 3072 = 4 x 768)
            "intermediate_size": 4 * HIDDEN,
            "hidden_act": "gelu",
            "hidden_dropout_prob": 0.0,
            "attention_probs_dropout_prob": 0.0,
            "max_position_embeddings": 512,
            "type_vocab_size": 2,
            "initializer_range": 0.02,
            "layer_norm_eps": 1e-12,
            "pad_token_id": 0,
            "position_embedding_type": "absolute",
        },
        "distilgpt2": {
            "model_type": "gpt2",
            "architectures": ["GPT2LMHeadModel"],
            "vocab_size": 420,
            "n_positions": 128,
            "n_embd": HIDDEN,
            "n_layer": 2,
            "n_head": 4,
            "n_inner": None,
            "activation_function": "gelu_new",
            "resid_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "attn_pdrop": 0.0,
            "layer_norm_epsilon": 1e-5,
            # a wide init: peaked next-token distributions, so that greedy and beam search take different paths
            "initializer_range": 0.5,
            "bos_token_id": 0,
            "eos_token_id": 0,
        },
    }


RAD_DINO_PREPROCESSOR = {  # RAD-DINO's preprocessor_config.json, but for IMAGE_SIZE px
    "image_processor_type": "BitImageProcessor",
    "do_convert_rgb": True,
    "do_resize": True,
    "size": {"shortest_edge": IMAGE_SIZE},
    "resample": 3,
    "do_center_crop": True,
    "crop_size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE},
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "image_mean": [0.5307, 0.5307, 0.5307],
    "image_std": [0.2583, 0.2583, 0.2583],
}


def listify(v):
    return v if isinstance(v, list) else [v]


def write_fixtures(work: Path, seed: int, common_views=False) -> dict:
    """Everything both sides read, under `work`; the description the official side reads (fixtures.json).
    `common_views`: the rare views of the batch replaced (RARE_VIEWS)."""
    paths = {k: work / k for k in ("rad_dino", "cxr_bert", "distilgpt2")}
    configs = backbone_configs()
    for k, folder in paths.items():
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps(configs[k], indent=1))
    (paths["rad_dino"] / "preprocessor_config.json").write_text(json.dumps(RAD_DINO_PREPROCESSOR, indent=1))
    train_tokenizer(paths["distilgpt2"])
    images = work / "mimic" / "files"
    write_images(images, seed)
    train = [annotation_item(*b) for b in BATCH]
    if common_views:
        for it in train:
            for part in (it["anchor_scan"], it["auxiliary_references"], (it["prior_study"] or {}).get("latest_study")):
                if not part:
                    continue
                files = listify(part["image_path"])
                views = [RARE_VIEWS.get(Path(f).stem, v) for f, v in zip(files, listify(part["view_position"]))]
                part["view_position"] = views if isinstance(part["view_position"], list) else views[0]
    ann = {"train": train, "val": [annotation_item(*BATCH[3])], "test": []}
    ann_path = work / "annotation.json"
    ann_path.write_text(json.dumps(ann, indent=1))
    vp_path = work / "view_position.json"
    vp_path.write_text(json.dumps(VIEW_POSITIONS_JSON, indent=1))
    fx = {
        "work": str(work),
        "seed": seed,
        "hidden_size": HIDDEN,
        "configs": configs,
        "paths": {
            **{k: str(v) for k, v in paths.items()},
            "images": str(images),
            "annotation": str(ann_path),
            "view_positions": str(vp_path),
        },
    }
    (work / "fixtures.json").write_text(json.dumps(fx, indent=1))
    return fx


def run_official(venv: Path, mlrg_root: Path, work: Path, timeout=900) -> dict:
    "Run benchmarks/mlrg_official_side.py with the second venv; its saved output."
    import torch

    out = work / "official.pt"
    cmd = [
        str(Path(venv).expanduser() / "bin" / "python"),
        str(HERE / "mlrg_official_side.py"),
        "--mlrg-root",
        str(mlrg_root),
        "--work",
        str(work),
        "--out",
        str(out),
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["CUDA_VISIBLE_DEVICES"] = ""
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=str(work))
    (work / "official.log").write_text(r.stdout + "\n--- stderr ---\n" + r.stderr)
    if r.returncode != 0:
        raise RuntimeError(f"the official side failed (log: {work / 'official.log'}):\n{r.stderr[-4000:]}")
    return torch.load(out, map_location="cpu", weights_only=True)


# ---------------------------------------------------------------------------------------------------------------
# The name map: official (MLRG) tensor names -> mlrg tensor names
#
# Each entry of `build_map`: mlrg name <- op(official names). ops: "copy" (same shape), "rows" (rows of an official
# table, e.g. the view embedding by view name), "t" (transposed: GPT-2's Conv1D). `apply_map` checks every shape, and
# `map_report` that every mlrg tensor is filled and every official trainable tensor used (or skipped, with a reason).

# Official module prefix -> mlrg module prefix, for modules whose inner names are the same on both sides.
PREFIX_MAP = {
    "image_encoder.": "visual.image_encoder.net.",  # the HF Dinov2 (frozen)
    "text_encoder.": "text_encoder.net.",  # the HF BERT cut to 6 layers
}
# Renames between transformers versions inside the backbones (official 4.43.3 -> mlrg's 5.x): Dinov2's attention.
BACKBONE_RENAMES = (
    ("attention.attention.query.", "attention.q_proj."),
    ("attention.attention.key.", "attention.k_proj."),
    ("attention.attention.value.", "attention.v_proj."),
    ("attention.output.dense.", "attention.o_proj."),
)
# Official name -> mlrg name (op "copy"), as mlrg/models.py and mlrg/report_model.py name them with the `mimic`
# presets' options (projection="mlrg", fusion_style="mlrg", prompt_projection="mlrg", prompt_fusion="mlrg").
_HEAD = (
    "0.weight",
    "0.bias",
    "1.weight",
    "1.bias",
    "1.running_mean",
    "1.running_var",
    "1.num_batches_tracked",
    "3.weight",
    "3.bias",
)
NAME_MAP = {
    # ProjectionHead (Conv1d d->2h, BatchNorm1d, ReLU, Conv1d 2h->h): mlrg.models.ProjectionHead, same inner names
    **{f"image_projection.head.{h}": f"visual.image_proj.head.{h}" for h in _HEAD},
    # the text head, on every token (stage 1), and on the prompt's tokens (stage 2, prompt_projection="mlrg")
    **{f"text_projection.head.{h}": f"text_proj.head.{h}" for h in _HEAD},
    # ln_1 in the image encoder's space (after the view embedding), ln_2 after the temporal embedding
    **{f"ln_{i}.{p}": f"visual.ln_{i}.{p}" for i in (1, 2) for p in ("weight", "bias")},
    # MLRG's fusion Transformer (models/bert_model.py) -> mlrg.models.MLRGFusion (fusion_style="mlrg"): layers.i.0 =
    # attention (fc_q, fc_k, fc_v, fc_o; ln_1 on the queries, ln_2 on keys and values), layers.i.1 = feed-forward
    # (net.0 LayerNorm, net.1 and net.4 Linear), then norm
    **{
        f"fusion_multiview.layers.{i}.0.{a}.{p}": f"visual.fusion.layers.{i}.0.{a}.{p}"
        for i in range(3)
        for a in ("fc_q", "fc_k", "fc_v", "fc_o", "ln_1", "ln_2")
        for p in ("weight", "bias")
    },
    **{
        f"fusion_multiview.layers.{i}.1.net.{n}.{p}": f"visual.fusion.layers.{i}.1.net.{n}.{p}"
        for i in range(3)
        for n in (0, 1, 4)
        for p in ("weight", "bias")
    },
    **{f"fusion_multiview.norm.{p}": f"visual.fusion.norm.{p}" for p in ("weight", "bias")},
    # stage 2: ln_3 over the visual memory
    **{f"ln_3.{p}": f"memory_norm.{p}" for p in ("weight", "bias")},
    # MLRG's BertCrossLayer (post-LN self-attention, cross-attention, FFN) -> mlrg.report_model.BertPromptFusion
    **{
        f"fusion_multimodal.0.{a}.self.{x}.{p}": f"prompt_fusion.{m}.{y}.{p}"
        for a, m in (("attention", "self_attn"), ("crossattention", "cross_attn"))
        for x, y in (("query", "q"), ("key", "k"), ("value", "v"))
        for p in ("weight", "bias")
    },
    **{
        f"fusion_multimodal.0.{a}.output.{x}.{p}": f"prompt_fusion.{m}.{y}.{p}"
        for a, m in (("attention", "self_attn"), ("crossattention", "cross_attn"))
        for x, y in (("dense", "out"), ("LayerNorm", "norm"))
        for p in ("weight", "bias")
    },
    **{
        f"fusion_multimodal.0.{x}.{p}": f"prompt_fusion.{y}.{p}"
        for x, y in (("intermediate.dense", "ff_in"), ("output.dense", "ff_out"), ("output.LayerNorm", "norm"))
        for p in ("weight", "bias")
    },
}
# Official tables -> mlrg embeddings, row by row (op "rows"): the view-position rows by view name (MLRG's JSON ->
# mlrg.data.VIEW_POSITIONS, see `view_row_order`), the temporal rows (current, latest prior, second prior) and the
# type rows (ori, fused) in order.
ROW_MAP = {
    "vp_pos_embed": "visual.view_embed.weight",
    "temp_pos_embed": "visual.temporal_embed.weight",
    "type_pos_embed": "type_embed.weight",
}
# The decoder: GPT-2's names under this prefix, renamed (and Conv1D weights transposed, op "t") by
# mlrg.decoder.gpt2_state_to_decoder into mlrg's ReportDecoder under "decoder.".
DECODER_PREFIX = "text_decoder.encoder_decoder.decoder."
# Official tensors no mlrg tensor takes, and why.
SKIPPED = {
    "text_encoder.pooler.": "BERT's pooler: MLRG reads last_hidden_state only (mlrg drops the pooler)",
    "text_encoder.embeddings.position_ids": "a buffer of positions 0..511, not a weight",
}


def _skip_reason(name):
    for k, why in SKIPPED.items():
        if name == k or (k.endswith(".") and name.startswith(k)):
            return why
    return None


def build_map(off_sd, ml_model, view_names=None):
    """The entries {mlrg name: (op, [official names], extra)} that fill `ml_model` from the official state dict
    `off_sd`, and notes on the map."""
    from mlrg.decoder import gpt2_state_to_decoder

    ml_sd = ml_model.state_dict()
    entries, notes = {}, []
    for o_pre, m_pre in PREFIX_MAP.items():
        for k in off_sd:
            if not k.startswith(o_pre):
                continue
            name = m_pre + k[len(o_pre) :]
            if name not in ml_sd and o_pre == "image_encoder.":
                for a, b in BACKBONE_RENAMES:
                    name = name.replace(a, b)
                if name in ml_sd:
                    notes.append(
                        "Dinov2: transformers 4.43's attention.attention.{query,key,value} and "
                        "attention.output.dense are 5.x's attention.{q,k,v,o}_proj"
                    )
            if name in ml_sd:
                entries[name] = ("copy", [k], None)
    for o, m in NAME_MAP.items():
        if o in off_sd and m in ml_sd:
            entries[m] = ("copy", [o], None)
    for o, m in ROW_MAP.items():
        if o in off_sd and m in ml_sd:
            rows = view_names if o == "vp_pos_embed" else list(range(min(ml_sd[m].shape[0], off_sd[o].shape[0])))
            entries[m] = ("rows", [o], rows)
            if o == "vp_pos_embed" and rows is not None and None in rows:
                none = [i for i, v in enumerate(rows) if v is None]
                notes.append(
                    f"{m}: row 0 is padding (MLRG's table has none)"
                    if none == [0]
                    else f"{m}: rows {none} have no row of MLRG's view JSON (padding; mlrg's pooled views)"
                )
    for k, v in off_sd.items():
        if k.startswith(DECODER_PREFIX) and _skip_reason(k) is None:
            ((name, t),) = gpt2_state_to_decoder({k[len(DECODER_PREFIX) :]: v}).items()
            if "decoder." + name in ml_sd:
                entries["decoder." + name] = ("copy" if torch_equal(t, v) else "t", [k], None)
    return entries, sorted(set(notes))


def torch_equal(a, b):
    import torch

    return a.shape == b.shape and bool(torch.equal(a, b))


def apply_map(entries, off_sd, ml_model):
    "The mlrg state dict filled through `entries`; shape problems as a list of strings."
    ml_sd = ml_model.state_dict()
    new, problems = {}, []
    for m, (op, os_, extra) in entries.items():
        src = [off_sd[o] for o in os_]
        if op == "copy":
            t = src[0]
        elif op == "t":
            t = src[0].t()
        else:  # rows
            table = src[0].reshape(src[0].shape[0], -1)
            if extra is None:
                problems.append(f"{m}: no row order for {os_[0]}")
                continue
            t = ml_sd[m].clone()
            for r, idx in enumerate(extra):
                if idx is not None and r < t.shape[0]:
                    t[r] = table[idx]
        want = ml_sd[m]
        if t.shape != want.shape:
            if t.numel() == want.numel() and op == "copy":
                t = t.reshape(want.shape)
            else:
                problems.append(f"{m} {tuple(want.shape)} <- {op}({', '.join(os_)}) {tuple(t.shape)}")
                continue
        new[m] = t.to(want.dtype)
    ml_model.load_state_dict(new, strict=False)
    return problems


def map_report(entries, notes, problems, off_sd, off_trainable, ml_model):
    "Coverage of the name map: every mlrg tensor filled, every official trainable tensor used or skipped with reason."
    ml_sd = ml_model.state_dict()
    used = {o for _, os_, _ in entries.values() for o in os_}
    uncovered = [k for k in ml_sd if k not in entries]
    unused = [k for k in off_trainable if k not in used and _skip_reason(k) is None]
    skipped = {k: _skip_reason(k) for k in off_sd if k not in used and _skip_reason(k) is not None}
    return {
        "mlrg_tensors": len(ml_sd),
        "mapped": len(entries),
        "uncovered_mlrg": uncovered,
        "unused_official_trainable": unused,
        "skipped_official": sorted({v for v in skipped.values()}),
        "skipped_official_count": len(skipped),
        "shape_problems": problems,
        "notes": notes,
        "complete": not uncovered and not unused and not problems,
    }


# ---------------------------------------------------------------------------------------------------------------
# Comparison helpers


def diff(a, b):
    "max |a - b| (inf when the shapes differ)."
    import torch

    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    if a.shape != b.shape:
        return float("inf")
    return float((a - b).abs().max()) if a.numel() else 0.0


def entry(mine, official):
    import torch

    m, o = float(torch.as_tensor(mine).reshape(())), float(torch.as_tensor(official).reshape(()))
    return {"mlrg": m, "official": o, "max_abs_diff": abs(m - o)}


def guarded(out, key, fn):
    "out[key] = fn(), or the error (type, message, last frame of the traceback) when it fails."
    try:
        out[key] = fn()
    except Exception as e:  # a diagnosis must survive a helper's half-finished change
        tb = traceback.extract_tb(e.__traceback__)
        where = f"{Path(tb[-1].filename).name}:{tb[-1].lineno} {tb[-1].name}" if tb else ""
        out[key] = {"error": f"{type(e).__name__}: {e}"[:600], "at": where}
    return out[key]


def rows_by_key(keys):
    "{image key: [(sample, slot), ...]} of a batch's `image_keys`."
    out = {}
    for b, row in enumerate(keys):
        for s, k in enumerate(row):
            if k:
                out.setdefault(k, []).append((b, s))
    return out


def ids_of_row(ids, mask):
    return [int(t) for t, m in zip(ids.tolist(), mask.tolist()) if m]


class DinoPixels:
    "Records the pixel_values the HF Dinov2 inside an mlrg model receives."

    def __init__(self, net):
        self.seen = []
        self.h = net.register_forward_pre_hook(self._pre, with_kwargs=True)

    def _pre(self, module, args, kwargs):
        self.seen.append((kwargs.get("pixel_values") if "pixel_values" in kwargs else args[0]).detach().clone())

    def close(self):
        self.h.remove()


# Names a parameter giving mlrg MLRG's view-position JSON may have (point 1.6); the first one mlrg declares is set.
VIEW_JSON_PARAMS = ("view_positions", "view_position_embed", "view_vocab", "view_positions_path")


def stage_params(params, preset_name, overrides, view_json=None):
    """Checked parameters: `preset_name`'s values, its model_config with only the tiny widths replaced, then
    `overrides` (the tiny folders; MLRG's view-position JSON when mlrg has a parameter for it)."""
    preset = params.presets[preset_name].values
    given = {"preset": preset_name, **overrides}
    vj = next((k for k in VIEW_JSON_PARAMS if k in params.params), None)
    if vj is not None and view_json is not None:
        given[vj] = view_json
    if "model_config" in preset:
        given["model_config"] = {**preset["model_config"], **overrides.get("model_config", {})}
    return params.check(given)


# ---------------------------------------------------------------------------------------------------------------
# The mlrg side


def mlrg_stage1(fx, off, out):
    "mlrg's stage 1 from PRETRAIN_PRESETS['mimic'] on the same batch, with the official weights; fills `out`."
    import torch

    from mlrg.pretrain import PRETRAIN, build_pretrain

    p = fx["paths"]
    params = stage_params(
        PRETRAIN,
        "mimic",
        dict(
            data_path=p["annotation"],
            image_root=p["images"],
            image_pretrained_path=p["rad_dino"],
            text_pretrained_path=p["cxr_bert"],
            tokenizer_path=p["distilgpt2"],
            image_size=IMAGE_SIZE,
            linear_probe=False,
            num_workers=0,
            model_config={"d_model": HIDDEN, "proj_dim": HIDDEN},
        ),
        p["view_positions"],
    )
    out["params"] = {k: v for k, v in params.items() if isinstance(v, (str, int, float, bool, type(None)))}
    # besides the data and folder paths
    out["preset_overrides"] = [
        "image_size",
        "model_config.d_model",
        "model_config.proj_dim",
        "linear_probe",
        "num_workers",
    ]
    out["preset_overrides"] += [
        f"{k} (MLRG's view JSON)" for k in VIEW_JSON_PARAMS if params.get(k) == p["view_positions"]
    ]
    torch.manual_seed(fx["seed"])
    parts = build_pretrain(params)
    model, ds = parts.model, parts.train_ds
    vp2id = json.loads(Path(p["view_positions"]).read_text())
    vp = off["pretrain_state"]["vp_pos_embed"]
    o1 = {**off["stage1"], "vp_pos_embed_rows": {n: vp[i].reshape(-1) for n, i in vp2id.items()}}
    entries, notes = build_map(off["pretrain_state"], model, view_row_order(model, off, fx))
    problems = apply_map(entries, off["pretrain_state"], model)
    out["name_map"] = map_report(entries, notes, problems, off["pretrain_state"], off["pretrain_trainable"], model)
    batch = parts.collate_fn([ds[i] for i in range(len(ds))])
    out["ids"] = {"mlrg": list(batch["id"]), "official": o1["ids"]}
    keys = batch.get("image_keys")
    d = out.setdefault("diagnostics", {})
    # the text: stage 1 reads "[CLS]" + facts joined by [SEP] + "[SEP]" (factual_serialization)
    ti = o1["text_inputs"]
    off_rows = [ids_of_row(r, m) for r, m in zip(ti["input_ids"], ti["attention_mask"])]
    key = "text" if "text_ids" in batch else "target"  # stage 1's text (report_style), else the report
    mine = guarded(d, "text_ids", lambda: [ids_of_row(r, m) for r, m in zip(batch[f"{key}_ids"], batch[f"{key}_mask"])])
    d["text_ids_equal"] = mine == off_rows
    d["text_ids"] = None if mine == off_rows else first_difference(mine, off_rows, parts.vocab)
    model.eval()  # the validation loss first, while BatchNorm's running statistics are the loaded ones
    with torch.no_grad():
        ev = guarded(out, "eval_forward", lambda: model(batch)["loss"])
    if torch.is_tensor(ev):
        out["stage1_eval_loss"] = entry(ev, o1["eval_loss"])
        del out["eval_forward"]
    model.train()
    dino = DinoPixels(model.visual.image_encoder.net)
    with torch.no_grad():
        res = guarded(out, "forward", lambda: {k: v for k, v in model(batch).items() if torch.is_tensor(v)})
        vis = guarded(out, "visual", lambda: model.encode_visual(batch))
    dino.close()
    if "error" not in res:
        out["stage1_loss"] = entry(res["loss"], o1["loss"])
        if "loss_text" in res:
            out["stage1_text_loss"] = entry(res["loss_text"], o1["instance_loss"])
        if "loss_mpc" in res:
            out["stage1_mpc_loss"] = entry(res["loss_mpc"], o1["mpc_loss"])
        del out["forward"]
    else:
        out["stage1_loss"] = {
            "mlrg": None,
            "official": float(o1["loss"]),
            "max_abs_diff": float("inf"),
            "error": res["error"],
            "at": res["at"],
        }
    if "error" not in vis:
        del out["visual"]
        guarded(d, "intermediates", lambda: stage1_intermediates(o1, batch, keys, vis, model, dino))
    return model, parts


def view_row_order(model, off, fx):
    """For each row of mlrg's view embedding, the row of MLRG's vp_pos_embed, by view name (None where MLRG's JSON has
    no such name: the padding row)."""
    from mlrg.data import VIEW_POSITIONS, view_id

    vp2id = json.loads(Path(fx["paths"]["view_positions"]).read_text())
    sd = model.state_dict()
    if ROW_MAP["vp_pos_embed"] not in sd:
        return None
    n = sd[ROW_MAP["vp_pos_embed"]].shape[0]
    vocab = (getattr(model.visual, "config", None) or {}).get("view_vocab", "collapsed")
    if vocab != "collapsed":  # mlrg's view_vocab ("raw", or MLRG's JSON): a row per view name, row 0 padding
        from mlrg.data import view_table

        rows = [None] * n
        for name, r in view_table(vocab).items():
            rows[r] = vp2id.get(name)
        return rows
    # collapsed: 0 padding, then VIEW_POSITIONS; a missing view ("") is its "unk", and every other view of MLRG's
    # JSON is its one "other" row, which takes MLRG's row of the first such view in the batch (a second one cannot be
    # reproduced: MLRG has a row per view, 1.6)
    views = [v for it in json.loads(Path(fx["paths"]["annotation"]).read_text())["train"] for v in item_views(it)]
    other = next((v for v in views if VIEW_POSITIONS[view_id(v) - 1] == "other"), None)
    rows = {None: None, "unk": vp2id.get(""), "other": vp2id.get(other)}
    return [rows[nm] if nm in rows else vp2id.get(nm) for nm in [None, *VIEW_POSITIONS]][:n]


def item_views(it):
    "The view positions of an annotation item's images (anchor, auxiliary views, prior)."
    out = list(it["anchor_scan"]["view_position"]) + list(it["auxiliary_references"]["view_position"])
    if it.get("prior_study"):
        out.append(it["prior_study"]["latest_study"]["view_position"])
    return out


def stage1_intermediates(o1, batch, keys, vis, model, dino):
    "Max differences of the stage-1 intermediates, image by image (matched by path)."
    import torch

    r = {}
    paths = o1["image_paths"]
    index = {p: i for i, p in enumerate(paths)}
    if dino.seen:
        r["pixels"] = pixel_diff(o1["pixels"], paths, batch, keys, model)
    if keys is None:
        r["image_keys"] = "the batch has no image_keys (CONTRACTS: DATA helper)"
        return r
    r["views"] = view_rows(o1, batch, keys, model)
    tok = vis["tokens"]
    worst = 0.0
    per = {}
    for k, where in rows_by_key(keys).items():
        if k not in index:
            per[k] = "not in MLRG's batch"
            continue
        for b, s in where:
            dd = diff(tok[b, s], o1["projected"][index[k]])
            per[f"{k}@{b},{s}"] = dd
            worst = max(worst, dd)
    r["projected_tokens"] = {"max_abs_diff": worst, "per_slot": per}
    if "fused_tokens" in vis:
        B = tok.shape[0]
        r["fused_tokens"] = {
            "max_abs_diff": diff(vis["fused_tokens"], o1["fused"][:B]),
            "per_sample": [diff(vis["fused_tokens"][i], o1["fused"][i]) for i in range(B)],
        }
    with torch.no_grad():
        img = model.image_embedding(vis)
        off_img = torch.nn.functional.normalize(o1["fused"][:, 0], dim=-1)
        r["image_embedding"] = diff(img, off_img)
        txt = model.encode_texts(batch)
        off_txt = torch.nn.functional.normalize(o1["text_projected"][:, 0], dim=-1)
        r["text_embedding"] = diff(txt, off_txt)
    return r


def view_rows(o1, batch, keys, model):
    """Per image: MLRG's view string and its row of vp_pos_embed; mlrg's view id; whether mlrg's row holds MLRG's row
    (after the name map)."""
    from mlrg.data import VIEW_POSITIONS

    table = model.state_dict().get(ROW_MAP["vp_pos_embed"])
    vis = model.visual
    # the rows the model reads: slot_view_ids (mlrg's view_vocab), else the batch's collapsed view ids
    ids = vis.slot_view_ids(batch) if hasattr(vis, "slot_view_ids") else batch["view_ids"]
    names = batch.get("view_positions")
    out = {}
    for k, where in rows_by_key(keys).items():
        if k not in o1["image_paths"]:
            continue
        b, s = where[0]
        vid = int(ids[b, s])
        off_view = o1["view_positions"][o1["image_paths"].index(k)].split("_")[0]
        mine = names[b][s] if names is not None else ([None, *VIEW_POSITIONS] + ["?"] * 99)[vid]
        out[k] = {"official": off_view, "mlrg": mine, "mlrg_row": vid}
    if table is not None and "vp_pos_embed_rows" in o1:
        for k, v in out.items():
            v["same_row"] = bool(torch_equal(table[v["mlrg_row"]], o1["vp_pos_embed_rows"][v["official"]]))
    return out


def pixel_diff(off_pixels, paths, batch, keys, model):
    "Max difference of the pixels Dinov2 receives, image by image: mlrg's encoder run on each slot's image alone."
    import torch

    enc = model.visual.image_encoder
    dino = DinoPixels(enc.net)
    per = {}
    try:
        with torch.no_grad():
            for k, where in rows_by_key(keys or []).items():
                if k not in paths:
                    continue
                b, s = where[0]
                enc(batch["images"][b, s][None])
                per[k] = diff(dino.seen[-1][0], off_pixels[paths.index(k)])
    finally:
        dino.close()
    return {"max_abs_diff": max(per.values()) if per else None, "per_image": per}


def save_stage1_checkpoint(model, parts, path):
    "The mlrg stage-1 checkpoint stage 2 is built from (its config, weights and tokenizer, as mlrg.engine.fit writes)."
    import torch

    ck = {"config": {"model": parts.model_config}, "model": model.state_dict(), "vocab": parts.vocab.state()}
    torch.save(ck, path)
    return path


def strip_generated(seq, bos, eos, pad):
    "Token ids after [BOS], up to [EOS], without padding (as mlrg's generate returns them)."
    out = []
    for t in [int(x) for x in seq][1:]:
        if t == eos:
            break
        if t != pad:
            out.append(t)
    return out


def mlrg_stage2(fx, off, stage1_ck, out):
    "mlrg's stage 2 from FINETUNE_PRESETS['mimic'] on the same batch, with the official weights; fills `out`."
    import torch

    from mlrg.finetune import FINETUNE, build_finetune

    p = fx["paths"]
    params = stage_params(
        FINETUNE,
        "mimic",
        dict(
            data_path=p["annotation"],
            image_root=p["images"],
            pretrained_path=str(stage1_ck),
            decoder_path=p["distilgpt2"],
            image_pretrained_path=p["rad_dino"],
            text_pretrained_path=p["cxr_bert"],
            tokenizer_path=p["distilgpt2"],
            image_size=IMAGE_SIZE,
            select_metric="loss",  # no scorer runs here; RCB would need CheXbert and RadGraph weights
            num_workers=0,
            # MLRG takes the decoder's and the prompt-fusion layer's dropout from the folders' config.json (0 in the
            # tiny folders, 0.1 in distilgpt2's and bert-base's); mlrg from its `dropout` parameter (the preset's 0.1)
            dropout=0.0,
        ),
        p["view_positions"],
    )
    out["params"] = {k: v for k, v in params.items() if isinstance(v, (str, int, float, bool, type(None)))}
    out["preset_overrides"] = ["dropout", "image_size", "num_workers", "select_metric"]  # besides the paths
    out["preset_overrides"] += [
        f"{k} (MLRG's view JSON)" for k in VIEW_JSON_PARAMS if params.get(k) == p["view_positions"]
    ]
    torch.manual_seed(fx["seed"] + 1)
    parts = build_finetune(params)
    model, ds = parts.model, parts.train_ds
    o2 = off["stage2"]
    entries, notes = build_map(off["finetune_state"], model, view_row_order(model, off, fx))
    problems = apply_map(entries, off["finetune_state"], model)
    out["name_map"] = map_report(entries, notes, problems, off["finetune_state"], off["finetune_trainable"], model)
    batch = parts.collate_fn([ds[i] for i in range(len(ds))])
    vocab = parts.vocab
    d = out.setdefault("diagnostics", {})
    pi = o2["prompt_inputs"]
    off_prompt = [ids_of_row(r, m) for r, m in zip(pi["input_ids"], pi["attention_mask"])]
    my_prompt = [ids_of_row(r, m) for r, m in zip(batch["prompt_ids"], batch["prompt_mask"])]
    d["prompt_ids_equal"] = my_prompt == off_prompt
    off_types = [ids_of_row(r, m) for r, m in zip(pi["token_type_ids"], pi["attention_mask"])]
    guarded(
        d,
        "prompt_segments_equal",
        lambda: [ids_of_row(r, m) for r, m in zip(batch["prompt_segments"], batch["prompt_mask"])] == off_types,
    )
    ri = o2["report_inputs"]
    off_target = [ids_of_row(r, m) for r, m in zip(ri["input_ids"], ri["attention_mask"])]
    my_target = [ids_of_row(r, m) for r, m in zip(batch["target_ids"], batch["target_mask"])]
    d["target_ids_equal"] = my_target == off_target
    if not d["prompt_ids_equal"]:
        d["prompt_first_difference"] = first_difference(my_prompt, off_prompt, vocab)
    if not d["target_ids_equal"]:
        d["target_first_difference"] = first_difference(my_target, off_target, vocab)
    # eval mode first, as on the official side: BatchNorm's running statistics are still the loaded ones
    model.eval()
    with torch.no_grad():
        ev = d.setdefault("eval_mode", {})
        guarded(ev, "visual_memory", lambda: diff(model.visual_memory(batch), o2["eval_visual_memory"]))
        guarded(ev, "memory", lambda: diff(model.memory(batch), o2["eval_memory"]))
    model.train()
    with torch.no_grad():
        res = guarded(out, "forward", lambda: model(batch)["loss"])
    if torch.is_tensor(res):
        out["stage2_loss"] = entry(res, o2["loss"])
        del out["forward"]
    else:
        out["stage2_loss"] = {"mlrg": None, "official": float(o2["loss"]), "max_abs_diff": float("inf"), **res}
    guarded(out, "stage2_logits", lambda: logits_entry(model, batch, o2))
    guarded(d, "intermediates", lambda: stage2_intermediates(model, batch, o2))
    # generation: the official eval-mode memory fed to mlrg's decoder
    model.eval()
    mem = o2["eval_memory"].to(next(model.parameters()).dtype)
    bos, eos, pad = vocab.bos_id, vocab.eos_id, vocab.pad_id
    gen = {}
    for name, beams in (("greedy", 1), ("beam3", 3)):
        official = [strip_generated(s, bos, eos, pad) for s in o2["generated"][name]]
        mine = guarded(gen, name, lambda: model.generate(batch, num_beams=beams, max_length=100, memory=mem))
        equal = isinstance(mine, list) and [list(map(int, s)) for s in mine] == official
        out[f"{name}_tokens_equal"] = bool(equal)
        gen[name] = {
            "equal": bool(equal),
            "official_lengths": [len(s) for s in official],
            "mlrg_lengths": [len(s) for s in mine] if isinstance(mine, list) else mine,
            "first_difference": None if equal or not isinstance(mine, list) else first_difference(mine, official),
        }
    d["generation"] = gen
    return model, parts


def first_difference(mine, official, vocab=None):
    "Where two lists of token-id lists first differ: row, position, both tokens (and texts with `vocab`)."
    for i, (a, b) in enumerate(zip(mine, official)):
        if list(a) != list(b):
            j = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            r = {
                "row": i,
                "position": j,
                "mlrg": list(a[j : j + 5]),
                "official": list(b[j : j + 5]),
                "lengths": [len(a), len(b)],
            }
            if vocab is not None:
                r["mlrg_text"] = vocab.backend.decode(list(a), skip_special_tokens=False)[:300]
                r["official_text"] = vocab.backend.decode(list(b), skip_special_tokens=False)[:300]
            return r
    return {"rows": [len(mine), len(official)]}


def logits_entry(model, batch, o2):
    "Teacher-forced logits on the scored positions (labels != -100), both sides; summary numbers and the max diff."
    import torch

    with torch.no_grad():
        m = model.memory(batch)
        lg = model.decoder(batch["target_ids"][:, :-1], m, model.memory_mask(batch, m))
    ol, lab = o2["logits"], o2["labels"]
    keep = lab != -100
    if lg.shape[:2] != ol.shape[:2]:
        return {
            "mlrg": None,
            "official": list(ol.shape),
            "max_abs_diff": float("inf"),
            "error": f"logits of shape {tuple(lg.shape)} vs official {tuple(ol.shape)}",
        }
    a, b = lg[keep].double(), ol[keep].double()
    dd = diff(a, b)
    return {
        "mlrg": {"mean": float(a.mean()), "std": float(a.std()), "argmax": a.argmax(-1)[:8].tolist()},
        "official": {"mean": float(b.mean()), "std": float(b.std()), "argmax": b.argmax(-1)[:8].tolist()},
        "max_abs_diff": dd,
        "positions": int(keep.sum()),
        "vocab": int(ol.shape[-1]),
        "argmax_agreement": float((a.argmax(-1) == b.argmax(-1)).double().mean()),
    }


def stage2_intermediates(model, batch, o2):
    "Max differences of the stage-2 intermediates: prompt embedding, visual memory, fused memory (train and eval)."
    import torch

    r = {}
    with torch.no_grad():
        model.train()
        pm = batch["prompt_mask"].bool()
        guarded(r, "prompt_embedding", lambda: masked_diff(model.encode_prompt(batch), o2["prompt_embed"], pm))
        guarded(r, "visual_memory", lambda: diff(model.visual_memory(batch), o2["visual_memory"]))
        guarded(r, "memory", lambda: diff(model.memory(batch), o2["memory"]))
        B = len(batch["id"])
        guarded(r, "fused_tokens", lambda: diff(model.visual(batch)["fused_tokens"], o2["fused"][:B]))
    return r


def masked_diff(mine, official, mask):
    "Max difference over the real (unpadded) tokens, and over every position when the shapes agree."
    L = min(mine.shape[1], official.shape[1])
    m = mask[:, :L]
    out = {"real_tokens": diff(mine[:, :L][m], official[:, :L][m])}
    if mine.shape == official.shape:
        out["all_positions"] = diff(mine, official)
    return out


def first_mismatch(result, tol):
    """Per stage, the first check in pipeline order beyond the tolerance (or False), with what localises it: the
    images whose view row differs, the worst projected image."""
    out = {}
    for stage, checks in result["checks"].items():
        for name, v in checks.items():
            val = v.get("real_tokens") if isinstance(v, dict) else v
            if val is False or (isinstance(val, (int, float)) and not isinstance(val, bool) and val > tol):
                out[stage] = {"check": name, "value": val}
                break
    inter = result["diagnostics"]["stage1"].get("diagnostics", {}).get("intermediates", {})
    views = inter.get("views") or {}
    bad = {k: f"{v['official']} -> mlrg {v['mlrg']}" for k, v in views.items() if v.get("same_row") is False}
    if bad:
        out["view_rows_differ"] = bad
    per = (inter.get("projected_tokens") or {}).get("per_slot") or {}
    if per:
        worst = max(per, key=lambda k: per[k] if isinstance(per[k], float) else -1)
        out["worst_projected_image"] = {worst: per[worst]}
    return out


def summary_checks(s1, s2):
    "The diagnostics that localise a mismatch, in one place (max abs differences, equalities)."

    def get(d, *path):
        for p in path:
            d = d.get(p) if isinstance(d, dict) else None
        return d.get("max_abs_diff", d) if isinstance(d, dict) and "max_abs_diff" in d else d

    d1, d2 = s1.get("diagnostics", {}), s2.get("diagnostics", {})
    return {
        "stage1": {
            "pixels": get(d1, "intermediates", "pixels"),
            "text_ids_equal": d1.get("text_ids_equal"),
            "projected_tokens": get(d1, "intermediates", "projected_tokens"),
            "fused_tokens": get(d1, "intermediates", "fused_tokens"),
            "image_embedding": get(d1, "intermediates", "image_embedding"),
            "text_embedding": get(d1, "intermediates", "text_embedding"),
        },
        "stage2": {
            "prompt_ids_equal": d2.get("prompt_ids_equal"),
            "prompt_segments_equal": d2.get("prompt_segments_equal"),
            "target_ids_equal": d2.get("target_ids_equal"),
            "prompt_embedding": get(d2, "intermediates", "prompt_embedding"),
            "fused_tokens": get(d2, "intermediates", "fused_tokens"),
            "visual_memory": get(d2, "intermediates", "visual_memory"),
            "memory": get(d2, "intermediates", "memory"),
            "eval_visual_memory": get(d2, "eval_mode", "visual_memory"),
            "eval_memory": get(d2, "eval_mode", "memory"),
        },
    }


# ---------------------------------------------------------------------------------------------------------------
# Main


def git_commit(root: Path):
    r = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=7", "HEAD"], capture_output=True, text=True)
    return r.stdout.strip() or None


def failures_of(result, tol):
    "What keeps the check from passing (empty: it passes)."
    bad = []
    for k in ("stage1_loss", "stage1_text_loss", "stage1_mpc_loss", "stage1_eval_loss", "stage2_loss", "stage2_logits"):
        e = result.get(k)
        if k in ("stage1_text_loss", "stage1_mpc_loss", "stage1_eval_loss") and e is None:
            continue
        if not isinstance(e, dict) or e.get("max_abs_diff") is None or not e["max_abs_diff"] <= tol:
            bad.append(f"{k}: max_abs_diff {None if not isinstance(e, dict) else e.get('max_abs_diff')}")
    for k in ("greedy_tokens_equal", "beam3_tokens_equal"):
        if result.get(k) is not True:
            bad.append(f"{k}: {result.get(k)}")
    for s, rep in (result.get("name_map") or {}).items():
        if not isinstance(rep, dict) or not rep.get("complete"):
            bad.append(f"name map of {s} incomplete")
    return bad


def atomic_write_json(obj, path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str) + "\n")
    os.replace(tmp, path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--mlrg-root", required=True, help="a local checkout of MLRG's repository (see above)")
    ap.add_argument("--venv", default=str(DEFAULT_VENV), help=f"the official side's venv (default {DEFAULT_VENV})")
    ap.add_argument("--work", default=None, help="folder for the fixtures (default: a new temporary folder)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    ap.add_argument(
        "--common-views",
        action="store_true",
        help="no rare view positions in the batch (AP AXIAL, XTABLE LATERAL, missing): checks all but point 1.6",
    )
    ap.add_argument("--seed", type=int, default=0, help="seed of the fixtures and of the official modules' init")
    ap.add_argument("--tolerance", type=float, default=TOLERANCE, help=f"max abs difference allowed ({TOLERANCE})")
    ap.add_argument("--out", default=str(RESULT), help=f"where the JSON goes (default {RESULT.relative_to(REPO)})")
    a = ap.parse_args(argv)
    root = Path(a.mlrg_root).expanduser().resolve()
    if not (root / "models" / "model_pretrain_finetune_v0905_ablation.py").is_file():
        print(f"--mlrg-root {root}: not a checkout of MLRG's repository (see --help)", file=sys.stderr)
        return 2
    import torch

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    sys.path.insert(0, str(REPO))
    import transformers

    import mlrg

    result = {
        "command": " ".join(["python", "benchmarks/compare_mlrg.py", *(sys.argv[1:] if argv is None else argv)]),
        "mlrg_commit": git_commit(root),
        "mlrg_commit_checked": MLRG_COMMIT,
        "project_commit": git_commit(REPO),
        "tolerance": a.tolerance,
    }
    t0 = time.time()
    result["venv"] = ensure_venv(Path(a.venv))
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="compare-mlrg-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        fx = write_fixtures(work, a.seed, a.common_views)
        off = run_official(Path(a.venv), root, work)
        result["versions"] = {
            "official": {**off["versions"], "stubbed_modules": off["stubbed_modules"]},
            "mlrg": {
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "mlrg": getattr(mlrg, "__version__", None),
                "python": sys.version.split()[0],
            },
        }
        s1, s2 = {}, {}
        with contextlib.redirect_stdout(sys.stderr):  # stdout carries the JSON only; mlrg's tables go to stderr
            m1 = guarded(s1, "model", lambda: mlrg_stage1(fx, off, s1))
        for k in ("stage1_loss", "stage1_text_loss", "stage1_mpc_loss", "stage1_eval_loss"):
            if k in s1:
                result[k] = s1.pop(k)
        if isinstance(m1, tuple):
            del s1["model"]
            ck = save_stage1_checkpoint(m1[0], m1[1], work / "mlrg_stage1.pt")
            with contextlib.redirect_stdout(sys.stderr):
                guarded(s2, "model", lambda: mlrg_stage2(fx, off, ck, s2))
            if isinstance(s2.get("model"), tuple):
                del s2["model"]
        for k in ("stage2_loss", "stage2_logits", "greedy_tokens_equal", "beam3_tokens_equal"):
            if k in s2:
                result[k] = s2.pop(k)
        result["name_map"] = {"stage1": s1.pop("name_map", None), "stage2": s2.pop("name_map", None)}
        result["checks"] = summary_checks(s1, s2)
        result["diagnostics"] = {"stage1": s1, "stage2": s2}
    finally:
        if not a.keep and not a.work:
            shutil.rmtree(work, ignore_errors=True)
    result["seconds"] = round(time.time() - t0, 1)
    result["failures"] = failures_of(result, a.tolerance)
    if result["failures"] and "checks" in result:
        result["first_mismatch"] = first_mismatch(result, a.tolerance)
    result["ok"] = not result["failures"]
    ordered = {
        k: result[k]
        for k in (
            "stage1_loss",
            "stage2_loss",
            "stage2_logits",
            "greedy_tokens_equal",
            "beam3_tokens_equal",
            "ok",
            "failures",
            "first_mismatch",
            "checks",
        )
        if k in result
    }
    ordered.update({k: v for k, v in result.items() if k not in ordered})
    atomic_write_json(ordered, Path(a.out))
    print(json.dumps(ordered, indent=1, default=str))
    return 0 if ordered["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

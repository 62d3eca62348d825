"""Tests of stage 1 (mlrg.pretrain): the ablation flags reach the model through the pretrain entry point, parameter
checking (notebook, function, command line), a 2-process gloo DDP run under torchrun, bf16 on the CPU, the pickle
guard, run folders, Recall@K and the linear probe on hand-made cases."""

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mlrg.core import InputError, read_jsonl
from mlrg.data import Vocab
from mlrg.engine import load_checkpoint
from mlrg.metrics import roc_auc
from mlrg.models import MLRG_STAGE1, ProjectionHead, VisualEncoder, load_visual_state
from mlrg.pretrain import (
    PRETRAIN,
    PretrainEvaluator,
    build_pretrain,
    linear_probe,
    load_pretrained,
    pretrain,
    pretrain_cli,
    recall_at_k,
)
from mlrg.inputs import write_tiny_phantom

PRETRAIN_DEFAULTS = PRETRAIN.defaults()

REPO = Path(__file__).resolve().parents[1]
FAST = dict(image_size=32, batch_size=4, eval_batch_size=16, progress=False, probe_max_train=32, num_threads=1)


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    "A tiny prepared phantom laid out as a run folder: <root>/mimic, <root>/prepared/annotation.json + vocab.json."
    root = tmp_path_factory.mktemp("pt")
    ann = write_tiny_phantom(root, patients=16, seed=3)
    data = json.loads(ann.read_text())
    assert data["train"] and data["val"]
    return root, ann


def _env():
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }


def _batch_with(parts, need_aux, need_prior):
    "A collated batch of train samples that have auxiliary views / a prior, as asked."
    ds = parts.train_ds
    idx = [
        i
        for i, it in enumerate(ds.items)
        if (not need_aux or it["auxiliary_references"]["image_path"]) and (not need_prior or it["prior_study"])
    ][:4]
    assert len(idx) >= 2, "the phantom should have samples with auxiliary views and priors"
    return parts.collate_fn([ds[i] for i in idx])


@pytest.mark.parametrize("flag,slots", [("is_prior_scan", "prior"), ("is_multiview_learning", "aux")])
def test_ablation_flag_decides_what_the_model_sees(phantom, flag, slots):
    _, ann = phantom
    emb = {}
    for on in (True, False):
        parts = build_pretrain(PRETRAIN.check(data_path=str(ann), linear_probe=False, **FAST, **{flag: on}))
        model = parts.model.eval()
        batch = _batch_with(parts, need_aux=slots == "aux", need_prior=slots == "prior")
        V = batch["images"].shape[1] - 1
        changed = {**batch, "images": batch["images"].clone()}
        sl = slice(V, V + 1) if slots == "prior" else slice(1, V)
        changed["images"][:, sl] = torch.randn_like(changed["images"][:, sl]) * 3
        with torch.no_grad():
            emb[on] = (model.encode_images(batch), model.encode_images(changed))
        assert parts.model_config[flag] is on
    assert not torch.allclose(*emb[True], atol=1e-4)  # the flag on: those pixels reach the embedding
    torch.testing.assert_close(*emb[False])  # off: they are never looked at


def test_mpc_flag_changes_the_loss_end_to_end(phantom, tmp_path):
    root, ann = phantom
    got = {}
    for on in (True, False):
        out = tmp_path / f"mpc_{on}"
        s = pretrain(
            data_path=str(ann),
            using_mpc_loss=on,
            max_steps=2,
            log_steps=1,
            linear_probe=False,
            model_save_path=str(out),
            **FAST,
        )
        recs = read_jsonl(out / "metrics.jsonl")
        got[on] = [r for r in recs if r["kind"] == "train"]
        assert ("train_loss_mpc" in got[on][0]) is on
        assert ("loss_mpc" in s["best"]) is on
        assert load_checkpoint(out / "last.pt")["config"]["model"]["using_mpc_loss"] is on
    # the total is the text loss plus the mpc term (weights 1:1) when on, the text loss alone when off
    assert got[False][0]["train_loss"] == pytest.approx(got[False][0]["train_loss_text"], rel=1e-6)
    assert got[True][0]["train_loss"] == pytest.approx(
        got[True][0]["train_loss_text"] + got[True][0]["train_loss_mpc"], rel=1e-5
    )


def test_visual_half_of_a_pretrain_checkpoint(phantom, tmp_path):
    """Two steps of stage 1, then its best checkpoint's visual half in a fresh VisualEncoder: every tensor, the same
    outputs."""
    _, ann = phantom
    out = tmp_path / "vis"
    s = pretrain(data_path=str(ann), max_steps=2, linear_probe=False, model_save_path=str(out), **FAST)
    ck = load_checkpoint(s["best_checkpoint"])
    visual = VisualEncoder(ck["config"]["model"])
    table = load_visual_state(visual, s["best_checkpoint"], print_fn=None)
    assert set(table.status) == {"loaded"}
    for k, v in visual.state_dict().items():
        assert torch.equal(v, ck["model"]["visual." + k]), k
    model, vocab, _ = load_pretrained(s["best_checkpoint"])  # the whole model still loads
    parts = build_pretrain(PRETRAIN.check(data_path=str(ann), linear_probe=False, **FAST))
    batch = _batch_with(parts, need_aux=True, need_prior=True)
    with torch.no_grad():
        mine, theirs = visual.eval()(batch), model.visual(batch)
    for k in theirs:
        assert torch.equal(mine[k], theirs[k]), k
    with torch.no_grad():
        assert torch.equal(model.image_embedding(mine), model.encode_images(batch))


def test_stage1_probe_on_a_tiny_run(phantom, tmp_path):
    """A tiny stage-1 run scores the val linear probes (image embedding and encoder features): the macro AUC, the mean
    of the observations scored, lies in [0, 1] and is the same in the summary, its eval curve, metrics.jsonl and the
    run folder's results.jsonl."""
    root, _ = phantom
    run = tmp_path / "run"
    run.mkdir()
    for sub in ("prepared", "mimic"):
        (run / sub).symlink_to(root / sub)
    s = pretrain(run_dir=str(run), max_steps=2, **FAST)
    b = s["best"]
    auc = b["probe_auc_macro"]
    per = [v for k, v in b.items() if k.startswith("probe_auc/")]
    assert 0.0 <= auc <= 1.0 and len(per) == b["probe_n_scored"] >= 1 and auc == pytest.approx(np.mean(per))
    assert b["probe_n_val"] >= 2 and b["probe_n_train"] >= 2
    enc = b["probe_encoder_auc_macro"]  # the image encoder's own features (what a frozen encoder gives stage 2)
    assert 0.0 <= enc <= 1.0 and b["probe_encoder_n_scored"] == b["probe_n_scored"]
    assert s["curve"][-1]["probe_encoder_auc_macro"] == enc
    assert s["curve"][-1]["probe_auc_macro"] == auc
    assert json.loads((run / "pretrain" / "pretrain_summary.json").read_text())["best"]["probe_auc_macro"] == auc
    ev = [r for r in read_jsonl(run / "pretrain" / "metrics.jsonl") if r["kind"] == "eval"]
    assert ev[-1]["val_probe_auc_macro"] == auc
    rec = read_jsonl(run / "results.jsonl")[-1]
    assert (rec["val_probe_auc_macro"], rec["val_probe_encoder_auc_macro"]) == (auc, enc)
    assert s["params"]["eval_batch_size"] == 16  # FAST's, as given


def test_medclip_mode_refuses_mlrg_flags_and_trains(phantom, tmp_path):
    _, ann = phantom
    with pytest.raises(InputError, match="medclip"):
        build_pretrain(PRETRAIN.check(data_path=str(ann), mode="medclip", is_prior_scan=True, **FAST))
    s = pretrain(data_path=str(ann), mode="medclip", max_steps=1, model_save_path=str(tmp_path / "mc"), **FAST)
    assert "loss_clip" in s["best"] and np.isfinite(s["best_val_loss"])


def test_parameter_checks():
    assert PRETRAIN.check(lr=4)["lr"] == 4.0 and isinstance(PRETRAIN.check(lr=4)["lr"], float)  # papermill -p lr 4
    with pytest.raises(InputError, match="did you mean 'batch_size'"):
        PRETRAIN.check(bach_size=4)
    with pytest.raises(InputError, match="parameter 'num_epochs'"):
        PRETRAIN.check(num_epochs=2.5)
    with pytest.raises(InputError, match="parameter 'uncertain'"):
        PRETRAIN.check(uncertain="maybe")
    with pytest.raises(InputError, match="recall_ks"):
        PRETRAIN.check(recall_ks=[0, 5])
    # the notebook: every global that papermill added beyond the known names is checked, so a typo is an error
    g = {**PRETRAIN_DEFAULTS, "In": [], "lr": 3, "eval_step": 10}
    with pytest.raises(InputError, match="did you mean 'eval_steps'"):
        PRETRAIN.notebook(g, names_before=set(PRETRAIN_DEFAULTS) | {"In"})
    assert PRETRAIN.notebook({**PRETRAIN_DEFAULTS, "lr": 3}, set(PRETRAIN_DEFAULTS))["lr"] == 3.0
    # the command line: the same names, the same checks
    p = PRETRAIN.cli(["--lr", "4", "--use_amp", "--gpu_id", "0", "--model_config", '{"d_model": 64}'])
    assert p["lr"] == 4.0 and p["use_amp"] is True and p["gpu_id"] == "0" and p["model_config"] == {"d_model": 64}


def test_cli_reports_bad_parameters(capsys):
    assert pretrain_cli(["--bach_size", "4"]) == 2
    assert "did you mean 'batch_size'" in capsys.readouterr().err
    assert pretrain_cli(["--lr", "fast"]) == 2
    assert "parameter 'lr'" in capsys.readouterr().err
    p = subprocess.run(
        [sys.executable, "-m", "mlrg.pretrain", "--num_epoch", "3"],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 2 and "did you mean 'num_epochs'" in p.stderr, p.stderr[-2000:]


def test_ddp_two_processes_gloo(phantom, tmp_path):
    root, ann = phantom
    out = tmp_path / "ddp"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--standalone",
        "-m",
        "mlrg.pretrain",
        "--data_path",
        str(ann),
        "--image_size",
        "32",
        "--batch_size",
        "4",
        "--max_steps",
        "2",
        "--eval_batch_size",
        "16",
        "--probe_max_train",
        "16",
        "--progress",
        "false",
        "--model_save_path",
        str(out),
    ]
    p = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    ck = load_checkpoint(out / "last.pt")
    assert ck["world_size"] == 2 and len(ck["rng"]) == 2 and ck["global_step"] == 2
    assert ck["vocab"] == Vocab.load(root / "prepared" / "vocab.json").itos
    model, vocab, best = load_pretrained(out / "best.pt")
    assert best["config"]["model"]["is_prior_scan"] is True and len(vocab) == model.config["vocab_size"]
    assert p.stdout.count("pretrain: best step") == 1  # only rank 0 prints the summary
    assert json.loads((out / "pretrain_summary.json").read_text())["global_step"] == 2


def test_bf16_on_cpu_and_run_folder(phantom):
    root, _ = phantom
    s = pretrain(run_dir=str(root), amp="bf16", max_steps=2, **FAST)
    assert Path(s["out_dir"]) == root / "pretrain"
    ck = load_checkpoint(root / "pretrain" / "last.pt")
    assert ck["config"]["amp"] == "bf16" and np.isfinite(s["best_val_loss"])
    rec = read_jsonl(root / "results.jsonl")[-1]
    assert rec["stage"] == "pretrain" and rec["best_checkpoint"] == str(root / "pretrain" / "best.pt")
    assert all(
        np.isfinite(r["train_loss"]) for r in read_jsonl(root / "pretrain" / "metrics.jsonl") if r["kind"] == "train"
    )


def test_medclip_pickle_needs_trust(phantom, tmp_path):
    root, ann = phantom
    data = json.loads(ann.read_text())
    files = root / "mimic" / "files"
    conv = lambda items: [
        {
            "image_path": str(files / it["anchor_scan"]["image_path"][0]),
            "report": it["findings"],
            "labels": [0.0 if v is None else v for v in it["chexpert"]],
        }
        for it in items
    ]
    pkl = tmp_path / "datasets.pkl"
    pkl.write_bytes(pickle.dumps({s: conv(data[s]) for s in ("train", "val", "test")}))
    with pytest.raises(InputError, match="refusing to load a pickle"):
        pretrain(data_path=str(pkl), max_steps=1, **FAST)
    s = pretrain(
        data_path=str(pkl), trust_pickle=True, mode="medclip", max_steps=1, model_save_path=str(tmp_path / "pk"), **FAST
    )
    assert s["data"]["samples"]["train"] == len(data["train"]) and "built from the train split" in s["data"]["vocab"]
    assert s["best"]["probe_n_val"] == len(data["val"])  # the pickle's labels feed the probe


def test_recall_at_k_hand_made():
    # 4 studies, study 0 with 2 images. Reports: one per study (the first sample's text).
    e = torch.eye(4)
    txt = torch.stack([e[0], e[0], e[1], e[2], e[3]])
    img = torch.stack([e[0], e[2], e[1], e[2], (e[0] + e[3]) / 2**0.5])  # sample 1 (study 0) looks like study 2
    r = recall_at_k(img, txt, [0, 0, 1, 2, 3], ks=(1, 2, 4))
    assert r["n_studies"] == 4 and r["n_queries_i2t"] == 5
    # image->report: samples 0, 2, 3 right at K=1; sample 4 ties r0 and r3 (the tie counts against it): K=2; sample 1:
    # K=4
    assert (r["i2t_R@1"], r["i2t_R@2"], r["i2t_R@4"]) == pytest.approx((3 / 5, 4 / 5, 1.0))
    # report->image: r0, r1, r3 find an image of their study first; r2 ties its image 3 with sample 1's (study 0): K=2
    assert (r["t2i_R@1"], r["t2i_R@2"]) == pytest.approx((3 / 4, 1.0))
    assert r["chance@1"] == pytest.approx(1 / 4) and r["chance@4"] == 1.0
    perfect = recall_at_k(txt, txt, [0, 0, 1, 2, 3], ks=(1,))
    assert perfect["i2t_R@1"] == 1.0 and perfect["t2i_R@1"] == 1.0


def test_linear_probe_and_auc():
    assert roc_auc([0, 1, 0, 1], [0.1, 0.9, 0.2, 0.8]) == 1.0 and roc_auc([0, 1], [0.5, 0.5]) == 0.5
    assert np.isnan(roc_auc([1, 1], [0.1, 0.2]))
    g = np.random.default_rng(1)
    x = g.normal(size=(300, 6))
    items = [{"chexpert": [float(v > 0), -1.0 if v > 1 else float(w > 0)] + [None] * 12} for v, w in x[:, :2]]
    r = linear_probe(x[:200], items[:200], x[200:], items[200:], uncertain="ignore")
    assert r["probe_auc/Atelectasis"] > 0.95 and r["probe_auc/Cardiomegaly"] > 0.95 and r["probe_n_scored"] == 2
    none = linear_probe(x[:200], [{"chexpert": None}] * 200, x[200:], items[200:])
    assert none["probe_n_scored"] == 0 and none["probe_unlabelled_train"] == 200


def test_mimic_preset_is_mlrg_stage1():
    p = PRETRAIN.check(
        preset="mimic",
        data_path="a.json",
        image_pretrained_path="rad-dino",
        text_pretrained_path="cxr-bert",
        tokenizer_path="distilgpt2",
    )
    assert p["model_config"] == {"d_model": 768, "proj_dim": 768, **MLRG_STAGE1}
    assert (p["eval_batch_size"], p["val_loss_mean"]) == (32, "batches")
    assert (p["weight_decay"], p["weight_decay_scope"], p["drop_last"]) == (0.01, "all", True)
    assert (p["report_style"], p["image_preprocess"], p["max_views"]) == ("factual_serialization", "processor", None)
    d = PRETRAIN.defaults()  # mlrg's own defaults stay
    assert (d["eval_batch_size"], d["val_loss_mean"], d["weight_decay_scope"], d["drop_last"]) == (
        None,
        "samples",
        "matrices",
        False,
    )
    assert PRETRAIN.check(batch_size=8)["eval_batch_size"] == 8  # val batches of the training size: losses compare


def test_mlrg_stage1_on_the_phantom_deduplicates_val_images(phantom):
    _, ann = phantom
    mc = {"d_model": 32, "proj_dim": 32, **MLRG_STAGE1}
    p = PRETRAIN.check(
        data_path=str(ann), linear_probe=False, model_config=mc, report_style="factual_serialization", **FAST
    )
    parts = build_pretrain(p)
    assert isinstance(parts.model.visual.image_proj, ProjectionHead) and parts.model_config["batch_images"] == "dedup"
    ds = parts.val_ds
    batch = parts.collate_fn([ds[i] for i in range(min(8, len(ds)))])  # unshuffled: a study's views side by side
    # the report is read as MLRG's [CLS]fact[SEP]...[SEP], at [CLS], after the text ProjectionHead
    assert (batch["text_ids"][:, 0] == parts.vocab.cls_id).all()
    m = parts.model.eval()
    with torch.no_grad():
        tok = m.text_encoder(batch["text_ids"], batch["text_mask"])[0]
        want = torch.nn.functional.normalize(m.text_proj(tok)[:, 0], dim=-1)
        torch.testing.assert_close(m.encode_texts(batch), want)
    keys = [k for row in batch["image_keys"] for k in row if k]
    current = {k for row in batch["image_keys"] for k in row[:-1] if k}
    priors = {row[-1] for row in batch["image_keys"] if row[-1]}  # MLRG: priors are told apart among priors only
    with torch.no_grad():
        vis = parts.model.eval().visual(batch)
        out = parts.model(batch)
    assert len(keys) > len(current) + len(priors)  # the slots hold images twice (B4) ...
    assert vis["image_tokens"].shape[0] == len(current) + len(priors)  # ... the model sees each once
    assert torch.isfinite(out["loss"])
    ev = parts.evaluator(parts.model)
    assert np.isfinite(ev["val_loss"])


def test_val_loss_mean_over_batches(phantom):
    _, ann = phantom
    parts = build_pretrain(PRETRAIN.check(data_path=str(ann), linear_probe=False, **FAST))
    model = parts.model.eval()
    n = len(parts.val_ds)
    bs = 3 if n % 3 else 4
    assert n % bs, "the val split should end with a partial batch"
    got = {}
    for how in ("samples", "batches"):
        ev = PretrainEvaluator(parts.val_ds, batch_size=bs, loss_mean=how)
        got[how] = ev.embed_val(model)[0]["loss"]
    with torch.no_grad():
        losses, sizes = [], []
        for i in range(0, n, bs):
            b = parts.collate_fn([parts.val_ds[j] for j in range(i, min(n, i + bs))])
            losses.append(float(model(b)["loss"]))
            sizes.append(len(b["id"]))
    assert got["batches"] == pytest.approx(np.mean(losses), rel=1e-6)
    assert got["samples"] == pytest.approx(np.average(losses, weights=sizes), rel=1e-6)
    assert got["samples"] != pytest.approx(got["batches"], rel=1e-6)
    with pytest.raises(InputError, match="val_loss_mean"):
        PretrainEvaluator(parts.val_ds, loss_mean="median")

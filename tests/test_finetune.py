"""Tests of stage 2 (mlrg.finetune): a reloaded checkpoint writes the same reports, the stage-1 weights load by name
and shape with two learning rates, each ablation flag changes only what it names, empty / garbage / over-long prompt
parts are handled, cached features equal pixels, a run killed by SIGKILL and started again ends with the weights of an
uninterrupted run, a 2-process gloo run generates every val sample exactly once, `mlrg generate` end to end, and
`token_grid` over a stage-1 checkpoint with and without the feature cache."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mlrg.core import InputError, read_jsonl
from mlrg.data import Vocab
from mlrg.engine import load_checkpoint
from mlrg.evaluate import evaluate_files
from mlrg.report_model import FeatureCache
from mlrg.finetune import (
    FINETUNE,
    GENERATE,
    build_finetune,
    dataset_for,
    finetune,
    fit_config,
    generate_cli,
    load_finetune_data,
    load_report_model,
    model_config_for,
)
from mlrg.data import collate
from mlrg.inputs import write_tiny_phantom
from mlrg.labeler import apply_policy, label_reports
from mlrg.pretrain import pretrain

REPO = Path(__file__).resolve().parents[1]
FAST = dict(
    batch_size=4,
    eval_batch_size=16,
    progress=False,
    num_threads=1,
    meteor=False,
    decoder_layers=1,
    max_length=48,
    num_beams=2,
)


def _env():
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    "A run folder: a tiny prepared phantom (mimic/, prepared/) and one step of stage 1 at 32 px (pretrain/best.pt)."
    root = tmp_path_factory.mktemp("ft")
    ann = write_tiny_phantom(root, patients=16, seed=3)
    pretrain(
        run_dir=str(root),
        image_size=32,
        max_steps=1,
        batch_size=4,
        eval_batch_size=16,
        linear_probe=False,
        progress=False,
        num_threads=1,
    )
    assert (root / "pretrain" / "best.pt").is_file()
    return root, ann


@pytest.fixture(scope="module")
def trained(run):
    "Two steps of stage 2 in the run folder (stage-1 initialisation), with the test split written."
    root, ann = run
    return finetune(run_dir=str(root), max_steps=2, **FAST)


def _parts(root, data=None, **kw):
    return build_finetune(FINETUNE.check(run_dir=str(root), **{**FAST, **kw}), data=data)


def test_reloaded_checkpoint_writes_the_same_reports(run, trained):
    root, ann = run
    assert Path(trained["out_dir"]) == root / "finetune"
    model, vocab, ck = load_report_model(trained["best_checkpoint"])
    assert (
        ck["vocab"] == load_checkpoint(root / "pretrain" / "best.pt")["vocab"] == vocab.itos
    )  # stage 1's vocabulary, carried
    preds = json.loads((root / "finetune" / "test_predictions.json").read_text())
    items = json.loads(ann.read_text())["test"]
    assert [p["id"] for p in preds] == [it["id"] for it in items]
    assert set(preds[0]) == {"id", "study", "reference", "generated", "prompt", "has_prior"}
    ds = dataset_for(ck, items, root / "mimic" / "files")
    batch = collate([ds[i] for i in range(len(ds))])
    ids = model.generate(batch, **ck["config"]["generation"])
    assert [vocab.decode(s) for s in ids] == [p["generated"] for p in preds]  # reloaded model = the run's
    again, _, _ = load_report_model(trained["best_checkpoint"])
    assert again.generate(batch, **ck["config"]["generation"]) == ids
    rows = list(csv.DictReader(open(root / "finetune" / "test_predictions.csv", encoding="utf-8")))
    assert [r["dicom_id"] for r in rows] == [p["id"] for p in preds] and rows[0]["labels"] == preds[0]["reference"]
    assert read_jsonl(root / "results.jsonl")[-1]["stage"] == "finetune"


def test_stage1_weights_load_by_name_with_two_learning_rates(run):
    root, _ = run
    parts = _parts(root, cache_features=False)
    t, model = parts.init_table, parts.model
    ck = load_checkpoint(root / "pretrain" / "best.pt")["model"]
    loaded = set(t[t.status == "loaded"].name)
    assert {n.split(".")[0] for n in loaded} == {"visual", "text_encoder"}
    assert set(t[t.status == "skipped"].name) == {
        k for k in ck if k.split(".")[0] in ("image_head", "text_head", "mpc_head")
    }
    assert {n.split(".")[0] for n in t[t.status == "new"].name} >= {
        "decoder",
        "prompt_fusion",
        "type_embed",
        "segment_embed",
    }
    sd = model.state_dict()
    for n in loaded:
        assert torch.equal(sd[n], ck[n]), n
    groups = parts.param_groups
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    covered = {n for n in trainable if any(n.startswith(k) for k in groups)}
    assert covered == loaded & trainable and set(groups.values()) == {FINETUNE.check()["pt_lr"]}
    assert not any(n.startswith("visual.image_encoder.") for n in trainable)  # frozen, as MLRG
    # the ablation: no stage-1 weights, one learning rate, and the new weights are those of the same seed
    off = _parts(root, data=parts.data, stage1_init=False, cache_features=False)
    assert off.init_table is None and off.param_groups is None and off.model_config == parts.model_config
    sd_off = off.model.state_dict()
    for n in sd:
        if n not in loaded:
            assert torch.equal(sd[n], sd_off[n]), n
    # text_lr: stage 1's text side (the prompt encoder) at its own rate, the image encoder still at pt_lr
    text = _parts(root, data=parts.data, cache_features=False, freeze_image_encoder=False, text_lr=3e-3, pt_lr=1e-4)
    rates = {
        n: next(lr for k, lr in text.param_groups.items() if n.startswith(k))
        for n, p in text.model.named_parameters()
        if p.requires_grad and any(n.startswith(k) for k in text.param_groups)
    }
    assert {n for n, lr in rates.items() if lr == 3e-3} == {n for n in rates if n.startswith("text_encoder.")}
    assert {n for n, lr in rates.items() if lr == 1e-4} == {n for n in rates if n.startswith("visual.")} != set()
    assert fit_config(FINETUNE.check(run_dir=str(root), text_lr=3e-3), text, root)["init"]["text_lr"] == 3e-3
    assert "text_lr" not in fit_config(FINETUNE.check(run_dir=str(root)), parts, root)["init"]  # older configs equal


def _same(a, b):
    if torch.is_tensor(a):
        return torch.equal(a, b)
    return a == b


def _changed_keys(ds_on, ds_off, n=12):
    "The item keys whose values differ between two datasets over the first `n` samples."
    out = set()
    for i in range(min(n, len(ds_on))):
        a, b = ds_on[i], ds_off[i]
        out |= {k for k in a if not _same(a[k], b[k])}
    return out


@pytest.mark.parametrize("flag,segment", [("use_indication", 0), ("use_prior_report", 1)])
def test_prompt_ablation_changes_only_its_part_of_the_prompt(run, flag, segment):
    root, _ = run
    on = _parts(root)
    off = _parts(root, data=on.data, **{flag: False})
    assert on.model_config == off.model_config
    assert _changed_keys(on.train_ds, off.train_ds) <= {"prompt_ids", "prompt_segments"}
    vocab = on.vocab
    want = "[CLS] [NHI] [SEP]" if segment == 0 else "[NHPR] [SEP]"
    for i in range(len(on.train_ds)):
        a, b = on.train_ds[i], off.train_ds[i]
        keep = 1 - segment
        assert (
            a["prompt_ids"][a["prompt_segments"] == keep].tolist()
            == b["prompt_ids"][b["prompt_segments"] == keep].tolist()
        )
        assert vocab.decode(b["prompt_ids"][b["prompt_segments"] == segment], skip_special=False) == want
    assert any(
        not torch.equal(on.train_ds[i]["prompt_ids"], off.train_ds[i]["prompt_ids"]) for i in range(len(on.train_ds))
    )


@pytest.mark.parametrize(
    "flag,key", [("use_prior_scan", "is_prior_scan"), ("use_auxiliary_views", "is_multiview_learning")]
)
def test_image_ablation_hides_only_its_slots(run, flag, key):
    root, _ = run
    on = _parts(root)
    off = _parts(root, data=on.data, **{flag: False})
    diff = {k for k in on.model_config["visual"] if on.model_config["visual"][k] != off.model_config["visual"][k]}
    assert diff == {key} and {k for k in on.model_config if on.model_config[k] != off.model_config[k]} == {"visual"}
    assert _changed_keys(on.train_ds, off.train_ds) == set()  # the data are the same
    ds = on.train_ds
    idx = [i for i, it in enumerate(ds.items) if it["prior_study"] and it["auxiliary_references"]["image_path"]][:3]
    batch = collate([ds[i] for i in idx])
    V = batch["features"].shape[1] - 1
    mine, other = (slice(V, V + 1), slice(1, V)) if flag == "use_prior_scan" else (slice(1, V), slice(V, V + 1))

    def memory_change(model, sl):
        noisy = {**batch, "features": batch["features"].clone()}
        noisy["features"][:, sl] += torch.randn_like(noisy["features"][:, sl]) * 3
        with torch.no_grad():
            return float((model.eval().memory(noisy) - model.memory(batch)).abs().max())

    assert memory_change(on.model, mine) > 1e-3  # the flag on: those images are seen
    assert memory_change(off.model, mine) == 0.0  # off: never looked at
    assert memory_change(off.model, other) > 1e-3  # ... and the other slots still are


@pytest.mark.parametrize("text", ["", "   ", "@@@ ### $$$", "zzqx wwvq kkpl", " ".join(["effusion"] * 5000), None])
def test_empty_garbage_or_long_prompt_parts(trained, run, text):
    root, ann = run
    model, vocab, ck = load_report_model(trained["best_checkpoint"])
    items = json.loads(ann.read_text())["val"]
    it = next(i for i in items if i["prior_study"])
    bad = {
        **it,
        "indication_pure": text,
        "prior_study": {"latest_study": {**it["prior_study"]["latest_study"], "findings": text}},
    }
    ds = dataset_for(ck, [bad, it], root / "mimic" / "files")
    s = ds[0]
    words = vocab.decode(s["prompt_ids"], skip_special=False).split()
    assert (
        len(s["prompt_ids"]) <= ck["config"]["data"]["max_prompt_length"]
        and words[0] == "[CLS]"
        and words.count("[SEP]") == 2
    )
    if text is None or not text.strip() or text.startswith(("@", "zz")):
        assert words == ["[CLS]", "[NHI]", "[SEP]", "[NHPR]", "[SEP]"]
    batch = collate([ds[0], ds[1]])
    out = model.generate(batch, num_beams=2, max_length=12)
    assert len(out) == 2 and torch.isfinite(model(batch)["loss"])


def test_cached_features_equal_pixels(run, trained):
    root, ann = run
    model, vocab, ck = load_report_model(trained["best_checkpoint"])
    items = json.loads(ann.read_text())["val"][:4]
    ds = dataset_for(ck, items, root / "mimic" / "files")
    cache = FeatureCache.compute(
        model.visual.image_encoder, [p for it in items for _, p, _, _ in ds.slots(it)], ds.image, progress=False
    )
    ds.features = cache
    pix = collate([dataset_for(ck, items, root / "mimic" / "files")[i] for i in range(len(items))])
    feat = collate([ds[i] for i in range(len(items))])
    assert "features" in feat and "features" not in pix
    with torch.no_grad():
        torch.testing.assert_close(model.memory(feat), model.memory(pix), atol=1e-4, rtol=1e-4)


def test_token_grid_with_and_without_the_feature_cache(run):
    """token_grid over a stage-1 checkpoint: its weights load as they are; the cache keeps the encoder's own tokens and
    the model pools them, as it pools the pixels' tokens: the same memory either way."""
    root, _ = run
    cached = _parts(root, token_grid=1)  # frozen, not augmented: the feature cache is on
    pixels = _parts(root, data=cached.data, token_grid=1, cache_features=False)
    assert cached.features is not None and pixels.features is None
    assert cached.features.tokens.shape[1] == 1 + 2 * 2  # small_cnn at 32 px, stage 1's
    assert cached.model_config["visual"]["token_grid"] == 1 and cached.model.visual.n_tokens == 2
    t = cached.init_table
    assert set(t[t.name.str.startswith("visual.")].status) == {"loaded"}
    batch_c = collate([cached.train_ds[i] for i in range(4)])
    batch_p = collate([pixels.train_ds[i] for i in range(4)])
    assert "features" in batch_c and "features" not in batch_p
    with torch.no_grad():
        mem = cached.model.eval().memory(batch_c)
        assert mem.shape[1] == 2 * 2  # anchor + fused tokens, 2 each
        torch.testing.assert_close(mem, pixels.model.eval().memory(batch_p), atol=1e-4, rtol=1e-4)


def test_token_grid_and_prior_path_over_a_stage1_config():
    "None keeps the stage-1 checkpoint's token_grid, a value replaces it; prior_path and other_images reach the config."
    vocab = Vocab("heart size normal".split())
    s1 = {"config": {"model": {"image_size": 64, "d_model": 32, "fusion_heads": 4, "token_grid": 2}}}
    assert model_config_for(FINETUNE.check(), vocab, s1)["visual"]["token_grid"] == 2
    mc = model_config_for(FINETUNE.check(token_grid=3, prior_path="decoder", other_images="memory"), vocab, s1)
    assert (mc["visual"]["token_grid"], mc["prior_path"], mc["other_images"]) == (3, "decoder", "memory")
    assert model_config_for(FINETUNE.check(), vocab, s1)["other_images"] == "fusion"
    assert "attention_dropout" not in model_config_for(FINETUNE.check(), vocab, s1)  # None: dropout's rate
    assert model_config_for(FINETUNE.check(attention_dropout=0.0), vocab, s1)["attention_dropout"] == 0.0
    assert model_config_for(FINETUNE.check(), vocab)["visual"]["token_grid"] is None
    with pytest.raises(InputError, match="parameter 'token_grid'"):
        FINETUNE.check(token_grid=0)


KILL = """
import os, signal, sys
from mlrg import finetune as ft
real, calls = ft.MLRGReportModel.forward, [0]
def dying(self, batch):
    if self.training:
        calls[0] += 1
        if calls[0] == int(os.environ["KILL_AT"]): os.kill(os.getpid(), signal.SIGKILL)
    return real(self, batch)
ft.MLRGReportModel.forward = dying
sys.exit(ft.finetune_cli(sys.argv[1:]))
"""


def _args(d):
    return [x for k, v in d.items() for x in (f"--{k}", json.dumps(v) if isinstance(v, (dict, list)) else str(v))]


def test_killed_then_same_command_gives_the_uninterrupted_weights(run, tmp_path):
    root, ann = run
    conf = dict(data_path=str(ann), max_steps=4, save_steps=2, stage1_init=False, test=False, **FAST)
    straight = finetune(**conf, model_save_path=str(tmp_path / "straight"))
    script = tmp_path / "kill.py"
    script.write_text(KILL)
    out = tmp_path / "run"
    cmd = [sys.executable, str(script), *_args({**conf, "model_save_path": str(out)})]
    killed = subprocess.run(cmd, env={**_env(), "KILL_AT": "3"}, capture_output=True, text=True, timeout=180)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert load_checkpoint(out / "last.pt")["global_step"] == 2
    again = subprocess.run(cmd, env={**_env(), "KILL_AT": "0"}, capture_output=True, text=True, timeout=180)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "continuing it from last.pt" in again.stderr
    a, b = load_checkpoint(out / "last.pt"), load_checkpoint(Path(straight["out_dir"]) / "last.pt")
    assert a["global_step"] == b["global_step"] == 4
    for k in b["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=0, atol=1e-6)
    assert a["best_metric"] == pytest.approx(b["best_metric"])


def test_ddp_two_processes_generate_every_val_sample_once(run, tmp_path):
    root, ann = run
    out = tmp_path / "ddp"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--standalone",
        "-m",
        "mlrg.finetune",
        *_args(
            dict(data_path=str(ann), max_steps=2, eval_steps=1, stage1_init=False, model_save_path=str(out), **FAST)
        ),
    ]
    p = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    ck = load_checkpoint(out / "last.pt")
    assert ck["world_size"] == 2 and ck["global_step"] == 2
    val_ids = sorted(it["id"] for it in json.loads(ann.read_text())["val"])
    assert len(val_ids) % 2 == 1 or len(val_ids) > 2  # shards of unequal or equal size, both fine
    for step in (1, 2):
        got = [r["id"] for r in read_jsonl(out / "evals" / f"val_step_{step}.jsonl")]
        assert sorted(got) == val_ids  # every val sample, exactly once
    evals = [r for r in read_jsonl(out / "metrics.jsonl") if r["kind"] == "eval"]
    assert [r["val_n"] for r in evals] == [len(val_ids)] * 2 and all("val_bleu4+ce14" in r for r in evals)
    assert p.stdout.count("finetune: best step") == 1  # the summary printed once
    assert len(json.loads((out / "test_predictions.json").read_text())) == len(json.loads(ann.read_text())["test"])


def test_mlrg_generate_end_to_end(run, trained, tmp_path, capsys):
    root, ann = run
    best = trained["best_checkpoint"]
    assert (
        generate_cli(
            [
                "--checkpoint",
                best,
                "--annotation",
                str(ann),
                "--split",
                "test",
                "--out",
                str(tmp_path / "p.csv"),
                "--quiet",
                "--num_beams",
                "1",
            ]
        )
        == 0
    )
    assert "generate:" in capsys.readouterr().out
    res = evaluate_files(tmp_path / "p.csv", meteor=False, annotation=ann)
    assert res["n"] == len(json.loads(ann.read_text())["test"])
    assert (
        generate_cli(
            [
                "--checkpoint",
                best,
                "--annotation",
                str(ann),
                "--split",
                "val",
                "--out",
                str(tmp_path / "p.json"),
                "--quiet",
                "--limit",
                "2",
            ]
        )
        == 0
    )
    assert len(json.loads((tmp_path / "p.json").read_text())) == 2
    # bad input: one line naming the file, status 2
    for argv, says in [
        (["--checkpoint", str(tmp_path / "no.pt")], "checkpoint not found"),
        (["--checkpoint", str(root / "pretrain" / "best.pt")], "not a stage-2 checkpoint"),
        (["--checkpoint", best, "--out", str(tmp_path / "p.txt")], "unknown output format"),
    ]:
        base = {"--annotation": str(ann), "--out": str(tmp_path / "q.json")}
        full = argv + [x for k, v in base.items() if k not in argv for x in (k, v)]
        assert generate_cli(full) == 2
        assert says in capsys.readouterr().err
    from mlrg.runs import SUBCOMMANDS, main

    if "generate" in SUBCOMMANDS:
        assert (
            main(
                [
                    "generate",
                    "--checkpoint",
                    best,
                    "--annotation",
                    str(ann),
                    "--out",
                    str(tmp_path / "m.json"),
                    "--quiet",
                ]
            )
            == 0
        )


def test_parameter_checks(tmp_path):
    assert FINETUNE.check(pt_lr=1)["pt_lr"] == 1.0
    with pytest.raises(InputError, match="did you mean 'batch_size'"):
        FINETUNE.check(bach_size=4)
    with pytest.raises(InputError, match="parameter 'select_metric'"):
        FINETUNE.check(select_metric="rcb")
    with pytest.raises(InputError, match="freeze_image_encoder"):
        FINETUNE.check(cache_features=True, freeze_image_encoder=False)
    p = FINETUNE.cli(["--use_prior_report", "false", "--num_beams", "1", "--model_config", '{"fusion_depth": 2}'])
    assert p["use_prior_report"] is False and p["num_beams"] == 1 and p["model_config"] == {"fusion_depth": 2}
    with pytest.raises(InputError, match="did you mean 'num_beams'"):
        GENERATE.cli(["--checkpoint", "a", "--annotation", "b", "--out", "c", "--num_beam", "2"])
    with pytest.raises(InputError, match="no stage-1 checkpoint in the run folder"):
        build_finetune(FINETUNE.check(run_dir=str(tmp_path / "run")))


def test_rcb_selection_runs_both_scorers(monkeypatch):
    import mlrg.finetune as ft

    calls = []

    def fake(name, refs, hyps, path=None):
        calls.append((name, path, len(hyps)))
        score = {"radgraph": {"RadGraph F1 (partial)": 0.25}, "chexbert": {"CheXbert-14 micro F1": 0.5}}[name]
        return {"status": "ok", "message": name, "scores": score}

    monkeypatch.setattr(ft, "run_adapter", fake)
    recs = [{"reference": "a b", "generated": "a c"}] * 3
    assert ft.rcb_scores(recs, 0.125, {"chexbert": "c.pth", "radgraph": None}) == {
        "radgraph_f1": 0.25,
        "chexbert14": 0.5,
        "rcb": 0.875,
    }
    assert sorted(calls) == [("chexbert", "c.pth", 3), ("radgraph", None, 3)]
    monkeypatch.setattr(
        ft, "run_adapter", lambda *a, **k: {"status": "skipped", "message": "radgraph: skipped (no weights)"}
    )
    with pytest.raises(InputError, match="no weights"):
        ft.rcb_scores(recs, 0.1, {})
    # the parameter check refuses RCB before any work unless both scorers can run
    monkeypatch.setattr(
        ft, "adapter_status", lambda name, path=None: "ready" if name == "chexbert" else "no radgraph weights"
    )
    with pytest.raises(InputError, match="radgraph cannot run here"):
        FINETUNE.check(select_metric="rcb")
    monkeypatch.setattr(ft, "adapter_status", lambda name, path=None: "ready")
    assert FINETUNE.check(select_metric="rcb")["select_metric"] == "rcb"


def test_iu_preset_on_r2gen_annotation(run, tmp_path):
    """preset='iu' on an R2Gen-format annotation (two views per study, no prior): both stages run, with no prior and no
    indication."""
    root, ann = run
    studies = {}
    for split, items in json.loads(Path(ann).read_text()).items():
        for it in items:
            paths = it["anchor_scan"]["image_path"] + it["auxiliary_references"]["image_path"]
            if len(paths) >= 2 and it["study_id"] not in studies:
                studies[it["study_id"]] = (
                    split,
                    {"id": str(it["study_id"]), "report": it["findings"], "image_path": paths[:2], "split": split},
                )
    r2gen = {s: [v for sp, v in studies.values() if sp == s] for s in ("train", "val", "test")}
    assert all(r2gen[s] for s in r2gen)
    (tmp_path / "annotation.json").write_text(json.dumps(r2gen))
    common = dict(
        data_path=str(tmp_path / "annotation.json"),
        image_root=str(root / "mimic" / "files"),
        max_steps=1,
        batch_size=4,
        eval_batch_size=16,
        progress=False,
        num_threads=1,
    )
    pt = pretrain(preset="iu", image_size=32, linear_probe=False, model_save_path=str(tmp_path / "pt"), **common)
    assert pt["model"]["is_prior_scan"] is False
    ft = finetune(
        preset="iu",
        pretrained_path=pt["best_checkpoint"],
        model_save_path=str(tmp_path / "ft"),
        meteor=False,
        decoder_layers=1,
        num_beams=2,
        **common,
    )
    p = ft["params"]
    assert (p["max_views"], p["max_length"], p["use_prior_report"], p["use_indication"], p["select_metric"]) == (
        2,
        60,
        False,
        False,
        "bleu4",
    )
    preds = json.loads((tmp_path / "ft" / "test_predictions.json").read_text())
    assert len(preds) == len(r2gen["test"]) and all(
        "[NHI]" in r["prompt"] and "[NHPR]" in r["prompt"] and not r["has_prior"] for r in preds
    )
    with pytest.raises(InputError, match="parameter 'data_path'"):
        FINETUNE.check(preset="iu")


def test_finding_labels_on_the_training_split_only(run):
    "finding_loss > 0: each training item carries the rule labeler's reading of its reference; val and test none."
    root, ann = run
    parts = _parts(root, finding_loss=1.0, cache_features=False)
    items = json.loads(ann.read_text())["train"]
    want = apply_policy(label_reports([it["findings"] for it in items]), "positive").astype(float)
    got = [parts.train_ds[i]["finding_labels"].tolist() for i in range(len(parts.train_ds))]
    assert got == want.tolist() and want.sum() > 0
    assert all("finding_labels" not in ds[0] for ds in (parts.val_ds, parts.test_ds))
    batch = parts.collate_fn([parts.train_ds[i] for i in range(3)])
    assert batch["finding_labels"].shape == (3, 14)
    out = parts.model(batch)
    assert set(out) == {"loss", "token_loss", "finding_loss"}
    torch.testing.assert_close(out["loss"], out["token_loss"] + out["finding_loss"])
    assert "finding_labels" not in _parts(root, cache_features=False).train_ds[0]  # off: as before

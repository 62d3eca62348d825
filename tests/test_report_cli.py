"""Tests of `mlrg report` (mlrg.finetune.report_cli, report_study): the findings for one study given as image files
are those `mlrg generate` writes for the same study of a prepared annotation (with a prior study and an indication,
and without a prior), `--json` holds the prompt the model saw, and bad arguments are one-line errors naming them."""

import json
from pathlib import Path

import pytest
import torch

from mlrg.core import InputError
from mlrg.finetune import finetune, generate_reports, load_report_model, report_cli, report_study
from mlrg.inputs import write_tiny_phantom


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny prepared phantom and a tiny stage-2 checkpoint (one step from random weights; no stage 1), with the
    reports `mlrg generate` writes for its test split."""
    root = tmp_path_factory.mktemp("report")
    ann = write_tiny_phantom(root, patients=16, seed=3)
    s = finetune(
        data_path=str(ann),
        stage1_init=False,
        max_steps=1,
        batch_size=4,
        eval_batch_size=16,
        image_size=32,
        d_model=32,
        prompt_heads=4,
        decoder_layers=1,
        decoder_heads=4,
        max_length=48,
        num_beams=2,
        test=False,
        meteor=False,
        progress=False,
        num_threads=1,
        model_save_path=str(root / "finetune"),
    )
    items = json.loads(ann.read_text())["test"]
    recs = generate_reports(s["best_checkpoint"], ann, "test", progress=False)
    assert [r["id"] for r in recs] == [it["id"] for it in items]
    return {"ck": s["best_checkpoint"], "items": items, "recs": recs, "files": root / "mimic" / "files", "root": root}


def _views(it):
    a, x = it["anchor_scan"], it["auxiliary_references"]
    return list(zip(a["image_path"] + x["image_path"], a["view_position"] + x["view_position"]))


def _argv(tiny, it, raw_indication=True):
    "mlrg report's arguments for annotation item `it`: its images as files, its prior study and its indication."
    argv = ["--checkpoint", tiny["ck"]]
    for p, v in _views(it):
        argv += ["--image", str(tiny["files"] / p), "--view", v]
    if it.get("prior_study"):
        ls = it["prior_study"]["latest_study"]
        argv += ["--prior-image", str(tiny["files"] / ls["image_path"]), "--prior-view", ls["view_position"]]
        argv += ["--prior-findings", ls["findings"]]
    return argv + ["--indication", it["indication"] if raw_indication else it["indication_pure"]]


def _cases(tiny):
    "(index, item) of a test study with a prior study, auxiliary views and an indication, and of one without a prior."
    its = tiny["items"]
    with_prior = next(
        i
        for i, it in enumerate(its)
        if it["prior_study"] and it["auxiliary_references"]["image_path"] and it["indication"]
    )
    without = next(i for i, it in enumerate(its) if not it["prior_study"])
    return [(with_prior, its[with_prior]), (without, its[without])]


def test_report_writes_the_findings_mlrg_generate_writes(tiny, capsys):
    assert len({r["generated"] for r in tiny["recs"]}) > 1  # the tiny model's findings depend on the study
    for i, it in _cases(tiny):
        assert report_cli(_argv(tiny, it)) == 0
        out = capsys.readouterr().out
        assert out == tiny["recs"][i]["generated"] + "\n"  # the findings alone, one line
        assert report_cli(_argv(tiny, it, raw_indication=False) + ["--json"]) == 0
        rec = json.loads(capsys.readouterr().out)
        assert rec["findings"] == tiny["recs"][i]["generated"]
        assert rec["prompt"]["text"] == tiny["recs"][i]["prompt"]  # the same prompt, to the token


def test_decoding_settings_default_to_the_checkpoints_and_can_be_changed(tiny, capsys):
    i, it = _cases(tiny)[0]
    assert report_cli(_argv(tiny, it) + ["--json"]) == 0
    rec = json.loads(capsys.readouterr().out)
    ck_gen = torch.load(tiny["ck"], weights_only=True)["config"]["generation"]
    assert rec["generation"] == ck_gen and (ck_gen["num_beams"], ck_gen["max_length"]) == (2, 48)
    ann = tiny["root"] / "prepared" / "annotation.json"
    greedy = generate_reports(tiny["ck"], ann, "test", progress=False, num_beams=1, max_length=12)[i]
    assert report_cli(_argv(tiny, it) + ["--num-beams", "1", "--max_length", "12", "--json"]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert rec["findings"] == greedy["generated"]
    assert (rec["generation"]["num_beams"], rec["generation"]["max_length"]) == (1, 12)


def test_json_record_has_the_prompt_the_images_and_the_checkpoint(tiny, capsys):
    (_, it), (_, it0) = _cases(tiny)
    ls = it["prior_study"]["latest_study"]
    assert report_cli(_argv(tiny, it) + ["--json"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1  # one JSON record, one line
    rec = json.loads(out)
    assert set(rec) == {"findings", "prompt", "images", "model_reads", "checkpoint", "generation"}
    _, vocab, _ = load_report_model(tiny["ck"])
    ind, pri = (vocab.decode(vocab.encode(t), skip_special=False) for t in (it["indication_pure"], ls["findings"]))
    # the raw indication cleaned as mlrg prepare cleans it, [UNK] for a word outside the vocabulary
    assert rec["prompt"]["indication"] == ind
    assert rec["prompt"]["prior_findings"] == pri
    assert rec["prompt"]["text"] == f"[CLS] {ind} [SEP] {pri} [SEP]"
    views = _views(it) + [(ls["image_path"], ls["view_position"])]
    assert [(im["role"], im["path"], im["view"]) for im in rec["images"]] == [
        (role, str((tiny["files"] / p).resolve()), v)
        for role, (p, v) in zip(["anchor"] + ["view"] * (len(views) - 2) + ["prior"], views)
    ]
    assert rec["checkpoint"] == str(Path(tiny["ck"]).resolve()) and all(rec["model_reads"].values())
    # without a prior and without an indication: the model sees [NHI] and [NHPR]
    argv = [a for a in _argv(tiny, it0) if a not in ("--indication", it0["indication"])]
    assert report_cli(argv + ["--json"]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert rec["prompt"] == {
        "indication": "[NHI]",
        "prior_findings": "[NHPR]",
        "text": "[CLS] [NHI] [SEP] [NHPR] [SEP]",
    }
    assert [im["role"] for im in rec["images"]] == ["anchor"] + ["view"] * (len(_views(it0)) - 1)


def test_bad_arguments_are_one_line_errors_naming_them(tiny, tmp_path, capsys):
    _, it = _cases(tiny)[0]
    argv = _argv(tiny, it)
    image = argv[argv.index("--image") + 1]
    view_at = argv.index("--view") + 1
    not_stage2 = tmp_path / "stage1.pt"
    torch.save({"config": {"stage": "pretrain"}, "model": {}}, not_stage2)
    cases = [
        (["--image", str(tmp_path / "missing.jpg"), "--view", "PA"], "--image", "image file not found"),
        (["--image", image, "--view", "PA", "--image", image], "--view", "2 --image but 1 --view"),
        (["--image", image, "--view", "SIDEWAYS"], "--view SIDEWAYS", "one of PA, AP, LATERAL"),
        (["--image", image, "--view", "PA", "--prior-findings", "no effusion."], "--prior-findings", "--prior-image"),
        (["--image", image, "--view", "PA", "--prior-image", image, "--prior-image", image], "--prior-image", "one"),
        (["--image", image, "--view", "PA", "--prior-image", image, "--prior-view", "up"], "--prior-view up", "PA"),
        (["--image", image, "--view", "PA", "--imag", image], "did you mean --image?", "command line"),
        ([], "--image", "no current image"),
    ]
    for extra, where, says in cases:
        assert report_cli(["--checkpoint", tiny["ck"]] + extra) == 2, extra
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("mlrg report: error: "), err
        assert where in err and says in err, err
    bad_view = argv[:view_at] + ["SIDEWAYS"] + argv[view_at + 1 :]
    assert report_cli(bad_view) == 2 and "--view SIDEWAYS: unknown view" in capsys.readouterr().err
    assert report_cli(["--checkpoint", str(not_stage2), "--image", image, "--view", "PA"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--checkpoint {not_stage2}: not a stage-2 checkpoint" in err


def test_report_study_in_a_notebook_cell(tiny, monkeypatch, capsys):
    import matplotlib.pyplot as plt

    shown = []
    monkeypatch.setattr(plt, "show", lambda *a, **k: shown.append(len(plt.gcf().axes)))
    i, it = _cases(tiny)[0]
    ls = it["prior_study"]["latest_study"]
    rec = report_study(
        tiny["ck"],
        images=[(tiny["files"] / p, v) for p, v in _views(it)],
        prior_images=[(tiny["files"] / ls["image_path"], ls["view_position"])],
        prior_findings=ls["findings"],
        indication=it["indication"],
        show=True,
    )
    assert rec["findings"] == tiny["recs"][i]["generated"]
    assert shown == [len(_views(it)) + 1]  # one figure: the current views and the prior image
    assert f"findings: {rec['findings']}" in capsys.readouterr().out
    plt.close("all")
    # a bare path as the prior image takes the anchor's view; errors name report_study's arguments
    rec = report_study(tiny["ck"], [(tiny["files"] / _views(it)[0][0], "pa")], tiny["files"] / ls["image_path"])
    assert [(im["role"], im["view"]) for im in rec["images"]] == [("anchor", "PA"), ("prior", "PA")]
    with pytest.raises(InputError, match=r"images\[0\] view = 'x': unknown view"):
        report_study(tiny["ck"], [(tiny["files"] / _views(it)[0][0], "x")])
    with pytest.raises(InputError, match=r"images\[0\] = '.*nothing.jpg': image file not found"):
        report_study(tiny["ck"], [(Path("nothing.jpg"), "PA")])
    with pytest.raises(InputError, match="unknown decoding setting"):
        report_study(tiny["ck"], [(tiny["files"] / _views(it)[0][0], "PA")], num_beam=2)

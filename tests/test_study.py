"""The study end to end (mlrg.study): the tiny preset runs every stage notebook with papermill into one run folder and
writes an index.html whose links and images all resolve; a second run skips every stage; changing one parameter reruns
that stage and the ones after it only, keeping the previous outputs and executed notebook; a second study into a running
study's folder is refused; a SIGKILL of the study process alone during pretraining ends its stage too, and the same
command then redoes no finished stage, continues training from the last checkpoint and ends with the weights of an
uninterrupted run; a failing stage is named by its notebook and cell; a refused preset leaves no folder."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mlrg.core import InputError, read_jsonl
from mlrg.engine import load_checkpoint
from mlrg.pretrain import pretrain
from mlrg.runs import lock_holder, processes_below, running
from mlrg.study import failed_cell, plan_study

REPO = Path(__file__).resolve().parents[1]
TINY = ["-p", "num_threads", "1", "-p", "pretrain.max_steps", "12", "-p", "pretrain.save_steps", "1"]


def _env():
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }


def _study(run, *extra, **kw):
    return subprocess.run(
        [sys.executable, "-m", "mlrg.study", "--preset", "tiny", "--run", str(run), *TINY, *extra],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        **kw,
    )


def _lines(out):
    "{step: what the study first said of it} from its lines per step ('running ...', 'continuing ...', '... skipped')."
    said = {}
    for m in re.finditer(r"^\[\d+/\d+\] (\S+)\s+(.*)$", out, re.M):
        said.setdefault(m.group(1), m.group(2))
    return said


def _resolves(index: Path):
    "Every href and src of `index` (relative paths) names a file that exists."
    page = index.read_text()
    refs = re.findall(r'(?:href|src)="([^"]+)"', page)
    assert refs
    missing = [r for r in refs if not (index.parent / r).is_file()]
    assert not missing, missing
    return refs


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """A tiny study; a second one started into its folder while it runs (refused); the first killed (SIGKILL of the
    study process alone) during pretraining; then the same command again to the end."""
    root = tmp_path_factory.mktemp("study")
    run = root / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlrg.study", "--preset", "tiny", "--run", str(run), *TINY],
        cwd=REPO,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    deadline = time.time() + 400
    while time.time() < deadline and lock_holder(run) is None and proc.poll() is None:
        time.sleep(0.05)
    second = subprocess.Popen(  # a second study into the same folder, while the first holds it
        [sys.executable, "-m", "mlrg.study", "--preset", "tiny", "--run", str(run), *TINY],
        cwd=REPO,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    while time.time() < deadline and len(list((run / "pretrain").glob("step_*.pt"))) < 2 and proc.poll() is None:
        time.sleep(0.1)
    assert proc.poll() is None, "the study ended before a pretraining checkpoint was written"
    children = processes_below(proc.pid)
    os.kill(proc.pid, signal.SIGKILL)  # the study alone: its stage (papermill and the kernel) must end with it
    proc.wait()
    deadline = time.time() + 15
    while time.time() < deadline and any(running(c) for c in children):
        time.sleep(0.1)
    orphans = [c for c in children if running(c)]
    for c in orphans:
        os.kill(c, signal.SIGKILL)
    # the step the study must continue from: last.pt's (a kill between the numbered checkpoint and last.pt leaves
    # last.pt one step behind the newest step_N.pt)
    killed_at = load_checkpoint(run / "pretrain" / "last.pt")["global_step"]
    out, err = second.communicate(timeout=120)
    second = subprocess.CompletedProcess(second.args, second.returncode, out, err)
    again = _study(run)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    return dict(
        run=run,
        root=root,
        first=proc.stdout.read(),
        again=again.stdout + again.stderr,
        killed_at=killed_at,
        second=second,
        pid=proc.pid,
        children=children,
        orphans=orphans,
    )


def test_one_writer_per_run_folder_and_the_stage_ends_with_the_study(study):
    """A second study into a running study's folder is refused at once, naming the folder and the first study; killing
    the study alone ends its papermill and kernel; the log has no cursor codes or TCP warning."""
    second = study["second"]
    assert second.returncode == 2, second.stdout[-2000:] + second.stderr[-2000:]
    assert f"in use by process {study['pid']}" in second.stderr and str(study["run"]) in second.stderr, second.stderr
    assert len(second.stderr.strip().splitlines()) == 1 and "[1/" not in second.stdout
    assert len(study["children"]) >= 2 and not study["orphans"], (study["children"], study["orphans"])
    steps = [r["step"] for r in read_jsonl(study["run"] / "pretrain" / "metrics.jsonl") if r.get("kind") == "train"]
    assert steps and len(steps) == len(set(steps)), steps  # one writer: no record twice
    for log in (study["first"], study["again"]):
        assert "\x1b[" not in log and "\r" not in log and "without encryption" not in log, log[-3000:]
    assert re.search(r"^train: .*\d+/12", study["first"], re.M), study["first"][-3000:]  # progress as plain lines


def test_study_writes_every_report_and_an_index(study):
    run = study["run"]
    steps = [s.key for s in plan_study("tiny", run)]
    assert list(_lines(study["again"])) == steps
    for s in plan_study("tiny", run):
        rec = json.loads((run / "study" / f"{s.key}.json").read_text())
        assert rec["status"] == "done" and rec["seconds"] > 0 and rec["peak_rss_mb"] > 50
        assert (run / "reports" / s.report).is_file() and (run / "reports" / s.report).with_suffix(".html").is_file()
    refs = _resolves(run / "index.html")
    assert "pretrain/curves.png" in refs and "finetune/curves.png" in refs and "study/ce_per_observation.png" in refs
    assert sum(r.endswith(".html") and r.startswith("reports/") for r in refs) == len(steps)
    page = (run / "index.html").read_text()
    assert "MLRG stage 2 (this run)" in page and "oracle" in page and "MLRG, published" in page


def test_killed_study_continues_and_ends_as_an_uninterrupted_one(study):
    """No finished stage is redone; pretraining continues from its last checkpoint and ends with an uninterrupted run's
    weights."""
    said = _lines(study["again"])
    assert all("skipped" in said[k] for k in ("phantom", "prepare", "label")), said
    assert said["pretrain"].startswith("continuing"), said
    assert 1 <= study["killed_at"] < 12
    report = (
        study["run"] / "reports" / "03_pretrain.ipynb"
    ).read_text()  # the engine's log, kept in the executed notebook
    resumed = re.search(r"resumed from \S+ at step (\d+)", report)
    assert resumed and study["killed_at"] <= int(resumed.group(1)) < 12, report[-3000:]
    # the same stage 1 without interruption, on the run's data, with the parameters the study gave the notebook
    p = json.loads((study["run"] / "study" / "pretrain.params.json").read_text())
    ref = study["root"] / "uninterrupted"
    pretrain(
        {
            **{k: v for k, v in p.items() if k != "run_dir"},
            "data_path": str(study["run"] / "prepared" / "annotation.json"),
            "image_root": str(study["run"] / "mimic" / "files"),
            "model_save_path": str(ref),
            "progress": False,
        }
    )
    a, b = load_checkpoint(study["run"] / "pretrain" / "last.pt"), load_checkpoint(ref / "last.pt")
    assert a["global_step"] == b["global_step"] == 12
    assert a["model"].keys() == b["model"].keys() and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_rerun_skips_and_one_changed_parameter_reruns_only_what_follows(study):
    run = study["run"]
    same = _study(run)
    assert same.returncode == 0 and all("skipped" in v for v in _lines(same.stdout).values()), same.stdout
    changed = _study(run, "-p", "finetune.max_steps", "3")
    assert changed.returncode == 0, changed.stderr[-2000:]
    said = _lines(changed.stdout)
    assert [k for k, v in said.items() if "skipped" not in v] == ["finetune", "evaluate"], said
    assert json.loads((run / "finetune" / "finetune_summary.json").read_text())["global_step"] == 3
    assert list(run.glob("finetune.replaced-*"))  # the old stage-2 run was moved aside, not deleted
    _resolves(run / "index.html")
    # ... and so was its executed notebook; no empty folder was set aside
    kept = list((run / "reports").glob("04_finetune.replaced-*.ipynb"))
    assert len(kept) == 1 and kept[0].with_suffix(".html").is_file(), kept
    assert not [p for p in run.rglob("*.replaced-*") if p.is_dir() and not any(p.iterdir())]
    # a rerun that fails keeps the executed notebook of the run before it
    failed = _study(run, "-p", "finetune.max_steps", "2", "-p", "finetune.pretrained_path", str(run / "none.pt"))
    assert failed.returncode == 1 and "04_finetune.ipynb failed" in failed.stderr, failed.stderr[-2000:]
    kept = sorted((run / "reports").glob("04_finetune.replaced-*.ipynb"))
    assert len(kept) == 2 and not any(failed_cell(k) for k in kept), kept
    assert failed_cell(run / "reports" / "04_finetune.ipynb")  # the failed run's own, beside them


def test_failing_stage_is_named_and_plan_errors_come_first(tmp_path):
    (tmp_path / "bad" / "mimic").mkdir(parents=True)
    (tmp_path / "bad" / "mimic" / "notes.txt").write_text("someone else's data")  # the phantom refuses to write over it
    bad = _study(tmp_path / "bad")
    assert bad.returncode == 1
    assert re.search(r"nbs/01a_phantom\.ipynb failed in code cell \d+ \(InputError: .*mimic", bad.stderr), bad.stderr[
        -2000:
    ]
    assert (tmp_path / "bad" / "reports" / "01a_phantom.ipynb").is_file() and (
        tmp_path / "bad" / "mimic" / "notes.txt"
    ).is_file()
    assert (
        list(_lines(bad.stdout)) == ["phantom"]
        and json.loads((tmp_path / "bad" / "study" / "phantom.json").read_text())["status"] == "failed"
    )
    with pytest.raises(InputError, match="did you mean 'batch_size'"):
        plan_study("tiny", tmp_path / "x", [("finetune.batchsize", "4")])
    out = subprocess.run(
        [sys.executable, "-m", "mlrg.study", "--preset", "mimic", "--run", str(tmp_path / "m")],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2 and "study.mimic_root" in out.stderr and not (tmp_path / "m").exists()
    # a preset refused at the start leaves no run folder behind
    required = ["image_pretrained_path", "text_pretrained_path", "tokenizer_path", "finetune.decoder_path"]
    out = subprocess.run(
        [sys.executable, "-m", "mlrg.study", "--preset", "mimic", "--run", str(tmp_path / "m")]
        + ["-p", "study.mimic_root", str(tmp_path / "no-mimic")]
        + [a for k in required for a in ("-p", k, str(tmp_path / "none"))],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2 and not (tmp_path / "m").exists(), out.stderr


def test_mimic_preset_through_the_notebooks(hub, tmp_path):
    """The mimic preset scaled down: the phantom as the MIMIC-CXR-JPG root, tiny RAD-DINO / CXR-BERT / DistilGPT2
    folders, every notebook."""
    root, _ = hub
    args = [
        "--preset",
        "mimic",
        "--run",
        str(tmp_path / "m"),
        "-p",
        "study.mimic_root",
        str(root / "mimic"),
        "-p",
        "image_pretrained_path",
        str(root / "dino"),
        "-p",
        "text_pretrained_path",
        str(root / "bert"),
        "-p",
        "tokenizer_path",
        str(root / "gpt2"),
        "-p",
        "finetune.decoder_path",
        str(root / "gpt2"),
        "-p",
        "text_layers",
        "1",
        "-p",
        "image_size",
        "28",
        "-p",
        "batch_size",
        "4",
        "-p",
        "grad_accum",
        "1",
        "-p",
        "max_steps",
        "2",
        "-p",
        "num_workers",
        "0",
        "-p",
        "model_config",
        '{"d_model": 32, "proj_dim": 32}',
        "-p",
        "pretrain.linear_probe",
        "false",
        "-p",
        "num_threads",
        "1",
        "-p",
        "finetune.select_metric",
        "bleu4+ce14",
        "-p",
        "finetune.val_max_samples",
        "6",
        "-p",
        "finetune.max_length",
        "40",
        "-p",
        "meteor",
        "false",
    ]
    out = subprocess.run(
        [sys.executable, "-m", "mlrg.study", *args], cwd=REPO, env=_env(), capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    run = tmp_path / "m"
    assert (run / "mimic").is_symlink() and list(_lines(out.stdout)) == ["prepare", "pretrain", "finetune", "evaluate"]
    ft = json.loads((run / "finetune" / "finetune_summary.json").read_text())
    assert ft["backbones"]["decoder"] == "distilgpt2" and "gpt2 BPE" in ft["backbones"]["tokenizer"]
    assert (
        ft["params"]["select_metric"] == "bleu4+ce14"
        and ft["params"]["pt_lr"] == 5e-6
        and ft["params"]["amp"] == "bf16"
    )
    _resolves(run / "index.html")


def test_demo_plans_its_variant_beside_the_main_stage_2_and_the_index_shows_both(tmp_path):
    "A preset's `variants` add a stage-2 run each on the same stage 1, in its own folder; result_rows labels it."
    from mlrg.runs import RunFolder
    from mlrg.study import STUDY_PRESETS, result_rows

    steps = plan_study("demo", tmp_path / "d")
    keys = [s.key for s in steps]
    assert keys == ["phantom", "prepare", "label", "pretrain", "finetune", "evaluate", "finetune.mlrg_design"]
    # --no-variants: the main recipe alone, its steps (and fingerprints) unchanged
    from mlrg.study import study_parser

    assert study_parser().parse_args(["--no-variants"]).no_variants and not study_parser().parse_args([]).no_variants
    alone = plan_study("demo", tmp_path / "d", variants=False)
    assert [(s.key, s.fingerprint) for s in alone] == [(s.key, s.fingerprint) for s in steps[:-1]]
    main, variant = steps[4], steps[-1]
    assert variant.group == "variant mlrg_design"
    assert variant.outputs == (str(tmp_path / "d" / "variants" / "mlrg_design"),)
    for k, v in STUDY_PRESETS["demo"]["variants"]["mlrg_design"].items():
        assert variant.params[k] == v
    differ = {k for k in {*main.params, *variant.params} if main.params.get(k) != variant.params.get(k)}
    assert differ == {"prior_path", "freeze_image_encoder", "finding_loss", "model_save_path"}
    assert variant.fingerprint != main.fingerprint
    # the rows index.html shows: the main run and the variant, each from the test result in its summary
    from mlrg.evaluate import evaluate

    res = evaluate(["no effusion ."], ["small effusion ."], ["a"], meteor=False)
    for s in (main, variant):
        Path(s.outputs[0]).mkdir(parents=True)
        (Path(s.outputs[0]) / "finetune_summary.json").write_text(json.dumps({"test": {"result": res}}, default=str))
    rows = result_rows(RunFolder.create(tmp_path / "d"), steps)
    labels = [r[0] for r in rows]
    assert "MLRG stage 2 (this run)" in labels and "variant: mlrg design" in labels
    assert [r[3] for r in rows if r[0] == "variant: mlrg design"] == ["variant"]

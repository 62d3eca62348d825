"""Nothing lost, nothing cryptic (issue 8), for the training engine every stage uses: a run killed at any point, even in
the middle of writing a checkpoint, and started again with the same command ends with the same weights as a run that
was never interrupted; a run into a folder holding another run stops (or, asked to, moves the old run aside); a write
that fails half-way leaves the previous files; unreadable, unsafe or foreign checkpoints and unusable output folders are
one clear error naming the file."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from mlrg import core
from mlrg.core import InputError, read_jsonl, save_json, seed_everything, write_set
from mlrg.engine import continue_or_start, fit, load_checkpoint, save_checkpoint, train_config

from test_engine import BASE, _env, _weights, toy  # toy: the engine tests' fixture (a toy model and data)

CONF = {**BASE, "num_epochs": 2, "save_steps": 3, "eval_steps": 4}  # 7 batches an epoch, 14 steps


RUN = """
import json, os, signal, sys; sys.path.insert(0, {toy_dir!r})
import toy
from mlrg import engine
from mlrg.core import seed_everything
conf, out, kill_at, kill_in_write = json.loads(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4])
if kill_in_write:                        # die half-way through writing the kill_in_write-th checkpoint file
    real, count = engine.atomic_write, [0]
    def dying_write(path, data, *a, **k):
        count[0] += 1
        if count[0] == kill_in_write:
            with open(os.path.join(os.path.dirname(path), "." + os.path.basename(path) + ".x7k2.tmp"), "wb") as f:
                f.write(data[: len(data) // 2]); f.flush(); os.fsync(f.fileno())
            os.kill(os.getpid(), signal.SIGKILL)
        return real(path, data, *a, **k)
    engine.atomic_write = dying_write
seed_everything(0)
res = engine.fit(toy.MLP(kill_at=kill_at), toy.Data(), toy.collate, {{**conf, "out_dir": out}}, evaluate=toy.evaluate)
print(json.dumps({{"global_step": res["global_step"], "stopped": res["stopped"]}}))
"""  # noqa: E501


def _run(tmp_path, out, kill_at=None, kill_in_write=None):
    script = tmp_path / "run.py"
    script.write_text(RUN.format(toy_dir=str(tmp_path)))
    return subprocess.run(
        [sys.executable, str(script), json.dumps(CONF), str(out), json.dumps(kill_at), json.dumps(kill_in_write)],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=180,
    )


@pytest.mark.parametrize(
    "kill_at,kill_in_write",
    [(2, None), (13, None), (None, 3)],
    ids=["before-the-first-checkpoint", "mid-epoch", "while-writing-a-checkpoint"],
)
def test_killed_then_same_command_gives_the_uninterrupted_weights(toy, tmp_path, kill_at, kill_in_write):
    seed_everything(0)
    straight = toy.MLP()
    fit(straight, toy.Data(), toy.collate, {**CONF, "out_dir": str(tmp_path / "straight")}, evaluate=toy.evaluate)

    out = tmp_path / "run"
    killed = _run(tmp_path, out, kill_at, kill_in_write)
    assert killed.returncode == -9, killed.stderr
    if kill_in_write:
        assert list(out.glob(".*.tmp")), "the simulated crash left no partial file"
    again = _run(tmp_path, out)  # the same command, run again
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout.strip().splitlines()[-1]) == {"global_step": 14, "stopped": "finished"}
    assert not list(out.glob(".*.tmp"))  # the interrupted write's leftover is gone
    if kill_at != 2:
        assert "continuing it from last.pt" in again.stderr
    final = toy.MLP()
    final.load_state_dict(load_checkpoint(out / "last.pt")["model"])
    torch.testing.assert_close(_weights(final), _weights(straight), rtol=0, atol=1e-6)


def test_a_finished_run_is_not_trained_again(toy, tmp_path):
    out = tmp_path / "run"
    seed_everything(0)
    first = fit(toy.MLP(), toy.Data(), toy.collate, {**CONF, "out_dir": str(out)}, evaluate=toy.evaluate)
    before = (out / "best.pt").read_bytes()
    model = toy.MLP()
    again = fit(model, toy.Data(), toy.collate, {**CONF, "out_dir": str(out)}, evaluate=toy.evaluate)
    assert (again["global_step"], again["stopped"], again["best_step"]) == (
        first["global_step"],
        "finished",
        first["best_step"],
    )
    assert (out / "best.pt").read_bytes() == before
    assert len(read_jsonl(out / "metrics.jsonl")) == len(first["history"])


def test_other_settings_stop_or_move_the_old_run_aside(toy, tmp_path):
    out = tmp_path / "run"
    seed_everything(0)
    fit(toy.MLP(), toy.Data(), toy.collate, {**CONF, "out_dir": str(out)}, evaluate=toy.evaluate)
    best = (out / "best.pt").read_bytes()
    with pytest.raises(InputError, match=r"run: holds a run with other settings: lr: 0.01 -> 0.02"):
        fit(toy.MLP(), toy.Data(), toy.collate, {**CONF, "lr": 0.02, "out_dir": str(out)}, evaluate=toy.evaluate)
    assert (out / "best.pt").read_bytes() == best  # the finished run's best.pt is untouched
    fit(
        toy.MLP(),
        toy.Data(),
        toy.collate,
        {**CONF, "lr": 0.02, "out_dir": str(out), "overwrite": True},
        evaluate=toy.evaluate,
    )
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("run.replaced-")]
    assert len(aside) == 1 and (aside[0] / "best.pt").read_bytes() == best  # moved aside, never deleted
    assert json.loads((out / "params.json").read_text())["lr"] == 0.02


def test_output_folder_problems_are_clear_before_any_work(toy, tmp_path):
    (tmp_path / "a_file").write_text("")
    for bad, says in [
        (tmp_path / "a_file", "the output folder is a file"),
        (tmp_path / "a_file" / "sub", "cannot write to the output folder"),
    ]:
        with pytest.raises(InputError, match=says):
            fit(toy.MLP(), toy.Data(), toy.collate, {**CONF, "out_dir": str(bad)}, evaluate=toy.evaluate)
    for bad in (float("nan"), float("inf"), "nan"):
        with pytest.raises(InputError, match="parameter 'lr'.*finite"):
            train_config({"lr": bad})


def test_bad_checkpoints_are_errors_naming_the_file(toy, tmp_path):
    good = save_checkpoint({"format": "mlrg.fit/1", "model": toy.MLP().state_dict()}, tmp_path / "good.pt")
    (tmp_path / "cut.pt").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "text.pt").write_text("not a checkpoint")
    torch.save({"model": {}, "path": Path("x")}, tmp_path / "unsafe.pt")
    torch.save({"state_dict": {}}, tmp_path / "foreign.pt")
    cases = {
        "cut.pt": "cannot be read as a checkpoint",
        "empty.pt": "cannot be read as a checkpoint",
        "text.pt": "cannot be read as a checkpoint",
        "unsafe.pt": "holds Python objects",
        "foreign.pt": "is not a training checkpoint of mlrg",
        "missing.pt": "checkpoint not found",
    }
    for name, says in cases.items():
        with pytest.raises(InputError, match=f"{name}: {says}") as e:
            fit(
                toy.MLP(),
                toy.Data(),
                toy.collate,
                {**CONF, "out_dir": str(tmp_path / "out"), "resume_from": str(tmp_path / name)},
            )
        assert "weights_only=False" not in str(e.value)


def test_a_write_that_fails_half_way_keeps_the_old_files(tmp_path, monkeypatch):
    files = {
        tmp_path / "annotation.json": "old annotation",
        tmp_path / "vocab.json": "old vocab",
        tmp_path / "summary.json": "old",
    }
    write_set(files)
    real, calls = core._write_temp, []

    def disk_full_on_the_second(path, data, fsync=True):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(28, "No space left on device", str(path))
        return real(path, data, fsync)

    monkeypatch.setattr(core, "_write_temp", disk_full_on_the_second)
    with pytest.raises(OSError, match="No space left"):
        write_set({p: "new " + v for p, v in files.items()})
    assert {p: p.read_text() for p in files} == files  # all old, none new
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in files)  # no temporary file left


def test_continue_or_start_reads_a_checkpoint_when_params_json_is_gone(tmp_path):
    out = tmp_path / "run"
    save_checkpoint({"format": "mlrg.fit/1", "config": {"lr": 0.1}}, out / "last.pt")
    assert continue_or_start(out, {"lr": 0.1}) == out / "last.pt"
    with pytest.raises(InputError, match="lr: 0.1 -> 0.3"):
        continue_or_start(out, {"lr": 0.3})


# ---------------------------------------------------------------- the phantom's folder
def test_phantom_refuses_a_folder_it_did_not_write(tmp_path, capsys):
    from mlrg.phantom import write_phantom
    from mlrg.runs import main

    root = tmp_path / "mimic"
    (root / "files").mkdir(parents=True)
    (root / "mimic-cxr-2.0.0-metadata.csv").write_text("the user's real metadata")
    assert main(["phantom", "--out", str(root), "--patients", "3", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{root}: holds files the phantom did not write" in err
    assert (root / "mimic-cxr-2.0.0-metadata.csv").read_text() == "the user's real metadata"
    assert sorted(p.name for p in root.iterdir()) == ["files", "mimic-cxr-2.0.0-metadata.csv"]


def test_phantom_same_parameters_keep_other_parameters_stop(tmp_path):
    from mlrg.phantom import write_phantom

    out = tmp_path / "ph"
    first = write_phantom(out, patients=3, seed=1, size=40, progress=False)
    stamp = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    again = write_phantom(out, patients=3, seed=1, size=40, progress=False)  # kept as it is
    assert again == first and {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == stamp
    with pytest.raises(InputError, match=r"ph: holds a phantom with other parameters \(patients 3 -> 4\)"):
        write_phantom(out, patients=4, seed=1, size=40, progress=False)
    write_phantom(out, patients=4, seed=1, size=40, progress=False, overwrite=True)
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("ph.replaced-")]
    assert len(aside) == 1 and json.loads((aside[0] / "phantom-info.json").read_text())["parameters"]["patients"] == 3


def test_phantom_interrupted_is_written_again(tmp_path):
    from mlrg.phantom import write_phantom

    ref = write_phantom(tmp_path / "ref", patients=3, seed=2, size=40, progress=False)
    out = tmp_path / "ph"
    save_json(
        {"parameters": {**ref["parameters"]}, "complete": False}, out / "phantom-info.json"
    )  # as a killed run leaves it
    (out / ".mimic-cxr-2.0.0-metadata.csv.k3j2.tmp").write_text("half")
    info = write_phantom(out, patients=3, seed=2, size=40, progress=False)
    assert info["complete"] and not list(out.glob(".*.tmp"))
    assert (out / "mimic-cxr-2.0.0-metadata.csv").read_bytes() == (
        tmp_path / "ref" / "mimic-cxr-2.0.0-metadata.csv"
    ).read_bytes()


# ---------------------------------------------------------------- prepare: inputs and its set of outputs
@pytest.fixture(scope="module")
def small_phantom(tmp_path_factory):
    from mlrg.phantom import write_phantom

    root = tmp_path_factory.mktemp("faults") / "mimic"
    write_phantom(root, patients=6, seed=4, size=40, progress=False)
    return root


def _copy(root, tmp_path):
    import shutil

    return Path(shutil.copytree(root, tmp_path / "mimic"))


def test_prepare_catches_empty_and_non_image_files_without_decoding(small_phantom, tmp_path):
    from mlrg.data import prepare

    root = _copy(small_phantom, tmp_path)
    jpgs = sorted((root / "files").rglob("*.jpg"))
    jpgs[0].write_bytes(b"")
    jpgs[1].write_text("<html>not an image</html>")
    with pytest.raises(InputError, match=rf"{jpgs[0].name}: empty file \(0 bytes\)"):
        prepare(root, tmp_path / "p1" / "annotation.json", progress=False)
    s = prepare(root, tmp_path / "p2" / "annotation.json", skip_bad=True, progress=False)
    assert s["skipped"]["image_corrupt"] == 2


def test_prepare_names_the_metadata_row_cut_short_or_badly_dated(small_phantom, tmp_path):
    from mlrg.data import prepare

    root = _copy(small_phantom, tmp_path)
    meta = root / "mimic-cxr-2.0.0-metadata.csv"
    lines = meta.read_text().splitlines()
    header = lines[0].split(",")
    t = header.index("StudyTime")
    cut = lines[3].split(",")[: t + 1]
    cut[t] = cut[t][:3]  # the row ends in the middle of StudyTime
    date = lines[5].split(",")
    date[header.index("StudyDate")] = "2150131"
    meta.write_text("\n".join(lines[:3] + [",".join(cut), lines[4], ",".join(date)] + lines[6:]) + "\n")
    with pytest.raises(InputError, match=r"metadata.csv, line 4: .*fewer fields than the header"):
        prepare(root, tmp_path / "p" / "annotation.json", progress=False)
    s = prepare(root, tmp_path / "p" / "annotation.json", skip_bad=True, progress=False)
    assert s["skipped"]["metadata_short_row"] == 1 and s["skipped"]["metadata_bad_date"] == 1


def test_prepare_writes_its_files_as_a_set_and_checks_the_folder_first(small_phantom, tmp_path, monkeypatch):
    from mlrg.data import prepare

    out = tmp_path / "prep" / "annotation.json"
    prepare(small_phantom, out, progress=False)
    before = {p.name: p.read_bytes() for p in out.parent.iterdir()}
    real = core._write_temp

    def full_disk_on_the_vocabulary(path, data, fsync=True):
        if Path(path).name == "vocab.json":
            raise OSError(28, "No space left on device", str(path))
        return real(path, data, fsync)

    monkeypatch.setattr(core, "_write_temp", full_disk_on_the_vocabulary)
    with pytest.raises(OSError):
        prepare(small_phantom, out, min_freq=1, progress=False)
    assert {p.name: p.read_bytes() for p in out.parent.iterdir()} == before  # all three as they were
    monkeypatch.setattr(core, "_write_temp", real)
    (tmp_path / "a_file").write_text("")
    with pytest.raises(InputError, match="a_file: the output folder is a file"):
        prepare(small_phantom, tmp_path / "a_file" / "annotation.json", progress=False)


# ---------------------------------------------------------------- evaluate: which file plays which role
def test_evaluate_refuses_an_annotation_as_predictions(tmp_path, capsys):
    from mlrg.runs import main

    ann = tmp_path / "annotation.json"
    ann.write_text(json.dumps({"train": [], "val": [], "test": [{"id": "a", "findings": "no effusion."}]}))
    pred = tmp_path / "pred.json"
    pred.write_text(json.dumps({"a": "small effusion."}))
    assert main(["evaluate", "--pred", str(ann), "--gt", str(pred), "--no-meteor"]) == 2
    err = capsys.readouterr().err
    assert (
        "annotation.json: is an MLRG annotation" in err
        and "given as the predictions (--pred)" in err
        and "as --gt" in err
    )
    assert main(["evaluate", "--pred", str(pred), "--gt", str(ann), "--no-meteor"]) == 0  # the right way round


def test_pretrain_checks_its_output_folder_before_any_work(tmp_path, capsys):
    from mlrg.pretrain import pretrain_cli

    (tmp_path / "a_file").write_text("")
    assert (
        pretrain_cli(["--model_save_path", str(tmp_path / "a_file"), "--num_threads", "1", "--progress", "false"]) == 2
    )
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "a_file: the model_save_path folder is a file" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]  # no phantom, no data written
    assert pretrain_cli(["--lr", "nan"]) == 2 and "parameter 'lr'" in capsys.readouterr().err


def test_os_errors_are_one_line_naming_the_path(tmp_path, capsys):
    from mlrg.runs import main

    reports = tmp_path / "reports.csv"
    reports.write_text("Report\nNo effusion.\n")
    (tmp_path / "a_file").write_text("")
    assert main(["label", "--in", str(reports), "--out", str(tmp_path / "a_file" / "labels.csv")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("mlrg label: error: ") and str(tmp_path / "a_file") in err
    assert "Traceback" not in err

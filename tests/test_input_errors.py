"""Errors that name the file (issue 19): an input that is not UTF-8 (Latin-1, UTF-16) is one line naming the file, where
it is not UTF-8 and how to convert it, in every JSON reader and in finetune, pretrain and generate (UTF-8 with a
byte-order mark is read); a full disk names the file being written and keeps ENOSPC, in the atomic writers, the run
logs and checkpoints, and leaves no temporary file and no half line; `mlrg evaluate` and `mlrg label` check their output
folder before any work."""

import codecs
import errno
import json
import os
import pickle
import subprocess
from pathlib import Path

import pytest

from mlrg.core import (
    InputError,
    append_jsonl,
    atomic_write,
    load_json,
    read_jsonl,
    save_jsonl,
)
from mlrg.runs import main

TEXT = {"train": [{"id": "a", "findings": "Caf\u00e9 au lait spots."}], "val": [], "test": []}
AT = json.dumps(TEXT, ensure_ascii=False).index("\u00e9")  # the offset of the first byte that is not UTF-8 in Latin-1


def _one_line_error(capsys, prog):
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"{prog}: error: ") and "Traceback" not in err, err
    return err


# ---------------------------------------------------------------- input that is not UTF-8
@pytest.mark.parametrize(
    "encoding,says",
    [
        ("latin-1", f"not UTF-8 (byte 0xe9 at offset {AT}, line 1) (expected UTF-8 JSON (convert it, e.g. iconv"),
        ("utf-16", "not UTF-8 but UTF-16 (it starts with a UTF-16 byte-order mark) (expected UTF-8 JSON (convert it"),
        ("utf-16-le", "not UTF-8 but UTF-16 (NUL bytes between its first characters)"),
    ],
)
def test_load_json_names_a_file_that_is_not_utf8(tmp_path, encoding, says):
    p = tmp_path / "annotation.json"
    p.write_bytes(json.dumps(TEXT, ensure_ascii=False).encode(encoding))
    with pytest.raises(InputError) as e:
        load_json(p)
    assert str(e.value).startswith(f"{p}: ") and says in str(e.value)
    assert e.value.where == p and e.value.expected.startswith("UTF-8 JSON (convert it, e.g. iconv -f ")


def test_utf8_with_a_byte_order_mark_is_read(tmp_path):
    p = tmp_path / "annotation.json"
    p.write_bytes(codecs.BOM_UTF8 + json.dumps(TEXT, ensure_ascii=False).encode())
    assert load_json(p) == TEXT
    q = tmp_path / "log.jsonl"
    q.write_bytes(codecs.BOM_UTF8 + b'{"a": 1}\n{"b": "caf\xc3\xa9"}\n')
    assert read_jsonl(q) == [{"a": 1}, {"b": "caf\u00e9"}]


def test_every_json_reader_names_the_file(tmp_path):
    from mlrg.data import (
        FACTS_FILE,
        Vocab,
        read_annotation,
        read_factual_serialization,
        view_vocab,
    )
    from mlrg.evaluate import read_texts
    from mlrg.labeler import read_reports_csv

    latin1 = '{"a": "caf\u00e9"}\n'.encode("latin-1")
    utf16 = '{"a": "caf\u00e9"}\n'.encode("utf-16")
    (tmp_path / "mimic").mkdir()
    cases = [
        ("log.jsonl", b'{"a": 1}\n' + latin1, read_jsonl, "(byte 0xe9 at offset 19, line 2)"),
        ("ann.json", utf16, read_annotation, "not UTF-8 but UTF-16"),
        ("vocab.json", latin1, Vocab.load, "not UTF-8 (byte 0xe9"),
        ("pred.json", utf16, read_texts, "not UTF-8 but UTF-16"),
        ("pred.jsonl", latin1, read_texts, "not UTF-8 (byte 0xe9"),
        ("pred.csv", b"id,report\n1,caf\xe9\n", read_texts, "(byte 0xe9 at offset 15, line 2)"),
        ("reports.csv", b"Report\ncaf\xe9\n", read_reports_csv, "(byte 0xe9 at offset 10, line 2)"),
        ("views.json", latin1, view_vocab, "not UTF-8 (byte 0xe9"),
        (f"mimic/{FACTS_FILE}", latin1, lambda p: read_factual_serialization(p.parent), "not UTF-8 (byte 0xe9"),
    ]
    for name, raw, read, says in cases:
        p = tmp_path / name
        p.write_bytes(raw)
        with pytest.raises(InputError) as e:
            read(p)
        assert str(p) in str(e.value) and says in str(e.value), (name, str(e.value))


def test_a_python2_pickle_names_the_file_and_the_encoding(tmp_path):
    from mlrg.data import read_medclip_pickle

    # Python 2's pickle (protocol 2) of {"train": [{"image_path": "a.jpg", "report": "Caf\xe9."}], "val": [],
    # "test": []}, its strings Latin-1 `str`s
    py2 = b"\x80\x02}(U\x05train]}(U\nimage_pathU\x05a.jpgU\x06reportU\x05Caf\xe9.uaU\x03val]U\x04test]u."
    (tmp_path / "datasets.pkl").write_bytes(py2)
    with pytest.raises(InputError) as e:
        read_medclip_pickle(tmp_path / "datasets.pkl", trust_pickle=True)
    msg = str(e.value)
    assert msg.startswith(f"{tmp_path / 'datasets.pkl'}: a Python 2 pickle with text that is not ASCII (byte 0xe9")
    assert "ASCII in its Python 2 strings" in msg and "encoding='utf-8' or 'latin1'" in msg
    assert pickle.loads(py2, encoding="latin1")["train"][0]["report"] == "Caf\u00e9."  # the suggested fix works


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    "A tiny prepared phantom: its annotation, and a Latin-1, a UTF-16 and a UTF-8-with-BOM copy beside it."
    from mlrg.inputs import write_tiny_phantom

    root = tmp_path_factory.mktemp("enc")
    ann = write_tiny_phantom(root, patients=4, seed=3)
    data = json.loads(ann.read_text(encoding="utf-8"))
    data["train"][0]["findings"] += " Caf\u00e9 au lait spots."
    text = json.dumps(data, ensure_ascii=False)
    copies = {
        "latin1": ("latin-1", b""),
        "utf16": ("utf-16", b""),
        "bom": ("utf-8", codecs.BOM_UTF8),
    }
    for name, (enc, prefix) in copies.items():
        (ann.parent / f"{name}.json").write_bytes(prefix + text.encode(enc))
    return ann


@pytest.mark.parametrize("kind,says", [("latin1", "not UTF-8 (byte 0xe9 at offset"), ("utf16", "not UTF-8 but UTF-16")])
def test_pretrain_and_finetune_name_an_annotation_that_is_not_utf8(phantom, tmp_path, capsys, kind, says):
    bad = phantom.parent / f"{kind}.json"
    for stage in ("pretrain", "finetune"):
        out = tmp_path / stage
        argv = [stage, "--data_path", str(bad), "--model_save_path", str(out), "--num_threads", "1"]
        assert main(argv + ["--progress", "false"]) == 2
        err = _one_line_error(capsys, f"mlrg.{stage}")
        assert f"{bad}: {says}" in err and "(expected UTF-8 JSON (convert it, e.g. iconv -f " in err


@pytest.mark.parametrize("kind,says", [("latin1", "not UTF-8 (byte 0xe9 at offset"), ("utf16", "not UTF-8 but UTF-16")])
def test_generate_names_an_annotation_that_is_not_utf8(phantom, tmp_path, capsys, monkeypatch, kind, says):
    from mlrg import finetune

    monkeypatch.setattr(finetune, "load_report_model", lambda *a, **k: (None, None, {"config": {"generation": {}}}))
    bad = phantom.parent / f"{kind}.json"
    argv = ["generate", "--checkpoint", str(tmp_path / "best.pt"), "--annotation", str(bad)]
    assert main(argv + ["--out", str(tmp_path / "p.json"), "--quiet"]) == 2
    assert f"{bad}: {says}" in _one_line_error(capsys, "mlrg generate")


def test_the_stages_read_an_annotation_with_a_byte_order_mark(phantom):
    from mlrg.inputs import load_inputs
    from mlrg.pretrain import PRETRAIN

    plain = load_inputs(PRETRAIN.check(data_path=str(phantom)))
    bom = load_inputs(PRETRAIN.check(data_path=str(phantom.parent / "bom.json")))
    assert {s: len(v) for s, v in bom.items.items()} == {s: len(v) for s, v in plain.items.items()}
    assert bom.items["train"][0]["findings"].endswith("Caf\u00e9 au lait spots.")


# ---------------------------------------------------------------- a full disk
@pytest.fixture
def full_disk(monkeypatch):
    "`os.write` fills the disk: it writes half of what it is given, then fails with ENOSPC naming no file."
    real = os.write

    def write(fd, data):
        real(fd, bytes(data)[: max(1, len(data) // 2)])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", write)


def _only(folder, *names):
    assert sorted(p.name for p in Path(folder).iterdir()) == sorted(names)  # no temporary file left


def test_atomic_writes_on_a_full_disk_name_the_file(tmp_path, full_disk):
    p = tmp_path / "metrics.json"
    p.write_text("old")
    for write in (lambda: atomic_write(p, "new " * 1000), lambda: save_jsonl([{"a": 1}] * 100, p)):
        with pytest.raises(OSError) as e:
            write()
        assert (e.value.errno, e.value.filename, type(e.value)) == (errno.ENOSPC, str(p), OSError)
        assert p.read_text() == "old"
        _only(tmp_path, "metrics.json")


def test_append_jsonl_on_a_full_disk_names_the_file_and_leaves_no_half_line(tmp_path, monkeypatch):
    p = tmp_path / "metrics.jsonl"
    append_jsonl(p, {"step": 1})
    before = p.read_bytes()
    real = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: real(fd, bytes(data)[:5]) and _enospc())
    with pytest.raises(OSError) as e:
        append_jsonl(p, {"step": 2, "loss": 0.5})
    assert (e.value.errno, e.value.filename) == (errno.ENOSPC, str(p))
    assert p.read_bytes() == before  # the 5 bytes written are cut off again
    monkeypatch.setattr(os, "write", real)
    append_jsonl(p, {"step": 2})
    assert read_jsonl(p) == [{"step": 1}, {"step": 2}]


def _enospc():
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_checkpoint_on_a_full_disk_is_one_line_naming_the_file(tmp_path, full_disk, capsys):
    import torch

    from mlrg.engine import CheckpointWriter, save_checkpoint
    from mlrg.runs import one_line_errors

    w = CheckpointWriter(tmp_path / "run")
    ck = {"format": "mlrg.fit/1", "model": {"w": torch.zeros(1000)}}
    status, _ = one_line_errors("mlrg finetune", lambda: w.write(ck, ["step_3.pt", "last.pt"]))
    assert status == 2
    err = _one_line_error(capsys, "mlrg finetune")
    assert err == f"mlrg finetune: error: {tmp_path / 'run' / 'step_3.pt'}: No space left on device\n"
    _only(tmp_path / "run")
    with pytest.raises(OSError) as e:
        save_checkpoint(ck, tmp_path / "run" / "best.pt")
    assert (e.value.errno, e.value.filename) == (errno.ENOSPC, str(tmp_path / "run" / "best.pt"))
    _only(tmp_path / "run")


def test_fsync_failing_names_the_file(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "fsync", lambda fd: _enospc())
    for write in (lambda p: atomic_write(p, b"x"), lambda p: append_jsonl(p, {"a": 1})):
        p = tmp_path / "f"
        with pytest.raises(OSError) as e:
            write(p)
        assert (e.value.errno, e.value.filename) == (errno.ENOSPC, str(p))


def _mount_tmpfs(folder, options):
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    cmd = ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)]
    r = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")


@pytest.fixture
def small_disk(tmp_path):
    "A real 1 MiB tmpfs (root only; skipped where it cannot be mounted)."
    d = tmp_path / "small"
    _mount_tmpfs(d, "size=1m")
    yield d
    subprocess.run(["umount", str(d)], check=True)


def test_a_real_full_disk_names_the_file(small_disk, capsys):
    import torch

    from mlrg.engine import save_checkpoint
    from mlrg.runs import one_line_errors

    p = small_disk / "last.pt"
    atomic_write(p, b"old")
    status, _ = one_line_errors("mlrg pretrain", lambda: save_checkpoint({"w": torch.zeros(2**19)}, p))  # 2 MiB
    assert status == 2
    assert _one_line_error(capsys, "mlrg pretrain") == f"mlrg pretrain: error: {p}: No space left on device\n"
    assert p.read_bytes() == b"old"
    _only(small_disk, "last.pt")
    log = small_disk / "metrics.jsonl"
    append_jsonl(log, {"step": 1})
    with pytest.raises(OSError) as e:
        append_jsonl(log, {"text": "x" * 2**21})
    assert (e.value.errno, e.value.filename) == (errno.ENOSPC, str(log))
    assert read_jsonl(log) == [{"step": 1}]  # no half line


# ---------------------------------------------------------------- output folders checked before any work
@pytest.fixture
def read_only(tmp_path):
    "A folder nobody can write to: a read-only tmpfs as root (root ignores permissions), else mode 0555."
    d = tmp_path / "ro"
    if os.geteuid() == 0:
        _mount_tmpfs(d, "ro,size=64k")
        yield d
        subprocess.run(["umount", str(d)], check=True)
    else:
        d.mkdir()
        d.chmod(0o555)
        yield d
        d.chmod(0o755)


def _no_work(*a, **k):
    raise AssertionError("the work started before the output folder was checked")


def test_evaluate_checks_its_output_folders_before_any_work(tmp_path, read_only, capsys, monkeypatch):
    from mlrg import evaluate

    monkeypatch.setattr(evaluate, "evaluate_files", _no_work)
    pred = tmp_path / "pred.json"
    pred.write_text(json.dumps({"a": "No effusion."}))
    base = ["evaluate", "--pred", str(pred), "--gt", str(pred), "--no-meteor"]
    for flag in ("--out", "--per-sample"):
        assert main(base + [flag, str(read_only / "out" / "m.json")]) == 2
        err = _one_line_error(capsys, "mlrg evaluate")
        assert f"{read_only / 'out'}: cannot write to the folder of the {flag} file" in err
    (tmp_path / "m.json").mkdir()
    assert main(base + ["--out", str(tmp_path / "m.json")]) == 2
    assert f"{tmp_path / 'm.json'}: the --out file is a folder" in _one_line_error(capsys, "mlrg evaluate")


def test_label_checks_its_output_folder_before_any_work(tmp_path, read_only, capsys, monkeypatch):
    from mlrg import labeler

    monkeypatch.setattr(labeler, "read_reports_csv", _no_work)
    reports = tmp_path / "reports.csv"
    reports.write_text("Report\nNo effusion.\n")
    assert main(["label", "--in", str(reports), "--out", str(read_only / "labels.csv")]) == 2
    err = _one_line_error(capsys, "mlrg label")
    assert f"{read_only}: cannot write to the folder of the --out file" in err
    assert not any(read_only.iterdir())

"Tests of mlrg.core: the shared machinery every stage relies on."

import os
import pickle
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mlrg import core
from mlrg.core import InputError, atomic_write, derive_seed, load_json, save_json, seed_everything
from mlrg.engine import get_device, load_checkpoint, save_checkpoint
from mlrg.runs import RunFolder, main


def test_derive_seed_is_stable_across_processes():
    code = "from mlrg.core import derive_seed; print(derive_seed(9233, 'patient', 7))"
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONHASHSEED": "123"},
    ).stdout.strip()
    assert int(out) == derive_seed(9233, "patient", 7)
    assert len({derive_seed(1, "patient", i) for i in range(1000)}) == 1000


def test_seed_everything_repeats_torch_and_numpy():
    seed_everything(5)
    a = (torch.rand(3), np.random.rand(3))
    seed_everything(5)
    b = (torch.rand(3), np.random.rand(3))
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1])


def test_atomic_write_keeps_old_file_when_the_write_fails(tmp_path):
    p = tmp_path / "metrics.json"
    save_json({"v": 1}, p)

    class Boom:
        def __str__(self):
            raise RuntimeError("boom")

    with pytest.raises(TypeError):
        save_json({"v": Boom()}, p)  # fails while serialising: the old file stays
    assert load_json(p) == {"v": 1}
    with pytest.raises(TypeError):
        atomic_write(p, 12345)  # fails inside the write: no temp file is left
    assert sorted(f.name for f in tmp_path.iterdir()) == ["metrics.json"]
    assert load_json(p) == {"v": 1}


def test_load_checkpoint_refuses_pickled_objects(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    p = tmp_path / "evil.pt"
    p.write_bytes(pickle.dumps({"model": Evil()}, protocol=2))
    with pytest.raises(InputError, match="evil.pt: holds Python objects") as e:  # an error naming the file (issue 8)
        load_checkpoint(p)
    assert "weights_only=False" not in str(e.value)  # nothing suggests loading it unsafely
    with pytest.raises(InputError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "missing.pt")


def test_checkpoint_round_trip_with_rng_state(tmp_path):
    seed_everything(3)
    ck = {
        "model": {"w": torch.randn(2, 2)},
        "rng": core.rng_states(),
        "config": {"lr": 5e-5, "seed": 9233},
        "vocab": ["[PAD]", "[UNK]", "effusion"],
    }
    expected = (random.random(), np.random.rand(4), torch.rand(4))
    save_checkpoint(ck, tmp_path / "ck.pt")
    back = load_checkpoint(tmp_path / "ck.pt")  # weights_only=True accepts every part
    assert torch.equal(back["model"]["w"], ck["model"]["w"]) and back["vocab"] == ck["vocab"]
    seed_everything(99)
    core.set_rng_states(back["rng"])  # resume draws the same numbers
    assert random.random() == expected[0] and np.array_equal(np.random.rand(4), expected[1])
    assert torch.equal(torch.rand(4), expected[2])


def test_get_device():
    assert get_device(None).type == "cpu" and get_device("cpu").type == "cpu"
    with pytest.raises(InputError, match="gpu_id"):
        get_device("first")
    if not torch.cuda.is_available():
        assert get_device("0").type == "cpu"  # falls back, with a warning


def test_run_folder_layout(tmp_path, monkeypatch):
    monkeypatch.setenv("MLRG_OUTPUTS", str(tmp_path))
    run = RunFolder.create("study1")
    assert run.root == (tmp_path / "study1").resolve() and run.root.is_dir()
    assert run.annotation.parent == run.prepared and run.mimic.name == "mimic"
    assert RunFolder.create(tmp_path / "elsewhere").root == (tmp_path / "elsewhere").resolve()


def test_measure_reports_time_and_memory():
    with core.measure() as m:
        x = np.ones(10_000_000)
    assert m["seconds"] > 0 and m["peak_rss_mb"] > x.nbytes / 2**20


def test_console_script():
    exe = Path(sys.executable).parent / "mlrg"
    cmd = (
        [str(exe)]
        if exe.exists()
        else [sys.executable, "-c", "import sys; from mlrg.runs import main; sys.exit(main())"]
    )
    ok = subprocess.run(cmd + ["--help"], capture_output=True, text=True)
    assert ok.returncode == 0 and "phantom" in ok.stdout and "prepare" in ok.stdout
    bad = subprocess.run(cmd + ["frobnicate"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown command 'frobnicate'" in bad.stderr
    assert main(["frobnicate"]) == 2

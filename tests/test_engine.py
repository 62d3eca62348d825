"""Tests of the shared training engine in mlrg.core: exact resume (also after a killed process), data-parallel
training under torchrun, bf16, NaN stop, early stopping, best-checkpoint selection, accumulation, parameters."""

import importlib.util
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from mlrg.core import InputError, Params, read_jsonl, seed_everything
from mlrg.engine import (
    NonFiniteLoss,
    build_optimizer,
    build_scheduler,
    compare_configs,
    fit,
    load_checkpoint,
    resolve_amp,
    train_config,
    warmup_steps,
)

REPO = Path(__file__).resolve().parents[1]

# A toy problem shared by the in-process runs and the scripts run in subprocesses: a small MLP with dropout (so
# the RNG state matters) on a dataset whose items carry random "augmentation" noise (so the data RNG matters).
TOY = """
import os, signal, torch
from torch import nn

class Data(torch.utils.data.Dataset):
    def __init__(self, n=28, noise=0.05, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 4, generator=g)
        self.y = self.x @ torch.tensor([1., -2., .5, 3.]) + 0.1 * torch.randn(n, generator=g)
        self.noise = noise
    def __len__(self): return len(self.x)
    def __getitem__(self, i):                      # random augmentation: drawn from the global torch RNG
        return {"x": self.x[i] + self.noise * torch.randn(4), "y": self.y[i]}

def collate(items): return {k: torch.stack([it[k] for it in items]) for k in items[0]}

class MLP(nn.Module):
    "forward(batch) -> {'loss', 'mae'}; kill_at: SIGKILL this process at that training forward pass; nan_at: NaN loss from then on."
    def __init__(self, dropout=0.2, kill_at=None, nan_at=None):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(dropout), nn.Linear(16, 1))
        self.calls, self.kill_at, self.nan_at = 0, kill_at, nan_at
    def forward(self, batch):
        if self.training:
            self.calls += 1
            if self.kill_at is not None and self.calls == self.kill_at: os.kill(os.getpid(), signal.SIGKILL)
        err = self.net(batch["x"]).squeeze(-1) - batch["y"]
        loss = (err ** 2).mean()
        if self.training and self.nan_at is not None and self.calls >= self.nan_at: loss = loss * float("nan")
        return {"loss": loss, "mae": err.abs().mean()}

class Linear(nn.Module):
    def __init__(self):
        super().__init__(); self.lin = nn.Linear(4, 1)
    def forward(self, batch):
        return {"loss": ((self.lin(batch["x"]).squeeze(-1) - batch["y"]) ** 2).mean()}

VAL = Data(16, noise=0.0, seed=1)
def evaluate(model, ctx=None):
    b = collate([VAL[i] for i in range(len(VAL))])
    return {"val_loss": model(b)["loss"].item()}
"""  # noqa: E501


@pytest.fixture
def toy(tmp_path):
    (tmp_path / "toy.py").write_text(TOY)
    spec = importlib.util.spec_from_file_location("toy", tmp_path / "toy.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _env():
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }


def _weights(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def _strip(records):
    "metrics.jsonl records without the timing fields (which differ between runs)."
    return [{k: v for k, v in r.items() if k not in ("seconds", "samples_per_s")} for r in records]


BASE = {
    "batch_size": 4,
    "lr": 0.01,
    "warmup": 0.2,
    "scheduler": "cosine",
    "grad_clip": 1.0,
    "eval_steps": 2,
    "log_steps": 1,
    "seed": 7,
    "progress": False,
    "keep_last": None,
}


@pytest.mark.parametrize("grad_accum,save_steps,kill_at,workers", [(1, 3, 11, 0), (2, 5, 12, 2)])
def test_resume_after_killed_process_is_exact(toy, tmp_path, grad_accum, save_steps, kill_at, workers):
    # 28 samples in batches of 4: 7 batches an epoch; 2 epochs. The killed run's last checkpoint is mid-epoch.
    # With workers, the straight and killed runs load in 2 worker processes and the resumed run in the main one:
    # each batch's augmentation is seeded by (seed, epoch, rank, batch), so the data are the same either way.
    conf = {**BASE, "num_epochs": 2, "grad_accum": grad_accum, "save_steps": save_steps, "num_workers": workers}
    seed_everything(0)
    straight = toy.MLP()
    res = fit(straight, toy.Data(), toy.collate, {**conf, "out_dir": str(tmp_path / "straight")}, evaluate=toy.evaluate)

    script = tmp_path / "killed.py"
    script.write_text(
        textwrap.dedent(f"""
        import json, sys; sys.path.insert(0, {str(tmp_path)!r})
        import toy
        from mlrg.core import seed_everything
        from mlrg.engine import fit
        seed_everything(0)
        fit(toy.MLP(kill_at={kill_at}), toy.Data(), toy.collate, {{**json.loads(sys.argv[1]), "out_dir": sys.argv[2]}}, evaluate=toy.evaluate)
    """)  # noqa: E501
    )
    out = tmp_path / "killed"
    p = subprocess.run(
        [sys.executable, str(script), json.dumps(conf), str(out)],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == -9, p.stderr  # SIGKILLed mid-run
    ck = load_checkpoint(out / "last.pt")
    assert 0 < ck["global_step"] < res["global_step"] and ck["epoch_batches"] > 0  # resumes mid-epoch
    assert (
        read_jsonl(out / "metrics.jsonl")[-1]["step"] > ck["global_step"]
    )  # records after the checkpoint were lost work

    resumed = toy.MLP()  # fresh weights: all state comes from the checkpoint
    res2 = fit(
        resumed,
        toy.Data(),
        toy.collate,
        {**conf, "num_workers": 0, "out_dir": str(out), "resume_from": str(out / "last.pt")},
        evaluate=toy.evaluate,
    )
    assert res2["global_step"] == res["global_step"]
    torch.testing.assert_close(_weights(resumed), _weights(straight), rtol=0, atol=1e-6)
    assert res2["best_step"] == res["best_step"] and res2["best_metric"] == pytest.approx(res["best_metric"], abs=1e-6)
    a, b = _strip(read_jsonl(tmp_path / "straight" / "metrics.jsonl")), _strip(read_jsonl(out / "metrics.jsonl"))
    assert len(a) == len(b) and [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys()
        assert all(ra[k] == pytest.approx(rb[k], abs=1e-6) for k in ra)


def test_resume_from_epoch_end_and_config_changes(toy, tmp_path):
    conf = {**BASE, "num_epochs": 3, "save_steps": None, "eval_steps": None, "hidden": 16}
    seed_everything(0)
    straight = toy.MLP()
    fit(
        straight,
        toy.Data(),
        toy.collate,
        {**conf, "out_dir": str(tmp_path / "a")},
        evaluate=toy.evaluate,
        vocab=["[PAD]", "x"],
    )
    ck = load_checkpoint(tmp_path / "a" / "epoch_0.pt")
    assert (ck["epoch"], ck["epoch_batches"], ck["global_step"], ck["vocab"]) == (1, 0, 7, ["[PAD]", "x"])
    assert {"model", "optimizer", "scheduler", "scaler", "rng", "config", "best_metric", "bad_evals", "history"} <= set(
        ck
    )
    resumed = toy.MLP()
    fit(
        resumed,
        toy.Data(),
        toy.collate,
        {**conf, "out_dir": str(tmp_path / "b"), "resume_from": str(tmp_path / "a" / "epoch_0.pt")},
        evaluate=toy.evaluate,
        vocab=["[PAD]", "x"],
    )
    torch.testing.assert_close(_weights(resumed), _weights(straight), rtol=0, atol=1e-6)
    # an architecture key that changed is an error; a different vocabulary too
    with pytest.raises(InputError, match="hidden: 16 -> 32"):
        fit(
            toy.MLP(),
            toy.Data(),
            toy.collate,
            {**conf, "hidden": 32, "out_dir": str(tmp_path / "c"), "resume_from": str(tmp_path / "a" / "epoch_0.pt")},
            arch_keys=("hidden",),
        )
    with pytest.raises(InputError, match="vocabulary"):
        fit(
            toy.MLP(),
            toy.Data(),
            toy.collate,
            {**conf, "out_dir": str(tmp_path / "c"), "resume_from": str(tmp_path / "a" / "epoch_0.pt")},
            vocab=["[PAD]", "y"],
        )
    assert compare_configs({"lr": 0.01, "out_dir": "a"}, {"lr": 0.02, "out_dir": "b"}) == ["lr: 0.01 -> 0.02"]


def test_evaluation_does_not_move_the_training_rng(toy, tmp_path):
    def noisy_eval(model, ctx):  # an evaluation that draws random numbers (e.g. a shuffled loader)
        torch.rand(100)
        return toy.evaluate(model, ctx)

    seed_everything(0)
    a = toy.MLP()
    fit(
        a,
        toy.Data(),
        toy.collate,
        {**BASE, "num_epochs": 1, "eval_steps": 1, "out_dir": str(tmp_path / "a")},
        evaluate=noisy_eval,
    )
    seed_everything(0)
    b = toy.MLP()
    fit(b, toy.Data(), toy.collate, {**BASE, "num_epochs": 1, "eval_steps": None, "out_dir": str(tmp_path / "b")})
    torch.testing.assert_close(_weights(a), _weights(b), rtol=0, atol=0)


DDP_SCRIPT = """
import json, sys; sys.path.insert(0, {toy_dir!r})
import torch, toy
from mlrg.core import seed_everything
from mlrg.engine import fit, is_main_process
seed_everything(0)
model = toy.Linear()
res = fit(model, toy.Data(noise=0.0), toy.collate, {conf}, evaluate=toy.evaluate, vocab=["[PAD]", "a"])
if is_main_process():
    json.dump({{"weights": torch.cat([p.detach().flatten() for p in model.parameters()]).tolist(), "global_step": res["global_step"]}},
              open({out!r}, "w"))
"""  # noqa: E501


def test_ddp_two_processes_on_cpu(toy, tmp_path):
    # 2 ranks x batch 4 see exactly the samples of one batch of 8 (rank-strided shards of one permutation), and DDP
    # averages their gradients, so the linear model ends where a single process with batch 8 ends.
    conf = {
        "batch_size": 4,
        "num_epochs": 2,
        "lr": 0.05,
        "warmup": 0,
        "scheduler": "constant",
        "eval_steps": 2,
        "save_steps": 2,
        "log_steps": 1,
        "seed": 3,
        "progress": False,
        "out_dir": str(tmp_path / "ddp"),
    }
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT.format(toy_dir=str(tmp_path), conf=repr(conf), out=str(tmp_path / "ddp.json")))
    p = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone", str(script)],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=180,
        cwd=tmp_path,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    got = json.loads((tmp_path / "ddp.json").read_text())
    ck = load_checkpoint(tmp_path / "ddp" / "last.pt")
    assert (
        ck["world_size"] == 2 and len(ck["rng"]) == 2 and ck["global_step"] == got["global_step"] == 8
    )  # 14 per rank: 4 batches
    assert load_checkpoint(tmp_path / "ddp" / "best.pt")["vocab"] == ["[PAD]", "a"]
    recs = read_jsonl(tmp_path / "ddp" / "metrics.jsonl")  # written once, by rank 0
    assert [r["step"] for r in recs if r["kind"] == "train"] == list(range(1, 9))
    seed_everything(0)
    single = toy.Linear()
    fit(single, toy.Data(noise=0.0), toy.collate, {**conf, "batch_size": 8, "out_dir": str(tmp_path / "single")})
    torch.testing.assert_close(torch.tensor(got["weights"]), _weights(single), rtol=0, atol=1e-5)


def test_grad_accumulation_matches_bigger_batch(toy, tmp_path):
    conf = {"num_epochs": 2, "lr": 0.05, "warmup": 0, "scheduler": "constant", "progress": False, "seed": 1}
    seed_everything(0)
    a = toy.Linear()
    ra = fit(
        a, toy.Data(noise=0.0), toy.collate, {**conf, "batch_size": 4, "grad_accum": 2, "out_dir": str(tmp_path / "a")}
    )
    seed_everything(0)
    b = toy.Linear()
    rb = fit(b, toy.Data(noise=0.0), toy.collate, {**conf, "batch_size": 8, "out_dir": str(tmp_path / "b")})
    assert ra["global_step"] == rb["global_step"] == 8  # 7 batches of 4 -> 4 steps an epoch (last one a single batch)
    torch.testing.assert_close(_weights(a), _weights(b), rtol=0, atol=1e-6)
    seed_everything(0)
    c = toy.Linear()
    fit(c, toy.Data(noise=0.0), toy.collate, {**conf, "batch_size": 4, "out_dir": str(tmp_path / "c")})
    assert not torch.allclose(_weights(c), _weights(b), atol=1e-4)  # the comparison can fail


def test_bf16_on_cpu(toy, tmp_path):
    seed_everything(0)
    m = toy.MLP()
    w0 = _weights(m).clone()
    res = fit(m, toy.Data(), toy.collate, {**BASE, "num_epochs": 1, "use_amp": True, "out_dir": str(tmp_path)})
    losses = [r["train_loss"] for r in res["history"] if r["kind"] == "train"]
    assert len(losses) == 7 and all(torch.isfinite(torch.tensor(losses)))
    assert not torch.allclose(_weights(m), w0) and torch.isfinite(_weights(m)).all()
    assert resolve_amp(use_amp=True, device="cpu") == "bf16"
    with pytest.raises(InputError, match="parameter 'amp'"):
        fit(toy.MLP(), toy.Data(), toy.collate, {**BASE, "amp": "fp16", "out_dir": str(tmp_path / "fp16")})


def test_nan_loss_stops_and_keeps_last_good_checkpoint(toy, tmp_path):
    m = toy.MLP(nan_at=3)
    with pytest.raises(NonFiniteLoss, match="non-finite loss at step 3"):
        fit(
            m,
            toy.Data(),
            toy.collate,
            {**BASE, "num_epochs": 2, "save_steps": 1, "out_dir": str(tmp_path)},
            evaluate=toy.evaluate,
        )
    for name in ("last.pt", "best.pt"):
        ck = load_checkpoint(tmp_path / name)
        assert ck["global_step"] == 2
        assert all(torch.isfinite(v).all() for v in ck["model"].values())
    assert not (tmp_path / "step_3.pt").exists()
    assert read_jsonl(tmp_path / "metrics.jsonl")[-1]["kind"] == "stop"


def _scripted_eval(values):
    it = iter(values)
    return lambda model, ctx: {"val_loss": next(it), "bleu4": 0.0}


def test_early_stopping(toy, tmp_path):
    res = fit(
        toy.MLP(),
        toy.Data(),
        toy.collate,
        {**BASE, "num_epochs": 5, "eval_steps": 1, "early_stopping_patience": 2, "out_dir": str(tmp_path)},
        evaluate=_scripted_eval([3.0, 1.0, 1.5, 1.2, 0.5, 0.1]),
    )
    assert res["stopped"] == "early_stopping" and res["global_step"] == 4 and res["best_step"] == 2
    ck = load_checkpoint(tmp_path / "last.pt")
    assert ck["bad_evals"] == 2 and ck["global_step"] == 4


@pytest.mark.parametrize("mode,best_step", [("min", 4), ("max", 5)])
def test_best_checkpoint_follows_validation_metric(toy, tmp_path, mode, best_step):
    m = toy.MLP()
    res = fit(
        m,
        toy.Data(),
        toy.collate,
        {**BASE, "max_steps": 6, "eval_steps": 1, "save_steps": 1, "select_mode": mode, "out_dir": str(tmp_path)},
        evaluate=_scripted_eval([3.0, 1.0, 2.0, 0.5, 4.0, 2.5]),
    )
    assert res["best_step"] == best_step and res["global_step"] == 6
    best, same = load_checkpoint(tmp_path / "best.pt"), load_checkpoint(tmp_path / f"step_{best_step}.pt")
    assert best["global_step"] == best_step
    assert all(torch.equal(best["model"][k], same["model"][k]) for k in best["model"])
    assert not torch.equal(
        best["model"]["net.0.weight"], load_checkpoint(tmp_path / "last.pt")["model"]["net.0.weight"]
    )
    with pytest.raises(InputError, match="select_metric"):
        fit(
            toy.MLP(),
            toy.Data(),
            toy.collate,
            {**BASE, "max_steps": 1, "select_metric": "rcb", "out_dir": str(tmp_path / "x")},
            evaluate=_scripted_eval([1.0]),
        )


def test_keep_last_and_files(toy, tmp_path):
    out = tmp_path / "run"
    fit(
        toy.MLP(),
        toy.Data(),
        toy.collate,
        {**BASE, "num_epochs": 2, "save_steps": 2, "keep_last": 2, "out_dir": str(out)},
        evaluate=toy.evaluate,
    )
    names = sorted(p.name for p in out.iterdir())
    assert names == [
        "best.pt",
        "epoch_0.pt",
        "epoch_1.pt",
        "last.pt",
        "metrics.jsonl",
        "params.json",
        "step_12.pt",
        "step_14.pt",
    ]
    assert json.loads((out / "params.json").read_text())["save_steps"] == 2


def test_params_check_and_cli():
    defaults = {"batch_size": 32, "lr": 5e-5, "use_amp": False, "run_dir": None, "views": ["PA"]}
    declared = Params.infer(defaults)
    with pytest.raises(InputError, match="did you mean 'batch_size'"):
        declared.check({"batchsize": 4})
    with pytest.raises(InputError, match="did you mean 'lr'"):
        declared.check({"lrr": 4})
    got = declared.check({"lr": 4, "use_amp": "false", "run_dir": "outputs/x"})
    assert got["lr"] == 4.0 and isinstance(got["lr"], float) and got["use_amp"] is False and got["batch_size"] == 32
    with pytest.raises(InputError, match="parameter 'batch_size'.*integer"):
        declared.check({"batch_size": "eight"})
    with pytest.raises(InputError, match="parameter 'use_amp'"):
        declared.check({"use_amp": 3})
    with pytest.raises(InputError, match="parameter 'lr'"):
        declared.check({"lr": [1]})
    assert declared.cli(["--lr", "1e-4", "--use_amp", "--views", '["PA", "AP"]']) == {
        "batch_size": 32,
        "lr": 1e-4,
        "use_amp": True,
        "run_dir": None,
        "views": ["PA", "AP"],
    }
    assert declared.cli(["--batch-size", "4"])["batch_size"] == 4  # --name and --name-with-dashes both work
    with pytest.raises(InputError, match="did you mean 'batch_size'"):
        declared.cli(["--bach-size", "4"])
    with pytest.raises(InputError, match="did you mean 'grad_accum'"):
        train_config({"grad_acumm": 2})


def test_optimizer_groups():
    net = torch.nn.Sequential(
        torch.nn.Embedding(5, 4), torch.nn.Linear(4, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 2)
    )
    opt = build_optimizer(net, 5e-5, 0.1, param_groups={"3.": 5e-6})
    groups = {g["name"]: g for g in opt.param_groups}
    assert [p.shape for p in groups["default/decay"]["params"]] == [
        torch.Size([4, 4])
    ]  # embedding, biases, norm: no decay
    assert groups["default/no_decay"]["weight_decay"] == 0.0 and len(groups["default/no_decay"]["params"]) == 4
    assert groups["3./decay"]["lr"] == 5e-6 and groups["default/decay"]["lr"] == 5e-5


class _Still(torch.nn.Module):
    "A loss with zero gradient: AdamW then only applies its decoupled weight decay, p <- p * (1 - lr * wd) a step."

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 2)

    def forward(self, batch):
        return {"loss": sum(p.sum() for p in self.parameters()) * 0.0 + batch["y"].sum() * 0.0}


@pytest.mark.parametrize("scope", ["matrices", "all"])
def test_weight_decay_scope_in_fit(toy, tmp_path, scope):
    conf = {"num_epochs": 1, "batch_size": 4, "lr": 0.1, "weight_decay": 0.5, "warmup": 0, "scheduler": "constant"}
    torch.manual_seed(0)
    m = _Still()
    w0, b0 = m.lin.weight.detach().clone(), m.lin.bias.detach().clone()
    run = fit(
        m,
        toy.Data(noise=0.0),
        toy.collate,
        {**conf, "progress": False, "weight_decay_scope": scope, "out_dir": str(tmp_path)},
    )
    shrink = (1 - 0.1 * 0.5) ** run["global_step"]
    assert run["global_step"] == 7
    torch.testing.assert_close(m.lin.weight.detach(), w0 * shrink)  # matrices decay under both scopes
    torch.testing.assert_close(m.lin.bias.detach(), b0 * shrink if scope == "all" else b0)  # the bias only under "all"
    with pytest.raises(InputError, match="weight_decay_scope"):
        train_config({"weight_decay_scope": "most"})


@pytest.mark.parametrize("drop_last,steps", [(False, 4), (True, 3)])
def test_drop_last_in_fit(toy, tmp_path, drop_last, steps):
    conf = {"num_epochs": 1, "batch_size": 8, "progress": False, "drop_last": drop_last, "out_dir": str(tmp_path)}
    seen = []
    run = fit(toy.Linear(), toy.Data(), lambda items: seen.append(len(items)) or toy.collate(items), conf)
    assert run["global_step"] == steps and seen == [8, 8, 8, 4][:steps]  # 28 samples: the batch of 4 is dropped or not


def _schedule(kind, total, warmup, lrs=(1.0, 0.1), steps=None):
    "The learning rate of each param group at every optimizer step of `build_scheduler(kind, total, warmup)`."
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in lrs]
    opt = torch.optim.SGD([{"params": [p], "lr": lr} for p, lr in zip(params, lrs)])
    sched = build_scheduler(opt, kind, total, warmup)
    out = []
    for _ in range(steps or total):  # fit: the step runs at the current lr, then scheduler.step()
        out.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    return torch.tensor(out, dtype=torch.float64)  # (steps, groups)


@pytest.mark.parametrize("total,warmup", [(50, 10), (50, 0.2), (7, 3), (40, 1)])
def test_warmup_cosine_schedule_shape(total, warmup):
    lr = _schedule("cosine", total, warmup)
    w = warmup_steps(warmup, total)
    assert w == (10 if total == 50 else warmup)  # a fraction < 1 of the run, else a step count
    peak = torch.tensor([1.0, 0.1], dtype=torch.float64)
    # warmup: a straight line from peak / w up to the peak at its last step (no step is wasted at lr 0)
    ramp = torch.arange(1, w + 1, dtype=torch.float64)[:, None] / w * peak
    torch.testing.assert_close(lr[:w], ramp)
    # then the cosine: from the peak down towards 0, never rising; it would reach 0 at step `total`, one past the last
    # (so the last step still moves the weights: at ~0 for a long run, 0.15 x the peak for the 4 steps after a warmup)
    torch.testing.assert_close(lr[w], peak)
    assert (lr[w:].diff(dim=0) <= 1e-12).all() and (lr[w + 1 :].diff(dim=0) < 0).all()
    assert (lr.max(0).values == peak).all()

    def cosine(step):
        return peak * 0.5 * (1 + math.cos(math.pi * (step - w) / (total - w)))

    middle = w + (total - w) // 2
    torch.testing.assert_close(lr[middle], cosine(middle))
    torch.testing.assert_close(lr[-1], cosine(total - 1))
    if total - w >= 40:
        assert (lr[-1] < 2e-3 * peak).all()
    torch.testing.assert_close(lr[:, 0] / lr[:, 1], torch.full((total,), 10.0, dtype=torch.float64))  # ratios kept
    # past the planned end it stays at 0 (progress is capped)
    assert _schedule("cosine", total, warmup, steps=total + 3)[total:].abs().max() < 1e-12


def test_constant_schedule_with_and_without_warmup():
    lr = _schedule("constant", 30, 5)
    torch.testing.assert_close(lr[:5, 0], torch.tensor([0.2, 0.4, 0.6, 0.8, 1.0], dtype=torch.float64))
    assert (lr[5:] == torch.tensor([1.0, 0.1], dtype=torch.float64)).all()  # flat after the warmup
    assert (_schedule("constant", 30, 0) == torch.tensor([1.0, 0.1], dtype=torch.float64)).all()
    cos = _schedule("cosine", 30, 0)
    assert cos[0, 0] == 1.0 and (cos[:, 0].diff() < 0).all()  # no warmup: the cosine from the first step
    with pytest.raises(InputError, match="scheduler"):
        _schedule("linear", 30, 5)


def test_schedule_in_fit(toy, tmp_path):
    "fit's logged learning rate per optimizer step is the schedule's (14 steps: 2 epochs of 7 batches)."
    conf = {**BASE, "num_epochs": 2, "warmup": 4, "eval_steps": None, "out_dir": str(tmp_path)}
    torch.manual_seed(0)
    fit(toy.Linear(), toy.Data(), toy.collate, conf)
    logged = [r["lr"] for r in read_jsonl(tmp_path / "metrics.jsonl") if r["kind"] == "train"]
    want = _schedule("cosine", 14, 4, lrs=(BASE["lr"],))[:, 0].tolist()
    assert len(logged) == 14
    torch.testing.assert_close(torch.tensor(logged, dtype=torch.float64), torch.tensor(want, dtype=torch.float64))

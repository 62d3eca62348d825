"""Learnability of the phantom: do its findings need the lateral view, and does its change need the prior?

A small CNN is trained on the phantom's images against its ground truth (`phantom-truth.jsonl`) on the CPU
(2 threads), four times, in two experiments. Within an experiment both models train for the same number of
epochs (passes over the same training studies in the same order), chosen from a short calibration of their
speed so that all training fits `budget_seconds`; wall and CPU seconds actually used are reported.

1. views: multi-label "present" per observation from (a) the frontal image alone vs (b) frontal + lateral
   (one shared CNN applied to each view, features concatenated). Per-observation ROC AUC on held-out
   patients, macro AUC, and the AUC restricted to lateral-only positives (findings the truth marks as
   visible only on the lateral view) against all negatives: there (a) must sit near 0.5 and (b) well above.
   The AUCs after the first epoch are recorded too (learnable, but not trivially).
2. prior: per study with a prior, a 3-way head per tracked observation {worse-or-new, unchanged,
   better-or-resolved}, masked where the observation has no change entry, from (a) the current frontal image
   alone vs (b) current + prior frontal images (siamese: shared CNN, features [current, prior, current -
   prior]). Observations whose training change classes are nearly all one class are left out (reported).
   Accuracy and balanced accuracy pooled over (study, observation) pairs and per observation, against the
   majority-class baselines, on held-out patients.

Run: `python benchmarks/phantom_learnability.py --root DIR --budget-seconds 120 --size 128 --seed 0
--out benchmarks/results/phantom_learnability.json`. Importable by path (the phantom notebook loads it with
importlib): `run_learnability(root, ...) -> dict`, `plot_learnability(results) -> Figure`.
Timings depend on the machine, so the epochs that fit the budget (and the numbers) do too.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from mlrg.core import OBSERVATIONS, InputError, derive_seed, image_relpath, save_json, seed_everything
from mlrg.data import load_image
from mlrg.phantom import TRUTH_FILE, read_truth as read_truth_file
from mlrg.metrics import balanced_accuracy, roc_auc

CHANGE_CLASSES = ["worse-or-new", "unchanged", "better-or-resolved"]
CHANGE_TO_CLASS = {"new": 0, "worse": 0, "unchanged": 1, "better": 2, "resolved": 2}
SPLIT_FILE = "mimic-cxr-2.0.0-split.csv"


# ----------------------------------------------------------------------------------------------- metrics
def _nanmean(values):
    v = [x for x in values if x is not None and not math.isnan(x)]
    return float(np.mean(v)) if v else float("nan")


# ----------------------------------------------------------------------------------------------- data
def read_truth(root):
    "The records of `phantom-truth.jsonl` under `root` (`mlrg.phantom.read_truth`), checked for the keys this benchmark uses."
    path = Path(root) / TRUTH_FILE
    records = read_truth_file(path)
    for i, r in enumerate(records, 1):
        missing = [k for k in ("subject_id", "study_id", "prior_study_id", "images", "findings", "change") if k not in r]
        if missing: raise InputError(f"missing keys {missing}", where=f"{path}, line {i}", expected="the phantom-truth.jsonl schema")
        for im in r["images"]:
            if im.get("projection") not in ("frontal", "lateral"):
                raise InputError(f"image {im.get('dicom_id')!r} has projection {im.get('projection')!r}", where=f"{path}, line {i}", expected="'frontal' or 'lateral'")
    if not records: raise InputError("no records", where=path)
    return records


def image_path(root, subject_id, study_id, dicom_id):
    "Where MIMIC-CXR-JPG keeps an image: files/pNN/p<subject>/s<study>/<dicom>.jpg."
    return Path(root) / "files" / image_relpath(subject_id, study_id, dicom_id)


def split_patients(root, records, seed, eval_fraction=0.3, min_eval_fraction=0.15, min_eval_patients=20):
    """Patients -> 'train' / 'eval'. The official split (validate + test = eval) when it holds enough patients,
    else a seeded patient-level split with `eval_fraction` of the patients. Returns (mapping, info)."""
    subjects = sorted({int(r["subject_id"]) for r in records})
    official = {}
    path = Path(root) / SPLIT_FILE
    if path.exists():
        import pandas as pd
        df = pd.read_csv(path)
        for col in ("subject_id", "split"):
            if col not in df.columns: raise InputError(f"column {col!r} missing", where=path, expected="dicom_id, study_id, subject_id, split")
        bad = df[~df["split"].isin(["train", "validate", "test"])]
        if len(bad): raise InputError(f"split value {bad['split'].iloc[0]!r}", where=f"{path}, row {bad.index[0] + 2}", expected="train / validate / test")
        for sid, sp in zip(df["subject_id"].astype(int), df["split"]):
            official[sid] = "train" if sp == "train" else "eval"
    n_eval = sum(official.get(s) == "eval" for s in subjects)
    covered = all(s in official for s in subjects)
    if covered and n_eval >= max(min_eval_patients, min_eval_fraction * len(subjects)) and n_eval < len(subjects):
        return {s: official[s] for s in subjects}, {"source": "official (validate + test = eval)", "train_patients": len(subjects) - n_eval, "eval_patients": n_eval}
    rng = np.random.default_rng(derive_seed(seed, "learnability", "split"))
    order = rng.permutation(len(subjects))
    k = max(1, int(round(eval_fraction * len(subjects))))
    mapping = {subjects[i]: ("eval" if j < k else "train") for j, i in enumerate(order)}
    why = ("split file missing" if not path.exists() else "split file does not cover every patient" if not covered
           else f"official split has only {n_eval} of {len(subjects)} patients in validate + test")
    return mapping, {"source": f"seeded patient-level split ({eval_fraction:.0%} eval; {why})", "train_patients": len(subjects) - k, "eval_patients": k}


def load_images(root, records, size, progress=True):
    "Every image of `records` as one uint8 tensor [N, size, size]; returns (tensor, {dicom_id: row}, missing list)."
    import torch
    from tqdm import tqdm
    items = [(im["dicom_id"], image_path(root, r["subject_id"], r["study_id"], im["dicom_id"])) for r in records for im in r["images"]]
    present = [(d, p) for d, p in items if p.exists()]
    missing = [str(p) for d, p in items if not p.exists()]
    out = np.zeros((len(present), size, size), dtype=np.uint8)
    def work(i): out[i] = load_image(present[i][1], size)     # an unreadable image is an InputError naming it
    with ThreadPoolExecutor(2) as ex:
        list(tqdm(ex.map(work, range(len(present))), total=len(present), desc="load images", disable=not progress, leave=False))
    return torch.from_numpy(out), {d: i for i, (d, _) in enumerate(present)}, missing


def first_image(record, projection, index):
    "The row of the study's first loaded image with `projection` (PA/AP preferred order as listed), or None."
    for im in record["images"]:
        if im["projection"] == projection and im["dicom_id"] in index: return index[im["dicom_id"]]
    return None


def change_targets(records, observations=None, require_frontal_visible=True):
    """(study_id, observation, class) for every change entry of a study whose prior is in `records`.
    Classes index CHANGE_CLASSES. With `require_frontal_visible`, a pair is left out (and counted) when the
    finding is present in the current or the prior study but not visible on the frontal view there: its
    change cannot be seen on frontal images. Returns (pairs, counts)."""
    by_id = {int(r["study_id"]): r for r in records}
    obs = set(observations or OBSERVATIONS) - {"No Finding"}
    pairs, counts = [], {"studies_with_prior": 0, "pairs": 0, "left_out_not_frontal_visible": 0, "left_out_unknown_change": 0}
    for r in records:
        prior = by_id.get(r["prior_study_id"]) if r["prior_study_id"] is not None else None
        if prior is None: continue
        counts["studies_with_prior"] += 1
        for o, ch in sorted(r["change"].items()):
            if o not in obs: continue
            if ch not in CHANGE_TO_CLASS: counts["left_out_unknown_change"] += 1; continue
            if require_frontal_visible and any(s["findings"].get(o, {}).get("present") and "frontal" not in s["findings"][o].get("views", [])
                                               for s in (r, prior)):
                counts["left_out_not_frontal_visible"] += 1; continue
            pairs.append((int(r["study_id"]), o, CHANGE_TO_CLASS[ch]))
    counts["pairs"] = len(pairs)
    return pairs, counts


# ----------------------------------------------------------------------------------------------- model
def _make_trunk(width=16):
    import torch.nn as nn
    def block(i, o, k=3): return [nn.Conv2d(i, o, k, stride=2, padding=k // 2, bias=False), nn.BatchNorm2d(o), nn.ReLU(inplace=True)]
    layers = block(1, width, 5) + block(width, 2 * width) + block(2 * width, 4 * width) + block(4 * width, 8 * width)
    layers += [nn.Conv2d(8 * width, 8 * width, 3, padding=1, bias=False), nn.BatchNorm2d(8 * width), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


def _build_model(n_inputs, n_out, mode, width=16):
    "A shared CNN trunk on each of `n_inputs` images; pooled features (avg + max) combined by `mode`, then a linear head."
    import torch
    import torch.nn as nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.trunk = _make_trunk(width)
            self.feat = 16 * width                         # avg + max pooled
            n_feat = self.feat * (3 if mode == "diff" else n_inputs)
            self.head = nn.Sequential(nn.Dropout(0.2), nn.Linear(n_feat, n_out))

        def embed(self, x):
            h = self.trunk(x)
            return torch.cat([h.mean((2, 3)), h.amax((2, 3))], 1)

        def forward(self, *xs):
            b = xs[0].shape[0]
            f = self.embed(torch.cat(xs, 0)).split(b, 0)   # one pass over all views (shared BatchNorm statistics)
            if mode == "diff": f = (f[0], f[1], f[0] - f[1])
            return self.head(torch.cat(f, 1))
    return Net()


def _prepare(x_uint8, train, gen, shift=0.05, jitter=0.1):
    "uint8 [B,H,W] -> normalised float [B,1,H,W]; with `train`: random shifts (edge-replicated) and brightness/contrast jitter (no flips)."
    import torch
    import torch.nn.functional as F
    x = x_uint8.float().unsqueeze(1).div_(255.0)
    if train:
        b, _, h, w = x.shape
        p = max(1, int(round(shift * h)))
        xp = F.pad(x, (p, p, p, p), mode="replicate")
        d = torch.randint(0, 2 * p + 1, (b, 2), generator=gen).tolist()
        x = torch.stack([xp[i, :, dy:dy + h, dx:dx + w] for i, (dy, dx) in enumerate(d)])
        contrast = 1 + (torch.rand(b, 1, 1, 1, generator=gen) * 2 - 1) * jitter
        bright = (torch.rand(b, 1, 1, 1, generator=gen) * 2 - 1) * jitter
        x = (x - 0.5) * contrast + 0.5 + bright
    return (x - 0.5) / 0.25


def _now(clock):
    "A clock: wall seconds, or this process's CPU seconds divided by torch's thread count ('cpu')."
    import torch
    if clock not in ("wall", "cpu"): raise InputError(f"clock={clock!r}", where="clock", expected="'wall' or 'cpu'")
    threads = max(1, torch.get_num_threads())
    return time.perf_counter if clock == "wall" else (lambda: time.process_time() / threads)


def train_lockstep(experiment, models, n, seed, seconds=None, epochs=None, batch_size=32, lr=2e-3, clock="wall", progress=True,
                   after_first_epoch=None, max_epochs=40.0):
    """Train the models of one experiment side by side, one step of each in turn on the same batch, so that they
    always have had exactly the same number of passes over the same training samples in the same order
    (equal epochs, whatever each one costs). `models` is a list of (name, model, inputs, target_fn, loss_fn):
    `inputs(idx, train, gen)` gives a model's input tensors for sample indices, `target_fn(idx)` the targets.
    Training stops when `seconds` (on `clock`, all models together) are used, with a cosine learning rate over
    that time, or, with `epochs` instead, after that many passes (cosine over the steps); `max_epochs` caps
    both. `after_first_epoch(name, model)` is called once per model after the first pass (its time is not
    counted). AdamW. Returns {name: epochs, steps, wall and CPU seconds spent in that model's steps, ...}."""
    import torch
    from tqdm import tqdm
    if (seconds is None) == (epochs is None): raise InputError("give exactly one of seconds and epochs", where="train_lockstep")
    gen = torch.Generator().manual_seed(derive_seed(seed, "learnability", experiment, "batches") % 2**63)
    state = {}
    for name, model, *_ in models:
        seed_everything(derive_seed(seed, "learnability", experiment, name, "train"))
        state[name] = {"opt": torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4), "wall": 0.0, "cpu": 0.0, "loss": None,
                       "aug": torch.Generator().manual_seed(derive_seed(seed, "learnability", experiment, "augment") % 2**63)}
        model.train()
    batches = [b for b in range(0, n, batch_size) if min(n, b + batch_size) - b >= 2]   # BatchNorm needs 2 samples
    if not batches: return {name: {"epochs": 0.0, "steps": 0, "train_samples": n, "wall_seconds": 0.0, "cpu_seconds": 0.0} for name, *_ in models}
    cap = max(1, int(round(max_epochs * len(batches))))
    total = min(cap, max(1, int(round(epochs * len(batches))))) if epochs is not None else cap
    now = _now(clock); t0 = now(); paused = 0.0; step = 0; done = False; ep = 0
    bar = tqdm(total=round(seconds, 1) if seconds is not None else total, desc=f"train {experiment} ({' + '.join(m[0] for m in models)})",
               unit="s" if seconds is not None else "step", disable=not progress, leave=False)
    while not done:
        perm = torch.randperm(n, generator=gen)
        for b in batches:
            frac = (now() - t0 - paused) / seconds if seconds is not None else step / total
            if frac >= 1 or step >= total: done = True; break
            idx = perm[b:b + batch_size]
            lr_now = lr * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))
            for name, model, inputs, target_fn, loss_fn in models:
                s = state[name]; w, c = time.perf_counter(), time.process_time()
                for g in s["opt"].param_groups: g["lr"] = lr_now
                loss = loss_fn(model(*inputs(idx, True, s["aug"])), target_fn(idx))
                s["opt"].zero_grad(set_to_none=True); loss.backward(); s["opt"].step()
                s["loss"] = loss.item() if s["loss"] is None else 0.9 * s["loss"] + 0.1 * loss.item()
                s["wall"] += time.perf_counter() - w; s["cpu"] += time.process_time() - c
            step += 1
            if seconds is not None: bar.n = min(round(now() - t0 - paused, 1), bar.total)
            else: bar.n = step
            bar.set_postfix_str(f"epoch {step / len(batches):.1f} " + " ".join(f"{k} {v['loss']:.3f}" for k, v in state.items()), refresh=False)
            bar.refresh()
        ep += 1
        if ep == 1 and not done and after_first_epoch is not None:
            p0 = now()
            for name, model, *_ in models: after_first_epoch(name, model); model.train()
            paused += now() - p0
    bar.close()
    return {name: {"epochs": round(step / len(batches), 2), "steps": step, "train_samples": n, "batch_size": batch_size,
                   "wall_seconds": round(s["wall"], 2), "cpu_seconds": round(s["cpu"], 2),
                   "final_loss_ema": None if s["loss"] is None else round(s["loss"], 4)} for name, s in state.items()}


def _predict(model, inputs, n, batch_size=128):
    import torch
    model.eval(); out = []
    with torch.no_grad():
        for i in range(0, n, batch_size):
            idx = torch.arange(i, min(n, i + batch_size))
            out.append(model(*inputs(idx, False, None)))
    return torch.cat(out) if out else torch.zeros(0)


# ----------------------------------------------------------------------------------------------- experiments
def _views_experiment(records, split, imgs, index, seconds, seed, min_positives, min_test_positives, progress, clock="wall",
                      epochs=None, max_epochs=40.0):
    import torch
    import torch.nn.functional as F
    rows = []
    for r in records:
        f, l = first_image(r, "frontal", index), first_image(r, "lateral", index)
        if f is not None and l is not None: rows.append((r, f, l, split[int(r["subject_id"])]))
    tr = [x for x in rows if x[3] == "train"]; te = [x for x in rows if x[3] == "eval"]
    res = {"views_n_train": len(tr), "views_n_test": len(te), "positives": {}, "skipped_observations": {}}
    def present(recs, o): return np.array([bool(x[0]["findings"].get(o, {}).get("present")) for x in recs])
    obs = []
    for o in OBSERVATIONS:
        ptr, pte = int(present(tr, o).sum()), int(present(te, o).sum())
        res["positives"][o] = {"train": ptr, "test": pte, "test_negatives": len(te) - pte}
        if ptr < min_positives or len(tr) - ptr < min_positives: res["skipped_observations"][o] = f"{ptr} positives / {len(tr) - ptr} negatives in train (< {min_positives})"
        elif pte < min_test_positives or len(te) - pte < min_test_positives: res["skipped_observations"][o] = f"{pte} positives / {len(te) - pte} negatives in test (< {min_test_positives})"
        else: obs.append(o)
    res["observations"] = obs
    res["auc_frontal"], res["auc_frontal_lateral"], res["auc_after_first_epoch"] = {}, {}, {}
    res["lateral_only"] = {}
    res["training"] = {}
    if not obs or len(tr) < 2 or not te:
        res["macro_auc_frontal"] = res["macro_auc_frontal_lateral"] = float("nan")
        res["macro_lateral_only_frontal"] = res["macro_lateral_only_frontal_lateral"] = float("nan")
        return res
    y_tr = torch.tensor(np.stack([present(tr, o) for o in obs], 1), dtype=torch.float32)
    y_te = np.stack([present(te, o) for o in obs], 1)
    fr_tr = imgs[[x[1] for x in tr]]; la_tr = imgs[[x[2] for x in tr]]
    fr_te = imgs[[x[1] for x in te]]; la_te = imgs[[x[2] for x in te]]
    models = []
    for name, n_in in (("frontal", 1), ("frontal_lateral", 2)):
        seed_everything(derive_seed(seed, "learnability", "views", "init"))   # the same initial trunk for both
        model = _build_model(n_in, len(obs), "concat")
        def inputs(idx, train, gen, n_in=n_in):
            fr, la = (fr_tr, la_tr) if train else (fr_te, la_te)
            xs = [_prepare(fr[idx], train, gen)]
            if n_in == 2: xs.append(_prepare(la[idx], train, gen))
            return xs
        models.append((name, model, inputs, lambda idx: y_tr[idx], F.binary_cross_entropy_with_logits))
    inputs_of = {name: inputs for name, _, inputs, *_ in models}
    def first(name, m):
        s = _predict(m, inputs_of[name], len(te)).numpy()
        res["auc_after_first_epoch"][name] = {o: roc_auc(y_te[:, j], s[:, j]) for j, o in enumerate(obs)}
    tr_res = train_lockstep("views", models, len(tr), seed, None if epochs else seconds, epochs, clock=clock, progress=progress,
                            after_first_epoch=first, max_epochs=max_epochs)
    scores = {}
    for name, model, inputs, *_ in models:
        res["training"][f"views/{name}"] = tr_res[name]
        scores[name] = _predict(model, inputs, len(te)).numpy()
    for j, o in enumerate(obs):
        res["auc_frontal"][o] = roc_auc(y_te[:, j], scores["frontal"][:, j])
        res["auc_frontal_lateral"][o] = roc_auc(y_te[:, j], scores["frontal_lateral"][:, j])
        lat_only = np.array([x[0]["findings"][o]["present"] and x[0]["findings"][o].get("views") == ["lateral"] for x in te])
        if lat_only.any():
            keep = lat_only | ~y_te[:, j]
            res["lateral_only"][o] = {"n_pos": int(lat_only.sum()), "n_neg": int((~y_te[:, j]).sum()),
                                      "auc_frontal": roc_auc(lat_only[keep], scores["frontal"][keep, j]),
                                      "auc_frontal_lateral": roc_auc(lat_only[keep], scores["frontal_lateral"][keep, j])}
            vis = y_te[:, j] & ~lat_only                   # the other positives: visible on the frontal view
            keep = vis | ~y_te[:, j]
            res["lateral_only"][o].update({"n_pos_frontal_visible": int(vis.sum()),
                                           "auc_frontal_visible_frontal": roc_auc(vis[keep], scores["frontal"][keep, j]),
                                           "auc_frontal_visible_frontal_lateral": roc_auc(vis[keep], scores["frontal_lateral"][keep, j])})
    res["macro_auc_frontal"] = _nanmean(res["auc_frontal"].values())
    res["macro_auc_frontal_lateral"] = _nanmean(res["auc_frontal_lateral"].values())
    res["macro_lateral_only_frontal"] = _nanmean([v["auc_frontal"] for v in res["lateral_only"].values()])
    res["macro_lateral_only_frontal_lateral"] = _nanmean([v["auc_frontal_lateral"] for v in res["lateral_only"].values()])
    # all lateral-only positives pooled (study, observation) against the same observations' negatives
    res["lateral_only_pooled"] = _pooled_lateral_only(te, obs, y_te, scores)
    return res


def _pooled_lateral_only(te, obs, y_te, scores):
    "AUC over every (study, observation) with a lateral-only positive vs every negative of those observations, per-observation scores ranked together."
    lo_obs = [j for j, o in enumerate(obs) if any(x[0]["findings"][o]["present"] and x[0]["findings"][o].get("views") == ["lateral"] for x in te)]
    if not lo_obs: return {"n_pos": 0, "auc_frontal": float("nan"), "auc_frontal_lateral": float("nan")}
    lab, sa, sb = [], [], []
    for j in lo_obs:
        o = obs[j]
        lat = np.array([x[0]["findings"][o]["present"] and x[0]["findings"][o].get("views") == ["lateral"] for x in te])
        keep = lat | ~y_te[:, j]
        # per-observation rank (0..1) so observations with different score scales can be pooled
        for s, dst in ((scores["frontal"][:, j], sa), (scores["frontal_lateral"][:, j], sb)):
            r = np.argsort(np.argsort(s)) / max(len(s) - 1, 1)
            dst.extend(r[keep].tolist())
        lab.extend(lat[keep].tolist())
    lab = np.array(lab)
    return {"n_pos": int(lab.sum()), "n_neg": int((~lab).sum()), "observations": [obs[j] for j in lo_obs],
            "auc_frontal": roc_auc(lab, sa), "auc_frontal_lateral": roc_auc(lab, sb)}


def _prior_experiment(records, split, imgs, index, seconds, seed, min_pairs, progress, clock="wall", epochs=None,
                      max_epochs=40.0, max_majority_fraction=0.85):
    import torch
    import torch.nn.functional as F
    by_id = {int(r["study_id"]): r for r in records}
    pairs, counts = change_targets(records)
    res = {"change_counts": counts, "change_classes": CHANGE_CLASSES, "training": {}, "max_majority_fraction": max_majority_fraction}
    obs_pairs = {}
    for sid, o, c in pairs: obs_pairs.setdefault(o, []).append((sid, c))
    # observations with too few training pairs, or whose training change classes are nearly all one class, are left out (reported)
    train_counts = {o: np.bincount([c for s, c in v if split[int(by_id[s]["subject_id"])] == "train"], minlength=len(CHANGE_CLASSES))
                    for o, v in obs_pairs.items()}
    res["change_skipped_observations"] = {}
    obs = []
    for o in OBSERVATIONS:
        if o not in obs_pairs: continue
        c = train_counts[o]; n = int(c.sum())
        if n < min_pairs: res["change_skipped_observations"][o] = f"{n} training pairs (< {min_pairs})"
        elif c.max() / n > max_majority_fraction:
            res["change_skipped_observations"][o] = (f"{c.max() / n:.0%} of its {n} training pairs are '{CHANGE_CLASSES[int(c.argmax())]}'"
                                                     f" (> {max_majority_fraction:.0%}: a majority guess, nothing to learn)")
        else: obs.append(o)
    res["change_observations"] = obs
    res["change_class_counts_train_per_observation"] = {o: {k: int(v) for k, v in zip(CHANGE_CLASSES, train_counts[o])} for o in obs_pairs}
    studies = {}                                           # study -> {obs column: class}
    no_image = 0
    for sid, o, c in pairs:
        if o not in obs: continue
        r = by_id[sid]; p = by_id[int(r["prior_study_id"])]
        cur, pri = first_image(r, "frontal", index), first_image(p, "frontal", index)
        if cur is None or pri is None: no_image += 1; continue
        studies.setdefault(sid, {"cur": cur, "pri": pri, "split": split[int(r["subject_id"])], "y": {}})["y"][obs.index(o)] = c
    res["change_counts"]["left_out_no_frontal_image"] = no_image
    rows_tr = [s for s in studies.values() if s["split"] == "train"]; rows_te = [s for s in studies.values() if s["split"] == "eval"]
    def target(rows):
        y = torch.full((len(rows), max(len(obs), 1)), -100, dtype=torch.long)
        for i, s in enumerate(rows):
            for j, c in s["y"].items(): y[i, j] = c
        return y
    y_tr, y_te = target(rows_tr), target(rows_te)
    res["prior_n_train_studies"], res["prior_n_test_studies"] = len(rows_tr), len(rows_te)
    res["prior_n_train_pairs"], res["prior_n_test_pairs"] = int((y_tr >= 0).sum()), int((y_te >= 0).sum())
    res["change_class_counts_train"] = {c: int((y_tr == k).sum()) for k, c in enumerate(CHANGE_CLASSES)}
    res["change_class_counts_test"] = {c: int((y_te == k).sum()) for k, c in enumerate(CHANGE_CLASSES)}
    nan = float("nan")
    for k in ("change_accuracy_without_prior", "change_accuracy_with_prior", "change_balanced_accuracy_without_prior",
              "change_balanced_accuracy_with_prior", "change_majority_baseline", "change_majority_balanced_accuracy",
              "change_observation_majority_baseline", "change_observation_majority_balanced_accuracy"):
        res[k] = nan
    res["change_per_observation"] = {}
    if not obs or len(rows_tr) < 2 or not rows_te or res["prior_n_test_pairs"] == 0: return res
    mask = (y_te >= 0).numpy()
    truth = y_te.numpy()[mask]
    majority = int(np.argmax([res["change_class_counts_train"][c] for c in CHANGE_CLASSES]))
    res["change_majority_class"] = CHANGE_CLASSES[majority]
    res["change_majority_baseline"] = float((truth == majority).mean())
    res["change_majority_balanced_accuracy"] = balanced_accuracy(truth, np.full_like(truth, majority))
    obs_major = np.array([int(np.argmax(train_counts[o])) for o in obs])                # each observation's own majority class
    guess = np.broadcast_to(obs_major, y_te.shape)[mask]
    res["change_observation_majority_baseline"] = float((guess == truth).mean())
    res["change_observation_majority_balanced_accuracy"] = balanced_accuracy(truth, guess)
    cur_tr = imgs[[s["cur"] for s in rows_tr]]; pri_tr = imgs[[s["pri"] for s in rows_tr]]
    cur_te = imgs[[s["cur"] for s in rows_te]]; pri_te = imgs[[s["pri"] for s in rows_te]]
    n_cls = len(CHANGE_CLASSES)
    def loss_fn(logits, y): return F.cross_entropy(logits.view(-1, n_cls), y.view(-1), ignore_index=-100)
    models = []
    for name, n_in, mode in (("without_prior", 1, "concat"), ("with_prior", 2, "diff")):
        seed_everything(derive_seed(seed, "learnability", "prior", "init"))
        model = _build_model(n_in, len(obs) * n_cls, mode)
        def inputs(idx, train, gen, n_in=n_in):
            cu, pr = (cur_tr, pri_tr) if train else (cur_te, pri_te)
            xs = [_prepare(cu[idx], train, gen)]
            if n_in == 2: xs.append(_prepare(pr[idx], train, gen))
            return xs
        models.append((name, model, inputs, lambda idx: y_tr[idx], loss_fn))
    tr_res = train_lockstep("prior", models, len(rows_tr), seed, None if epochs else seconds, epochs, clock=clock, progress=progress,
                            max_epochs=max_epochs)
    preds = {}
    for name, model, inputs, *_ in models:
        res["training"][f"prior/{name}"] = tr_res[name]
        logits = _predict(model, inputs, len(rows_te)).view(len(rows_te), len(obs), n_cls)
        preds[name] = logits.argmax(-1).numpy()
    for name in preds:
        p = preds[name][mask]
        res[f"change_accuracy_{name}"] = float((p == truth).mean())
        res[f"change_balanced_accuracy_{name}"] = balanced_accuracy(truth, p)
    yt = y_te.numpy()
    for j, o in enumerate(obs):
        m = mask[:, j]
        if not m.any(): continue
        t = yt[m, j]
        v = {"n_test": int(m.sum()), "test_class_counts": {c: int((t == k).sum()) for k, c in enumerate(CHANGE_CLASSES)},
             "majority_class": CHANGE_CLASSES[int(obs_major[j])], "majority_baseline": float((t == obs_major[j]).mean())}
        for name in preds:
            v[f"accuracy_{name}"] = float((preds[name][m, j] == t).mean())
            v[f"balanced_accuracy_{name}"] = balanced_accuracy(t, preds[name][m, j])
        res["change_per_observation"][o] = v
    return res


def _loadavg():
    try: import os; return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError): return None


def run_learnability(root, budget_seconds=120, size=128, seed=0, progress=True, min_positives=10, min_test_positives=5, min_change_pairs=10,
                     clock="wall", epochs=None, max_majority_fraction=0.85, views_share=0.5, max_epochs=40.0):
    """Train the four small CNNs on the phantom at `root` and return the results dict (see the module docstring);
    undefined values (an AUC without positives, an experiment without data) are None.
    Fairness: the two models of an experiment train side by side, a step of each on the same batch in turn
    (`train_lockstep`), so they always have the same epochs (passes over the same training studies, in the same
    order). All training (loading and evaluation not counted) fits `budget_seconds`: `views_share` of it for
    the views experiment, the rest (whatever the views left) for the prior experiment. `epochs` fixes the epochs
    of all four instead (then the budget is not used). `clock`: "wall" seconds or "cpu" (CPU seconds / 2 threads, for a machine other work shares).
    The training seconds actually used (wall and CPU) are reported."""
    import torch
    root = Path(root)
    if not root.is_dir(): raise InputError("phantom folder not found", where=root)
    if budget_seconds <= 0: raise InputError(f"budget_seconds={budget_seconds}", where="budget_seconds", expected="a positive number of seconds")
    if clock not in ("wall", "cpu"): raise InputError(f"clock={clock!r}", where="clock", expected="'wall' or 'cpu'")
    if int(size) < 32: raise InputError(f"size={size}", where="size", expected="at least 32 pixels")
    if epochs is not None and not epochs > 0: raise InputError(f"epochs={epochs}", where="epochs", expected="a positive number or None")
    if not 0 < views_share < 1: raise InputError(f"views_share={views_share}", where="views_share", expected="between 0 and 1")
    t_start = time.perf_counter()
    threads_before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        records = read_truth(root)
        split, split_info = split_patients(root, records, seed)
        t0 = time.perf_counter()
        imgs, index, missing = load_images(root, records, int(size), progress)
        load_s = time.perf_counter() - t0
        load_before = _loadavg()
        out = {"root": str(root), "budget_seconds": budget_seconds, "clock": clock, "size": int(size), "seed": int(seed),
               "torch_version": torch.__version__, "threads": torch.get_num_threads(), "split": split_info,
               "studies": len(records), "patients": len(split), "images_loaded": len(index), "images_missing": len(missing),
               "images_missing_examples": missing[:5], "load_seconds": round(load_s, 2)}
        now = _now(clock); t_views = now()
        v = _views_experiment(records, split, imgs, index, budget_seconds * views_share, seed, min_positives, min_test_positives,
                              progress, clock, epochs, max_epochs=max_epochs)
        used = sum(x["wall_seconds"] if clock == "wall" else x["cpu_seconds"] / out["threads"] for x in v["training"].values())
        p = _prior_experiment(records, split, imgs, index, max(budget_seconds - used, 1e-3), seed, min_change_pairs, progress, clock, epochs,
                              max_epochs=max_epochs, max_majority_fraction=max_majority_fraction)
        training = {**v.pop("training"), **p.pop("training")}
        out.update(v); out.update(p); out["training"] = training
        out["training_wall_seconds"] = round(sum(x["wall_seconds"] for x in training.values()), 2)
        out["training_cpu_seconds"] = round(sum(x["cpu_seconds"] for x in training.values()), 2)
        out["views_epochs"] = (training.get("views/frontal") or {}).get("epochs")
        out["prior_epochs"] = (training.get("prior/without_prior") or {}).get("epochs")
        out["wall_seconds"] = round(time.perf_counter() - t_start, 2)
        out["load_average_1min"] = {"before": load_before, "after": _loadavg()}   # > 2 means the 2 cores were shared
        return _json_safe(out)                             # None (not NaN) where a value is undefined
    finally:
        torch.set_num_threads(threads_before)


# ----------------------------------------------------------------------------------------------- report
def _json_safe(x):
    "NaN -> None, recursively (JSON has no NaN)."
    if isinstance(x, dict): return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)): return [_json_safe(v) for v in x]
    if isinstance(x, float) and math.isnan(x): return None
    return x


def _nan_from_none(x):
    if isinstance(x, dict): return {k: _nan_from_none(v) for k, v in x.items()}
    if isinstance(x, list): return [_nan_from_none(v) for v in x]
    return float("nan") if x is None else x


def _f(x): return "  n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


def _plan_text(res, keys):
    t = [res["training"][k] for k in keys if k in res.get("training", {})]
    if not t: return "not trained"
    return f"{t[0]['epochs']:g} epochs each ({t[0]['steps']} steps of {t[0].get('batch_size', 32)}, trained side by side)"


def format_table(res):
    "A readable text summary of `run_learnability`'s results."
    L = [f"phantom learnability: {res['root']}  ({res['patients']} patients, {res['studies']} studies, {res['images_loaded']} images"
         f" at {res['size']} px, loaded in {res['load_seconds']} s; split: {res['split']['source']})",
         f"budget {res['budget_seconds']} s of training in all ({res.get('clock', 'wall')} clock; used {res.get('training_wall_seconds')} s wall, "
         f"{res.get('training_cpu_seconds')} s CPU), torch {res['torch_version']}, {res['threads']} threads, seed {res['seed']}", ""]
    L.append(f"1. views: {res['views_n_train']} train / {res['views_n_test']} test studies with a frontal and a lateral image;"
             f" both models {_plan_text(res, ['views/frontal', 'views/frontal_lateral'])}")
    L.append(f"   {'observation':<28}{'pos tr/te':>11}{'frontal':>9}{'fr+lat':>9}{'lat-only n':>11}{'lo fr':>8}{'lo fr+lat':>10}")
    for o in res["observations"]:
        lo = res["lateral_only"].get(o, {}); pz = res["positives"][o]
        L.append(f"   {o:<28}{pz['train']:>5}/{pz['test']:<5}{_f(res['auc_frontal'][o]):>9}{_f(res['auc_frontal_lateral'][o]):>9}"
                 f"{lo.get('n_pos', ''):>11}{_f(lo.get('auc_frontal')) if lo else '':>8}{_f(lo.get('auc_frontal_lateral')) if lo else '':>10}")
    L.append(f"   {'macro':<39}{_f(res['macro_auc_frontal']):>9}{_f(res['macro_auc_frontal_lateral']):>9}{'':>11}"
             f"{_f(res['macro_lateral_only_frontal']):>8}{_f(res['macro_lateral_only_frontal_lateral']):>10}")
    lp = res.get("lateral_only_pooled") or {}
    if lp.get("n_pos"):
        L.append(f"   {'lateral-only pooled':<28}{lp['n_pos']:>5} (study, observation) positives vs {lp['n_neg']} negatives:"
                 f" frontal {_f(lp['auc_frontal'])}, frontal + lateral {_f(lp['auc_frontal_lateral'])}")
    for name, a in (res.get("auc_after_first_epoch") or {}).items():
        L.append(f"   after 1 epoch, {name}: macro AUC {_f(_nanmean(list(_nan_from_none(a).values())))}, max {_f(max([x for x in a.values() if x is not None], default=None))}")
    for o, why in res["skipped_observations"].items(): L.append(f"   skipped {o}: {why}")
    L.append("")
    L.append(f"2. prior: {res.get('prior_n_train_pairs', 0)} train / {res.get('prior_n_test_pairs', 0)} test (study, observation) pairs"
             f" ({res.get('prior_n_train_studies', 0)} / {res.get('prior_n_test_studies', 0)} studies); classes {', '.join(CHANGE_CLASSES)};"
             f" both models {_plan_text(res, ['prior/without_prior', 'prior/with_prior'])}")
    L.append(f"   test class counts {res.get('change_class_counts_test')}; left out: {res['change_counts']}")
    L.append(f"   {'':<34}{'accuracy':>10}{'balanced':>10}")
    L.append(f"   {'majority (' + str(res.get('change_majority_class', '-')) + ')':<34}{_f(res['change_majority_baseline']):>10}{_f(res['change_majority_balanced_accuracy']):>10}")
    L.append(f"   {'majority per observation':<34}{_f(res.get('change_observation_majority_baseline')):>10}{_f(res.get('change_observation_majority_balanced_accuracy')):>10}")
    L.append(f"   {'current image only':<34}{_f(res['change_accuracy_without_prior']):>10}{_f(res['change_balanced_accuracy_without_prior']):>10}")
    L.append(f"   {'current + prior image':<34}{_f(res['change_accuracy_with_prior']):>10}{_f(res['change_balanced_accuracy_with_prior']):>10}")
    L.append(f"     {'per observation':<26}{'n':>5}{'majority':>10}{'acc w/o':>9}{'acc with':>9}{'bal w/o':>9}{'bal with':>9}")
    for o, v in res["change_per_observation"].items():
        L.append(f"     {o:<26}{v['n_test']:>5}{_f(v['majority_baseline']):>10}{_f(v['accuracy_without_prior']):>9}{_f(v['accuracy_with_prior']):>9}"
                 f"{_f(v.get('balanced_accuracy_without_prior')):>9}{_f(v.get('balanced_accuracy_with_prior')):>9}")
    for o, why in res.get("change_skipped_observations", {}).items(): L.append(f"   excluded {o}: {why}")
    L.append("")
    L.append("training: " + "; ".join(f"{k} {v['epochs']} epochs / {v['steps']} steps in {v['wall_seconds']} s wall, {v['cpu_seconds']} s CPU" for k, v in res["training"].items()))
    la = res.get("load_average_1min", {})
    L.append(f"wall time {res['wall_seconds']} s; 1-minute load average {la.get('before')} before, {la.get('after')} after (above 2: the cores were shared, fewer steps fit the budget)")
    return "\n".join(L)


def plot_learnability(results):
    "Left: AUC per observation, frontal vs frontal + lateral (lateral-only subsets shaded); right: change accuracy without vs with the prior."
    import matplotlib.pyplot as plt
    res = _nan_from_none(results)                          # works on the dict and on its JSON (None for NaN) alike
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(14, 4.8), gridspec_kw={"width_ratios": [3.2, 1]})
    names, a, b, lat = [], [], [], []
    for o in res["observations"]:
        names.append(o); a.append(res["auc_frontal"][o]); b.append(res["auc_frontal_lateral"][o]); lat.append(False)
    for o, v in res["lateral_only"].items():
        names.append(f"{o}\n(lateral-only, n={v['n_pos']})"); a.append(v["auc_frontal"]); b.append(v["auc_frontal_lateral"]); lat.append(True)
    x = np.arange(len(names)); w = 0.38
    for i, l in enumerate(lat):
        if l: ax.axvspan(i - 0.5, i + 0.5, color="gold", alpha=0.25, lw=0)
    ax.bar(x - w / 2, np.nan_to_num(a), w, label="frontal only", color="tab:blue")
    ax.bar(x + w / 2, np.nan_to_num(b), w, label="frontal + lateral", color="tab:orange")
    ax.axhline(0.5, color="grey", ls="--", lw=1, label="chance (0.5)")
    ax.set_xticks(x); ax.set_xticklabels(names, rotation=40, ha="right", fontsize=8)
    ax.set_ylim(0, 1.05); ax.set_ylabel("ROC AUC (held-out patients)")
    ax.set_title(f"Findings: macro AUC {_f(res['macro_auc_frontal'])} frontal vs {_f(res['macro_auc_frontal_lateral'])} frontal + lateral"
                 + ("\nshaded: positives visible only on the lateral view vs all negatives" if any(lat) else ""), fontsize=10)
    if not names: ax.text(0.5, 0.5, "no observation with enough positives\n(see skipped_observations)", ha="center", va="center", transform=ax.transAxes)
    ax.legend(fontsize=8, loc="lower left")
    labels = ["accuracy", "balanced\naccuracy"]
    wo = [res["change_accuracy_without_prior"], res["change_balanced_accuracy_without_prior"]]
    wi = [res["change_accuracy_with_prior"], res["change_balanced_accuracy_with_prior"]]
    x2 = np.arange(2)
    ax2.bar(x2 - w / 2, np.nan_to_num(wo), w, label="current only", color="tab:blue")
    ax2.bar(x2 + w / 2, np.nan_to_num(wi), w, label="current + prior", color="tab:orange")
    base = [res["change_majority_baseline"], res["change_majority_balanced_accuracy"]]
    for i, v in enumerate(base):
        if not math.isnan(v): ax2.hlines(v, i - 0.45, i + 0.45, colors="k", linestyles="--", label="majority class" if i == 0 else None)
    ax2.set_xticks(x2); ax2.set_xticklabels(labels); ax2.set_ylim(0, 1.05)
    ax2.set_title(f"Change since prior ({res.get('prior_n_test_pairs', 0)} test pairs,\n{len(CHANGE_CLASSES)} classes)", fontsize=10)
    ax2.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return fig


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", required=True, help="a phantom folder (written by `mlrg phantom`)")
    ap.add_argument("--budget-seconds", type=float, default=120, help="training time of all four models together")
    ap.add_argument("--size", type=int, default=128, help="images are downsampled to size x size")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--min-positives", type=int, default=10, help="an observation needs this many positives and negatives in train")
    ap.add_argument("--min-test-positives", type=int, default=5, help="... and this many in test")
    ap.add_argument("--out", default="benchmarks/results/phantom_learnability.json")
    ap.add_argument("--figure", default=None, help="PNG path of the figure (default: next to --out)")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="budget in wall seconds, or in CPU seconds / 2 threads (the same compute on a busy machine)")
    ap.add_argument("--epochs", type=float, default=None, help="fixed epochs for all four models (default: as many as fit the budget; always equal within an experiment)")
    ap.add_argument("--max-majority-fraction", type=float, default=0.85,
                    help="change task: leave out observations whose most frequent training change class exceeds this fraction")
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)
    try:
        res = run_learnability(a.root, a.budget_seconds, a.size, a.seed, progress=not a.no_progress,
                               min_positives=a.min_positives, min_test_positives=a.min_test_positives, clock=a.clock,
                               epochs=a.epochs, max_majority_fraction=a.max_majority_fraction)
    except InputError as e:
        print(f"phantom_learnability: error: {e}", file=sys.stderr); return 2
    print(format_table(res))
    save_json(_json_safe(res), a.out)
    import matplotlib
    matplotlib.use("Agg")                                  # a script, not a notebook: write the PNG only
    fig = plot_learnability(res)
    png = Path(a.figure or Path(a.out).with_suffix(".png"))
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    print(f"saved {a.out} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Tests of mlrg.learnability that need no (or hardly any) training: the AUC, the change targets, the split, the truth
reader, lockstep training."""

import itertools
import json
import math

import numpy as np
import pytest

import mlrg.learnability as pl
from mlrg.core import InputError
from mlrg.metrics import balanced_accuracy, roc_auc


def _pairwise_auc(y, s):
    "AUC the slow way: over every (positive, negative) pair, a win counts 1 and a tie 1/2."
    pos = [b for a, b in zip(y, s) if a]
    neg = [b for a, b in zip(y, s) if not a]
    return sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg)) / (len(pos) * len(neg))


def test_auc_hand_computed_cases():
    assert roc_auc([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]) == 1.0
    assert roc_auc([1, 1, 0, 0], [0.1, 0.2, 0.3, 0.4]) == 0.0
    # pairs (pos, neg): (.35,.1) win, (.35,.4) loss, (.8,.1) win, (.8,.4) win -> 3/4
    assert roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
    # ties: (.5 vs .5) counts 1/2, (.5 vs .2) 1, (.9 vs .5) 1, (.9 vs .2) 1 -> 3.5/4
    assert roc_auc([0, 1, 0, 1], [0.5, 0.5, 0.2, 0.9]) == pytest.approx(0.875)
    assert roc_auc([0, 1, 0, 1, 1], [3, 3, 3, 3, 3]) == pytest.approx(0.5)  # all tied
    assert roc_auc(np.array([True, False, True]), np.array([2.0, 1.0, 1.0])) == pytest.approx(0.75)


def test_auc_matches_pairwise_count_with_many_ties():
    rng = np.random.default_rng(0)
    for _ in range(20):
        y = rng.random(40) < 0.3
        y[0], y[1] = True, False
        s = np.round(rng.normal(size=40) + y, 1)  # rounding makes ties
        assert roc_auc(y, s) == pytest.approx(_pairwise_auc(y, s))


def test_auc_undefined_without_both_classes_and_shape_checked():
    assert math.isnan(roc_auc([1, 1, 1], [0.1, 0.2, 0.3]))
    assert math.isnan(roc_auc([0, 0], [0.1, 0.2]))
    with pytest.raises(InputError):
        roc_auc([0, 1, 1], [0.1, 0.2])


def test_balanced_accuracy():
    # class 0 recall 2/3, class 2 recall 1/1 -> 5/6 (class 1 absent from the truth: not averaged)
    assert balanced_accuracy([0, 0, 0, 2], [0, 0, 1, 2]) == pytest.approx(5 / 6)
    assert balanced_accuracy([1, 1, 0], [1, 1, 1]) == pytest.approx(0.5)


def _finding(grade, views=("frontal", "lateral")):
    return {"present": grade > 0, "grade": grade, "side": None, "severity": None, "views": list(views) if grade else []}


def _record(subject, study, prior, findings, change, order=0):
    f = {o: _finding(0) for o in pl.OBSERVATIONS}
    f.update(findings)
    return {
        "subject_id": subject,
        "study_id": study,
        "study_order": order,
        "prior_study_id": prior,
        "study_date": 21000101 + order,
        "study_time": 0.0,
        "images": [{"dicom_id": f"d{study}", "view": "PA", "projection": "frontal"}],
        "findings": f,
        "devices": {},
        "change": change,
        "has_findings_section": True,
    }


def test_change_targets_classes_and_exclusions():
    records = [
        _record(10000001, 50000001, None, {"Edema": _finding(1), "Pleural Effusion": _finding(2, ["lateral"])}, {}),
        _record(
            10000001,
            50000002,
            50000001,
            {"Edema": _finding(3), "Cardiomegaly": _finding(1), "Pleural Effusion": _finding(1)},
            {"Edema": "worse", "Cardiomegaly": "new", "Pleural Effusion": "better", "No Finding": "unchanged"},
            order=1,
        ),
        _record(
            10000001,
            50000003,
            50000002,
            {"Edema": _finding(3), "Lung Lesion": _finding(1, ["lateral"])},
            {"Edema": "unchanged", "Cardiomegaly": "resolved", "Pleural Effusion": "resolved", "Lung Lesion": "new"},
            order=2,
        ),
        _record(10000002, 50000004, 59999999, {"Edema": _finding(1)}, {"Edema": "new"}),  # prior not in the records
    ]
    pairs, counts = pl.change_targets(records)
    assert sorted(pairs) == sorted(
        [
            (50000002, "Edema", 0),
            (50000002, "Cardiomegaly", 0),
            (50000003, "Edema", 1),
            (50000003, "Cardiomegaly", 2),
            (50000003, "Pleural Effusion", 2),
        ]
    )
    # Pleural Effusion in 50000002 (prior was lateral-only) and Lung Lesion in 50000003 (lateral-only) are left out
    assert counts == {
        "studies_with_prior": 2,
        "pairs": 5,
        "left_out_not_frontal_visible": 2,
        "left_out_unknown_change": 0,
    }
    pairs_all, counts_all = pl.change_targets(records, require_frontal_visible=False)
    assert len(pairs_all) == 7 and counts_all["left_out_not_frontal_visible"] == 0
    assert (50000002, "Pleural Effusion", 2) in pairs_all and (50000003, "Lung Lesion", 0) in pairs_all
    only = pl.change_targets(records, observations=["Edema"])[0]
    assert sorted(only) == [(50000002, "Edema", 0), (50000003, "Edema", 1)]


def test_change_targets_counts_unknown_change_words():
    records = [_record(1, 1, None, {}, {}), _record(1, 2, 1, {"Edema": _finding(1)}, {"Edema": "much bigger"}, order=1)]
    pairs, counts = pl.change_targets(records)
    assert pairs == [] and counts["left_out_unknown_change"] == 1


def _write_split(root, rows):
    (root / pl.SPLIT_FILE).write_text(
        "dicom_id,study_id,subject_id,split\n"
        + "".join(f"d{i},{50000000 + i},{s},{sp}\n" for i, (s, sp) in enumerate(rows))
    )


def test_split_uses_official_split_when_it_has_enough_eval_patients(tmp_path):
    subjects = list(range(10000000, 10000040))
    records = [_record(s, 50000000 + i, None, {}, {}) for i, s in enumerate(subjects)]
    _write_split(tmp_path, [(s, "test" if i % 2 else "train") for i, s in enumerate(subjects)])
    mapping, info = pl.split_patients(tmp_path, records, seed=0, min_eval_patients=5)
    assert info["source"].startswith("official") and info["eval_patients"] == 20
    assert all(mapping[s] == ("eval" if i % 2 else "train") for i, s in enumerate(subjects))


def test_split_falls_back_to_a_seeded_patient_split(tmp_path):
    subjects = list(range(10000000, 10000040))
    records = [_record(s, 50000000 + i, None, {}, {}) for i, s in enumerate(subjects)]
    _write_split(tmp_path, [(s, "validate" if i == 0 else "train") for i, s in enumerate(subjects)])
    m1, info = pl.split_patients(tmp_path, records, seed=3)
    m2, _ = pl.split_patients(tmp_path, records, seed=3)
    m3, _ = pl.split_patients(tmp_path, records, seed=4)
    assert info["source"].startswith("seeded") and "only 1 of 40" in info["source"]
    assert m1 == m2 and m1 != m3
    assert sum(v == "eval" for v in m1.values()) == 12 == info["eval_patients"]


def test_read_truth_names_the_bad_line(tmp_path):
    good = json.dumps(_record(1, 2, None, {}, {}))
    (tmp_path / pl.TRUTH_FILE).write_text(good + "\n{not json\n")
    with pytest.raises(InputError, match="line 2"):
        pl.read_truth(tmp_path)
    (tmp_path / pl.TRUTH_FILE).write_text(good + "\n" + json.dumps({"subject_id": 1}) + "\n")
    with pytest.raises(InputError, match=r"line 2.*missing keys"):
        pl.read_truth(tmp_path)
    with pytest.raises(InputError, match="not found"):
        pl.read_truth(tmp_path / "nowhere")


def test_image_path_follows_mimic_layout():
    p = pl.image_path("/data", 10046166, 50051329, "02aa804e-bde0afdd-112c0b34-7bc16630-4e384014")
    assert p.as_posix() == "/data/files/p10/p10046166/s50051329/02aa804e-bde0afdd-112c0b34-7bc16630-4e384014.jpg"


def _tiny_models(n_out=2):
    import torch
    import torch.nn.functional as F

    x = torch.randint(0, 255, (40, 32, 32), dtype=torch.uint8)
    y = (torch.arange(40) % 2).float().unsqueeze(1).repeat(1, n_out)
    models = []
    for name, n_in in (("one", 1), ("two", 2)):
        torch.manual_seed(0)
        m = pl._build_model(n_in, n_out, "concat", width=4)

        def inputs(idx, train, gen, n_in=n_in):
            return [pl._prepare(x[idx], train, gen) for _ in range(n_in)]

        models.append((name, m, inputs, lambda idx: y[idx], F.binary_cross_entropy_with_logits))
    return models


def test_lockstep_training_gives_equal_epochs():
    "Two models of different cost trained side by side have the same steps and epochs, by epochs or by a time budget."
    res = pl.train_lockstep("t", _tiny_models(), 40, seed=0, epochs=2.4, batch_size=8, progress=False)
    assert res["one"]["steps"] == res["two"]["steps"] == 12 and res["one"]["epochs"] == res["two"]["epochs"] == 2.4
    assert res["two"]["cpu_seconds"] > 0 and res["one"]["wall_seconds"] > 0
    res = pl.train_lockstep("t", _tiny_models(), 40, seed=0, seconds=0.5, batch_size=8, progress=False, max_epochs=3)
    assert res["one"]["steps"] == res["two"]["steps"] >= 1 and res["one"]["epochs"] <= 3
    with pytest.raises(InputError):
        pl.train_lockstep("t", _tiny_models(), 40, seed=0, progress=False)


def test_prior_experiment_excludes_one_class_observations_and_reports_baselines():
    """An observation whose change is nearly always 'unchanged' is left out (and said why); per-observation results and
    baselines are reported."""
    import torch

    records, split, k = [], {}, 0
    for s in range(24):
        subj = 10000000 + s
        split[subj] = "eval" if s % 4 == 0 else "train"
        for order in range(3):
            sid = 50000000 + 10 * s + order
            g = [0, 1, 2, 1, 0, 2][(s + order) % 6]
            f = {"Edema": _finding(g), "Cardiomegaly": _finding(2)}
            ch = {}
            if order:
                pg = records[-1]["findings"]["Edema"]["grade"]
                if pg or g:
                    ch["Edema"] = (
                        "new"
                        if pg == 0
                        else "resolved"
                        if g == 0
                        else "worse"
                        if g > pg
                        else "better"
                        if g < pg
                        else "unchanged"
                    )
                ch["Cardiomegaly"] = "unchanged"
            r = _record(subj, sid, records[-1]["study_id"] if order else None, f, ch, order=order)
            r["images"] = [{"dicom_id": f"d{k}", "view": "PA", "projection": "frontal"}]
            k += 1
            records.append(r)
    imgs = torch.randint(0, 255, (k, 32, 32), dtype=torch.uint8)
    index = {f"d{i}": i for i in range(k)}
    res = pl._prior_experiment(records, split, imgs, index, None, seed=0, min_pairs=5, progress=False, epochs=1)
    assert res["change_observations"] == ["Edema"]
    assert (
        "Cardiomegaly" in res["change_skipped_observations"]
        and "unchanged" in res["change_skipped_observations"]["Cardiomegaly"]
    )
    v = res["change_per_observation"]["Edema"]
    assert v["n_test"] == res["prior_n_test_pairs"] > 0 and sum(v["test_class_counts"].values()) == v["n_test"]
    for key in ("accuracy_without_prior", "accuracy_with_prior", "balanced_accuracy_with_prior", "majority_baseline"):
        assert 0 <= v[key] <= 1
    assert res["training"]["prior/with_prior"]["epochs"] == res["training"]["prior/without_prior"]["epochs"] == 1.0
    present = sum(c > 0 for c in res["change_class_counts_test"].values())
    assert present >= 2 and res["change_majority_balanced_accuracy"] == pytest.approx(
        1 / present
    )  # a constant guess: one class right


def test_benchmark_script_is_a_thin_command_line(tmp_path):
    """benchmarks/phantom_learnability.py keeps its command line; a missing phantom folder is an error naming it (exit
    2)."""
    import os, subprocess, sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "phantom_learnability.py"
    # mlrg.core.seed_everything (run by earlier tests) leaves PYTHONHASHSEED at a 63-bit seed, which a new Python
    # refuses
    env = {k: v for k, v in os.environ.items() if k != "PYTHONHASHSEED"}
    r = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, env=env)
    assert r.returncode == 0 and all(
        f in r.stdout for f in ("--root", "--budget-seconds", "--size", "--seed", "--out")
    ), r.stderr
    r = subprocess.run(
        [sys.executable, str(script), "--root", str(tmp_path / "nowhere"), "--out", str(tmp_path / "r.json")],
        capture_output=True,
        text=True,
        env=env,
    )
    assert r.returncode == 2 and "not found" in r.stderr and not (tmp_path / "r.json").exists(), r.stderr

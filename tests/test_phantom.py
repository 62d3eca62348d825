"""Tests of mlrg.phantom: the MIMIC-CXR-shaped synthetic dataset (layout, determinism, longitudinal and multi-view
truth)."""

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mlrg.core import InputError
from mlrg.runs import main
from mlrg.phantom import (
    CHANGES,
    METADATA_COLUMNS,
    OBSERVATIONS,
    STATED,
    compose_report,
    phantom_cli,
    write_phantom,
    write_report,
)

N, SIZE = 160, 48


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    "A moderate dataset written with 2 workers, the same with 1 worker, and one with another seed."
    base = tmp_path_factory.mktemp("phantom")
    a, b, c = base / "a", base / "b", base / "c"
    write_phantom(a, patients=N, seed=7, size=SIZE, workers=2, progress=False)
    write_phantom(b, patients=N, seed=7, size=SIZE, workers=1, progress=False)
    write_phantom(c, patients=20, seed=8, size=SIZE, workers=1, progress=False)
    return a, b, c


def rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def truth(root):
    return [json.loads(l) for l in open(root / "phantom-truth.jsonl")]


def study_dir(root, subject, study):
    return root / "files" / f"p{str(subject)[:2]}" / f"p{subject}" / f"s{study}"


def report(root, r):
    return (study_dir(root, r["subject_id"], r["study_id"]).parent / f"s{r['study_id']}.txt").read_text()


def all_files(root):
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in root.rglob("*")
        if p.is_file() and p.name != "phantom-info.json"
    }


def test_layout_and_metadata_columns(ds):
    a = ds[0]
    for name in [
        "mimic-cxr-2.0.0-metadata.csv",
        "mimic-cxr-2.0.0-split.csv",
        "mimic-cxr-2.0.0-chexpert.csv",
        "phantom-truth.jsonl",
        "phantom-info.json",
    ]:
        assert (a / name).exists(), name
    meta = rows(a / "mimic-cxr-2.0.0-metadata.csv")
    assert list(meta[0]) == METADATA_COLUMNS
    T = truth(a)
    assert len(meta) == sum(len(r["images"]) for r in T)
    for m in meta:
        assert 10_000_000 <= int(m["subject_id"]) <= 19_999_999 and 50_000_000 <= int(m["study_id"]) <= 59_999_999
        assert re.fullmatch(r"[0-9a-f]{8}(-[0-9a-f]{8}){4}", m["dicom_id"])
        assert (study_dir(a, m["subject_id"], m["study_id"]) / f"{m['dicom_id']}.jpg").exists()
        assert len(m["StudyDate"]) == 8 and float(m["StudyTime"]) < 240000
        assert m["PerformedProcedureStepDescription"].startswith("CHEST")
    for r in T:
        assert (study_dir(a, r["subject_id"], r["study_id"]).parent / f"s{r['study_id']}.txt").exists()
    info = json.loads((a / "phantom-info.json").read_text())
    assert (
        info["counts"]["images"] == len(meta)
        and info["counts"]["studies"] == len(T)
        and info["parameters"]["seed"] == 7
    )
    chex = rows(a / "mimic-cxr-2.0.0-chexpert.csv")
    assert list(chex[0]) == ["subject_id", "study_id", *OBSERVATIONS] and len(chex) == len(T)
    assert {v for c in chex for o in OBSERVATIONS for v in [c[o]]} <= {"", "1.0", "0.0", "-1.0"}
    split = rows(a / "mimic-cxr-2.0.0-split.csv")
    assert list(split[0]) == ["dicom_id", "study_id", "subject_id", "split"]
    per_subject = {}
    for s in split:
        per_subject.setdefault(s["subject_id"], set()).add(s["split"])
    assert all(len(v) == 1 for v in per_subject.values())  # split by patient
    assert {s["split"] for s in split} == {"train", "validate", "test"}


def test_rows_columns_match_jpeg(ds):
    a = ds[0]
    for m in rows(a / "mimic-cxr-2.0.0-metadata.csv")[:200]:
        im = Image.open(study_dir(a, m["subject_id"], m["study_id"]) / f"{m['dicom_id']}.jpg")
        assert im.mode == "L" and im.size == (int(m["Columns"]), int(m["Rows"])) == (SIZE, SIZE)


def test_deterministic_whatever_the_workers(ds):
    a, b, c = ds
    fa, fb = all_files(a), all_files(b)
    assert fa.keys() == fb.keys() and all(fa[k] == fb[k] for k in fa)
    ia, ib = (json.loads((x / "phantom-info.json").read_text()) for x in (a, b))
    assert ia["counts"] == ib["counts"] and ia["parameters"] == ib["parameters"]


def test_same_seed_twice_identical(tmp_path):
    write_phantom(tmp_path / "x", patients=6, seed=3, size=40, progress=False)
    write_phantom(tmp_path / "y", patients=6, seed=3, size=40, progress=False)
    assert all_files(tmp_path / "x") == all_files(tmp_path / "y")


def test_different_seed_differs(ds):
    a, _, c = ds
    ta, tc = truth(a), truth(c)
    assert {r["subject_id"] for r in ta[:20]} != {r["subject_id"] for r in tc}
    assert (c / "mimic-cxr-2.0.0-chexpert.csv").read_bytes() != (a / "mimic-cxr-2.0.0-chexpert.csv").read_bytes()


def test_longitudinal_structure(ds):
    T = truth(ds[0])
    by_pat = {}
    for r in T:
        by_pat.setdefault(r["subject_id"], []).append(r)
    counts = [len(v) for v in by_pat.values()]
    assert min(counts) == 1 and 5 <= max(counts) <= 8 and len(by_pat) == N
    same_day = ties = unsorted = 0
    for recs in by_pat.values():
        assert [r["study_order"] for r in recs] == list(range(len(recs)))
        assert recs[0]["prior_study_id"] is None and recs[0]["change"] == {}
        for p, r in zip(recs, recs[1:]):
            assert r["prior_study_id"] == p["study_id"]
            assert (r["study_date"], r["study_time"]) >= (p["study_date"], p["study_time"])
            same_day += r["study_date"] == p["study_date"]
            ties += (r["study_date"], r["study_time"]) == (p["study_date"], p["study_time"])
        ids = [r["study_id"] for r in recs]
        unsorted += ids != sorted(ids)
    assert same_day >= 5 and ties >= 1 and unsorted >= 5


def test_views(ds):
    a = ds[0]
    with open(a / "mimic-cxr-2.0.0-metadata.csv") as f:
        vp = [r["ViewPosition"] for r in csv.DictReader(f)]
    assert {"PA", "AP", "LATERAL", ""} <= set(vp)
    T = truth(a)
    n_img = [len(r["images"]) for r in T]
    assert min(n_img) == 1 and max(n_img) == 3
    for r in T:
        for im in r["images"]:
            assert im["projection"] == (
                "lateral"
                if im["view"] in ("LATERAL", "LL")
                else "frontal"
                if im["view"] in ("PA", "AP")
                else im["projection"]
            )
    assert any(im["view"] == "" for r in T for im in r["images"])


def test_reports_headers_and_missing_findings(ds):
    a = ds[0]
    T = truth(a)
    without = 0
    for r in T:
        txt = report(a, r)
        for h in ("EXAMINATION:", "INDICATION:", "COMPARISON:", "IMPRESSION:"):
            assert h in txt
        assert ("FINDINGS:" in txt) == r["has_findings_section"]
        without += not r["has_findings_section"]
        assert ("COMPARISON:  None." in txt) == (r["prior_study_id"] is None)
    assert 1 <= without <= 0.12 * len(T)


def test_change_matches_grades(ds):
    T = truth(ds[0])
    by_id = {r["study_id"]: r for r in T}
    n = 0
    for r in T:
        if r["prior_study_id"] is None:
            continue
        p = by_id[r["prior_study_id"]]
        for o in OBSERVATIONS:
            if o == "No Finding":
                assert o not in r["change"]
                continue
            g0, g1 = p["findings"][o]["grade"], r["findings"][o]["grade"]
            exp = (
                None
                if g0 == g1 == 0
                else "new"
                if g0 == 0
                else "resolved"
                if g1 == 0
                else "worse"
                if g1 > g0
                else "better"
                if g1 < g0
                else "unchanged"
            )
            assert r["change"].get(o) == exp, (r["study_id"], o)
            n += exp is not None
    assert n > 50
    assert set(c for r in T for c in r["change"].values()) == set(CHANGES)


WORDS = {
    "new": ("new", "development"),
    "worse": ("increase", "worsen"),
    "better": ("decrease", "improv"),
    "unchanged": ("unchanged", "stable", "persistent"),
    "resolved": ("resol", "no longer"),
}


def test_change_phrases_in_reports(ds):
    a = ds[0]
    T = truth(a)
    by_id = {r["study_id"]: r for r in T}
    checked = 0
    for r in T:
        if r["prior_study_id"] is None:
            continue
        txt = " ".join(report(a, r).lower().split())
        proj = {im["projection"] for im in r["images"]}
        pproj = {im["projection"] for im in by_id[r["prior_study_id"]]["images"]}
        for o, c in r["change"].items():
            if o not in STATED:
                continue
            f = r["findings"][o] if c != "resolved" else by_id[r["prior_study_id"]]["findings"][o]
            if not set(f["views"]) & (proj if c != "resolved" else pproj):
                continue  # not visible: not reported
            assert any(w in txt for w in WORDS[c]), (r["study_id"], o, c, txt)
            checked += 1
    assert checked > 30
    removal = [r for r in T if r["prior_study_id"] and r["change"].get("Support Devices") == "resolved"]
    assert removal and all("remov" in report(a, r).lower() for r in removal)


def test_lateral_only_findings(ds):
    T = truth(ds[0])
    lat = [(r, o) for r in T for o, f in r["findings"].items() if f["present"] and f["views"] == ["lateral"]]
    assert len(lat) >= 5
    assert {o for _, o in lat} >= {"Pleural Effusion"}
    for r in T:
        f = r["findings"]["Pleural Effusion"]
        if f["present"]:
            assert (f["views"] == ["lateral"]) == (f["grade"] == 1)
        assert f["present"] == (f["grade"] > 0)


def test_chexpert_agrees_with_truth(ds):
    a = ds[0]
    chex = {int(c["study_id"]): c for c in rows(a / "mimic-cxr-2.0.0-chexpert.csv")}
    T = truth(a)
    clear_pos = 0
    for r in T:
        c, proj = chex[r["study_id"]], {im["projection"] for im in r["images"]}
        for o in ["Pleural Effusion", "Pneumothorax", "Cardiomegaly", "Edema", "Consolidation", "Atelectasis"]:
            f = r["findings"][o]
            if f["present"] and f["grade"] >= 2 and set(f["views"]) & proj:
                assert c[o] == "1.0", (r["study_id"], o)
                clear_pos += 1
            if c[o] == "1.0":
                assert f["present"], (r["study_id"], o)
            if not f["present"] and r["change"].get(o) != "resolved":
                assert c[o] in ("", "0.0")
        assert (c["Support Devices"] == "1.0") == r["findings"]["Support Devices"]["present"] or c[
            "Support Devices"
        ] == ""
        if r["findings"]["Support Devices"]["present"]:
            assert c["Support Devices"] == "1.0"
        if c["No Finding"] == "1.0":
            assert not any(r["findings"][o]["present"] and set(r["findings"][o]["views"]) & proj for o in STATED)
    assert clear_pos > 30
    assert any(c[o] == "-1.0" for c in chex.values() for o in OBSERVATIONS)


def test_rephrasing_keeps_truth(ds):
    T = truth(ds[0])
    by_id = {r["study_id"]: r for r in T}
    differs = 0
    for r in T[:40]:
        p = by_id.get(r["prior_study_id"])
        t1, l1 = compose_report(r, p, np.random.default_rng(1))
        t2 = write_report(r, p, np.random.default_rng(2))
        differs += t1 != t2
        assert compose_report(r, p, np.random.default_rng(1))[0] == t1
    assert differs > 20


def test_cli_and_bad_input(tmp_path, capsys):
    assert (
        phantom_cli(["--out", str(tmp_path / "cli"), "--patients", "3", "--size", "40", "--seed", "1", "--quiet"]) == 0
    )
    assert len(truth(tmp_path / "cli")) >= 3
    assert main(["phantom", "--out", str(tmp_path / "cli2"), "--patients", "2", "--size", "40", "--quiet"]) == 0
    with pytest.raises(InputError, match="size"):
        write_phantom(tmp_path / "bad", patients=2, size=0, progress=False)
    with pytest.raises(InputError, match="preset"):
        write_phantom(tmp_path / "bad", preset="huge", progress=False)
    with pytest.raises(InputError, match="parameter 'preset'"):
        phantom_cli(["--out", str(tmp_path / "z"), "--preset", "huge"])
    assert main(["phantom", "--out", str(tmp_path / "z"), "--preset", "huge"]) == 2 and not (tmp_path / "z").exists()
    with pytest.raises(InputError, match="did you mean 'patients'"):
        phantom_cli(["--out", str(tmp_path / "z"), "--patiens", "3"])
    with pytest.raises(InputError, match="parameter 'size'"):
        phantom_cli(["--out", str(tmp_path / "z"), "--size", "8"])
    with pytest.raises(SystemExit):
        phantom_cli(["--preset", "tiny"])  # --out is required


def test_parameters_declared_once():
    """The notebook's papermill parameters cell is PHANTOM's, and the command line offers its parameters (--out for
    out_dir)."""
    from mlrg.phantom import PHANTOM

    nb = json.loads((Path(__file__).resolve().parents[1] / "nbs" / "01a_phantom.ipynb").read_text())
    cells = [c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(cells) == 1 and "".join(cells[0]["source"]).strip() == PHANTOM.parameters_cell().strip()
    p = PHANTOM.cli(
        [
            "--out",
            "d",
            "--preset",
            "demo",
            "--patients",
            "5",
            "--size",
            "64",
            "--seed",
            "2",
            "--workers",
            "1",
            "--quiet",
        ]
    )
    assert p == {
        **PHANTOM.defaults(),
        "out_dir": "d",
        "preset": "demo",
        "patients": 5,
        "size": 64,
        "seed": 2,
        "workers": 1,
        "quiet": True,
    }
    with pytest.raises(InputError, match="did you mean 'learnability_seconds'|unknown parameter"):
        PHANTOM.cli(["--out", "d", "--learnability_seconds", "3"])  # notebook-only


def _plain_state(**findings):
    "A state with no finding and no device, then `findings` (observation -> attributes) set."
    from mlrg.phantom import DEVICES

    st = {o: {"grade": 0, "side": None} for o in STATED}
    st.update({"infectious": False, "devices": {d: None for d in DEVICES}})
    st.update(findings)
    return st


def _draw(st, projection, size=128, seed=3):
    from mlrg.phantom import image_geometry, render_image

    geo = image_geometry(np.random.default_rng(seed), "PA" if projection == "frontal" else "LATERAL")
    return render_image(size, st, projection, geo, np.random.default_rng(seed + 1)).astype(int)


@pytest.mark.parametrize(
    "finding",
    [
        {"Pleural Effusion": {"grade": 1, "side": "right"}},
        {"Consolidation": {"grade": 1, "side": "left", "lobe": "left lower lobe"}},
        {"Atelectasis": {"grade": 1, "side": "left", "loc": "retrocardiac"}},
    ],
)
def test_lateral_only_findings_are_drawn_on_the_lateral_only(finding):
    """Same geometry and noise: a lateral-only finding leaves the frontal image unchanged and clearly brightens the
    lateral's lower posterior lung."""
    normal, sick = _plain_state(), _plain_state(**finding)
    assert (_draw(normal, "frontal") == _draw(sick, "frontal")).all()
    d = _draw(sick, "lateral") - _draw(normal, "lateral")
    assert (d > 20).sum() >= 40  # a visible patch at 128 px, not a faint line
    rows, cols = np.nonzero(d > 20)
    assert rows.mean() > 64 and cols.mean() > 64  # lower half, posterior (the image's right on a lateral)


def test_grades_differ_visibly_on_the_frontal_view():
    "Change since the prior must be visible: each step of severity adds visibly changed area."

    def area(obs, g, **kw):
        base = _draw(_plain_state(), "frontal")
        return int((np.abs(_draw(_plain_state(**{obs: {"grade": g, **kw}}), "frontal") - base) > 15).sum())

    for obs, kw in (
        ("Pleural Effusion", {"side": "right"}),
        ("Consolidation", {"side": "right", "lobe": "right lower lobe"}),
        ("Edema", {"side": None}),
    ):
        a = [area(obs, g, **kw) for g in (1, 2, 3)]
        if obs != "Pleural Effusion":
            assert a[0] > 30, (obs, a)
        assert a[1] > 1.3 * a[0] + 20 and a[2] > 1.3 * a[1], (obs, a)


def test_small_findings_and_devices_are_conspicuous():
    from mlrg.phantom import _line_px

    assert _line_px(256) >= 2 and _line_px(128) >= 1
    base = _draw(_plain_state(), "frontal")
    nod = _plain_state(
        **{"Lung Lesion": {"grade": 1, "side": "right", "lobe": "right upper lobe", "pos": [0, 0, 0], "mm": 12}}
    )
    assert ((_draw(nod, "frontal") - base) > 20).sum() >= 6  # a 12 mm nodule: several clearly brighter pixels at 128 px
    ptx = _plain_state(**{"Pneumothorax": {"grade": 1, "side": "right"}})
    assert ((_draw(ptx, "frontal") - base) < -8).sum() >= 40  # a lucent rim without lung markings
    lesions = [r["details"].get("lesion_mm") for r in truth_of_patients(60) if r["findings"]["Lung Lesion"]["present"]]
    assert lesions and min(lesions) >= 10


def truth_of_patients(n, seed=0):
    from mlrg.phantom import assign_ids, simulate_patient

    subj, sids = assign_ids(seed, n)
    return [r for i in range(n) for r in simulate_patient(seed, i, subj[i], sids[i])[0]]


def test_lateral_only_prevalence_and_balanced_change():
    """Enough lateral-only findings (several observations) and change classes of the acute findings not dominated by one
    class."""
    T = truth_of_patients(400)
    lat = [o for r in T for o, f in r["findings"].items() if f["present"] and f["views"] == ["lateral"]]
    assert lat.count("Pleural Effusion") >= 40 and lat.count("Consolidation") >= 8 and lat.count("Atelectasis") >= 8
    cls = {"new": 0, "worse": 0, "unchanged": 1, "better": 2, "resolved": 2}
    for o in ("Pleural Effusion", "Edema", "Consolidation", "Atelectasis"):
        c = np.bincount([cls[r["change"][o]] for r in T if o in r["change"]], minlength=3)
        assert c.min() / c.sum() > 0.2, (o, c)


def test_factual_serialization_file(ds):
    "The phantom writes each study's findings as facts: one per findings sentence, lower case, as `prepare` reads them."
    from mlrg.data import FACTS_FILE, parse_report, read_factual_serialization
    from mlrg.phantom import FACTS_FILE as PHANTOM_FACTS_FILE

    a = ds[0]
    assert PHANTOM_FACTS_FILE == FACTS_FILE and (a / FACTS_FILE).is_file()
    facts = read_factual_serialization(a)
    T = truth(a)
    assert sorted(facts) == sorted(r["study_id"] for r in T)
    for r in T:
        f = facts[r["study_id"]]
        if not r["has_findings_section"]:
            assert f == []
            continue
        rep = parse_report(next((a / "files").rglob(f"s{r['study_id']}.txt")).read_text())
        assert f and all(x == x.lower() and not x.endswith(".") for x in f)
        text = rep["findings"].lower().replace("- ", "-")  # the report's line wrapping may break a word at its hyphen
        assert all(x in text for x in f)  # each fact is a sentence of the findings

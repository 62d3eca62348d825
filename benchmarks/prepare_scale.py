"""Time `mlrg.data.prepare` at full MIMIC-CXR size.

Writes (or reuses) a metadata-and-reports-only skeleton shaped like MIMIC-CXR-JPG + MIMIC-CXR: 377,110 images,
227,835 studies, 65,379 patients, a realistic view mix, dates and times with same-day studies and some exact
ties, split counts close to the official ones, a CheXpert table, and one short report .txt per study (no JPEGs).
Then runs `prepare(..., image_check="none")` in a fresh subprocess and reports its wall seconds and peak
resident memory (mlrg.core.measure) as JSON: printed and saved to benchmarks/results/prepare_scale.json.

    .venv/bin/python benchmarks/prepare_scale.py [--root /tmp/mimic_skeleton] [--sample-unit image] [--force]

Target: <= 120 s and <= 4 GB peak on 2 cores.
"""

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from mlrg.core import OBSERVATIONS, report_relpath

N_IMAGES, N_STUDIES, N_PATIENTS = 377_110, 227_835, 65_379
SPLIT_STUDIES = {"validate": 1_808, "test": 3_269}  # the rest (222,758) is train
MARKER = ".skeleton-complete.json"

FINDINGS = [
    "PA and lateral views of the chest provided.",
    "Single portable view of the chest.",
    "The lungs are clear without focal consolidation.",
    "No pleural effusion or pneumothorax is seen.",
    "The cardiac silhouette is within normal limits.",
    "Heart size is mildly enlarged.",
    "Mediastinal and hilar contours are unremarkable.",
    "There is mild pulmonary vascular congestion.",
    "Small bilateral pleural effusions are present.",
    "Right internal jugular line ends in the low SVC.",
    "Endotracheal tube terminates ___ cm above the carina.",
    "Bibasilar atelectasis is noted.",
    "Patchy opacity in the left lower lobe may reflect pneumonia.",
    "No acute osseous abnormalities.",
    "Moderate cardiomegaly is stable.",
    "Sternotomy wires are intact.",
    "Left-sided pacemaker leads are unchanged.",
    "There is no pulmonary edema.",
    "Nasogastric tube extends below the diaphragm.",
    "Lung volumes are low.",
]
IMPRESSIONS = [
    "No acute cardiopulmonary process.",
    "Mild pulmonary edema.",
    "Findings concerning for pneumonia.",
    "Stable cardiomegaly.",
    "Small bilateral effusions.",
    "Lines and tubes as described.",
]
INDICATIONS = [
    "___-year-old woman with shortness of breath. // eval for pneumonia",
    "___M with cough and fever",
    "History: ___F with chest pain",
    "___ with line placement. // position?",
    "Dyspnea.",
    "___-year-old man status post intubation. Evaluate ET tube.",
]


def write_skeleton(root: Path, seed=0):
    "Write the skeleton into `root` (tables + reports, no images)."
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    # patients -> studies -> images
    w = rng.lognormal(0, 1.1, N_PATIENTS)
    per_patient = 1 + rng.multinomial(N_STUDIES - N_PATIENTS, w / w.sum())
    per_study = 1 + rng.multinomial(N_IMAGES - N_STUDIES, np.full(N_STUDIES, 1 / N_STUDIES))
    subjects = np.sort(rng.choice(np.arange(10_000_000, 20_000_000), N_PATIENTS, replace=False))
    study_ids = rng.choice(np.arange(50_000_000, 60_000_000), N_STUDIES, replace=False)  # random, not time order
    st_subject = np.repeat(subjects, per_patient)
    first_of_patient = np.r_[0, np.cumsum(per_patient)[:-1]]
    # dates: gaps of days between a patient's studies (25 % on the same day), times of day; ~0.4 % exact ties
    gaps = rng.exponential(120, N_STUDIES).astype(int) * (rng.random(N_STUDIES) > 0.25)
    gaps[first_of_patient] = rng.integers(0, 365 * 80, N_PATIENTS)
    pat_index = np.repeat(np.arange(N_PATIENTS), per_patient)
    days = np.cumsum(gaps) - np.repeat(np.cumsum(gaps)[first_of_patient] - gaps[first_of_patient], per_patient)
    secs = rng.integers(0, 86_400_000, N_STUDIES) / 1000.0
    tie = np.flatnonzero((rng.random(N_STUDIES) < 0.004) & (np.arange(N_STUDIES) > 0))
    tie = tie[pat_index[tie] == pat_index[tie - 1]]
    days[tie], secs[tie] = days[tie - 1], secs[tie - 1]
    dates = (np.datetime64("2110-01-01") + days.astype("timedelta64[D]")).astype(str)
    dates = np.char.replace(dates, "-", "").astype(np.int64)
    hh, mm, ss = (secs // 3600).astype(int), (secs % 3600 // 60).astype(int), secs % 60
    times = np.char.mod("%06.3f", hh * 10000 + mm * 100 + ss)
    # images and views: the first image of a study is frontal-ish, the others mostly lateral
    im_study = np.repeat(np.arange(N_STUDIES), per_study)
    first_img = np.r_[True, im_study[1:] != im_study[:-1]]
    views = np.where(
        first_img,
        rng.choice(["AP", "PA", "", "AP AXIAL"], N_IMAGES, p=[0.56, 0.38, 0.05, 0.01]),
        rng.choice(["LATERAL", "LL", "AP", "PA", ""], N_IMAGES, p=[0.55, 0.24, 0.09, 0.08, 0.04]),
    )
    hexes = rng.integers(0, 2**32, (N_IMAGES, 5), dtype=np.uint64)
    dicom = ["-".join(f"{x:08x}" for x in row) for row in hexes.tolist()]
    sid, sub = study_ids[im_study], st_subject[im_study]
    meta = pd.DataFrame(
        {
            "dicom_id": dicom,
            "subject_id": sub,
            "study_id": sid,
            "PerformedProcedureStepDescription": np.where(views == "AP", "CHEST (PORTABLE AP)", "CHEST (PA AND LAT)"),
            "ViewPosition": views,
            "Rows": 3056,
            "Columns": 2544,
            "StudyDate": dates[im_study],
            "StudyTime": times[im_study],
            "ProcedureCodeSequence_CodeMeaning": "CHEST (PA AND LAT)",
            "ViewCodeSequence_CodeMeaning": np.where(first_img, "postero-anterior", "lateral"),
            "PatientOrientationCodeSequence_CodeMeaning": "Erect",
        }
    )
    meta.to_csv(root / "mimic-cxr-2.0.0-metadata.csv", index=False)
    # split by patient, filling val and test up to the official study counts
    order = rng.permutation(N_PATIENTS)
    cum = np.cumsum(per_patient[order])
    split_of_patient = np.full(N_PATIENTS, "train", dtype=object)
    n_val = np.searchsorted(cum, SPLIT_STUDIES["validate"]) + 1
    n_test = np.searchsorted(cum, SPLIT_STUDIES["validate"] + SPLIT_STUDIES["test"]) + 1
    split_of_patient[order[:n_val]] = "validate"
    split_of_patient[order[n_val:n_test]] = "test"
    pd.DataFrame(
        {"dicom_id": dicom, "study_id": sid, "subject_id": sub, "split": split_of_patient[pat_index[im_study]]}
    ).to_csv(root / "mimic-cxr-2.0.0-split.csv", index=False)
    chex = rng.choice(np.array(["1.0", "0.0", "-1.0", ""]), (N_STUDIES, 14), p=[0.12, 0.08, 0.03, 0.77])
    pd.concat(
        [pd.DataFrame({"subject_id": st_subject, "study_id": study_ids}), pd.DataFrame(chex, columns=OBSERVATIONS)],
        axis=1,
    ).to_csv(root / "mimic-cxr-2.0.0-chexpert.csv", index=False)
    # reports
    has_find, has_imp, has_ind = (
        rng.random(N_STUDIES) < 0.78,
        rng.random(N_STUDIES) < 0.93,
        rng.random(N_STUDIES) < 0.92,
    )
    n_sent = rng.integers(3, 8, N_STUDIES)
    made = set()
    from tqdm import tqdm

    for i in tqdm(range(N_STUDIES), desc="skeleton reports", mininterval=2):
        s = str(st_subject[i])
        d = root / "files" / f"p{s[:2]}" / f"p{s}"
        if s not in made:
            d.mkdir(parents=True, exist_ok=True)
            made.add(s)
        parts = ["                                 FINAL REPORT", " EXAMINATION:  CHEST (PA AND LAT)", " "]
        if has_ind[i]:
            parts += [f" INDICATION:  {INDICATIONS[i % len(INDICATIONS)]}", " "]
        parts += [" COMPARISON:  ___", " "]
        if has_find[i]:
            sent = [FINDINGS[j] for j in (i * 7 + np.arange(n_sent[i]) * 3) % len(FINDINGS)]
            parts += [" FINDINGS: ", " ", " " + " ".join(sent), " "]
        if has_imp[i] or not has_find[i] and rng.random() < 0.9:
            parts += [" IMPRESSION: ", " ", " " + IMPRESSIONS[i % len(IMPRESSIONS)]]
        else:
            parts += [" Portable chest radiograph reviewed.", " ", " " + IMPRESSIONS[i % len(IMPRESSIONS)]]
        (root / "files" / report_relpath(s, study_ids[i])).write_text("\n".join(parts) + "\n")
    info = {
        "images": N_IMAGES,
        "studies": N_STUDIES,
        "patients": N_PATIENTS,
        "seed": seed,
        "exact_tie_studies": int(len(tie)),
        "split_patients": {k: int((split_of_patient == k).sum()) for k in ("train", "validate", "test")},
        "seconds": round(time.perf_counter() - t0, 1),
    }
    (root / MARKER).write_text(json.dumps(info, indent=1))
    return info


CHILD = """
import json, sys
from mlrg.core import measure
from mlrg.data import prepare
with measure() as m:
    s = prepare(sys.argv[1], sys.argv[2], sample_unit=sys.argv[3], image_check="none", progress=True)
print("RESULT " + json.dumps({"prepare_seconds": m["seconds"], "peak_rss_mb": m["peak_rss_mb"], "summary": s}))
"""


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default="/tmp/mimic_skeleton", help="skeleton folder (reused when complete)")
    ap.add_argument("--out", default="/tmp/mimic_skeleton_prepared/annotation.json")
    ap.add_argument("--sample-unit", default="image", choices=("image", "study"))
    ap.add_argument("--force", action="store_true", help="rewrite the skeleton")
    a = ap.parse_args(argv)
    root = Path(a.root)
    if a.force and root.exists():
        shutil.rmtree(root)
    if (root / MARKER).exists():
        info = json.loads((root / MARKER).read_text())
        info["reused"] = True
    else:
        if root.exists():
            shutil.rmtree(root)
        info = write_skeleton(root)
        info["reused"] = False
    print("skeleton:", json.dumps(info), file=sys.stderr)
    t0 = time.perf_counter()
    p = subprocess.run(
        [sys.executable, "-c", CHILD, str(root), a.out, a.sample_unit], stdout=subprocess.PIPE, text=True
    )
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        print(p.stdout)
        sys.exit(p.returncode)
    res = json.loads(next(l for l in p.stdout.splitlines() if l.startswith("RESULT "))[7:])
    s = res["summary"]
    out = {
        "benchmark": "prepare_scale",
        "sample_unit": a.sample_unit,
        "image_check": "none",
        "prepare_seconds": round(res["prepare_seconds"], 1),
        "process_wall_seconds": round(wall, 1),
        "peak_rss_mb": round(res["peak_rss_mb"], 1),
        "target": {"seconds": 120, "peak_rss_mb": 4096},
        "meets_target": res["prepare_seconds"] <= 120 and res["peak_rss_mb"] <= 4096,
        "samples": s["samples"],
        "studies": s["studies"],
        "with_prior": s["with_prior"],
        "prior_status_studies": s["prior_status_studies"],
        "reports": s["reports"],
        "excluded": s["excluded"],
        "vocab_size": s["vocab_size"],
        "annotation_mb": round(os.path.getsize(a.out) / 2**20, 1),
        "skeleton": info,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "note": "page cache warm when the skeleton was just written or reused; first run after a reboot reads reports "
        "from disk",
    }
    text = json.dumps(out, indent=1)
    print(text)
    res_dir = Path(__file__).resolve().parent / "results"
    res_dir.mkdir(exist_ok=True)
    (res_dir / "prepare_scale.json").write_text(text + "\n")


if __name__ == "__main__":
    main()

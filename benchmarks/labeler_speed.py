"""Throughput of mlrg.labeler on realistic report text (one core).

Uses the IU X-Ray FINDINGS + IMPRESSION text from the installed torchxrayvision package when present (real reports,
read at run time, never stored), else MIMIC-style findings composed from a fixed set of sentences (~60 words each).
Prints and saves benchmarks/results/labeler_speed.json."""

import json, os, platform, random, sys, time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
from mlrg.core import save_json
from mlrg.labeler import extract_changes, iu_xray_path, label_reports, load_iu_xray

SENTENCES = [
    "PA and lateral views of the chest provided.",
    "The lungs are clear without focal consolidation.",
    "There is no pleural effusion or pneumothorax.",
    "Heart size is normal.",
    "Mediastinal contours are within normal limits.",
    "Moderate cardiomegaly is unchanged.",
    "Small bilateral pleural effusions with adjacent atelectasis.",
    "Right internal jugular central venous line with tip in the low SVC.",
    "Mild pulmonary vascular congestion.",
    "Patchy opacity at the left base may represent atelectasis, though infection cannot be excluded.",
    "Endotracheal tube terminates 4 cm above the carina.",
    "No acute osseous abnormality.",
    "Interval increase in the right pleural effusion.",
    "The previously seen pneumothorax has resolved.",
]


def synthetic(n, seed=0):
    rng = random.Random(seed)
    return [" ".join(rng.sample(SENTENCES, rng.randint(7, 11))) for _ in range(n)]


def measure(texts):
    texts = [t for t in texts if t]
    label_reports(texts[:200])  # warm-up
    best = 1e9
    for _ in range(3):
        t0 = time.perf_counter()
        label_reports(texts)
        best = min(best, time.perf_counter() - t0)
    t0 = time.perf_counter()
    [extract_changes(t) for t in texts]
    ch = time.perf_counter() - t0
    return {
        "reports": len(texts),
        "mean_words": round(sum(len(t.split()) for t in texts) / len(texts), 1),
        "seconds_best_of_3": round(best, 3),
        "reports_per_s": round(len(texts) / best),
        "changes_reports_per_s": round(len(texts) / ch),
    }


def main():
    res = {"synthetic_mimic_style": measure(synthetic(4000))}
    if iu_xray_path():
        res["iu_xray"] = measure([(r["findings"] + " " + r["impression"]).strip() for r in load_iu_xray()])
    else:
        print("torchxrayvision not installed: IU X-Ray text skipped")
    res.update(python=sys.version.split()[0], machine=platform.machine(), cpus=os.cpu_count(), single_process=True)
    print(json.dumps(res, indent=2))
    save_json(res, Path(__file__).resolve().parent / "results" / "labeler_speed.json")


if __name__ == "__main__":
    main()

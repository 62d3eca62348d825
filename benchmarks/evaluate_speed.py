"""Speed of the full evaluation suite (mlrg.evaluate.evaluate) on 3,852 pairs, MLRG's MIMIC-CXR test size.

Pairs come from a demo-size phantom (1,000 patients; images written at 64 px since only the text is used): references
are the prepared findings of every image, hypotheses are the oracle's findings (the phantom writer, another phrasing)
for even pairs and another pair's reference (shuffled) for odd ones. The run is pinned to 2 CPUs (where more exist; the
METEOR Java process inherits it) and includes the Java start-up. Prints and saves JSON to
benchmarks/results/evaluate_speed.json.

With `--mlrg-csv`, the pairs are MLRG's released MIMIC-CXR test CSV (`dicom_id,labels,report`, in MLRG's repository:
generated-radiology-reports/MIMIC-CXR/test_reports_epoch-1_20-10-2024_16-28-28.csv), scored under `--protocol mlrg`
(the default there; it needs GPT-2's tokenizer folder, `--tokenizer-path`), and the seven NLG scores are compared with
the ones its released log states (MLRG_RELEASED_LOG_MIMIC); the JSON goes to benchmarks/results/evaluate_mlrg_csv.json
and the exit code is 1 when a score differs by more than 1e-12.

    .venv/bin/python benchmarks/evaluate_speed.py [--pairs 3852] [--phantom DIR] [--no-meteor] [--sequential-meteor]
    .venv/bin/python benchmarks/evaluate_speed.py --mlrg-csv CSV --tokenizer-path GPT2_DIR [--protocol plain|mlrg]
"""

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from mlrg.core import measure, save_json
from mlrg.runs import repo_root

# The NLG scores in MLRG's released MIMIC-CXR test log (generated-radiology-reports/MIMIC-CXR/log_2024_10_20_14.log:
# chen_bleu_1..4, chen_meteor, chen_rouge, chen_cider; 3,852 examples), to the digits it prints
MLRG_RELEASED_LOG_MIMIC = {
    "BLEU-1": 0.41114996799739173,
    "BLEU-2": 0.2769778918508422,
    "BLEU-3": 0.20362264525354418,
    "BLEU-4": 0.1582088781713785,
    "METEOR": 0.17633810974007486,
    "ROUGE-L": 0.3195399064699496,
    "CIDEr": 0.3599887171235285,
}


def csv_pairs(path):
    "(references, generations, ids) of MLRG's released CSV (its `labels` are the references MLRG scored)."
    from mlrg.evaluate import read_texts

    preds, _ = read_texts(path, "pred")
    refs, _ = read_texts(path, "gt")
    ids = list(refs)
    return [refs[i] for i in ids], [preds[i] for i in ids], ids


def make_pairs(root, n, seed=0):
    from mlrg.data import prepare, read_annotation
    from mlrg.evaluate import load_truth, oracle_baseline, truth_changes
    from mlrg.phantom import write_phantom

    root = Path(root)
    t0 = time.perf_counter()
    if not (root / "mimic" / "phantom-truth.jsonl").is_file():
        write_phantom(root / "mimic", preset="demo", size=64, seed=seed, progress=True)
    if not (root / "prepared" / "annotation.json").is_file():
        prepare(root / "mimic", root / "prepared" / "annotation.json", progress=False)
    ann = read_annotation(root / "prepared" / "annotation.json")
    items = [it for s in ("test", "val", "train") for it in ann[s]]
    items = [items[i % len(items)] for i in range(n)]
    truth = load_truth(root / "mimic")
    orc = oracle_baseline(items, truth, seed)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)
    refs = [it["findings"] for it in items]
    hyps = [orc[it["id"]] if i % 2 == 0 else refs[perm[i]] for i, it in enumerate(items)]
    ids = [f"{it['id']}#{i}" for i, it in enumerate(items)]  # ids unique even when items repeat
    prior = [it["prior_study"] is not None for it in items]
    tc_all = truth_changes(truth)
    tc = [tc_all[it["id"]] for it in items]
    return refs, hyps, ids, prior, tc, time.perf_counter() - t0, len({it["id"] for it in items})


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pairs", type=int, default=3852)
    ap.add_argument("--phantom", default=None, help="folder to keep the demo phantom in (reused when present)")
    ap.add_argument("--no-meteor", action="store_true")
    ap.add_argument(
        "--sequential-meteor",
        action="store_true",
        help="also time pycocoevalcap's Meteor.compute_score (one round trip per pair)",
    )
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--mlrg-csv", default=None, help="score MLRG's released test CSV and check its log's NLG scores")
    ap.add_argument("--protocol", choices=("plain", "mlrg"), help="default: mlrg with --mlrg-csv, else plain")
    ap.add_argument("--tokenizer-path", default=None, help="GPT-2's tokenizer folder (protocol mlrg)")
    a = ap.parse_args(argv)
    protocol = a.protocol or ("mlrg" if a.mlrg_csv else "plain")
    if hasattr(os, "sched_setaffinity") and len(os.sched_getaffinity(0)) > a.cpus:
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: a.cpus])
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    tmp = None
    if a.mlrg_csv:
        t0 = time.perf_counter()
        refs, hyps, ids = csv_pairs(a.mlrg_csv)
        prior, tc, setup_s, distinct = None, None, time.perf_counter() - t0, len(ids)
    else:
        root = a.phantom or (tmp := tempfile.mkdtemp(prefix="mlrg_evalbench_"))
        refs, hyps, ids, prior, tc, setup_s, distinct = make_pairs(root, a.pairs)
    print(
        f"{len(refs)} pairs ({distinct} distinct images), mean reference length "
        f"{np.mean([len(r.split()) for r in refs]):.1f} words; "
        f"setup {setup_s:.1f} s (not timed)"
    )

    from mlrg.evaluate import evaluate, format_result, prepare_text, protocol_tokenizer, summary_row
    import resource

    tok = protocol_tokenizer(a.tokenizer_path) if protocol == "mlrg" else None

    load_before = os.getloadavg()
    ru0, rc0 = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    with measure() as m:
        res = evaluate(
            refs,
            hyps,
            ids,
            meteor=not a.no_meteor,
            has_prior=prior,
            truth_changes=dict(zip(ids, tc)) if tc is not None else None,
            protocol=protocol,
            tokenizer=tok,
        )
    ru1, rc1 = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = {
        "python": round(ru1.ru_utime + ru1.ru_stime - ru0.ru_utime - ru0.ru_stime, 2),
        "java_meteor": round(rc1.ru_utime + rc1.ru_stime - rc0.ru_utime - rc0.ru_stime, 2),
    }
    print(format_result(res, Path(a.mlrg_csv).name if a.mlrg_csv else "benchmark pairs"))
    out = {
        "pairs": len(refs),
        "source": str(a.mlrg_csv) if a.mlrg_csv else "demo phantom",
        "protocol": res["protocol"],
        "distinct_images": distinct,
        "cpus": cpus,
        "meteor": not a.no_meteor,
        "seconds_total": round(m["seconds"], 2),
        "peak_rss_mb": round(m["peak_rss_mb"], 1),
        "seconds_per_metric": res["seconds"],
        "note": "METEOR runs in a Java process concurrently with BLEU/ROUGE/CIDEr (its seconds include the Java "
        "start-up "
        "and overlap the others); cpu_seconds: CPU time of this process and of the Java child (a wall time taken "
        "while other processes load the machine overstates the cost; CPU time does not); CE = labelling both "
        "sides + the tables; longitudinal = change extraction + scores",
        "cpu_seconds": cpu,
        "load_average_1min_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "scores": summary_row(res),
        "budget_seconds": None if a.mlrg_csv else 30,
        "within_budget": None if a.mlrg_csv else m["seconds"] <= 30,
        "python": platform.python_version(),
        "machine": platform.machine(),
    }
    if a.sequential_meteor and not a.no_meteor:
        from pycocoevalcap.meteor.meteor import Meteor
        from mlrg.evaluate import sanitize_meteor

        gts = {i: [sanitize_meteor(prepare_text(r))] for i, r in enumerate(refs)}
        hy = {i: [sanitize_meteor(prepare_text(h))] for i, h in enumerate(hyps)}
        t0 = time.perf_counter()
        mt = Meteor()
        s, _ = mt.compute_score(gts, hy)
        mt.__del__()
        out["sequential_meteor"] = {
            "seconds": round(time.perf_counter() - t0, 2),
            "score": s,
            "equal_to_ours": abs(s - res["nlg"]["METEOR"]) < 1e-12,
        }
    failed = False
    if a.mlrg_csv:
        diff = {k: abs(res["nlg"][k] - v) for k, v in MLRG_RELEASED_LOG_MIMIC.items() if k in res["nlg"]}
        out["released_log_check"] = {
            k: {"log": MLRG_RELEASED_LOG_MIMIC[k], "mlrg": res["nlg"][k], "abs_diff": d, "bitwise_equal": d == 0}
            for k, d in diff.items()
        }
        failed = any(d > 1e-12 for d in diff.values())
        print(f"released log check ({len(diff)} NLG scores): max |diff| {max(diff.values()):.3g}", "FAILED" * failed)
    print(json.dumps({k: v for k, v in out.items() if k != "scores"}, indent=1))
    name = "evaluate_mlrg_csv.json" if a.mlrg_csv else "evaluate_speed.json"
    dest = repo_root() / "benchmarks" / "results" / name
    save_json(out, dest)
    print(f"-> {dest}")
    if tmp:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""Tests of the evaluation stage (mlrg.evaluate): NLG equality with pycocoevalcap, METEOR robustness, input errors, CE,
longitudinal, adapters, baselines."""

import json
import shutil

import numpy as np
import pandas as pd
import pytest

from mlrg import runs
from mlrg.core import InputError
from mlrg.evaluate import (
    CE5,
    LABELER_NAME,
    MeteorScorer,
    MissingJava,
    OBSERVATIONS,
    ce_summary,
    ce_table,
    change_scores,
    evaluate,
    evaluate_cli,
    load_truth,
    most_frequent_baseline,
    nearest_neighbour_baseline,
    nlg_scores,
    oracle_baseline,
    prepare_text,
    read_texts,
    run_adapter,
    sanitize_meteor,
    split_items,
    summary_row,
    truth_changes,
)

REFS = [
    "The heart is normal in size. The lungs are clear.",
    "Small left pleural effusion. No pneumothorax.",
    "Endotracheal tube in standard position.",
    "Moderate cardiomegaly with mild edema.",
    "No acute process.",
]
HYPS = [
    "Heart size is normal. Lungs are clear.",
    "No pleural effusion or pneumothorax.",
    "ET tube terminates in standard position.",
    "Cardiomegaly. Mild pulmonary edema.",
    "No acute cardiopulmonary process.",
]
needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="METEOR needs Java")


@pytest.fixture(scope="module")
def meteor_pair():
    "Our scorer and pycocoevalcap's own `Meteor` object inside it (one Java process: its start-up takes ~10 s)."
    ours = MeteorScorer()
    yield ours, ours.meteor
    ours.close()
    assert ours.proc.poll() is not None  # the Java process is gone


@pytest.fixture
def mlrg_main(monkeypatch):
    "The `mlrg evaluate` command through mlrg.runs.main."
    return lambda argv: runs.main(["evaluate", *argv])


# ---------------------------------------------------------------- NLG
@needs_java
def test_equal_to_pycocoevalcap(meteor_pair):
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    ours, theirs = meteor_pair
    got = nlg_scores(REFS, HYPS, meteor=True, meteor_scorer=ours)
    gts = {i: [prepare_text(r)] for i, r in enumerate(REFS)}
    res = {i: [prepare_text(h)] for i, h in enumerate(HYPS)}
    assert gts[0] == ["the heart is normal in size . the lungs are clear ."]
    b = Bleu(4).compute_score(gts, res, verbose=0)[0]
    for n in range(4):
        assert got["scores"][f"BLEU-{n + 1}"] == pytest.approx(b[n], abs=1e-12)
    assert got["scores"]["ROUGE-L"] == pytest.approx(Rouge().compute_score(gts, res)[0], abs=1e-12)
    assert got["scores"]["CIDEr"] == pytest.approx(Cider().compute_score(gts, res)[0], abs=1e-12)
    m, ms = theirs.compute_score(gts, res)
    assert got["scores"]["METEOR"] == pytest.approx(m, abs=1e-12)
    assert got["per_sample"]["METEOR"] == pytest.approx(ms, abs=1e-12)
    assert 0 < got["scores"]["BLEU-4"] < got["scores"]["BLEU-1"] < 1


@needs_java
def test_meteor_sanitises_unsafe_text(meteor_pair):
    ours, _ = meteor_pair
    hyps = [
        "heart size is normal.\nlungs ||| clear.",
        "no effusion\r\nor |pneumothorax|",
        "",
        "tube\u2028in place\x00.",
        "café",
    ]
    c, per = ours.score([prepare_text(r) for r in REFS], [prepare_text(h) for h in hyps])
    assert len(per) == 5 and 0 < c < 1 and per[2] == 0.0
    # the process is still in sync: a clean pair afterwards scores exactly as before
    c2, _ = ours.score(["the lungs are clear ."], ["the lungs are clear ."])
    assert c2 == pytest.approx(1.0, abs=0.01)
    assert sanitize_meteor("a|||b\nc\rd") == "a b c d"


def test_truncation_is_applied_and_reported():
    long_ref = ["the lungs are clear . " * 10]
    full = evaluate(long_ref, ["the lungs are clear ."], meteor=False)
    cut = evaluate(long_ref, ["the lungs are clear ."], meteor=False, truncate_ref=5)
    assert not full["settings"]["truncate_ref_used"] and cut["settings"]["truncate_ref_used"]
    assert cut["settings"]["truncate_ref"] == 5
    assert cut["nlg"]["BLEU-1"] == pytest.approx(1.0) and full["nlg"]["BLEU-1"] < 0.1  # brevity penalty without the cut
    with pytest.raises(InputError, match="truncate_ref"):
        evaluate(long_ref, ["x"], meteor=False, truncate_ref=0)


# ---------------------------------------------------------------- inputs
def _write(path, obj):
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return path


def test_mlrg_csv_form(tmp_path, mlrg_main, capsys):
    p = tmp_path / "mlrg_test.csv"
    pd.DataFrame({"dicom_id": ["a", "b", "c"], "labels": REFS[:3], "report": HYPS[:3]}).to_csv(p, index=False)
    preds, info = read_texts(p, "pred")
    refs, _ = read_texts(p, "gt")
    assert info["mlrg_csv"] and preds["b"] == HYPS[1] and refs["b"] == REFS[1]
    out = tmp_path / "m.json"
    assert mlrg_main(["--pred", str(p), "--no-meteor", "--out", str(out)]) == 0  # --gt defaults to the labels column
    m = json.loads(out.read_text())
    direct = evaluate(REFS[:3], HYPS[:3], meteor=False)
    assert m["nlg"]["BLEU-4"] == pytest.approx(direct["nlg"]["BLEU-4"]) and m["n"] == 3
    assert m["settings"]["labeler"] == LABELER_NAME and m["settings"]["uncertain_policy"] == "positive"
    text = capsys.readouterr().out
    assert "not CheXbert" in text and "reference truncation: no" in text and "uncertain policy: positive" in text


def test_json_and_csv_pairs(tmp_path):
    pred = _write(tmp_path / "pred.json", {"x1": HYPS[0], "x2": HYPS[1]})
    gt = tmp_path / "gt.csv"
    pd.DataFrame({"id": ["x2", "x1"], "findings": [REFS[1], REFS[0]]}).to_csv(gt, index=False)
    out = tmp_path / "m.json"
    assert (
        evaluate_cli(["--pred", str(pred), "--gt", str(gt), "--no-meteor", "--out", str(out), "--truncate-ref", "3"])
        == 0
    )
    m = json.loads(out.read_text())
    assert m["settings"]["truncate_ref_used"] and m["n"] == 2 and "METEOR" not in m["nlg"]


@pytest.mark.parametrize("case", ["missing", "extra", "duplicate", "empty", "empty_list"])
def test_id_errors_exit_2(tmp_path, mlrg_main, capsys, case):
    gt = _write(
        tmp_path / "gt.json", [{"id": "a", "findings": "x"}, {"id": "b", "findings": "y"}, {"id": "c", "findings": "z"}]
    )
    pred = {
        "missing": [{"id": "a", "report": "x"}, {"id": "b", "report": "y"}],
        "extra": [
            {"id": "a", "report": "x"},
            {"id": "b", "report": "y"},
            {"id": "c", "report": "z"},
            {"id": "zz9", "report": "w"},
        ],
        "duplicate": [
            {"id": "a", "report": "x"},
            {"id": "b", "report": "y"},
            {"id": "b", "report": "y2"},
            {"id": "c", "report": "z"},
        ],
        "empty": "",
        "empty_list": [],
    }[case]
    p = _write(tmp_path / "pred.json", pred)
    assert mlrg_main(["--pred", str(p), "--gt", str(gt), "--no-meteor"]) == 2
    err = capsys.readouterr().err
    assert "pred.json" in err
    expect = {
        "missing": "no prediction: c",
        "extra": "not in the references",
        "duplicate": "duplicate id(s): b",
        "empty": "empty file",
        "empty_list": "no records",
    }[case]
    assert expect in err
    if case == "extra":
        assert "zz9" in err


def test_missing_text_column(tmp_path):
    p = tmp_path / "p.csv"
    pd.DataFrame({"id": ["a"], "whatever": ["x"]}).to_csv(p, index=False)
    with pytest.raises(InputError, match="no prediction column"):
        read_texts(p, "pred")


# ---------------------------------------------------------------- CE
def _hand_labels():
    ref, gen = np.full((3, 14), np.nan), np.full((3, 14), np.nan)
    A, E = OBSERVATIONS.index("Atelectasis"), OBSERVATIONS.index("Edema")
    ref[:, A], gen[:, A] = [1, -1, 1], [1, 1, 0]
    ref[:, E], gen[:, E] = [1, 0, np.nan], [-1, 1, np.nan]
    return ref, gen


@pytest.mark.parametrize(
    "policy,ate,ede,micro_f1,ce5_macro_f1",
    [
        # Atelectasis (tp, fp, fn), Edema (tp, fp, fn); micro F1 = 2TP / (2TP + FP + FN); CE-5 macro = mean of 5 F1s
        ("positive", (2, 0, 1), (1, 1, 0), 6 / 8, (0.8 + 2 / 3) / 5),
        ("negative", (1, 1, 1), (0, 1, 1), 2 / 6, (0.5 + 0) / 5),
        ("ignore", (1, 0, 1), (0, 1, 1), 2 / 5, (2 / 3 + 0) / 5),
    ],
)
def test_ce_policies_hand_computed(policy, ate, ede, micro_f1, ce5_macro_f1):
    ref, gen = _hand_labels()
    t = ce_table(ref, gen, policy).set_index("observation")
    assert tuple(t.loc["Atelectasis", ["tp", "fp", "fn"]]) == ate
    assert tuple(t.loc["Edema", ["tp", "fp", "fn"]]) == ede
    assert t.loc["Atelectasis", "left_out"] == (1 if policy == "ignore" else 0)
    s = ce_summary(ce_table(ref, gen, policy))
    assert s["CE-14"]["micro"]["f1"] == pytest.approx(micro_f1)
    assert s["CE-5"]["micro"]["f1"] == pytest.approx(micro_f1)  # the labelled observations are both in the 5
    assert s["CE-5"]["macro"]["f1"] == pytest.approx(ce5_macro_f1)
    assert s["CE-14"]["macro"]["f1"] == pytest.approx(ce5_macro_f1 * 5 / 14)
    assert set(CE5) < set(OBSERVATIONS)


def test_ce_from_text_and_policy_named():
    refs = ["Small right pleural effusion.", "Possible atelectasis at the left base."]
    hyps = ["Right pleural effusion.", "Left basilar atelectasis."]
    pos = evaluate(refs, hyps, meteor=False, uncertain_policy="positive")
    neg = evaluate(refs, hyps, meteor=False, uncertain_policy="negative")
    assert pos["ce"]["CE-5"]["micro"]["f1"] == pytest.approx(1.0)
    assert neg["ce"]["CE-5"]["micro"]["f1"] == pytest.approx(2 / 3)  # atelectasis: uncertain ref -> negative, FP
    assert neg["settings"]["uncertain_policy"] == "negative" and "R2Gen" in neg["settings"]["uncertain_policy_meaning"]
    with pytest.raises(InputError, match="uncertain"):
        evaluate(refs, hyps, meteor=False, uncertain_policy="maybe")


# ---------------------------------------------------------------- longitudinal
def test_longitudinal_hand_made():
    refs = [
        "Increased right pleural effusion. New endotracheal tube.",
        "Pulmonary edema has improved.",
        "New consolidation.",
    ]
    hyps = [
        "The right pleural effusion has increased. Endotracheal tube unchanged.",
        "New consolidation.",
        "Clear lungs.",
    ]
    res = evaluate(refs, hyps, meteor=False, has_prior=[True, True, False])
    lg = res["longitudinal"]
    assert (lg["pairs"], lg["scored_cells"], lg["correct"]) == (2, 3, 1)  # effusion right; tube and edema wrong
    assert lg["accuracy"] == pytest.approx(1 / 3)
    assert lg["confusion"]["new"]["unchanged"] == 1 and lg["confusion"]["better"]["none"] == 1
    assert lg["confusion"]["none"]["new"] == 1  # the invented consolidation
    assert lg["per_class"]["worse"]["f1"] == 1.0 and lg["per_class"]["new"]["f1"] == 0.0
    # against a truth: the generation vs true changes; pairs without a truth dict are left out
    truth = {"0": {"Pleural Effusion": "worse", "Support Devices": "unchanged"}, "1": {"Edema": "better"}, "2": None}
    res = evaluate(refs, hyps, ids=["0", "1", "2"], meteor=False, truth_changes=truth)
    lt = res["longitudinal_vs_truth"]
    assert (lt["scored_cells"], lt["correct"]) == (3, 2) and lt["reference_vs_truth"] == pytest.approx(2 / 3)
    assert summary_row(res)["Long. vs truth"] == pytest.approx(2 / 3)
    with pytest.raises(InputError):
        change_scores([{"Edema": "bigger"}], [{}])


# ---------------------------------------------------------------- adapters and Java
def test_adapters_skip_and_fail_clearly(tmp_path, monkeypatch):
    monkeypatch.delenv("MLRG_CHEXBERT_WEIGHTS", raising=False)
    monkeypatch.delenv("MLRG_RADGRAPH_WEIGHTS", raising=False)
    for name in ("chexbert", "radgraph"):
        r = run_adapter(name, ["a"], ["a"])
        assert r["status"] == "skipped" and "MLRG_" in r["message"]
    fake = tmp_path / "chexbert.pth"
    fake.write_text("this is not a checkpoint")
    with pytest.raises(InputError, match="not a model checkpoint"):
        run_adapter("chexbert", ["a"], ["a"], path=fake)
    monkeypatch.setenv("MLRG_RADGRAPH_WEIGHTS", str(tmp_path / "nowhere.tar.gz"))
    with pytest.raises(InputError, match="MLRG_RADGRAPH_WEIGHTS.*weights not found|weights not found"):
        run_adapter("radgraph", ["a"], ["a"])
    # a file that looks like a checkpoint but the package is absent: skipped, naming the install
    zipish = tmp_path / "radgraph.tar.gz"
    zipish.write_bytes(b"\x1f\x8b" + b"\0" * 10)
    monkeypatch.setenv("MLRG_RADGRAPH_WEIGHTS", str(zipish))
    r = run_adapter("radgraph", ["a"], ["a"])
    assert r["status"] == "skipped" and "pip install radgraph" in r["message"]
    res = evaluate(["a b"], ["a b"], meteor=False)
    assert res["adapters"]["chexbert"]["status"] == "skipped"


def test_no_java_error(tmp_path, monkeypatch, mlrg_main, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty folder: no java
    with pytest.raises(MissingJava, match="default-jre-headless"):
        evaluate(REFS, HYPS, meteor=True)
    p = tmp_path / "p.csv"
    pd.DataFrame({"dicom_id": ["a"], "labels": ["x y"], "report": ["x y"]}).to_csv(p, index=False)
    assert mlrg_main(["--pred", str(p)]) == 2
    err = capsys.readouterr().err
    assert "java" in err.lower() and "--no-meteor" in err
    assert mlrg_main(["--pred", str(p), "--no-meteor"]) == 0


# ---------------------------------------------------------------- baselines on a tiny phantom
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from mlrg.data import prepare, read_annotation
    from mlrg.phantom import write_phantom

    d = tmp_path_factory.mktemp("eval_phantom")
    write_phantom(d / "mimic", preset="tiny", seed=0, progress=False)
    prepare(d / "mimic", d / "prepared" / "annotation.json", progress=False)
    return d, read_annotation(d / "prepared" / "annotation.json")


def test_baselines_oracle_beats_most_frequent(tiny):
    d, ann = tiny
    items, name = split_items(ann, "test")
    assert name == "val+test" and len(items) == len(ann["val"]) + len(ann["test"])
    truth = load_truth(d / "mimic")
    refs = [it["findings"] for it in items]
    ids = [it["id"] for it in items]
    prior = [it["prior_study"] is not None for it in items]
    tc = truth_changes(truth)
    mf = most_frequent_baseline(ann["train"], items)
    nn = nearest_neighbour_baseline(ann["train"], items, d / "mimic" / "files")
    orc = oracle_baseline(items, truth, seed=0)
    assert len(set(mf.values())) == 1 and set(nn.values()) <= {it["findings"] for it in ann["train"]}
    assert orc == oracle_baseline(items, truth, seed=0) and orc != oracle_baseline(items, truth, seed=1)
    res = {
        k: evaluate(
            refs, [p[i] for i in ids], ids, meteor=False, has_prior=prior, truth_changes={i: tc[i] for i in ids}
        )
        for k, p in (("mf", mf), ("nn", nn), ("oracle", orc))
    }
    assert res["oracle"]["nlg"]["BLEU-4"] > res["mf"]["nlg"]["BLEU-4"]
    assert res["oracle"]["ce"]["CE-14"]["micro"]["f1"] > res["mf"]["ce"]["CE-14"]["micro"]["f1"]
    assert res["oracle"]["ce"]["CE-5"]["micro"]["f1"] > res["nn"]["ce"]["CE-5"]["micro"]["f1"]
    assert res["oracle"]["longitudinal"]["accuracy"] > 0.5 > (res["mf"]["longitudinal"]["accuracy"] or 0)
    assert res["oracle"]["longitudinal_vs_truth"]["accuracy"] is not None


def test_annotation_as_references(tiny, tmp_path):
    d, ann = tiny
    ann_path = d / "prepared" / "annotation.json"
    pred = {it["id"]: it["findings"] for it in ann["test"]}
    p = _write(tmp_path / "pred.json", pred)
    out = tmp_path / "m.json"
    assert (
        evaluate_cli(
            [
                "--pred",
                str(p),
                "--gt",
                str(ann_path),
                "--split",
                "test",
                "--no-meteor",
                "--out",
                str(out),
                "--truth",
                str(d / "mimic"),
            ]
        )
        == 0
    )
    m = json.loads(out.read_text())
    assert m["nlg"]["BLEU-4"] == pytest.approx(1.0) and m["ce"]["CE-14"]["micro"]["f1"] == pytest.approx(1.0)
    assert m["longitudinal"]["prior_information"] == "given"
    assert m["longitudinal"]["pairs"] == sum(it["prior_study"] is not None for it in ann["test"])


def test_temporal_entity_f1_and_copy_prior_baseline(tmp_path):
    from mlrg.evaluate import TEMPORAL_WORDS, copy_prior_baseline, temporal_entities, temporal_entity_f1

    assert len(TEMPORAL_WORDS) == 44 and {"new", "resolved", "unchanged", "worsening", "unaltered"} <= TEMPORAL_WORDS
    assert temporal_entities("Newly seen, renewed: not counted. Stable-appearing.") == {"stable"}  # whole words only
    te = temporal_entity_f1(["increased effusion, new opacity", "", "stable"], ["new opacity", "", ""])
    assert te["per_sample"] == pytest.approx([2 * 1 / 3, 1.0, 0.0]) and te["f1"] == pytest.approx((2 / 3 + 1) / 3)
    r = evaluate(["Effusion has increased."], ["Effusion is unchanged."], meteor=False)
    assert r["temporal_entity_f1"] == {"f1": 0.0, "pairs": 1} and r["per_sample"]["temporal_entity_f1"] == [0.0]
    # copying the prior report: the prior's findings where there is one
    items = [{"id": "a", "findings": "now", "prior_study": {"latest_study": {"findings": "before", "image_path": "x"}}}]
    assert copy_prior_baseline([], items, tmp_path) == {"a": "before"}


def test_contradictions_rate_in_the_result_and_every_table(tmp_path):
    """The share of generated reports that assert and deny an observation: in the result, summary_row, the printed
    report, the per-pair CSV and the study's index."""
    import math
    import re

    from mlrg.core import save_json
    from mlrg.evaluate import TABLE_COLUMNS, format_result
    from mlrg.study import INDEX_COLUMNS, write_index

    refs = ["Mild edema.", "No effusion.", "Mild cardiomegaly.", "No pneumothorax."]
    hyps = [
        "Mild pulmonary edema is seen. No evidence of pulmonary edema.",
        "No new effusion. Small left effusion is unchanged.",
        "Mild cardiomegaly is seen. The heart is normal in size.",
        "Possible pneumonia. No pneumonia.",
    ]
    ids = ["a", "b", "c", "d"]
    r = evaluate(refs, hyps, ids, meteor=False)
    co = r["contradictions"]
    assert (co["rate"], co["reports"], co["n"], co["examples"]) == (0.5, 2, 4, ["a", "c"])
    assert {o: k for o, k in co["per_observation"].items() if k} == {"Cardiomegaly": 1, "Edema": 1}
    assert (co["references"]["rate"], co["references"]["reports"]) == (0.0, 0)
    assert r["per_sample"]["contradicted"] == ["Edema", "", "Cardiomegaly", ""]
    row = summary_row(r)
    assert list(row) == TABLE_COLUMNS and row["Contradictions"] == 0.5
    assert math.isnan(summary_row({k: v for k, v in r.items() if k != "contradictions"})["Contradictions"])
    text = format_result(r, "x")
    assert re.search(r"^Contradictions\s+0\.5000$", text, re.M), text
    assert "contradictions: 0.5000 of generated reports (2 of 4)" in text and "(references: 0.0000, 0 of 4)" in text
    # the command's per-pair CSV names each pair's contradicted observations
    pred, gt = _write(tmp_path / "p.json", dict(zip(ids, hyps))), _write(tmp_path / "g.json", dict(zip(ids, refs)))
    per = tmp_path / "per.csv"
    assert evaluate_cli(["--pred", str(pred), "--gt", str(gt), "--no-meteor", "--per-sample", str(per)]) == 0
    assert pd.read_csv(per, keep_default_na=False)["contradicted"].tolist() == r["per_sample"]["contradicted"]
    # the study's index: the column, with the value of the evaluate stage's table row
    assert INDEX_COLUMNS[-1] == "Contradictions" and set(INDEX_COLUMNS) <= set(TABLE_COLUMNS)
    rf = runs.RunFolder.create(tmp_path / "run")
    res = {k: v for k, v in r.items() if k != "per_sample"}
    save_json({"methods": {"m": res}, "table": [{"method": "MLRG stage 2", **row}]}, rf.evaluation / "metrics.json")
    page = write_index(rf, [], []).read_text()
    assert "<th>Contradictions</th></tr>" in page and "<td>0.500</td></tr>" in page


def test_stage2_flat_scores_carry_contradictions():
    from mlrg.finetune import score_records

    recs = [
        {"id": "a", "reference": "Mild edema.", "generated": "Mild edema. No edema.", "has_prior": False},
        {"id": "b", "reference": "No effusion.", "generated": "No effusion.", "has_prior": False},
    ]
    flat, res = score_records(recs)
    assert flat["contradictions"] == 0.5 == res["contradictions"]["rate"]

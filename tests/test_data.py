"Tests of mlrg.data: MIMIC-CXR preparation, priors, report sections, readers, vocabulary, Dataset, bad input."

import gzip
import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from mlrg.core import InputError, save_json
from mlrg.runs import main
from mlrg.data import (
    CHEXPERT_LABELS,
    METADATA_CSV,
    SPECIAL_TOKENS,
    SPLIT_CSV,
    MLRGDataset,
    Vocab,
    assign_priors,
    clean_indication,
    collate,
    image_relpath,
    normalize_text,
    normalize_view,
    parse_report,
    prepare,
    prepare_cli,
    read_annotation,
    read_medclip_pickle,
    read_mlrg_annotation,
    read_r2gen_annotation,
    tokenize,
    validate_mlrg_item,
)

META_COLS = [
    "dicom_id",
    "subject_id",
    "study_id",
    "PerformedProcedureStepDescription",
    "ViewPosition",
    "Rows",
    "Columns",
    "StudyDate",
    "StudyTime",
    "ProcedureCodeSequence_CodeMeaning",
    "ViewCodeSequence_CodeMeaning",
    "PatientOrientationCodeSequence_CodeMeaning",
]


def report(findings="The lungs are clear.", impression="No acute process.", indication="___M with cough."):
    parts = ["                                 FINAL REPORT", " EXAMINATION:  CHEST (PA AND LAT)", ""]
    if indication is not None:
        parts += [f" INDICATION:  {indication}", ""]
    parts += [" COMPARISON:  ___", ""]
    if findings is not None:
        parts += [" FINDINGS:", "", f" {findings}", ""]
    if impression is not None:
        parts += [" IMPRESSION:", "", f" {impression}", ""]
    return "\n".join(parts)


def S(subject, study, date, time, views, split="train", rep=None, **kw):
    "One crafted study: images named d<study>_<k> with the given view positions."
    return dict(
        subject=subject,
        study=study,
        date=date,
        time=time,
        split=split,
        images=[(f"d{study}_{k}", v) for k, v in enumerate(views)],
        report=report(**kw) if rep is None else rep,
    )


def write_tree(root, studies, chexpert=True, gz=False):
    "A crafted MIMIC-CXR-JPG tree: tiny JPEGs, reports, metadata/split (and CheXpert) tables."
    root = Path(root)
    meta, split, chex = [], [], []
    for s in studies:
        d = root / "files" / f"p{str(s['subject'])[:2]}" / f"p{s['subject']}"
        (d / f"s{s['study']}").mkdir(parents=True, exist_ok=True)
        for k, (dicom, view) in enumerate(s["images"]):
            Image.new("L", (24 + 8 * k, 32), 40 + 40 * k).save(d / f"s{s['study']}" / f"{dicom}.jpg", quality=90)
            meta.append(
                [
                    dicom,
                    s["subject"],
                    s["study"],
                    "CHEST (PA AND LAT)",
                    view,
                    32,
                    24 + 8 * k,
                    s["date"],
                    s["time"],
                    "CHEST (PA AND LAT)",
                    "",
                    "",
                ]
            )
            split.append([dicom, s["study"], s["subject"], s["split"]])
        if s["report"] is not None:
            data = s["report"] if isinstance(s["report"], bytes) else s["report"].encode()
            (d / f"s{s['study']}.txt").write_bytes(data)
        chex.append([s["subject"], s["study"]] + ["1.0" if i == 1 else "" for i in range(14)])

    def csv(name, header, rows):
        text = "\n".join([",".join(header)] + [",".join(map(str, r)) for r in rows]) + "\n"
        if gz:
            (root / (name + ".gz")).write_bytes(gzip.compress(text.encode()))
        else:
            (root / name).write_text(text)

    csv(METADATA_CSV, META_COLS, meta)
    csv(SPLIT_CSV, ["dicom_id", "study_id", "subject_id", "split"], split)
    if chexpert:
        csv("mimic-cxr-2.0.0-chexpert.csv", ["subject_id", "study_id", *CHEXPERT_LABELS], chex)
    return root


BASIC = [
    # patient 1: study ids in the opposite order to time; two studies on one day at different times
    S(10000001, 59000003, 21500101, 80000.0, ["PA", "LATERAL"], findings="Heart size is normal. Lungs are clear."),
    S(10000001, 58000002, 21500305, 93000.0, ["AP"], findings="New small left pleural effusion."),
    S(10000001, 57000001, 21500305, 151500.5, ["PA", "LL", ""], findings="Left effusion is unchanged. ___ noted."),
    # patient 2: an exact tie, then a study after the tie
    S(10000002, 50000010, 21600101, 100000.0, ["PA", "LATERAL"], findings="Lungs are clear."),
    S(10000002, 50000011, 21600101, 100000.0, ["AP"], findings="Lungs are clear. Heart size is normal."),
    S(10000002, 50000012, 21600202, 100000.0, ["pa", "lateral"], findings="Lungs are clear. No effusion."),
    # patient 3 (val) and 4 (test)
    S(10000003, 51000001, 21700101, 90000.0, ["PA", "LATERAL"], split="validate", findings="No focal consolidation."),
    S(10000004, 52000001, 21700101, 90000.0, ["AP"], split="test", findings="Mild cardiomegaly. Lungs are clear."),
]


@pytest.fixture
def tree(tmp_path):
    return write_tree(tmp_path / "mimic", BASIC)


def run(root, tmp_path, **kw):
    out = tmp_path / "prep" / "annotation.json"
    return prepare(root, out, progress=False, **kw), json.loads(out.read_text()), out


def by_study(ann):
    out = {}
    for s in ann:
        for it in ann[s]:
            out.setdefault(it["study_id"], []).append(it)
    return out


# ---------------------------------------------------------------- priors and views


def test_priors_follow_date_and_time_not_study_id(tree, tmp_path):
    summary, ann, _ = run(tree, tmp_path)
    st = by_study(ann)
    prior = lambda s: {
        None if it["prior_study"] is None else it["prior_study"]["latest_study"]["study_id"] for it in st[s]
    }
    assert prior(59000003) == {None}  # earliest, despite the largest study_id
    assert prior(58000002) == {59000003}
    assert prior(57000001) == {58000002}  # same day, later time
    assert prior(50000010) == prior(50000011) == {None}  # exact tie: no prior
    assert {it["prior_status"] for it in st[50000010]} == {"tied"}
    assert prior(50000012) == {None} and {it["prior_status"] for it in st[50000012]} == {"prior_tied"}
    assert summary["prior_status_studies"] == {"first": 3, "prior": 2, "tied": 2, "prior_tied": 1}
    p = st[57000001][0]["prior_study"]["latest_study"]
    assert p["findings"] == "new small left pleural effusion." and p["has_findings"] is True


def test_assign_priors_against_study_id_order():
    import pandas as pd

    df = pd.DataFrame(
        {
            "study_id": [3, 2, 1, 9],
            "subject_id": [1, 1, 1, 2],
            "study_date": [1, 2, 2, 5],
            "study_time": [5.0, 1.0, 0.5, 1.0],
        }
    )
    got = assign_priors(df).set_index("study_id")
    assert got.loc[1, "prior_study_id"] == 3 and got.loc[2, "prior_study_id"] == 1
    assert pd.isna(got.loc[3, "prior_study_id"]) and got.loc[9, "prior_status"] == "first"


def test_views_normalised_and_prior_image_matches_anchor(tree, tmp_path):
    _, ann, _ = run(tree, tmp_path)
    st = by_study(ann)
    views = sorted(it["anchor_scan"]["view_position"][0] for it in st[57000001])
    assert views == ["LL", "PA", "unk"]
    assert sorted(it["anchor_scan"]["view_position"][0] for it in st[50000012]) == ["LATERAL", "PA"]
    # the prior study 58000002 has one AP image: every anchor gets it
    assert {it["prior_study"]["latest_study"]["view_position"] for it in st[57000001]} == {"AP"}
    assert [normalize_view(v) for v in ["", " ll ", "ap  axial", None]] == ["unk", "LL", "AP AXIAL", "unk"]


def test_prior_image_prefers_same_view_then_projection(tmp_path):
    studies = [
        S(10000001, 50000001, 21500101, 1.0, ["AP", "PA", "LATERAL"]),
        S(10000001, 50000002, 21500102, 1.0, ["PA", "LL", "AP", "unk"]),
    ]
    _, ann, _ = run(write_tree(tmp_path / "m", studies), tmp_path)
    got = {
        it["anchor_scan"]["view_position"][0]: it["prior_study"]["latest_study"]["view_position"]
        for it in by_study(ann)[50000002]
    }
    assert got == {"PA": "PA", "AP": "AP", "LL": "LATERAL", "unk": "PA"}


def test_per_image_and_per_study_sample_counts(tree, tmp_path):
    s_img, ann_img, _ = run(tree, tmp_path)
    s_st, ann_st, _ = run(tree, tmp_path / "b", sample_unit="study")
    n_images = {"train": 2 + 1 + 3 + 2 + 1 + 2, "val": 2, "test": 1}
    assert s_img["samples"] == n_images
    assert s_st["samples"] == {"train": 6, "val": 1, "test": 1}
    # per study: the anchor is the preferred frontal view, everything else is auxiliary
    it = by_study(ann_st)[57000001][0]
    assert it["anchor_scan"]["view_position"] == ["PA"]
    assert it["auxiliary_references"]["view_position"] == ["LL", "unk"]
    # per image: each image is the anchor once and the others are its auxiliary references
    items = by_study(ann_img)[57000001]
    for it in items:
        assert it["anchor_scan"]["image_path"][0] not in it["auxiliary_references"]["image_path"]
        assert len(it["auxiliary_references"]["image_path"]) == 2
    assert items[0]["anchor_scan"]["image_path"] == [image_relpath(10000001, 57000001, "d57000001_0")]


def test_annotation_schema_and_extras(tree, tmp_path):
    summary, ann, out = run(tree, tmp_path)
    assert set(ann) == {"train", "val", "test"}
    for s in ann:
        for i, it in enumerate(ann[s]):
            assert validate_mlrg_item(it, f"{s}[{i}]") == []
            assert it["chexpert"][1] == 1.0 and it["chexpert"][0] is None
    assert (out.parent / "prepare_summary.json").exists() and (out.parent / "vocab.json").exists()
    assert json.loads((out.parent / "prepare_summary.json").read_text())["samples"] == summary["samples"]
    it = by_study(ann)[57000001][0]
    assert it["findings"] == "left effusion is unchanged. ___ noted."
    assert it["indication"] == "___M with cough." and it["indication_pure"] == "m with cough"


def test_gzipped_tables_are_read(tmp_path):
    root = write_tree(tmp_path / "m", BASIC[:3], gz=True)
    assert not (root / METADATA_CSV).exists()
    summary, _, _ = run(root, tmp_path)
    assert summary["samples"]["train"] == 6


# ---------------------------------------------------------------- report sections


def test_sections_last_header_wins_and_case():
    p = parse_report("FINDINGS: old.\n\nIMPRESSION: x.\n\nFINDINGS:\n New text\n  here.\nNote: still findings.\n")
    assert p["findings"] == "New text here. Note: still findings."
    assert parse_report("Findings: Clear.\nImpression: Fine.")["findings"] == "Clear."
    assert parse_report("findings are: nothing here")["findings"] is None  # lower-case mid-sentence 'are:' is text


def test_sections_missing_findings_and_fallback():
    p = parse_report(" FINAL REPORT\n INDICATION: ___ with pain\n\n IMPRESSION: Normal.\n")
    assert p["findings"] is None and p["impression"] == "Normal." and p["last_paragraph"] is None
    p = parse_report("FINAL REPORT\n EXAMINATION: Chest\n\n Portable view.\n\n No change since ___.\n")
    assert p["findings"] is None and p["impression"] is None and p["last_paragraph"] == "No change since ___."
    assert parse_report("FINDINGS:\n\nIMPRESSION: ok")["findings"] == ""


def test_text_cleaning():
    assert normalize_text("  The Lungs\n\nare  CLEAR. ") == "the lungs are clear."
    assert clean_indication("History: ___F with SOB // ?PNA..") == "f with sob pna"
    assert clean_indication("INDICATION: ___-year-old man, fever.") == "year-old man, fever"
    assert tokenize("A 2.5 cm ___ nodule, left-sided.") == ["a", "2.5", "cm", "nodule", ",", "left-sided", "."]


# ---------------------------------------------------------------- readers


def test_read_mlrg_annotation_roundtrip_and_bad_item(tree, tmp_path):
    _, ann, out = run(tree, tmp_path)
    assert read_mlrg_annotation(out) == ann
    assert read_annotation(out) == ann
    bad = {
        "train": ann["train"][:2] + [{**ann["train"][2], "anchor_scan": {"image_path": "x.jpg"}}],
        "val": [],
        "test": [],
    }
    del bad["train"][0]["indication_pure"]
    save_json(bad, tmp_path / "bad.json")
    with pytest.raises(InputError) as e:
        read_mlrg_annotation(tmp_path / "bad.json")
    assert "train[0]: missing key 'indication_pure'" in str(e.value) and "train[2].anchor_scan" in str(e.value)
    save_json({"training": []}, tmp_path / "top.json")
    with pytest.raises(InputError, match="top level"):
        read_mlrg_annotation(tmp_path / "top.json")


def test_read_r2gen_iu_and_mimic(tmp_path):
    iu = {
        "train": [
            {
                "id": "CXR2384_IM-0942",
                "report": "The heart size is normal. The lungs are clear.",
                "image_path": ["CXR2384_IM-0942/0.png", "CXR2384_IM-0942/1.png"],
                "split": "train",
            }
        ],
        "val": [],
        "test": [],
    }
    mim = {
        "train": [],
        "val": [],
        "test": [
            {
                "id": "02aa804e-bde0afdd-112c0b34-7bc16630-4e384014",
                "study_id": 50414267,
                "subject_id": 10000032,
                "report": "No acute process.",
                "image_path": ["p10/p10000032/s50414267/02aa804e-bde0afdd-112c0b34-7bc16630-4e384014.jpg"],
                "split": "test",
            }
        ],
    }
    save_json(iu, tmp_path / "iu.json")
    save_json(mim, tmp_path / "mimic.json")
    a = read_r2gen_annotation(tmp_path / "iu.json")["train"][0]
    assert a["anchor_scan"] == {"image_path": ["CXR2384_IM-0942/0.png"], "view_position": ["unk"]}
    assert a["auxiliary_references"]["image_path"] == ["CXR2384_IM-0942/1.png"] and a["prior_study"] is None
    assert a["findings"] == "the heart size is normal. the lungs are clear." and validate_mlrg_item(a) == []
    b = read_annotation(tmp_path / "mimic.json")["test"][0]
    assert b["study_id"] == 50414267 and b["subject_id"] == 10000032 and b["auxiliary_references"]["image_path"] == []
    save_json({"train": [{"id": "x", "image_path": []}], "val": [], "test": []}, tmp_path / "bad.json")
    with pytest.raises(InputError, match=r"train\[0\]"):
        read_r2gen_annotation(tmp_path / "bad.json")


def test_medclip_pickle_needs_trust(tmp_path):
    p = tmp_path / "datasets.pkl"
    with open(p, "wb") as f:
        pickle.dump(
            {
                "train": [{"image_path": "/data/img1.jpg", "report": "Lungs clear.", "labels": [1, 0, 0]}],
                "val": [{"image_path": "/data/img2.jpg", "report": "Effusion.", "labels": [0, 1, 0]}],
                "test": [],
            },
            f,
        )
    with pytest.raises(InputError, match="trust_pickle=True"):
        read_medclip_pickle(p)
    with pytest.raises(InputError, match="trust_pickle=True"):
        read_annotation(p)
    d = read_medclip_pickle(p, trust_pickle=True)
    assert d["val"][0]["labels"] == [0.0, 1.0, 0.0] and d["train"][0]["anchor_scan"]["image_path"] == ["/data/img1.jpg"]
    assert d["train"][0]["findings"] == "lungs clear." and validate_mlrg_item(d["train"][0]) == []


# ---------------------------------------------------------------- vocabulary


def test_vocab_roundtrip_and_train_only(tmp_path):
    studies = BASIC + [S(10000004, 52000002, 21700202, 1.0, ["PA"], split="test", findings="Zebra zebra zebra zebra.")]
    root = write_tree(tmp_path / "m", studies)
    summary, _, out = run(root, tmp_path, min_freq=1)
    v = Vocab.load(out.parent / "vocab.json")
    assert v.itos[:9] == list(SPECIAL_TOKENS) and len(v) == summary["vocab_size"]
    assert "effusion" in v.stoi and "zebra" not in v.stoi and "cardiomegaly" not in v.stoi  # test-split words are out
    ids = v.encode("Lungs are clear. Zebra.", bos_eos=True)
    assert ids[0] == v.bos_id and ids[-1] == v.eos_id and v.unk_id in ids
    assert v.decode(ids) == "lungs are clear . [UNK] .".replace(" [UNK]", "")
    v.save(tmp_path / "v2.json")
    assert Vocab.load(tmp_path / "v2.json").itos == v.itos
    (tmp_path / "bad.json").write_text('{"itos": ["a"]}')
    with pytest.raises(InputError, match="not an mlrg vocabulary"):
        Vocab.load(tmp_path / "bad.json")
    _, _, out3 = run(root, tmp_path / "c", min_freq=3)
    assert len(Vocab.load(out3.parent / "vocab.json")) < len(v)


# ---------------------------------------------------------------- Dataset


def test_dataset_and_collate_shapes_and_masks(tree, tmp_path):
    _, ann, out = run(tree, tmp_path, min_freq=1)
    v = Vocab.load(out.parent / "vocab.json")
    items = sorted(ann["train"], key=lambda it: it["study_id"])
    first = next(it for it in items if it["study_id"] == 59000003)  # 2 views, no prior
    third = next(it for it in items if it["study_id"] == 57000001)  # 3 views, a prior
    ds = MLRGDataset([first, third], tree / "files", v, image_size=32, max_views=2, max_length=6)
    assert ds.n_dropped_aux == 1
    b = collate([ds[0], ds[1]], pad_id=v.pad_id)
    assert b["images"].shape == (2, 3, 1, 32, 32)
    assert b["image_mask"].tolist() == [[True, True, False], [True, True, True]]
    assert b["has_prior"].tolist() == [False, True]
    assert b["temporal_ids"].tolist() == [[0, 0, 0], [0, 0, 1]]
    assert b["view_ids"][0, 2].item() == 0 and (b["images"][0, 2] == 0).all()
    assert b["target_ids"].shape[1] == 6 and b["target_ids"][0, 0].item() == v.bos_id
    assert (b["target_ids"][b["target_mask"]] != v.pad_id).all()
    assert v.decode(b["prompt_ids"][0], skip_special=False).endswith("[SEP] [NHPR] [SEP]")  # MLRG's pair of segments
    n0 = int(b["prompt_mask"][0].sum())
    assert b["prompt_segments"][0, :n0].tolist() == [0] * (n0 - 2) + [1, 1] and b["prompt_segments"][0, n0:].sum() == 0
    assert v.decode(b["prompt_ids"][1], skip_special=False).startswith("[CLS] m with cough [SEP] new small")
    no_ind = {**first, "indication_pure": ""}
    assert MLRGDataset([no_ind], tree / "files", v).prompt(no_ind)[0][:3] == [v.cls_id, v.nhi_id, v.sep_id]
    x = b["images"][0, 0]
    assert abs(x.mean().item()) < 5 and x.dtype == torch.float32


def test_dataset_augmentation_is_seeded_and_off_by_default(tree, tmp_path):
    _, ann, out = run(tree, tmp_path)
    v = Vocab.load(out.parent / "vocab.json")
    it = ann["train"][0]
    plain = MLRGDataset([it], tree / "files", v, image_size=32)
    assert torch.equal(plain[0]["images"], plain[0]["images"])
    aug = MLRGDataset([it], tree / "files", v, image_size=32, augment=True, seed=1)
    a0, a1 = aug[0]["images"], aug[0]["images"]
    assert torch.equal(a0, a1)
    aug.set_epoch(1)
    assert not torch.equal(a0, aug[0]["images"])


# ---------------------------------------------------------------- bad input


def _first_image(root, study):
    return next((root / "files").rglob(f"s{study}/*.jpg"))


def test_corrupt_jpeg(tree, tmp_path):
    img = _first_image(tree, 58000002)
    img.write_bytes(img.read_bytes()[:60])
    with pytest.raises(InputError, match=img.name):
        run(tree, tmp_path, image_check="decode")
    s, ann, out = run(tree, tmp_path, image_check="decode", skip_bad=True)
    assert s["skipped"] == {"image_corrupt": 1}
    assert 58000002 not in by_study(ann)
    # the prior of 57000001 was that study's only image: no prior now, counted
    assert {it["prior_status"] for it in by_study(ann)[57000001]} == {"prior_no_image"}
    # with the default 'exists' check it is not noticed until the Dataset loads it, which names the file
    s, ann, out = run(tree, tmp_path / "e")
    it = by_study(ann)[58000002][0]
    with pytest.raises(InputError, match=img.name):
        MLRGDataset([it], tree / "files", Vocab.load(out.parent / "vocab.json"), image_size=16)[0]


def test_missing_image(tree, tmp_path):
    img = _first_image(tree, 50000012)
    img.unlink()
    with pytest.raises(InputError, match=f"{img.name}: image file not found"):
        run(tree, tmp_path)
    s, ann, _ = run(tree, tmp_path, skip_bad=True)
    assert s["skipped"] == {"image_missing": 1} and s["samples"]["train"] == 10
    assert s["skipped_examples"]["image_missing"][0].startswith(str(img))
    s, _, _ = run(tree, tmp_path / "n", image_check="none")  # metadata-only: not checked
    assert s["samples"]["train"] == 11


def test_missing_report(tree, tmp_path):
    rep = next((tree / "files").rglob("s50000012.txt"))
    rep.unlink()
    with pytest.raises(InputError, match="s50000012.txt: report file not found"):
        run(tree, tmp_path)
    s, ann, _ = run(tree, tmp_path, skip_bad=True)
    assert s["skipped"] == {"report_missing": 1} and 50000012 not in by_study(ann)
    assert s["excluded"]["bad_report_images"] == 2


def test_non_utf8_report(tmp_path):
    studies = BASIC[:2] + [
        S(10000001, 57000001, 21500305, 151500.5, ["PA"], rep=report().encode() + b"\n caf\xe9 \xff")
    ]
    root = write_tree(tmp_path / "m", studies)
    with pytest.raises(InputError, match="s57000001.txt: report is not valid UTF-8"):
        run(root, tmp_path)
    s, _, _ = run(root, tmp_path, skip_bad=True)
    assert s["skipped"] == {"report_not_utf8": 1}


def test_metadata_missing_column_fails_even_with_skip_bad(tree, tmp_path):
    p = tree / METADATA_CSV
    lines = p.read_text().splitlines()
    drop = META_COLS.index("StudyTime")
    p.write_text("\n".join(",".join(c for k, c in enumerate(l.split(",")) if k != drop) for l in lines) + "\n")
    assert "StudyTime" not in p.read_text().splitlines()[0]
    for skip in (False, True):
        with pytest.raises(InputError, match=r"metadata.csv: missing column\(s\) StudyTime"):
            run(tree, tmp_path, skip_bad=skip)


def test_split_rows_with_unknown_dicom(tree, tmp_path):
    with open(tree / SPLIT_CSV, "a") as f:
        f.write("not-a-dicom,50000001,10000001,train\n")
    n = len((tree / SPLIT_CSV).read_text().splitlines())
    with pytest.raises(InputError, match=f"split.csv, line {n}: dicom_id='not-a-dicom' is not in"):
        run(tree, tmp_path)
    s, _, _ = run(tree, tmp_path, skip_bad=True)
    assert s["skipped"] == {"split_unknown_dicom": 1} and s["samples"]["train"] == 11


def test_empty_and_missing_findings_are_excluded_and_counted(tmp_path):
    studies = [
        S(10000001, 50000001, 21500101, 1.0, ["PA", "LATERAL"], findings=""),  # empty FINDINGS section
        S(10000001, 50000002, 21500102, 1.0, ["PA"], findings=None),  # no FINDINGS section
        S(10000001, 50000003, 21500103, 1.0, ["PA"], findings="Lungs clear."),
    ]
    s, ann, _ = run(write_tree(tmp_path / "m", studies), tmp_path)
    assert s["reports"]["empty_findings_section"] == 1 and s["reports"]["no_findings_section"] == 1
    assert s["excluded"]["no_findings_studies"] == 2 and s["excluded"]["no_findings_images"] == 3
    assert s["samples"]["train"] == 1
    prior = ann["train"][0]["prior_study"]["latest_study"]
    assert prior["study_id"] == 50000002 and prior["findings"] == "" and prior["has_findings"] is False


def test_cli_exit_codes(tree, tmp_path, capsys):
    out = tmp_path / "cli" / "ann.json"
    assert (
        prepare_cli(
            [
                "--mimic-root",
                str(tree),
                "--out",
                str(out),
                "--sample-unit",
                "study",
                "--quiet",
                "--vocab",
                str(tmp_path / "cli" / "v.json"),
                "--min-freq",
                "1",
            ]
        )
        == 0
    )
    assert (tmp_path / "cli" / "v.json").exists() and read_mlrg_annotation(out)["val"]
    capsys.readouterr()
    shutil.rmtree(tree / "files" / "p10" / "p10000004")
    for call in (lambda a: prepare_cli(a), lambda a: main(["prepare", *a])):
        assert call(["--mimic-root", str(tree), "--out", str(out), "--quiet"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "image file not found" in err and "mlrg prepare: error:" in err
    assert prepare_cli(["--mimic-root", str(tree), "--out", str(out), "--quiet", "--skip-bad"]) == 0
    assert "skipped: image_missing 1" in capsys.readouterr().out

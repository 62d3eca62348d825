"""The data side of MLRG's fidelity (issue 17): factual serialization (phantom, prepare, report_style and MLRG's item
filter), prior_order, RAD-DINO's processor preprocessing, GPT-2 strings and truncations as MLRG's tokenizer makes them,
max_views=None and the batch's image_keys."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mlrg.core import InputError
from mlrg.data import (
    MIMIC_VIEW_POSITIONS,
    BPETokenizer,
    MLRGDataset,
    Vocab,
    build_prompt,
    collate,
    n_view_rows,
    prepare,
    prior_report,
    processor_config,
    read_mlrg_annotation,
    stage1_ids,
    target_ids,
    view_id,
    view_row,
    view_rows,
    view_table,
    view_vocab,
)
from mlrg.inputs import INPUTS, load_inputs, write_tiny_phantom


# --- prior_order on a crafted tree: study ids against time, and a tie on date and time ---
def _tree(root):
    "One patient, four studies: ids 3 < 1 < 2 by time (dates disagree with ids); study 4 ties with study 2."
    rows = [("a", 3, "20000101"), ("b", 1, "20000102"), ("c", 2, "20000103"), ("d", 4, "20000103")]
    files = root / "files" / "p10" / "p10000001"
    meta = ["dicom_id,subject_id,study_id,ViewPosition,StudyDate,StudyTime"]
    split = ["dicom_id,study_id,subject_id,split"]
    for dicom, sid, date in rows:
        meta.append(f"{dicom},10000001,5000000{sid},PA,{date},120000")
        split.append(f"{dicom},5000000{sid},10000001,train")
        (files / f"s5000000{sid}").mkdir(parents=True)
        Image.new("L", (8, 8), 100).save(files / f"s5000000{sid}" / f"{dicom}.jpg")
        (files / f"s5000000{sid}.txt").write_text(f" FINDINGS: Lung {sid} is clear.\n IMPRESSION: None.\n")
    (root / "mimic-cxr-2.0.0-metadata.csv").write_text("\n".join(meta) + "\n")
    (root / "mimic-cxr-2.0.0-split.csv").write_text("\n".join(split) + "\n")


@pytest.mark.parametrize(
    "order,expected",
    [
        ("study_id", {50000001: None, 50000002: 50000001, 50000003: 50000002, 50000004: 50000003}),  # MLRG: by id
        ("datetime", {50000003: None, 50000001: 50000003, 50000002: None, 50000004: None}),  # 2 and 4 tie: no prior
    ],
)
def test_prior_order(tmp_path, order, expected):
    _tree(tmp_path / "mimic")
    s = prepare(tmp_path / "mimic", tmp_path / "out" / "a.json", progress=False, prior_order=order)
    ann = read_mlrg_annotation(tmp_path / "out" / "a.json")
    got = {it["study_id"]: it["prior_study"] and it["prior_study"]["latest_study"]["study_id"] for it in ann["train"]}
    assert got == expected and s["prior_order"] == order
    assert s["factual_serialization"]["file"] is None and "findings_factual_serialization" not in ann["train"][0]
    with pytest.raises(InputError, match="prior_order"):
        prepare(tmp_path / "mimic", tmp_path / "out" / "b.json", progress=False, prior_order="date")


# --- factual serialization: the phantom writes it, prepare keeps it, inputs filter on it ---
@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    return write_tiny_phantom(tmp_path_factory.mktemp("fs"), patients=8, seed=1)


def test_prepared_annotation_has_facts(phantom):
    ann = read_mlrg_annotation(phantom)
    items = [it for v in ann.values() for it in v]
    assert items and all(isinstance(it["findings_factual_serialization"], list) for it in items)
    assert all(it["findings_factual_serialization"] for it in items)  # studies with findings have facts
    priors = [it["prior_study"]["latest_study"] for it in items if it["prior_study"]]
    assert priors and all("findings_factual_serialization" in ls for ls in priors)
    summary = json.loads((phantom.parent / "prepare_summary.json").read_text())
    assert summary["factual_serialization"]["studies"] > 0


def test_report_style_filter_and_fallback(phantom, tmp_path, caplog):
    ann = json.loads(phantom.read_text())
    ann["train"][0]["findings_factual_serialization"] = []  # MLRG skips such an item
    (tmp_path / "a.json").write_text(json.dumps(ann))
    p = INPUTS.check(data_path=str(tmp_path / "a.json"), image_root=str(phantom.parent.parent / "mimic" / "files"))
    d = load_inputs({**p, "report_style": "factual_serialization"})
    assert d.info["report_style"] == "factual_serialization" and d.info["factual_serialization"]["skipped_empty"] == {
        "train": 1,
        "val": 0,
        "test": 0,
    }
    assert (
        len(d.items["train"]) == len(ann["train"]) - 1 and d.dataset_options["report_style"] == d.info["report_style"]
    )
    assert len(load_inputs(p).items["train"]) == len(ann["train"])  # findings (the default): nothing skipped
    for v in ann.values():
        for it in v:
            it.pop("findings_factual_serialization")
    (tmp_path / "b.json").write_text(json.dumps(ann))
    with caplog.at_level("WARNING"):
        d = load_inputs({**p, "data_path": str(tmp_path / "b.json"), "report_style": "factual_serialization"})
    assert d.info["report_style"] == "findings" and d.info["factual_serialization"]["present"] is False
    assert "no findings_factual_serialization" in caplog.text


def _item(**kw):
    it = {
        "id": "x",
        "findings": "the lungs are clear . no effusion .",
        "indication_pure": "cough",
        "anchor_scan": {"image_path": ["p1/a.png"], "view_position": ["PA"]},
        "auxiliary_references": {"image_path": ["p1/b.png", "p1/c.png", "p1/d.png"], "view_position": ["LL"] * 3},
        "prior_study": {
            "latest_study": {
                "image_path": "p0/e.png",
                "view_position": "PA",
                "findings": "small effusion .",
                "findings_factual_serialization": ["Small effusion"],
            }
        },
        "findings_factual_serialization": ["the lungs are clear", "no effusion"],
    }
    return {**it, **kw}


@pytest.fixture
def images(tmp_path):
    for n in "abcde":
        (tmp_path / ("p0" if n == "e" else "p1")).mkdir(exist_ok=True)
        Image.new("L", (20, 16), 50).save(tmp_path / ("p0" if n == "e" else "p1") / f"{n}.png")
    return tmp_path


def test_dataset_texts_keys_and_views(images):
    v = Vocab.build(["the lungs are clear . no effusion . small cough"], min_freq=1)
    ds = MLRGDataset([_item()], images, v, image_size=16, max_views=2, report_style="factual_serialization")
    x = ds[0]
    assert v.decode(x["text_ids"], skip_special=False) == "[CLS] the lungs are clear [SEP] no effusion [SEP]"
    assert x["text"] == "[CLS]the lungs are clear[SEP]no effusion[SEP]"
    assert v.decode(x["prompt_ids"], skip_special=False) == "[CLS] cough [SEP] small effusion [SEP]"
    assert x["image_keys"] == ["p1/a.png", "p1/b.png", "p0/e.png"]
    plain = MLRGDataset([_item()], images, v, image_size=16, max_views=None)[0]
    assert plain["images"].shape[0] == 5 and plain["image_keys"] == [
        "p1/a.png",
        "p1/b.png",
        "p1/c.png",
        "p1/d.png",
        "p0/e.png",
    ]
    assert torch.equal(plain["text_ids"], plain["target_ids"])  # findings: stage 1's text is the target
    b = collate([x, plain])
    assert b["images"].shape[:2] == (2, 5) and b["image_keys"][0] == ["p1/a.png", "p1/b.png", "", "", "p0/e.png"]
    assert b["image_mask"][0].tolist() == [True, True, False, False, True] and b["text_ids"].shape[0] == 2
    with pytest.raises(InputError, match="report_style"):
        MLRGDataset([], images, v, report_style="facts")


def test_decoded_images_kept_in_memory_up_to_the_budget(images):
    "Each image file is decoded once and kept (within image_cache_mb); with a budget of 0 every read opens the file."
    v = Vocab.build(["small effusion"], min_freq=1)
    ds = MLRGDataset([_item()], images, v, image_size=16, max_views=2)
    first = ds[0]["images"]
    assert ds._decoded_bytes == 3 * 16 * 16 and len(ds._decoded) == 3  # a.png, b.png, e.png at 16 x 16, uint8
    for p in ("p1/a.png", "p1/b.png", "p0/e.png"):
        (images / p).unlink()
    assert torch.equal(ds[0]["images"], first)  # no file read again
    none = MLRGDataset([_item()], images, v, image_size=16, max_views=2, image_cache_mb=0)
    with pytest.raises(InputError, match="image file not found"):
        none[0]
    # a budget of two images' bytes keeps the first two only
    for n in "abe":
        Image.new("L", (20, 16), 50).save(images / ("p0" if n == "e" else "p1") / f"{n}.png")
    some = MLRGDataset([_item()], images, v, image_size=16, max_views=2, image_cache_mb=2 * 256 / 2**20)
    some[0]
    assert len(some._decoded) == 2 and some._decoded_bytes == 512


def test_target_truncation(images):
    v = Vocab.build(["the lungs are clear ."], min_freq=1)
    long = _item(findings="the lungs are clear . " * 40)
    keep = MLRGDataset([long], images, v, image_size=16, max_length=20)[0]["target_ids"]
    cut = MLRGDataset([long], images, v, image_size=16, max_length=20, target_truncation="mlrg")[0]["target_ids"]
    assert len(keep) == 20 and keep[-1] == v.eos_id
    assert len(cut) == 21 and cut[-1] != v.eos_id and cut[0] == v.bos_id  # MLRG: max_length + 1, no [EOS]
    short = _item(findings="the lungs are clear .")
    assert torch.equal(
        MLRGDataset([short], images, v, image_size=16, target_truncation="mlrg")[0]["target_ids"],
        MLRGDataset([short], images, v, image_size=16)[0]["target_ids"],
    )


# --- GPT-2: MLRG's strings give GPT2TokenizerFast's ids ---
@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    d = tmp_path_factory.mktemp("gpt2")
    bpe = tokenizers.ByteLevelBPETokenizer()
    texts = ["the lungs are clear.", "no pleural effusion or pneumothorax.", "seen on ct of ___ likely", "cough"] * 9
    bpe.train_from_iterator(texts, vocab_size=320, min_frequency=1, special_tokens=["<|endoftext|>"])
    e = "<|endoftext|>"
    transformers.GPT2TokenizerFast(
        tokenizer_object=bpe._tokenizer, bos_token=e, eos_token=e, unk_token=e
    ).save_pretrained(d)
    hf = transformers.GPT2TokenizerFast.from_pretrained(str(d))  # MLRG's tokenizer (MAIN): these 9 tokens
    hf.add_special_tokens(
        {
            "bos_token": "[BOS]",
            "pad_token": "[PAD]",
            "cls_token": "[CLS]",
            "sep_token": "[SEP]",
            "mask_token": "[MASK]",
            "eos_token": "[EOS]",
            "unk_token": "[UNK]",
        }
    )
    hf.add_tokens(["[NHI]", "[NHPR]"])
    return BPETokenizer.from_folder(d), hf


def test_gpt2_strings_match_mlrg_tokenizer(gpt2):
    bt, hf = gpt2
    findings = "seen on ct of ___ likely. the lungs are clear."
    assert target_ids(bt, findings, 100) == hf("[BOS]" + findings + "[EOS]")["input_ids"]
    assert "___" in bt.decode(target_ids(bt, findings, 100))  # B3: kept in targets as in references
    for n in (5, 12):  # MLRG MF:859: max_length + 1 tokens
        assert (
            target_ids(bt, findings * 3, n, "mlrg")
            == hf("[BOS]" + findings * 3 + "[EOS]", max_length=n + 1, truncation=True)["input_ids"]
        )
    item = _item(findings_factual_serialization=[" The lungs are clear", "no pleural EFFUSION"])
    s = "[CLS]" + "[SEP]".join(x.strip().lower() for x in item["findings_factual_serialization"]) + "[SEP]"
    assert stage1_ids(bt, item, "factual_serialization") == hf(s)["input_ids"]
    assert (
        stage1_ids(bt, item, "factual_serialization", max_length=6) == hf(s, max_length=6, truncation=True)["input_ids"]
    )


@pytest.mark.parametrize("n_ind,n_pri,max_length", [(2, 3, 200), (3, 90, 30), (90, 3, 30), (40, 50, 30), (60, 61, 31)])
def test_prompt_pair_matches_mlrg_tokenizer(gpt2, n_ind, n_pri, max_length):
    bt, hf = gpt2
    ind, facts = " ".join(["cough"] * n_ind), ["no pleural effusion"] * n_pri
    pri = prior_report(
        _item(prior_study={"latest_study": {"findings": "x", "findings_factual_serialization": facts}}),
        "factual_serialization",
    )
    ids, seg = build_prompt(bt, ind, pri, max_length, truncation="mlrg")
    ref = hf(
        "[CLS]" + ind + "[SEP]",
        "[SEP]".join(facts) + "[SEP]",
        max_length=max_length,
        truncation=True,
        return_token_type_ids=True,
    )
    assert ids == ref["input_ids"] and seg == ref["token_type_ids"]
    if max_length == 200:  # untruncated, mlrg's default assembly is the same
        assert build_prompt(bt, ind, pri, max_length) == (ids, seg)


# --- RAD-DINO's processor: the dataset's pixels and HubViT's normalisation give the processor's pixel_values ---
@pytest.mark.parametrize("size,crop", [((50, 37), 28), ((37, 70), 28), ((30, 30), 42)])
def test_processor_matches_transformers(tmp_path, size, crop):
    transformers = pytest.importorskip("transformers")
    from mlrg.models import HubViT

    torch.manual_seed(0)
    cfg = transformers.Dinov2Config(
        patch_size=14, image_size=crop, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
    )
    transformers.Dinov2Model(cfg).save_pretrained(tmp_path / "dino")
    pp = {
        "do_resize": True,
        "size": {"shortest_edge": 28},
        "resample": 3,
        "do_center_crop": True,
        "crop_size": {"height": crop, "width": crop},
        "do_rescale": True,
        "rescale_factor": 0.00392156862745098,
        "do_normalize": True,
        "image_mean": [0.5307, 0.5307, 0.5307],
        "image_std": [0.2583, 0.2583, 0.2583],
        "do_convert_rgb": True,
        "image_processor_type": "BitImageProcessor",
    }
    (tmp_path / "dino" / "preprocessor_config.json").write_text(json.dumps(pp))
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, size[::-1], dtype=np.uint8)).save(tmp_path / "x.jpg", quality=90)
    Pil = getattr(transformers, "BitImageProcessorPil", None) or transformers.BitImageProcessor  # 5.x: PIL path
    with Image.open(tmp_path / "x.jpg") as im:  # as MLRG's collate: the PIL image of the file
        ref = Pil(**{k: v for k, v in pp.items() if k != "image_processor_type"})(im, return_tensors="pt").pixel_values
    ds = MLRGDataset([], tmp_path, None, image_size=crop, image_preprocess="processor", processor=tmp_path / "dino")
    x = ds.image("x.jpg")
    enc = HubViT(crop, tmp_path / "dino")
    seen = {}
    enc.net.register_forward_pre_hook(lambda m, a, kw: seen.update(px=kw["pixel_values"]), with_kwargs=True)
    enc.tokens(x[None])
    assert seen["px"].shape == ref.shape == (1, 3, crop, crop)
    assert (seen["px"] - ref).abs().max().item() <= 1e-6
    with pytest.raises(InputError, match="image_size"):
        MLRGDataset([], tmp_path, None, image_size=crop + 14, image_preprocess="processor", processor=tmp_path / "dino")
    assert processor_config(tmp_path / "dino")["crop_size"] == (crop, crop)


def test_facts_checked_and_cli_prior_order(tmp_path, capsys):
    from mlrg.data import prepare_cli, validate_mlrg_item

    it = _item(impression="", indication="", prior_study=None)
    assert validate_mlrg_item(it) == []
    assert validate_mlrg_item({**it, "findings_factual_serialization": "no effusion"}) == [
        "item.findings_factual_serialization: not a list of strings"
    ]
    _tree(tmp_path / "mimic")
    out = tmp_path / "cli" / "a.json"
    assert prepare_cli(["--mimic-root", str(tmp_path / "mimic"), "--out", str(out), "--prior-order", "study_id"]) == 0
    assert json.loads((out.parent / "prepare_summary.json").read_text())["prior_order"] == "study_id"


# --- view vocabulary (fidelity 1.6): the batch carries each slot's view string; view rows per vocabulary ---
def test_batch_carries_view_positions_and_view_ids_stay_collapsed(images):
    v = Vocab.build(["the lungs are clear . no effusion ."], min_freq=1)
    aux = {"image_path": ["p1/b.png", "p1/c.png"], "view_position": ["XTABLE LATERAL", "LATERAL"]}
    it = _item(auxiliary_references=aux)
    it["prior_study"]["latest_study"]["view_position"] = None
    x = MLRGDataset([it], images, v, image_size=16, max_views=None)[0]
    assert x["view_positions"] == ["PA", "XTABLE LATERAL", "LATERAL", ""]
    assert x["view_ids"].tolist() == [view_id("PA"), view_id("other"), view_id("LATERAL"), view_id("unk")]
    b = collate([x, MLRGDataset([_item()], images, v, image_size=16, max_views=2)[0]])
    assert b["view_positions"] == [x["view_positions"], ["PA", "LL", "", "PA"]]
    rows = view_rows(b["view_positions"], b["image_mask"], "raw", ids=b["id"])
    assert rows[0].tolist() == [1, 13, 3, 15] and rows[1].tolist() == [1, 4, 0, 1]  # an empty slot: 0 (padding)
    assert rows[0, 1] != rows[0, 2]  # XTABLE LATERAL and LATERAL: two rows (collapsed: "other" and "LATERAL")
    assert torch.equal(view_rows(b["view_positions"], b["image_mask"], "collapsed"), b["view_ids"])


def test_view_vocabularies(tmp_path):
    assert n_view_rows("collapsed") == 7 and view_table("collapsed")["other"] == 5  # the default: today's six
    assert n_view_rows("raw") == len(MIMIC_VIEW_POSITIONS) + 1 == 16 and "" in MIMIC_VIEW_POSITIONS
    assert view_row("XTABLE LATERAL", "raw") != view_row("LATERAL", "raw")
    assert view_row("XTABLE LATERAL", "collapsed") == view_row("SWIMMERS", "collapsed")  # pooled in "other"
    assert [view_row(x, "raw") for x in (None, "", "unk", float("nan"), " ap  axial ")] == [15] * 4 + [5]
    # MLRG's JSON (name -> row): its rows exactly, one further on (row 0 is padding), MLRG's "_" suffix ignored
    mlrg = {"LATERAL": 0, "PA": 1, "": 2, "XTABLE LATERAL": 3}
    path = tmp_path / "five_work_mimic_cxr_view_position_v1.1.json"
    path.write_text(json.dumps(mlrg))
    assert view_vocab(str(path)) == mlrg and n_view_rows(str(path)) == 5
    assert {k: view_row(k, str(path)) for k in mlrg} == {k: r + 1 for k, r in mlrg.items()}
    assert view_row("PA_0_prior", mlrg) == 2 and view_row("unk", mlrg) == 3
    with pytest.raises(InputError, match="'AP' of item s7"):
        view_row("AP", mlrg, item="s7")
    with pytest.raises(InputError, match="'RL' of item s2"):
        view_rows([["PA", "RL"]], torch.tensor([[True, True]]), "raw", ids=["s2"])
    for bad, msg in (("views.json", "no such file"), ({"PA": 1}, "rows in 0..0"), ({}, "view_vocab")):
        with pytest.raises(InputError, match=msg):
            view_vocab(bad if not isinstance(bad, str) else str(tmp_path / bad))

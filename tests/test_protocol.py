"""MLRG's evaluation protocol (mlrg.evaluate.apply_protocol, `protocol="mlrg"`) and the CheXbert / RadGraph adapters as
MLRG runs them (fidelity 2.20, 2.21, 2.22, 2.26, B1, B5): references cut to 100 GPT-2 tokens before every metric, empty
generations at val, CheXbert as the headline CE, RadGraph's model type "radgraph"."""

import importlib.machinery
import io
import json
import sys
import tarfile
import types
from pathlib import Path

import pytest

from mlrg.core import InputError
from mlrg.evaluate import (
    LABELER_NAME,
    MLRG_EMPTY_GENERATION,
    apply_protocol,
    clean_up_spaces,
    evaluate,
    evaluate_cli,
    format_result,
    mlrg_reference,
    run_adapter,
    summary_row,
)

FILLER = "the heart is normal in size. the lungs are clear. "
LATE = FILLER * 12 + "there is a large right pleural effusion. the effusion has increased."
MLRG_SPECIAL = {
    "bos_token": "[BOS]",
    "pad_token": "[PAD]",
    "cls_token": "[CLS]",
    "sep_token": "[SEP]",
    "mask_token": "[MASK]",
    "eos_token": "[EOS]",
    "unk_token": "[UNK]",
}


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    "A GPT-2-style byte-level BPE tokenizer (trained on a few reports) saved as GPT-2's folder is."
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("gpt2")
    texts = [LATE, "no pneumothorax, lungs are clear.", "the patient's tube is new. ___ was notified.", "mild edema."]
    bpe = tokenizers.ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=320, min_frequency=1, special_tokens=["<|endoftext|>"])
    eot = "<|endoftext|>"
    gpt2 = transformers.GPT2TokenizerFast(tokenizer_object=bpe._tokenizer, bos_token=eot, eos_token=eot, unk_token=eot)
    gpt2.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tok(gpt2_dir):
    from mlrg.data import BPETokenizer

    return BPETokenizer.from_folder(gpt2_dir)


def _n_tokens(tok, text):
    return len(tok.backend.encode(f"[BOS]{text}[EOS]", add_special_tokens=False).ids)


# ---------------------------------------------------------------- the cut itself
def test_reference_is_mlrgs_tokenizer_call(gpt2_dir, tok):
    "Equal to MLRG's call: GPT2TokenizerFast + MLRG's tokens, max_length=100, truncation, batch_decode (MF:882-886)."
    transformers = pytest.importorskip("transformers")
    t = transformers.AutoTokenizer.from_pretrained(str(gpt2_dir))
    t.add_special_tokens(dict(MLRG_SPECIAL))
    t.add_tokens(["[NHI]", "[NHPR]"])
    texts = [LATE, " No pneumothorax , lungs are clear . ", "the patient's tube is new. ___ was notified.", "x"]
    reports = ["[BOS]" + x.strip().lower() + "[EOS]" for x in texts]
    ids = t(reports, padding=True, max_length=100, truncation=True)["input_ids"]
    decoded = t.batch_decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    theirs = [clean_up_spaces(x) for x in decoded]
    assert [mlrg_reference(x, tok, 100) for x in texts] == theirs
    assert _n_tokens(tok, LATE) > 100 and "effusion" not in theirs[0]  # the case below is a real cut
    assert theirs[1] == "no pneumothorax, lungs are clear."  # transformers 4.43's clean-up of spaces
    assert "___" in theirs[2]  # de-identification blanks kept (B3)


def test_cut_keeps_at_most_max_tokens_minus_bos(tok):
    "[BOS] counts towards max_length: at most 99 text tokens stay, and a short reference comes back unchanged."
    cut = mlrg_reference(LATE, tok, 100)
    assert len(tok.backend.encode(cut, add_special_tokens=False).ids) <= 99
    assert LATE.startswith(cut)
    assert mlrg_reference(cut, tok, 100) == cut  # a cut reference is a fixed point (MLRG's released CSV relies on it)
    assert mlrg_reference("mild edema.", tok, 100) == "mild edema."
    assert mlrg_reference(LATE, tok, 10) == mlrg_reference(mlrg_reference(LATE, tok, 10), tok, 100)


def test_plain_is_unchanged(tok):
    refs, hyps = [LATE, " A  b ,"], ["", "x ."]
    assert apply_protocol(refs, hyps, "plain") == (refs, hyps)
    assert apply_protocol(refs, hyps, "plain", tok, 5, "val") == (refs, hyps)
    a = evaluate(refs, ["y", "x ."], meteor=False)
    b = evaluate(refs, ["y", "x ."], meteor=False, protocol="plain", tokenizer=tok)
    for k in ("nlg", "ce", "longitudinal", "temporal_entity_f1", "per_sample"):
        assert a[k] == b[k]
    assert a["protocol"] == {"name": "plain", "split": "test"} and a["settings"]["protocol"] == "plain"


def test_empty_generations_as_mlrg(tok):
    "An empty generation becomes '...' at val (MF:1148) and stays empty at test (MF:1175); plain leaves it."
    refs, hyps = ["mild edema.", "mild edema."], ["", " "]
    assert apply_protocol(refs, hyps, "mlrg", tok, split="val")[1] == [MLRG_EMPTY_GENERATION, " "]
    assert apply_protocol(refs, hyps, "mlrg", tok, split="test")[1] == ["", " "]
    assert apply_protocol(refs, hyps, "plain", split="val")[1] == ["", " "]
    res = evaluate(refs, hyps, meteor=False, protocol="mlrg", tokenizer=tok, split="val")
    assert res["protocol"]["empty_generations_replaced"] == 1 and res["empty_texts"]["hypotheses"] == 1


# ---------------------------------------------------------------- every metric sees the cut
def test_mlrg_truncates_references_for_ce_longitudinal_and_adapters(tok, monkeypatch):
    "A finding after token 100 of the reference: counted under plain, lost for CE, temporal score and adapters."
    import mlrg.evaluate as ev

    seen = {}

    def fake_adapter(name, refs, hyps, path=None):
        seen[name] = list(refs)
        return {"status": "skipped", "message": f"{name}: skipped (test)"}

    monkeypatch.setattr(ev, "run_adapter", fake_adapter)
    refs = [LATE, "mild edema."]
    hyps = ["there is a large right pleural effusion. the effusion has increased.", "mild edema."]
    plain = evaluate(refs, hyps, meteor=False)
    mlrg = evaluate(refs, hyps, meteor=False, protocol="mlrg", tokenizer=tok)
    eff = lambda r: next(o for o in r["ce_per_observation"] if o["observation"] == "Pleural Effusion")
    assert eff(plain)["support"] == 1 and eff(plain)["tp"] == 1
    assert eff(mlrg)["support"] == 0 and eff(mlrg)["fp"] == 1
    assert plain["temporal_entity_f1"]["f1"] == 1.0 and mlrg["temporal_entity_f1"]["f1"] == 0.5
    assert "effusion" not in seen["chexbert"][0] and "effusion" not in seen["radgraph"][0]
    assert mlrg["protocol"]["references_changed"] == 1 and mlrg["protocol"]["ref_max_tokens"] == 100
    R, H = apply_protocol(refs, hyps, "mlrg", tok)
    assert evaluate(R, H, meteor=False)["nlg"] == mlrg["nlg"]  # NLG scores the cut references too
    assert "protocol: mlrg" in format_result(mlrg)


def test_mlrg_needs_gpt2_tokenizer(tok):
    from mlrg.data import Vocab

    with pytest.raises(InputError, match="GPT-2 BPE tokens.*word vocabulary"):
        apply_protocol(["a"], ["b"], "mlrg", Vocab.build(["a b"], min_freq=1))
    with pytest.raises(InputError, match="no tokenizer"):
        evaluate(["a"], ["b"], meteor=False, protocol="mlrg")
    with pytest.raises(InputError, match="protocol"):
        apply_protocol(["a"], ["b"], "MLRG")
    with pytest.raises(InputError, match="truncate_ref"):  # B5: the white-space cut is not MLRG's and not combined
        evaluate(["a"], ["b"], meteor=False, protocol="mlrg", tokenizer=tok, truncate_ref=5)
    with pytest.raises(InputError, match="ref_max_tokens"):
        apply_protocol(["a"], ["b"], "mlrg", tok, max_tokens=0)


def test_metrics_file_names_protocol(tmp_path, gpt2_dir):
    pred = tmp_path / "mlrg.csv"
    pred.write_text("dicom_id,labels,report\na,mild edema.,mild edema.\nb,no effusion.,small effusion.\n")
    for protocol in ("plain", "mlrg"):
        out = tmp_path / f"{protocol}.json"
        args = ["--pred", str(pred), "--no-meteor", "--out", str(out), "--protocol", protocol]
        assert evaluate_cli(args + (["--tokenizer-path", str(gpt2_dir)] if protocol == "mlrg" else [])) == 0
        m = json.loads(out.read_text())
        assert m["protocol"]["name"] == protocol and m["settings"]["protocol"] == protocol
        assert m["settings"]["headline_ce_labeler"] == LABELER_NAME
    with pytest.raises(InputError, match="GPT-2"):
        evaluate_cli(["--pred", str(pred), "--no-meteor", "--protocol", "mlrg"])


# ---------------------------------------------------------------- adapters as MLRG runs them
def _module(name, **attrs):
    mod = types.ModuleType(name)
    mod.__spec__ = importlib.machinery.ModuleSpec(name, None)
    for k, v in attrs.items():
        setattr(mod, k, v)
        if isinstance(v, type):
            v.__module__ = name
    return mod


def _archive(path, weights=b"user"):
    with tarfile.open(path, "w:gz") as tar:
        for name, data in (("model/config.json", b"{}"), ("model/weights.th", weights), ("model/vocabulary/x", b"")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _fake_radgraph(seen, new_api=True, download=False):
    "radgraph 0.1.x (model_type, model_cache_dir) or 0.0.x (reads CACHE_DIR/radgraph.tar.gz, swallows **kwargs)."

    def hf_hub_download(*a, **k):
        return "/somewhere/else/radgraph-xl.tar.gz"

    if new_api:

        class RadGraph:
            def __init__(self, batch_size=1, cuda=None, model_type=None, model_cache_dir=None, **kw):
                model_type = model_type or "radgraph-xl"  # radgraph >= 0.1's default (B1)
                folder = Path(model_cache_dir or "/default/cache") / model_type
                if download or not folder.is_dir():
                    mod.hf_hub_download(repo_id="StanfordAIMI/RRG_scorers", filename=f"{model_type}.tar.gz")
                seen.update(model_type=model_type, weights=(folder / "weights.th").read_bytes())
    else:

        class RadGraph:
            def __init__(self, batch_size=1, cuda=None, **kw):
                seen.update(kwargs=kw, weights=Path(mod.CACHE_DIR, "radgraph.tar.gz").read_bytes()[:2])

    class F1RadGraph:
        def __init__(self, reward_level, **kw):
            seen["reward_level"] = reward_level
            self.rg = RadGraph(**kw)

        def __call__(self, refs, hyps):
            seen["refs"] = list(refs)
            return 0.25, [0.25] * len(refs), [], []

    mod = _module("radgraph", RadGraph=RadGraph, F1RadGraph=F1RadGraph, hf_hub_download=hf_hub_download)
    mod.CACHE_DIR = "/default/cache"
    return mod


def test_radgraph_adapter_asks_for_radgraph_not_xl(tmp_path, monkeypatch):
    "B1: model_type 'radgraph' and the user's archive unpacked in a private cache, on radgraph 0.1's interface."
    seen = {}
    monkeypatch.setitem(sys.modules, "radgraph", _fake_radgraph(seen))
    r = run_adapter("radgraph", ["a b"], ["a"], path=_archive(tmp_path / "radgraph.tar.gz", b"user weights"))
    assert seen["model_type"] == "radgraph" and seen["reward_level"] == "partial"
    assert seen["weights"] == b"user weights"  # the given file, not a cached one
    assert r["scores"] == {"RadGraph F1 (partial)": 0.25} and "'radgraph'" in r["message"]


def test_radgraph_adapter_on_radgraph_009(tmp_path, monkeypatch):
    "radgraph 0.0.9 (MLRG's pin): its CACHE_DIR points at the given file for the construction only."
    seen = {}
    mod = _fake_radgraph(seen, new_api=False)
    monkeypatch.setitem(sys.modules, "radgraph", mod)
    run_adapter("radgraph", ["a"], ["a"], path=_archive(tmp_path / "radgraph.tar.gz"))
    assert seen["kwargs"] == {"model_type": "radgraph"} and seen["weights"] == b"\x1f\x8b"
    assert mod.CACHE_DIR == "/default/cache"  # restored


def test_adapter_cannot_silently_download(tmp_path, monkeypatch):
    "A package that still asks the hub fails loudly: its download would mean the given file was not used."
    monkeypatch.setitem(sys.modules, "radgraph", _fake_radgraph({}, download=True))
    with pytest.raises(RuntimeError, match="local weights were not used"):
        run_adapter("radgraph", ["a"], ["a"], path=_archive(tmp_path / "radgraph.tar.gz"))
    with pytest.raises(InputError, match="config.json"):
        bad = tmp_path / "bad.tar.gz"
        with tarfile.open(bad, "w:gz") as tar:
            info = tarfile.TarInfo("readme")
            tar.addfile(info, io.BytesIO(b""))
        run_adapter("radgraph", ["a"], ["a"], path=bad)


def _fake_chexbert(default_cache):
    "f1chexbert 0.0.2's shape: reads CACHE_DIR/chexbert.pth when it exists; sklearn-style reports."

    class F1CheXbert:
        def __init__(self, device=None, **kw):
            self.weights = Path(mod.CACHE_DIR, "chexbert.pth").read_bytes()

        def __call__(self, hyps, refs):
            avg = lambda f: {"precision": f / 2, "recall": f, "f1-score": f}
            v = 0.75 if self.weights == b"PK\x03\x04user" else 0.0
            cr, cr5 = {"micro avg": avg(v), "macro avg": avg(0.5)}, {"micro avg": avg(0.4), "macro avg": avg(0.3)}
            return 0.0, None, cr, cr5

    mod = _module("f1chexbert", F1CheXbert=F1CheXbert)
    mod.CACHE_DIR = str(default_cache)
    return mod


def test_chexbert_is_headline_ce_under_mlrg(tmp_path, monkeypatch, tok):
    "Fidelity 2.26: CheXbert's CE is the table's CE under protocol mlrg when it runs; the given file is the one read."
    default = tmp_path / "cache"
    default.mkdir()
    (default / "chexbert.pth").write_bytes(b"PK\x03\x04stale")  # a cached file the package would otherwise use
    weights = tmp_path / "chexbert.pth"
    weights.write_bytes(b"PK\x03\x04user")
    monkeypatch.setitem(sys.modules, "f1chexbert", _fake_chexbert(default))
    refs, hyps = ["mild edema.", "no effusion."], ["mild edema.", "small effusion."]
    mlrg = evaluate(refs, hyps, meteor=False, protocol="mlrg", tokenizer=tok, chexbert_weights=str(weights))
    assert mlrg["adapters"]["chexbert"]["scores"]["CheXbert-14 micro F1"] == 0.75
    assert mlrg["ce_headline"]["labeler"].startswith("CheXbert") and mlrg["settings"]["headline_ce_labeler"].startswith(
        "CheXbert"
    )
    row = summary_row(mlrg)
    assert row["CE14 mi-F1"] == 0.75 and row["CE14 mi-P"] == 0.375 and row["CE5 ma-F1"] == 0.3
    assert "CE14 mi-F1 [CheXbert]" in format_result(mlrg)
    plain = evaluate(refs, hyps, meteor=False, chexbert_weights=str(weights))  # today's behaviour: rules in the table
    assert plain["ce_headline"]["labeler"] == LABELER_NAME
    assert summary_row(plain)["CE14 mi-F1"] == plain["ce"]["CE-14"]["micro"]["f1"]
    assert "CE14 mi-F1 [rules]" in format_result(plain)


def test_adapter_failure_under_transformers_5_says_why(tmp_path, monkeypatch):
    "The scorers call tokenizer methods transformers 5 removed: the error names them and MLRG's transformers pin."
    import mlrg.evaluate as ev

    class F1RadGraph:
        def __init__(self, reward_level, **kw):
            raise AttributeError("BertTokenizer has no attribute encode_plus")

    class RadGraph:
        def __init__(self, model_type=None, model_cache_dir=None):
            pass

    monkeypatch.setitem(sys.modules, "radgraph", _module("radgraph", RadGraph=RadGraph, F1RadGraph=F1RadGraph))
    monkeypatch.setattr(ev, "_transformers_major", lambda: 5)
    with pytest.raises(RuntimeError, match="transformers 5 removed.*4.43.3"):
        run_adapter("radgraph", ["a"], ["a"], path=_archive(tmp_path / "radgraph.tar.gz"))

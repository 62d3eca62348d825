"""Stage 2 as MLRG's code computes it (fidelity points 2.5-2.9, 2.12-2.14, 2.17-2.23): stage 1's text ProjectionHead on
the prompt, loaded from a stage-1 model; the memory's "ori" tokens and U[0, 1) type embeddings; BERT's fusion layer;
the decoder's inputs, padding and beam search as transformers' GPT-2 has them; GPT-2's token rows kept; a Lightning
checkpoint of plain values read without the pickle flag; the mimic presets; the scoring protocol at val and test.
Also mlrg's `prior_path` variants (not MLRG's): they change only the decoder's memory, and generate with and without
the cache alike."""

import argparse
import json

import pytest
import torch
import torch.nn.functional as F

from mlrg.core import InputError
from mlrg.data import Vocab
from mlrg.decoder import ReportDecoder, beam_search, greedy, load_gpt2_weights
from mlrg.finetune import FINETUNE, FINETUNE_PRESETS, lr_groups, load_stage1, model_config_for
from mlrg.models import MLRG_OPTIONS, MLRGPretrainModel, dummy_batch
from mlrg.report_model import (
    ATTENTION_LAYERS,
    REPORT_MLRG_OPTIONS,
    BertPromptFusion,
    MLRGReportModel,
    report_model_config,
)
from mlrg.study import study_notes

MLRG_VISUAL = {k: v[1] for k, v in MLRG_OPTIONS.items()}
MLRG_REPORT = {k: v[1] for k, v in REPORT_MLRG_OPTIONS.items()}
TINY = {"image_size": 32, "d_model": 32, "fusion_heads": 4, "fusion_depth": 1}


def _report_model(seed=0, **options):
    torch.manual_seed(seed)
    cfg = report_model_config(
        {
            "visual": {**TINY, **options.pop("visual", {})},
            "prompt": {"vocab_size": 60, "heads": 4},
            "prompt_heads": 4,
            "decoder": {"n_layers": 1, "n_heads": 4, "max_length": 32},
            **options,
        }
    )
    return MLRGReportModel(cfg)


def test_prompt_projection_is_stage1_text_head():
    "2.5: prompt_projection='mlrg' builds `text_proj` on every prompt token; a stage-1 model's loads into it by name."
    torch.manual_seed(1)
    s1 = MLRGPretrainModel({**TINY, **MLRG_VISUAL, "vocab_size": 60, "proj_dim": 32, "text_dim": 32, "text_heads": 4})
    m = _report_model(visual=MLRG_VISUAL, **MLRG_REPORT).eval()
    assert not hasattr(m, "prompt_proj") and hasattr(m, "text_proj")
    t = load_stage1(m, s1, print_fn=None).set_index("name")
    head = [k for k in t.index if k.startswith("text_proj.")]
    assert head and set(t.loc[head, "status"]) == {"loaded"}
    for k, v in s1.text_proj.state_dict().items():
        assert torch.equal(m.text_proj.state_dict()[k], v)
    assert any(k.startswith("text_proj") for k in lr_groups(m, t[t.status == "loaded"].index, 1e-4))  # pt_lr
    b = dummy_batch(batch_size=2, image_size=32, vocab_size=60)
    with torch.no_grad():
        tok = m.text_encoder(b["prompt_ids"], b["prompt_mask"], added=m.segment_embed(b["prompt_segments"].clamp(0, 1)))
        torch.testing.assert_close(m.encode_prompt(b), s1.text_proj.eval()(tok[0]))
    # the default keeps mlrg's prompt path: no projection when the widths match
    assert isinstance(_report_model().prompt_proj, torch.nn.Identity)


def test_type_embeddings_and_ori_memory():
    "2.6-2.7: type embeddings U[0, 1) with type_init='mlrg'; memory_tokens='mlrg': the projected anchor tokens first."
    w = _report_model(type_init="mlrg").type_embed.weight.detach()
    assert float(w.min()) >= 0 and float(w.max()) < 1
    assert float(_report_model().type_embed.weight.detach().min()) < 0  # N(0, 1) by default
    m = _report_model(visual=MLRG_VISUAL, **MLRG_REPORT).eval()
    b = dummy_batch(batch_size=3, image_size=32, vocab_size=60)
    with torch.no_grad():
        out, mem = m.visual(b), m.visual_memory(b)
        t = m.type_embed.weight
        want = m.memory_norm(torch.cat([out["tokens"][:, 0] + t[0], out["fused_tokens"] + t[1]], 1))
        torch.testing.assert_close(mem, want)
        assert not torch.allclose(out["tokens"][:, 0], out["anchor_tokens"])  # ori: before temporal + ln_2


def test_bert_fusion_is_transformers_bert_layer():
    "2.8-2.9: BertPromptFusion computes what a BERT layer with cross-attention computes from the same weights."
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        hidden_size=32,
        num_attention_heads=4,
        intermediate_size=48,
        is_decoder=True,
        add_cross_attention=True,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    cfg._attn_implementation = "eager"
    ref = transformers.models.bert.modeling_bert.BertLayer(cfg).eval()
    ours = BertPromptFusion(32, 4, ffn=48).eval()
    names = {"q": "self.query", "k": "self.key", "v": "self.value", "out": "output.dense", "norm": "output.LayerNorm"}
    sd = {}
    for mine, theirs in (("self_attn", "attention"), ("cross_attn", "crossattention")):
        for a, b in names.items():
            for p in ("weight", "bias"):
                sd[f"{mine}.{a}.{p}"] = ref.state_dict()[f"{theirs}.{b}.{p}"]
    for mine, theirs in (("ff_in", "intermediate.dense"), ("ff_out", "output.dense"), ("norm", "output.LayerNorm")):
        for p in ("weight", "bias"):
            sd[f"{mine}.{p}"] = ref.state_dict()[f"{theirs}.{p}"]
    ours.load_state_dict(sd)
    assert ours.norm.eps == ref.output.LayerNorm.eps == 1e-12
    mem, prompt = torch.randn(2, 6, 32), torch.randn(2, 5, 32)
    pad = torch.zeros(2, 5, dtype=torch.bool)
    pad[1, 3:] = True
    ext = pad[:, None, None, :].float() * torch.finfo(torch.float32).min
    want = ref(mem, attention_mask=None, encoder_hidden_states=prompt, encoder_attention_mask=ext)
    want = want[0] if isinstance(want, tuple) else want  # a tuple in transformers 4, a tensor in 5
    torch.testing.assert_close(ours(mem, prompt, pad), want, atol=1e-5, rtol=1e-5)
    # built with PyTorch's default Linear init, as MLRG's layer (no BERT init_weights)
    assert float(ours.self_attn.q.weight.abs().max()) > 0.1


def _gpt2(tmp_path, vocab=40):
    transformers = pytest.importorskip("transformers")
    transformers.utils.logging.set_verbosity_error()
    torch.manual_seed(3)
    cfg = transformers.GPT2Config(
        vocab_size=vocab,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=64,
        add_cross_attention=True,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    hf.save_pretrained(tmp_path / "gpt2")
    return hf


def _decoder(hf, tmp_path, vocab=40, **kw):
    from mlrg.decoder import gpt2_decoder_config

    cfg = dict(vocab_size=vocab, max_length=24, pad_id=1, bos_id=2, eos_id=3, **gpt2_decoder_config(tmp_path / "gpt2"))
    dec = ReportDecoder({**cfg, **kw}).eval()
    load_gpt2_weights(dec, tmp_path / "gpt2", print_fn=None)
    return dec


def test_decoder_inputs_and_padding_as_gpt2(tmp_path):
    "2.14: inputs tokens[:, :-1], [SEP] read as [PAD], padding masked: transformers' GPT-2 logits at every position."
    hf = _gpt2(tmp_path)
    dec = _decoder(hf, tmp_path, sep_id=4)
    toks = torch.tensor([[2, 10, 4, 12, 3, 1, 1], [2, 13, 14, 15, 16, 17, 3]])
    mem = torch.randn(2, 5, 32)
    inputs, mask = toks[:, :-1].clone(), (toks[:, :-1] != 1).long()
    inputs[inputs == 4] = 1
    want = hf(input_ids=inputs, attention_mask=mask, encoder_hidden_states=mem).logits
    torch.testing.assert_close(dec.teacher_forced(toks, mem), want, atol=1e-5, rtol=1e-5)
    labels = toks[:, 1:].masked_fill(toks[:, 1:] == 1, -100)
    torch.testing.assert_close(dec.loss(toks, mem), F.cross_entropy(want.transpose(1, 2), labels), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("seed", range(6))
def test_greedy_and_beam_search_pick_transformers_tokens(tmp_path, seed):
    "2.23: greedy and 3-beam search give the tokens of transformers' generate from the same weights and memory."
    hf = _gpt2(tmp_path)
    with torch.no_grad():  # [EOS] likelier, so that beams finish at different lengths
        hf.transformer.wte.weight[3] += 0.3 * hf.transformer.wte.weight.std()
    dec = _decoder(hf, tmp_path)
    torch.manual_seed(seed)
    mem = torch.randn(3, 5, 32) * 2
    start = torch.full((3, 1), 2)
    kw = dict(max_length=16, eos_token_id=3, pad_token_id=1, encoder_hidden_states=mem, do_sample=False)

    def strip(rows):
        return [[t for t in r[1:] if t not in (1,)][: (r[1:].index(3) if 3 in r[1:] else None)] for r in rows]

    g = hf.generate(start, num_beams=1, **kw).tolist()
    assert greedy(dec, mem, max_length=16) == [r[: r.index(3)] if 3 in r else r for r in strip(g)]
    b = hf.generate(start, num_beams=3, length_penalty=1.0, early_stopping=False, **kw).tolist()
    assert beam_search(dec, mem, num_beams=3, max_length=16) == [r[: r.index(3)] if 3 in r else r for r in strip(b)]


def test_gpt2_token_rows_kept(tmp_path):
    "2.12/B2: token_rows='keep' keeps the folder's rows (as resize_token_embeddings), the added ones new."
    hf = _gpt2(tmp_path, vocab=40)
    torch.manual_seed(0)
    dec = ReportDecoder(dict(vocab_size=49, n_positions=64, d_model=32, n_layers=2, n_heads=4, max_length=24))
    start = dec.tok.weight.detach().clone()
    t = load_gpt2_weights(dec, tmp_path / "gpt2", print_fn=None, token_rows="keep").set_index("name")
    assert t.loc["tok.weight", "status"] == "loaded (40 of 49 rows)"
    assert torch.equal(dec.tok.weight[:40].detach(), hf.transformer.wte.weight.detach())
    assert torch.equal(dec.tok.weight[40:].detach(), start[40:]) and dec.head.weight is dec.tok.weight
    torch.manual_seed(0)
    dec2 = ReportDecoder(dict(vocab_size=49, n_positions=64, d_model=32, n_layers=2, n_heads=4, max_length=24))
    t2 = load_gpt2_weights(dec2, tmp_path / "gpt2", print_fn=None).set_index("name")  # default: every row new
    assert t2.loc["tok.weight", "status"] == "new (shape mismatch)" and torch.equal(dec2.tok.weight.detach(), start)


def test_lightning_checkpoint_without_the_pickle_flag(tmp_path):
    """A Lightning .ckpt of tensors and plain values loads with weights_only=True (no trust_pickle); one holding a
    pickled object needs trust_pickle, and says so."""
    hf = _gpt2(tmp_path)
    sd = {f"decoder.encoder_decoder.decoder.{k}": v for k, v in hf.state_dict().items()}
    ck = {
        "state_dict": sd,
        "epoch": 8,
        "global_step": 1234,
        "pytorch-lightning_version": "2.3.0",
        "hyper_parameters": {"lr": 5e-5, "name": "cvt_21_to_distilgpt2", "layers": [1, 2], "flags": {"bf16": True}},
        "callbacks": {"ModelCheckpoint{'monitor': 'val_chen_cider'}": {"best_model_score": torch.tensor(0.425)}},
        "optimizer_states": [{"state": {0: {"exp_avg": torch.zeros(3)}}, "param_groups": [{"lr": 1e-4}]}],
        "lr_schedulers": [{"factor": 0.1, "patience": 5, "best": 0.42}],
    }
    torch.save(ck, tmp_path / "plain.ckpt")
    dec = _decoder(hf, tmp_path)
    t = load_gpt2_weights(dec, tmp_path / "plain.ckpt", trust_pickle=False, print_fn=None)
    assert (t.status == "loaded").sum() > 0
    torch.save({**ck, "hyper_parameters": argparse.Namespace(lr=5e-5)}, tmp_path / "pickled.ckpt")
    with pytest.raises(InputError, match="trust_pickle=True"):
        load_gpt2_weights(dec, tmp_path / "pickled.ckpt", trust_pickle=False, print_fn=None)
    load_gpt2_weights(dec, tmp_path / "pickled.ckpt", trust_pickle=True, print_fn=None)


def test_mimic_presets_set_mlrg_values():
    "2.17-2.19, 2.21: the finetune preset's stage-2 options are MLRG's; the study asks for decoder_init or says why."
    v = FINETUNE_PRESETS["mimic"].values
    assert {k: v[k] for k in MLRG_REPORT} == MLRG_REPORT and v["model_config"] == {**MLRG_VISUAL, "view_vocab": "raw"}
    assert (v["weight_decay"], v["weight_decay_scope"], v["drop_last"], v["eval_batch_size"]) == (0.01, "all", True, 14)
    assert (v["protocol"], v["select_metric"], v["decoder_token_rows"]) == ("mlrg", "rcb", "keep")
    assert all(k in FINETUNE.params for k in v)  # validated against the declaration
    assert FINETUNE.check()["protocol"] == "plain" and FINETUNE.check()["prompt_fusion"] == "torch"  # defaults: mlrg's
    note = study_notes("mimic", [("study.mimic_root", "x")])
    assert len(note) == 1 and "finetune.decoder_init" in note[0] and "50,257 token rows kept" in note[0]
    assert study_notes("mimic", [("finetune.decoder_init", "cvt.ckpt")]) == []


def test_mlrg_exact_model_from_the_preset():
    "The mimic preset's parameters and a stage-1 config build MLRG's stage-2 model; its loss is the logits' CE."
    vocab = Vocab("heart size normal small left pleural effusion cough fever".split())
    s1 = {"config": {"model": {**TINY, **MLRG_VISUAL, "text_dim": 32, "text_heads": 4, "proj_dim": 32}}}
    p = FINETUNE.check(
        {**FINETUNE_PRESETS["mimic"].values, "decoder": "small", "select_metric": "bleu4+ce14"},
        pretrained_path="stage1.pt",
        decoder_path="gpt2",
        prompt_heads=4,
        decoder_heads=4,
        decoder_layers=1,
    )
    cfg = model_config_for(p, vocab, s1)
    assert {k: cfg[k] for k in MLRG_REPORT} == MLRG_REPORT and cfg["decoder"]["sep_id"] == vocab.sep_id
    assert {k: cfg["visual"][k] for k in MLRG_VISUAL} == MLRG_VISUAL
    torch.manual_seed(0)
    m = MLRGReportModel(cfg).eval()
    assert isinstance(m.prompt_fusion, BertPromptFusion)
    b = dummy_batch(batch_size=3, image_size=32, vocab_size=len(vocab))
    with torch.no_grad():
        logits = m.logits(b)
        want = F.cross_entropy(logits.transpose(1, 2), b["target_ids"][:, 1:], ignore_index=vocab.pad_id)
        torch.testing.assert_close(m(b)["loss"], want)
        assert len(m.generate(b, num_beams=3, max_length=8)) == 3


def test_protocol_reaches_apply_protocol_at_val_and_test(monkeypatch, tmp_path):
    """2.21-2.22: protocol='mlrg' hands the val and the test records to mlrg.evaluate.apply_protocol (split 'val', then
    'test'), with GPT-2's tokenizer and max_length, and scores and writes its texts; the metrics file names it."""
    import mlrg.finetune as ft

    calls, tok = [], object()

    def fake(references, hypotheses, protocol, tokenizer=None, max_tokens=100, split="test"):
        calls.append((protocol, tokenizer is tok, max_tokens, split))
        return [f"cut {r}"[:12] for r in references], [h or "..." for h in hypotheses]

    monkeypatch.setattr(ft, "apply_protocol", fake)
    monkeypatch.setattr(ft, "protocol_tokenizer_for", lambda p, vocab: tok if p["protocol"] == "mlrg" else None)
    s = ft.finetune(
        protocol="mlrg",
        max_steps=1,
        eval_steps=1,
        batch_size=4,
        eval_batch_size=16,
        decoder_layers=1,
        max_length=24,
        num_beams=2,
        val_max_samples=4,
        progress=False,
        meteor=False,
        num_threads=1,
        phantom_patients=8,
        model_save_path=str(tmp_path / "ft"),
    )
    assert set(calls) == {("mlrg", True, 24, "val"), ("mlrg", True, 24, "test")}
    preds = json.loads((tmp_path / "ft" / "test_predictions.json").read_text())
    assert preds and all(r["reference"].startswith("cut ") for r in preds)
    metrics = json.loads((tmp_path / "ft" / "test_metrics.json").read_text())
    assert metrics["protocol"]["name"] == metrics["result"]["protocol"]["name"] == "mlrg"
    val = [json.loads(x) for x in next((tmp_path / "ft" / "evals").glob("val_step_*")).read_text().splitlines()]
    assert val and all(r["reference"].startswith("cut ") for r in val) and s["protocol"] == "mlrg"


def test_protocol_needs_gpt2_tokenizer():
    "protocol='mlrg' with a word vocabulary and no GPT-2 folder stops before any work, naming what it needs."
    from mlrg.finetune import protocol_tokenizer_for

    vocab = Vocab("heart size normal".split())
    assert protocol_tokenizer_for(FINETUNE.check(), vocab) is None
    with pytest.raises(InputError, match="GPT-2"):
        protocol_tokenizer_for(FINETUNE.check(protocol="mlrg"), vocab)


@pytest.mark.parametrize(
    "table, max_length",
    [
        ({2: {3: 0.55, 4: 0.25, 5: 0.2}, 4: {6: 1.0}, 5: {7: 1.0}}, 3),
        ({2: {3: 0.55, 4: 0.25, 5: 0.2}, 4: {6: 1.0}, 5: {7: 1.0}}, 4),
    ],
)
def test_beam_search_rules_are_transformers(tmp_path, table, max_length):
    """A toy table of test_decoder (how beams still running at max_length are scored) through transformers' own beam
    search: a logits processor puts the table's log-probabilities in place of the model's. (When to stop differs
    between versions: transformers 4.43, MLRG's pin, compares with the best of all candidates, `[EOS]` ones too, as
    mlrg does and test_decoder pins; the vectorized beam search of transformers >= 4.50 with the best running beam.)"""
    transformers = pytest.importorskip("transformers")
    from mlrg.decoder import TableLM

    lm = TableLM(table, vocab_size=10)
    hf = _gpt2(tmp_path, vocab=10)

    class Table(transformers.LogitsProcessor):
        def __call__(self, input_ids, scores):
            return lm.next_logits(input_ids, None).log_softmax(-1).to(scores.dtype)

    out = hf.generate(
        torch.full((1, 1), 2),
        encoder_hidden_states=torch.zeros(1, 1, 32),
        num_beams=2,
        max_length=max_length,
        eos_token_id=3,
        pad_token_id=1,
        do_sample=False,
        length_penalty=1.0,
        early_stopping=False,
        logits_processor=transformers.LogitsProcessorList([Table()]),
    ).tolist()[0][1:]
    assert beam_search(lm, torch.zeros(1, 1, 1), num_beams=2, max_length=max_length) == [
        [t for t in out[: out.index(3) if 3 in out else None] if t != 1]
    ]


def _prompt_batch():
    "A dummy batch whose prompts `[CLS] indication [SEP] prior [SEP]` differ in length; the third has no prior tokens."
    b = dummy_batch(batch_size=3, image_size=32, vocab_size=60)
    ids = torch.tensor([[4, 9, 10, 5, 11, 12, 13, 5], [4, 9, 5, 14, 5, 0, 0, 0], [4, 9, 10, 11, 5, 0, 0, 0]])
    seg = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0, 0, 0]])
    return {**b, "prompt_ids": ids, "prompt_mask": ids != 0, "prompt_segments": seg}


def test_prior_path_changes_only_the_decoders_memory():
    "fusion / decoder / prompt: same weights, same fused memory; only the prompt tokens appended after it differ."
    models = {p: _report_model(seed=3, prior_path=p).eval() for p in ("fusion", "decoder", "prompt")}
    sd = models["fusion"].state_dict()
    for m in models.values():  # no weights of its own: the same seed builds the same model
        assert m.state_dict().keys() == sd.keys() and all(torch.equal(v, sd[k]) for k, v in m.state_dict().items())
    b = _prompt_batch()
    with torch.no_grad():
        vis = {p: m.visual_memory(b) for p, m in models.items()}
        mem = {p: m.memory(b) for p, m in models.items()}
        mask = {p: m.memory_mask(b, mem[p]) for p, m in models.items()}
        prompt = models["fusion"].encode_prompt(b)
    n = vis["fusion"].shape[1]
    assert n == 2 * models["fusion"].visual.n_tokens and mem["fusion"].shape[1] == n and mask["fusion"] is None
    for p in ("decoder", "prompt"):
        assert torch.equal(vis[p], vis["fusion"]) and torch.equal(mem[p][:, :n], mem["fusion"])
        assert mask[p].shape == mem[p].shape[:2] and mask[p][:, :n].all()
    # prompt: every prompt token, the prompt's padding masked
    assert torch.equal(mem["prompt"][:, n:], prompt) and torch.equal(mask["prompt"][:, n:], b["prompt_mask"])
    # decoder: the prior report's tokens (segment 1) first in each row: 4, 2 and none here; the rest masked
    assert mem["decoder"].shape[1] == n + 4 and mask["decoder"][:, n:].sum(1).tolist() == [4, 2, 0]
    for j in range(3):
        real = b["prompt_mask"][j] & (b["prompt_segments"][j] == 1)
        k = int(real.sum())
        assert torch.equal(mem["decoder"][j, n : n + k], prompt[j, real])
    # the decoder never reads a masked token: garbage there leaves the logits as they were
    for p in ("decoder", "prompt"):
        m, junk = models[p], mem[p].masked_fill(~mask[p][..., None], 1e4)
        with torch.no_grad():
            a = m.decoder.teacher_forced(b["target_ids"], mem[p], mask[p])
            torch.testing.assert_close(m.decoder.teacher_forced(b["target_ids"], junk, mask[p]), a)
            assert not torch.allclose(m.decoder.teacher_forced(b["target_ids"], junk, None), a)  # the test can fail
    # a batch without prior tokens anywhere: nothing appended
    plain = dummy_batch(batch_size=2, image_size=32, vocab_size=60)
    with torch.no_grad():
        assert models["decoder"].memory(plain).shape[1] == n


def test_prior_path_config_and_older_prompt_memory():
    "prior_path values are checked; an older config's prompt_memory reads as prior_path (True: prompt, False: fusion)."
    base = {"prompt": {"vocab_size": 60, "heads": 4}, "prompt_heads": 4}
    assert report_model_config(base)["prior_path"] == "fusion"
    assert report_model_config({**base, "prompt_memory": True})["prior_path"] == "prompt"
    cfg = report_model_config({**base, "prompt_memory": False})
    assert cfg["prior_path"] == "fusion" and "prompt_memory" not in cfg
    assert report_model_config({**base, "prompt_memory": True, "prior_path": "prompt"})["prior_path"] == "prompt"
    with pytest.raises(InputError, match="prompt_memory"):
        report_model_config({**base, "prompt_memory": True, "prior_path": "decoder"})
    with pytest.raises(InputError, match="prior_path"):
        report_model_config({**base, "prior_path": "both"})
    with pytest.raises(InputError, match="parameter 'prior_path'"):
        FINETUNE.check(prior_path="both")
    # an older checkpoint's model (prompt_memory=True) loads into today's model, which computes as before
    old = _report_model(seed=4, prompt_memory=True).eval()
    new = MLRGReportModel(old.config).eval()
    new.load_state_dict(old.state_dict())
    b = _prompt_batch()
    with torch.no_grad():
        torch.testing.assert_close(new.logits(b), old.logits(b))


def _varied(path, **options):
    "A random model of `prior_path` whose decoder blocks' weights are large enough that it writes varied tokens."
    m = _report_model(seed=5, prior_path=path, **options).eval()
    torch.manual_seed(6)
    with torch.no_grad():
        for blk in m.decoder.blocks:
            for mod in blk.modules():
                if isinstance(mod, torch.nn.Linear):
                    mod.weight.normal_(0, 0.3)
    return m


@pytest.mark.parametrize("num_beams", [1, 3])
def test_prior_path_generation_cached_and_uncached_agree(num_beams):
    "Greedy and beam search run with each prior_path, and the key-value cache gives the uncached tokens."
    b, out = _prompt_batch(), {}
    for path in ("fusion", "decoder", "prompt"):
        m = _varied(path)
        out[path] = m.generate(b, num_beams=num_beams, max_length=12, use_cache=True)
        assert len(out[path]) == 3 and all(0 < len(s) <= 12 for s in out[path])
        assert out[path] == m.generate(b, num_beams=num_beams, max_length=12, use_cache=False)
    assert len({t for s in out["fusion"] for t in s}) > 3  # varied tokens: the comparison can fail
    assert out["decoder"][0] != out["fusion"][0]  # the prior's tokens change what is written
    assert out["decoder"][2] == out["fusion"][2]  # the third prompt has none: all masked, nothing changes


def _copying(path="decoder", gate_bias=0.0):
    "A varied random model whose decoder copies (copy=True); its copy gate's bias set to `gate_bias`."
    m = _varied(path, decoder={"n_layers": 1, "n_heads": 4, "max_length": 32, "copy": True})
    m.config["copy_skip_ids"] = [0, 1, 2, 3, 4, 5, 6, 7, 8]  # the word vocabulary's special tokens
    with torch.no_grad():
        m.decoder.copy.gate.bias.fill_(gate_bias)
    return m


def test_copy_mechanism_copies_the_prompt_tokens_in_memory():
    """copy_prompt: the decoder's next-token distribution mixes writing with copying the prompt tokens prior_path puts
    in its memory (special tokens never); gate shut it writes as without copying, open it copies only those tokens."""
    b = _prompt_batch()
    m = _copying("decoder")
    with torch.no_grad():
        mem = m.memory(b)
        ids = m.copy_ids(b, mem)
    n = mem.shape[1] - 4  # the prior report's tokens (4, 2 and none here) after the fused memory
    assert ids.shape == mem.shape[:2] and not ids[:, :n].any()  # the fused memory stands for no token
    # row 0's prior report is `11 12 13 [SEP]`: [SEP] is special; row 1's `14 [SEP]`; row 2 has none
    assert ids[:, n:].tolist() == [[11, 12, 13, 0], [14, 0, 0, 0], [0, 0, 0, 0]]
    with torch.no_grad():
        logp = m.logits(b)
    torch.testing.assert_close(logp.exp().sum(-1), torch.ones(logp.shape[:2]))  # a distribution at each position
    # gate open (bias -30: copy): every token written is one of the row's prior report tokens; a row with nothing to
    # copy writes as without the copy mechanism
    shut, open_ = _copying("decoder", 30.0), _copying("decoder", -30.0)
    for num_beams in (1, 3):
        out = open_.generate(b, num_beams=num_beams, max_length=10)
        assert set(out[0]) <= {11, 12, 13} and set(out[1]) <= {14} and out[0] and out[1], out
        assert out == open_.generate(b, num_beams=num_beams, max_length=10, use_cache=False)
        plain = shut.generate(b, num_beams=num_beams, max_length=10)
        shut.decoder.config["copy"] = False  # the same weights without the copy head
        assert plain == shut.generate(b, num_beams=num_beams, max_length=10) and out[2] == plain[2]
        assert set(plain[0]) - {11, 12, 13}  # writing differs from copying: the comparison can fail
        shut.decoder.config["copy"] = True
    # gate shut: the log-probabilities are the plain decoder's
    with torch.no_grad():
        a = shut.logits(b)
        shut.decoder.config["copy"] = False
        torch.testing.assert_close(a, shut.logits(b).log_softmax(-1), atol=1e-4, rtol=1e-4)
    # the loss trains the gate and the copy attention
    m.train()
    m(b)["loss"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.decoder.copy.parameters())


def test_copy_needs_prompt_tokens_in_memory_and_reaches_the_model_config():
    base = {"prompt": {"vocab_size": 60, "heads": 4}, "prompt_heads": 4, "decoder": {"copy": True}}
    with pytest.raises(InputError, match="prior_path 'decoder' or 'prompt'"):
        report_model_config(base)
    assert report_model_config({**base, "prior_path": "prompt"})["decoder"]["copy"] is True
    vocab = Vocab(["effusion", "small"])
    mc = model_config_for(FINETUNE.check(copy_prompt=True, prior_path="decoder"), vocab)
    assert mc["decoder"]["copy"] is True and mc["copy_skip_ids"] == list(range(9))  # [PAD] .. [MASK]
    plain = model_config_for(FINETUNE.check(), vocab)  # off: no new keys, so older runs' configs compare equal
    assert "copy" not in plain["decoder"] and "copy_skip_ids" not in plain
    with pytest.raises(InputError, match="decoder.copy"):
        model_config_for(FINETUNE.check(copy_prompt=True), vocab)  # prior_path fusion


@pytest.mark.parametrize("batch_images", ["slots", "dedup"])
def test_other_images_memory_adds_the_other_images_tokens(batch_images):
    """other_images="memory" (not MLRG's): same weights; the decoder's memory gains the other slots' embedded tokens
    after the fused memory, unused slots masked (as the ablation flags leave them); the fused memory and the prompt's
    part are as with "fusion"; an ablated prior image is masked, not read."""
    vis = {"batch_images": batch_images}
    fus = _report_model(seed=3, prior_path="prompt", visual=vis).eval()
    mem = _report_model(seed=3, prior_path="prompt", other_images="memory", visual=vis).eval()
    assert fus.config["other_images"] == "fusion" and mem.config["other_images"] == "memory"
    sd = fus.state_dict()
    assert all(torch.equal(v, sd[k]) for k, v in mem.state_dict().items()) and mem.state_dict().keys() == sd.keys()
    b = _prompt_batch()
    N, V = fus.visual.n_tokens, b["image_mask"].shape[1] - 1
    with torch.no_grad():
        a, m = fus.memory(b), mem.memory(b)
        ma, mm = fus.memory_mask(b, a), mem.memory_mask(b, m)
        out = mem.visual(b, slot_tokens=True)
    n, L = 2 * N, b["prompt_ids"].shape[1]
    assert m.shape[1] == a.shape[1] + V * N and mm.shape == m.shape[:2]
    torch.testing.assert_close(m[:, :n], a[:, :n])
    torch.testing.assert_close(m[:, -L:], a[:, -L:])
    assert torch.equal(mm[:, -L:], ma[:, -L:]) and mm[:, :n].all()
    used = b["image_mask"][:, 1:].repeat_interleave(N, dim=1)
    assert torch.equal(mm[:, n : n + V * N], used) and not used.all() and used.any()  # some slots empty: it can fail
    torch.testing.assert_close(m[:, n : n + V * N], mem.memory_norm(out["slot_tokens"][:, 1:].flatten(1, 2)))
    # the slots' tokens are the visual encoder's embedded ones: the anchor's equal anchor_tokens
    torch.testing.assert_close(out["slot_tokens"][:, 0], out["anchor_tokens"])
    # the decoder never reads a masked slot; a used one changes the logits
    with torch.no_grad():
        base = mem.decoder.teacher_forced(b["target_ids"], m, mm)
        junk = m.masked_fill(~mm[..., None], 1e4)
        torch.testing.assert_close(mem.decoder.teacher_forced(b["target_ids"], junk, mm), base)
        assert not torch.allclose(mem.decoder.teacher_forced(b["target_ids"], m * 1.5, mm), base)
    # without the prior image (use_prior_scan off) its slot is masked
    no_prior = _report_model(seed=3, prior_path="prompt", other_images="memory", visual={**vis, "is_prior_scan": False})
    with torch.no_grad():
        mask = no_prior.eval().memory_mask(b, no_prior.memory(b))
    assert not mask[:, n + (V - 1) * N : n + V * N].any() and b["image_mask"][:, V].any()
    # generation reads the same memory, cached and uncached alike
    assert mem.generate(b, num_beams=2, max_length=8) == mem.generate(b, num_beams=2, max_length=8, use_cache=False)


def test_other_images_is_checked():
    "other_images is checked in the model config and as a parameter; an older config without it reads as fusion."
    base = {"prompt": {"vocab_size": 60, "heads": 4}, "prompt_heads": 4}
    assert report_model_config(base)["other_images"] == "fusion"
    with pytest.raises(InputError, match="other_images"):
        report_model_config({**base, "other_images": "all"})
    with pytest.raises(InputError, match="parameter 'other_images'"):
        FINETUNE.check(other_images="all")
    # other_images="fusion" with prior_path="fusion" is MLRG's memory: no mask at all
    m = _report_model(seed=1).eval()
    b = _prompt_batch()
    with torch.no_grad():
        assert m.memory_mask(b, m.memory(b)) is None


def _rates(module):
    "The attention layers' rates and the other dropout layers' rates in `module`."
    attention = {float(m.dropout) for m in module.modules() if isinstance(m, ATTENTION_LAYERS)}
    other = {m.p for m in module.modules() if isinstance(m, torch.nn.Dropout)}
    return attention, other


def _dropped(rate, **options):
    "A tiny report model with dropout `rate` in the prompt encoder, the fusion and the decoder (as finetune sets it)."
    dec = {"n_layers": 1, "n_heads": 4, "max_length": 32, "dropout": rate}
    return _report_model(dropout=rate, decoder=dec, **options)


@pytest.mark.parametrize("fusion", ["torch", "mlrg"])
def test_attention_dropout_sets_only_the_attention_weights(fusion):
    "attention_dropout: the attention layers of the prompt encoder, fusion and decoder; other dropout keeps its rate."
    m = _dropped(0.1, attention_dropout=0.0, prompt_fusion=fusion)
    for part in (m.text_encoder, m.prompt_fusion, m.decoder):
        assert _rates(part) == ({0.0}, {0.1})
    assert all(float(x.dropout) == 0.0 for x in m.visual.modules() if isinstance(x, ATTENTION_LAYERS))  # untouched
    same = _dropped(0.1, prompt_fusion=fusion)  # None: dropout's rate everywhere, as before
    assert _rates(same.decoder) == ({0.1}, {0.1}) and "attention_dropout" not in same.config
    # at work: with only attention dropout on, training-mode losses vary with the seed; with it 0 they do not
    b = _prompt_batch()

    def losses(model):
        out = []
        for seed in (0, 1):
            torch.manual_seed(seed)
            out.append(model.train()(b)["loss"].item())
        return out

    assert len(set(losses(_dropped(0.0, attention_dropout=0.5, prompt_fusion=fusion)))) == 2
    assert len(set(losses(_dropped(0.0, attention_dropout=0.0, prompt_fusion=fusion)))) == 1
    with pytest.raises(InputError, match="attention_dropout"):
        _report_model(attention_dropout=1.5)
    with pytest.raises(InputError, match="parameter 'attention_dropout'"):
        FINETUNE.check(attention_dropout=-0.1)


def test_finding_loss_adds_the_heads_cross_entropy_in_training_only():
    """finding_loss: the token loss plus weight x the findings head's BCE when the batch has finding_labels; without
    them (val, test) or with the weight at 0, the token loss alone; the head's gradient reaches the encoders."""
    off = _report_model(seed=3, prior_path="prompt").eval()
    on = _report_model(seed=3, prior_path="prompt", finding_loss=0.5).eval()
    assert not hasattr(off, "finding_head") and "finding_loss" not in off.config and on.config["finding_loss"] == 0.5
    sd = off.state_dict()  # the head is built last: every other weight is the same seed's
    assert {k for k in on.state_dict() if k not in sd} == {k for k in on.state_dict() if k.startswith("finding_head.")}
    assert all(torch.equal(on.state_dict()[k], v) for k, v in sd.items())
    b = _prompt_batch()
    labels = torch.tensor([[1.0, 1.0] + [0.0] * 12, [0.0] * 14, [1.0] * 14])
    torch.nn.init.normal_(on.finding_head.weight)  # (zero at init: every finding starts at its bias)
    with torch.no_grad():
        mem = on.memory(b)
        mask = on.memory_mask(b, mem)
        tok = on.decoder.loss(b["target_ids"], mem, mask)
        bce = F.binary_cross_entropy_with_logits(on.finding_head(mem, mask), labels)
        out = on({**b, "finding_labels": labels})
        torch.testing.assert_close(on(b), {"loss": tok})  # no labels: the token loss alone
        torch.testing.assert_close(off({**b, "finding_labels": labels}), {"loss": tok})  # no head: the same
    torch.testing.assert_close(out, {"loss": tok + 0.5 * bce, "token_loss": tok, "finding_loss": bce})
    assert bce > 0.1
    assert not on({**b, "finding_labels": labels})["finding_loss"].requires_grad  # a logged term; "loss" is stepped on
    on.train().zero_grad()
    F.binary_cross_entropy_with_logits(
        on.finding_head(on.memory(b), on.memory_mask(b, on.memory(b))), labels
    ).backward()
    for part in ("visual", "text_encoder", "prompt_fusion"):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in getattr(on, part).parameters()), part
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in on.decoder.parameters())
    with pytest.raises(InputError, match="finding_loss"):
        _report_model(finding_loss=-1.0)

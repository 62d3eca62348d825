"""The stage-2 decoder (mlrg.decoder): teacher-forced loss, greedy decoding and beam search, with or without a cache."""

import math

import pytest
import torch

from mlrg.core import InputError
from mlrg.decoder import ReportDecoder, TableLM, beam_search, decoder_config, greedy, score_next


@pytest.fixture(scope="module")
def model():
    "A small decoder trained for a few steps on random memories, so that its outputs are not uniform."
    torch.manual_seed(0)
    dec = ReportDecoder(dict(vocab_size=40, d_model=32, n_layers=2, n_heads=4, max_length=24, dropout=0.0))
    mem = torch.randn(6, 9, 32)
    toks = torch.randint(4, 40, (6, 12))
    toks[:, 0] = 2
    toks[:, 8] = 3
    toks[:, 9:] = 0
    opt = torch.optim.AdamW(dec.parameters(), lr=3e-3)
    for _ in range(30):
        opt.zero_grad()
        dec.loss(toks, mem).backward()
        opt.step()
    return dec.eval(), mem


def test_config_and_loss(model):
    dec, mem = model
    with pytest.raises(InputError, match="unknown decoder config"):
        decoder_config(vocab_size=10, layers=2)
    with pytest.raises(InputError, match="multiple of n_heads"):
        decoder_config(vocab_size=10, d_model=30, n_heads=4)
    toks = torch.tensor([[2, 5, 6, 3, 0, 0]])
    with torch.no_grad():
        logits = dec(toks[:, :-1], mem[:1])
    manual = torch.nn.functional.cross_entropy(logits[0, :3], toks[0, 1:4])  # padding does not count
    assert float(dec.loss(toks, mem[:1]).detach()) == pytest.approx(float(manual), rel=1e-5)
    with pytest.raises(InputError, match="max_length=24"):
        dec(torch.full((1, 25), 5), mem[:1])


def test_beam_one_is_greedy_and_cache_changes_nothing(model):
    dec, mem = model
    g = greedy(dec, mem, max_length=20)
    assert g == greedy(dec, mem, max_length=20, use_cache=False)
    assert beam_search(dec, mem, num_beams=1, max_length=20) == g
    b3 = beam_search(dec, mem, num_beams=3, max_length=20)
    assert b3 == beam_search(dec, mem, num_beams=3, max_length=20, use_cache=False)
    assert any(len(s) > 2 for s in g)  # the trained model writes something


def test_padding_in_memory_is_ignored(model):
    dec, mem = model
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[:, 9:] = False
    padded = torch.cat([mem[:2], torch.randn(2, 3, 32) * 100], 1)  # garbage where the mask says padding
    assert greedy(dec, padded, mask, max_length=12) == greedy(dec, mem[:2], max_length=12)


def test_beam_search_finds_what_greedy_misses():
    A, B, C, D, EOS = 4, 5, 6, 7, 3
    lm = TableLM(
        {2: {A: 0.6, B: 0.4}, A: {C: 1 / 3, D: 1 / 3, EOS: 1 / 3}, B: {EOS: 1.0}, C: {EOS: 1.0}, D: {EOS: 1.0}},
        vocab_size=8,
    )
    mem = torch.zeros(2, 1, 1)
    assert [s[0] for s in greedy(lm, mem, max_length=5)] == [A, A]
    assert beam_search(lm, mem, num_beams=2, max_length=5) == [[B], [B]]


def test_constraints():
    logits, seq = torch.zeros(2, 10), torch.tensor([[2, 5, 6, 5], [2, 7, 8, 9]])
    lp = score_next(logits, seq, eos_id=3, min_length=4)
    assert math.isinf(lp[0, 3]) and not math.isinf(lp[0, 4])  # 3 generated tokens: [EOS] may not be the 4th
    assert not math.isinf(score_next(logits, seq, eos_id=3, min_length=3)[0, 3])  # ... with min_length 3 it may
    lp = score_next(logits, seq, eos_id=3, no_repeat_ngram_size=2)
    assert math.isinf(lp[0, 6]) and not math.isinf(lp[1, 6])  # "5 6" was written: no second 6 after 5
    base = torch.randn(2, 10)
    pen = score_next(base, seq, eos_id=3, repetition_penalty=2.0)
    plain = score_next(base, seq, eos_id=3)
    assert torch.all(pen[0, [5, 6]] < plain[0, [5, 6]]) and torch.equal(pen[0, [4, 7]], plain[0, [4, 7]])


def test_beam_search_stops_and_finalizes_as_transformers():
    """Hugging Face's BeamSearchScorer (transformers 4.43, MLRG's pin): a report is done only when its worst finished
    score beats the best of all candidates, an [EOS] one too, over the length so far; beams still running at max_length
    are scored over their generated tokens ([BOS] not counted)."""
    A, B, W, X, Z, EOS = 4, 5, 6, 7, 8, 3
    # step 2: A+[EOS] tops the candidates; the best running beam (B Z) alone would end the search there with [A],
    # but B Z W [EOS] (sum -1.98 over 4 tokens) beats it later
    lm = TableLM({2: {EOS: 0.4, A: 0.35, B: 0.25}, A: {EOS: 0.9, X: 0.1}, B: {EOS: 0.45, Z: 0.55}, Z: {W: 1.0}}, 10)
    assert beam_search(lm, torch.zeros(1, 1, 1), num_beams=2, max_length=6) == [[B, Z, W]]
    # at max_length the running A C scores log(0.25) / 2 (not / 3) and loses to [EOS] at once, log(0.55) / 1
    lm = TableLM({2: {EOS: 0.55, A: 0.25, B: 0.2}, A: {W: 1.0}, B: {X: 1.0}}, 10)
    assert beam_search(lm, torch.zeros(1, 1, 1), num_beams=2, max_length=3) == [[]]
    assert beam_search(lm, torch.zeros(1, 1, 1), num_beams=2, max_length=4) == [[A, W]]

"""Tests of the stage-1 options that reproduce MLRG's `Pretrain` (mlrg.models MLRG_STAGE1, the `mimic` preset):
ProjectionHead and LayerNorms, [CLS] pooling, MLRG's fusion network and its bypass, the batch of distinct images and
MLRG's form of loss (a); each checked against a computation written out here the way MLRG's code does it."""

import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mlrg.core import InputError, seed_everything
from mlrg.data import MIMIC_VIEW_POSITIONS, VIEW_POSITIONS, collate, view_rows
from mlrg.models import (
    DEFAULT_PRETRAIN_CONFIG,
    MLRG_OPTIONS,
    MLRG_STAGE1,
    VISUAL_KEYS,
    LongitudinalFusion,
    MLRGFusion,
    MLRGPretrainModel,
    ProjectionHead,
    dedup_images,
    dummy_batch,
    mlrg_multi_positive_contrastive,
    multi_positive_contrastive,
    pretrain_config,
    study_groups,
    visual_config,
)

torch.set_num_threads(min(2, torch.get_num_threads()))
VOCAB = 60
TINY = dict(vocab_size=VOCAB, image_size=32, d_model=32, proj_dim=32, text_dim=32, fusion_heads=4)


def keyed_batch(samples, image_size=32, seed=0):
    "A batch of `samples` (study, [anchor, auxiliary keys...], prior key or None), one random image per key."
    g = torch.Generator().manual_seed(seed)
    names = sorted({k for _, cur, pr in samples for k in cur + ([pr] if pr else [])})
    pool = {k: torch.randn(1, image_size, image_size, generator=g) for k in names}
    view = {k: 1 + i % len(VIEW_POSITIONS) for i, k in enumerate(names)}
    V = max(len(cur) for _, cur, _ in samples)
    items = []
    for i, (study, cur, prior) in enumerate(samples):
        slots = cur + [None] * (V - len(cur)) + [prior]
        n_txt = 3 + (i * 7) % 5
        items.append(
            {
                "images": torch.stack([pool[k] if k else torch.zeros(1, image_size, image_size) for k in slots]),
                "image_mask": torch.tensor([k is not None for k in slots]),
                "view_ids": torch.tensor([view[k] if k else 0 for k in slots]),
                "temporal_ids": torch.tensor([0] * V + [1 if prior else 0]),
                "has_prior": prior is not None,
                "prompt_ids": torch.tensor([4, 5]),
                "target_ids": torch.randint(9, VOCAB, (n_txt,), generator=g),
                "id": f"s{i}",
                "study_id": study,
                "findings": "",
            }
        )
    b = collate(items)
    b["image_keys"] = [[k or "" for k in cur + [None] * (V - len(cur)) + [prior]] for _, cur, prior in samples]
    return b


# two views of study 1 holding each other as auxiliary views and sharing prior p (B4), a lone anchor (study 2),
# study 3 with three views (only two in sample 3's slots), study 4 and 5 naming the same prior q (it joins study 4)
SAMPLES = [
    (1, ["a", "b"], "p"),
    (1, ["b", "a"], "p"),
    (2, ["c"], None),
    (3, ["d", "e"], None),
    (3, ["f", "d"], "r"),
    (4, ["g"], "q"),
    (5, ["h"], "q"),
]


def model(**kw):
    seed_everything(0)
    return MLRGPretrainModel({**TINY, **MLRG_STAGE1, **kw})


def mlrg_reference(m, batch):
    """MLRG's `Pretrain.forward` (MF:346-405, DS:106-165) written out with m's modules: the image list, one projection
    call, loss (a), temporal embedding and ln_2, a fusion call per anchor on its unpadded memory, loss (b)."""
    vis, keys, t = m.visual, batch["image_keys"], m.config["temperature"]
    B, V = len(keys), len(keys[0]) - 1
    study = study_groups(batch).tolist()
    rows, info = [], []  # (sample, slot, group, temporal id)
    for b in range(B):
        rows.append((b, 0, study[b], 0))
        info.append(keys[b][0])
    for b in range(B):
        for k in range(1, V):
            if keys[b][k] and keys[b][k] not in info:
                rows.append((b, k, study[b], 0))
                info.append(keys[b][k])
    priors = []
    for b in range(B):
        if keys[b][V] and keys[b][V] not in priors:
            priors.append(keys[b][V])
            rows.append((b, V, study[b], 1))
    images = torch.stack([batch["images"][b, k] for b, k, _, _ in rows])
    views = torch.tensor([int(batch["view_ids"][b, k]) for b, k, _, _ in rows])
    x = vis.image_encoder(images)[0] + vis.view_embed.weight[views].unsqueeze(1)
    x = vis.image_proj(vis.ln_1(x))
    # loss (a)
    n_cur = sum(1 for r in rows if r[3] == 0)
    pid = torch.tensor([r[2] for r in rows[:n_cur]])
    labels = (pid[:, None] == pid[None, :]).float()
    labels.fill_diagonal_(0.0)
    idx = torch.argwhere(labels.sum(1) != 0).reshape(-1)
    ge, labels = x[:n_cur, 0][idx], labels[idx][:, idx]
    labels = labels / labels.sum(1, keepdim=True)
    ge = F.normalize(ge, dim=-1)
    logits = ge @ ge.T / t
    logits.fill_diagonal_(-1e9)
    logits = logits - logits.max(-1, keepdim=True).values.detach()
    mpc = F.cross_entropy(logits, labels)
    # temporal embedding, ln_2, fusion per anchor
    x = vis.ln_2(x + torch.stack([vis.temporal_embed.weight[r[3]] for r in rows]).unsqueeze(1))
    fused = []
    for i in range(B):
        others = [j for j in range(len(rows)) if j != i and rows[j][2] == rows[i][2]]
        if not others:
            fused.append(x[i])
            continue
        mem = torch.cat([x[j] for j in others], 0)
        fused.append(vis.fusion(x[i][None], mem[None])[0])
    img = torch.stack(fused)[:, 0]
    # text: the ProjectionHead on every token, then token 0; loss (b)
    tok = m.text_encoder(batch["target_ids"], batch["target_mask"])[0]
    txt = m.text_proj(tok)[:, 0]
    g = torch.tensor(study)
    lab = (g[:, None] == g[None, :]).float()
    lab = lab / lab.sum(1, keepdim=True)
    i_n, t_n = F.normalize(img, dim=-1), F.normalize(txt, dim=-1)
    text = (F.cross_entropy(i_n @ t_n.T / t, lab) + F.cross_entropy(t_n @ i_n.T / t, lab)) / 2
    return {"loss": text + mpc, "loss_text": text, "loss_mpc": mpc, "fused": torch.stack(fused), "n_rows": len(idx)}


@pytest.mark.parametrize("train", [True, False])
def test_mlrg_exact_model_matches_mlrg_written_out(train):
    m = model().train(train)
    batch = keyed_batch(SAMPLES)
    with torch.no_grad():
        ref = mlrg_reference(m, batch)
        out = m(batch)
        vis = m.visual(batch)
    for k in ("loss", "loss_text", "loss_mpc"):
        assert torch.allclose(out[k], ref[k], atol=1e-5), (k, out[k], ref[k])
    assert out["n_mpc_rows"] == ref["n_rows"] == 5  # a, b (study 1), d, e, f (study 3); c, g, h have no positive
    assert torch.allclose(vis["fused_tokens"], ref["fused"], atol=1e-5)


def test_preset_model_has_mlrg_heads_and_norms():
    m = model()
    v = m.visual
    assert isinstance(v.image_proj, ProjectionHead) and isinstance(m.text_proj, ProjectionHead)
    assert (v.image_proj.hidden_dim, v.image_proj.out_dim) == (64, 32)
    assert isinstance(v.ln_1, nn.LayerNorm) and v.ln_1.normalized_shape == (v.image_encoder.dim,)
    assert isinstance(v.ln_2, nn.LayerNorm) and v.ln_2.normalized_shape == (32,)
    assert v.view_embed.weight.shape == (len(VIEW_POSITIONS) + 1, v.image_encoder.dim)  # the encoder's space
    assert v.temporal_embed.weight.shape == (3, 32)
    assert isinstance(v.fusion, MLRGFusion)
    for h in (m.image_head, m.text_head, m.mpc_head):
        assert isinstance(h, nn.Identity)  # no extra heads before the losses
    names = [k for k in m.state_dict() if not k.startswith(("visual.image_encoder.", "text_encoder."))]
    assert not any("null" in k or "head.weight" in k for k in names)
    bn = v.image_proj.head[1]
    assert isinstance(bn, nn.BatchNorm1d) and (bn.momentum, bn.eps) == (0.1, 1e-5)
    # default config: none of it
    d = MLRGPretrainModel(TINY)
    assert isinstance(d.visual.image_proj, nn.Linear) and not hasattr(d.visual, "ln_1")
    assert isinstance(d.visual.fusion, LongitudinalFusion) and isinstance(d.text_head, nn.Linear)


def test_projection_head_is_conv_bn_relu_conv_per_token():
    torch.manual_seed(0)
    ph = ProjectionHead(6, 12, 4).train()
    x = torch.randn(3, 5, 6)
    h = x.reshape(15, 6) @ ph.head[0].weight[:, :, 0].T + ph.head[0].bias
    h = F.relu((h - h.mean(0)) / torch.sqrt(h.var(0, unbiased=False) + 1e-5))
    assert torch.allclose(ph(x).reshape(15, 4), h @ ph.head[3].weight[:, :, 0].T + ph.head[3].bias, atol=1e-5)
    with pytest.raises(InputError):
        ph(torch.randn(3, 5, 7))


def test_text_is_read_at_cls_after_the_projection():
    m = model().eval()
    batch = keyed_batch(SAMPLES)
    with torch.no_grad():
        tok = m.text_encoder(batch["target_ids"], batch["target_mask"])[0]
        want = F.normalize(m.text_proj(tok)[:, 0], dim=-1)
        assert torch.allclose(m.encode_texts(batch), want, atol=1e-6)
        mean = model(text_pooling="mean").eval()
        assert not torch.allclose(mean.encode_texts(batch), want, atol=1e-3)
        # stage 1's own text ids (text_ids, from mlrg.data) win over the target when the batch has them
        b2 = {**batch, "text_ids": batch["target_ids"].flip(1), "text_mask": batch["target_mask"].flip(1)}
        assert not torch.allclose(m.encode_texts(b2), want, atol=1e-3)


def test_dedup_batch_gives_the_loss_of_the_hand_deduplicated_batch():
    dup = keyed_batch(
        [(1, ["a", "b"], "p"), (1, ["b", "a"], "p"), (2, ["c"], None), (3, ["d", "e"], None), (3, ["e", "d"], None)]
    )
    hand = keyed_batch([(1, ["a"], "p"), (1, ["b"], None), (2, ["c"], None), (3, ["d"], None), (3, ["e"], None)])
    for train in (True, False):
        m = model().train(train)
        with torch.no_grad():
            a, b = m(dup), m(hand)
        assert torch.allclose(a["loss"], b["loss"], atol=1e-6) and a["n_mpc_rows"] == b["n_mpc_rows"] == 4
        # slots double-count (B4): the duplicated batch's loss is another one
        s = model(batch_images="slots").train(train)
        with torch.no_grad():
            assert abs(float(s(dup)["loss"]) - float(s(hand)["loss"])) > 1e-3


def test_dedup_images_order_and_prior_groups():
    keys = [["a", "b", "p"], ["b", "a", "p"], ["c", "", ""], ["x", "", "p"]]
    used = torch.tensor([[1, 1, 1], [1, 1, 1], [1, 0, 0], [1, 0, 1]], dtype=torch.bool)
    src, idx, n_cur = dedup_images(keys, used)
    assert src.tolist() == [[0, 0], [1, 0], [2, 0], [3, 0], [0, 2]] and n_cur == 4
    assert idx.tolist() == [[0, 1, 4], [1, 0, 4], [2, -1, -1], [3, -1, 4]]
    with pytest.raises(InputError):
        dedup_images(keys[:2], used)


def test_mlrg_mpc_drops_rows_and_columns_without_positives():
    torch.manual_seed(0)
    e = torch.randn(5, 8)
    groups = [0, 0, 1, 2, 2]
    loss, n = mlrg_multi_positive_contrastive(e, groups, 0.5, return_rows=True)
    keep = [0, 1, 3, 4]
    assert n == 4
    assert torch.allclose(loss, mlrg_multi_positive_contrastive(e[keep], [0, 0, 2, 2], 0.5), atol=1e-7)
    # mlrg's own loss (a) keeps image 2 as a negative: another value
    assert abs(float(multi_positive_contrastive(e, groups, 0.5)) - float(loss)) > 1e-4
    # written out: soft targets over the kept images, diagonal out of the softmax
    z = F.normalize(e[keep], dim=-1)
    lg = z @ z.T / 0.5
    lg.fill_diagonal_(float("-inf"))
    tgt = torch.tensor([[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1], [0, 0, 1, 0]], dtype=torch.float)
    want = -(tgt * F.log_softmax(lg, -1).masked_fill(torch.eye(4, dtype=torch.bool), 0)).sum(1).mean()
    assert torch.allclose(loss, want, atol=1e-6)
    assert mlrg_multi_positive_contrastive(e, [0, 1, 2, 3, 4]).item() == 0.0


def test_lone_anchor_bypasses_fusion():
    m = model().eval()
    batch = keyed_batch(SAMPLES)
    with torch.no_grad():
        v = m.visual(batch)
    assert torch.equal(v["fused_tokens"][2], v["anchor_tokens"][2])  # c: nothing else of study 2
    assert not torch.allclose(v["fused_tokens"][0], v["anchor_tokens"][0])
    # slots mode with fusion_style="mlrg": an anchor with no used slot passes by too
    s = model(batch_images="slots").eval()
    b = dummy_batch(4, 32, max_views=3, vocab_size=VOCAB, seed=0)
    b["image_mask"][1, 1:] = False
    b["has_prior"][1] = False
    with torch.no_grad():
        v = s.visual(b)
    assert torch.equal(v["fused_tokens"][1], v["anchor_tokens"][1])
    assert not torch.allclose(v["fused_tokens"][0], v["anchor_tokens"][0])


def test_mlrg_fusion_structure_init_and_padding():
    torch.manual_seed(0)
    fu = MLRGFusion(64, depth=3, heads=8, dim_head=16, mlp_dim=64).eval()
    assert len(fu.layers) == 3 and not any("null" in k for k in fu.state_dict())
    for attn, ff in fu.layers:
        assert attn.heads == 8 and attn.dim_head == 16 and attn.fc_q.out_features == 128
        for lin in (attn.fc_q, attn.fc_k, attn.fc_v, attn.fc_o):
            assert lin.bias is not None and lin.bias.abs().max() == 0
            assert abs(lin.weight.std().item() - 0.001) < 2e-4
        assert ff.net[1].out_features == 64 and isinstance(ff.net[2], nn.GELU) and isinstance(ff.net[0], nn.LayerNorm)
        assert ff.net[1].weight.std().item() > 0.01  # torch's default init, not N(0, 0.001)
    # the visual encoder builds it with dim_head d // 4 and FFN d
    v = model().visual.fusion
    assert v.layers[0][0].dim_head == 8 and v.layers[0][0].heads == 4 and v.layers[0][1].net[1].out_features == 32
    a, mem = torch.randn(2, 5, 64), torch.randn(2, 7, 64)
    pad = torch.tensor([[False] * 4 + [True] * 3, [False] * 7])
    with torch.no_grad():
        out = fu(a, mem, pad)
        assert torch.allclose(out[0], fu(a[:1], mem[:1, :4])[0], atol=1e-6)
        assert torch.allclose(out[1], fu(a[1:], mem[1:])[0], atol=1e-6)


def test_embed_init_mlrg():
    v = model().visual
    t = v.temporal_embed.weight
    assert t.min() >= 0 and t.max() < 1 and t.std() < 0.4  # U[0, 1)
    w = v.view_embed.weight
    assert w[0].abs().sum() > 0 and 0.8 < w.std() < 1.2  # randn, every row
    n = model(embed_init="normal").visual
    assert n.view_embed.weight[0].abs().sum() == 0 and n.temporal_embed.weight.min() < 0


def test_outputs_keep_their_shapes_in_dedup_mode():
    m = model().eval()
    batch = keyed_batch(SAMPLES)
    with torch.no_grad():
        v = m.visual(batch)
    B, V1 = batch["image_mask"].shape
    N = m.visual.n_tokens
    assert v["tokens"].shape == (B, V1, N, 32) and v["fused_tokens"].shape == (B, N, 32)
    assert v["anchor_tokens"].shape == (B, N, 32) and v["global"].shape == (B, V1, 32)
    assert torch.equal(v["tokens"][0, 1], v["tokens"][1, 0])  # the same image b in two slots
    assert torch.equal(v["tokens"][0, 2], v["tokens"][1, 2])  # the shared prior p
    assert v["tokens"][~v["used"]].abs().sum() == 0
    assert v["image_tokens"].shape[0] == 11  # a b c d f g h, e, then priors p r q
    # encode_slots (stage 2's path) gives each used slot its own projection of the same image in eval mode
    tok, use = m.visual.encode_slots(batch)
    assert torch.allclose(tok[use], v["tokens"][use], atol=1e-5)


def test_config_checks():
    assert set(MLRG_OPTIONS) <= set(VISUAL_KEYS)
    assert MLRG_STAGE1 == dict(
        projection="mlrg", fusion_style="mlrg", batch_images="dedup", embed_init="mlrg", text_pooling="cls"
    )
    for k in MLRG_OPTIONS:
        with pytest.raises(InputError, match=k):
            pretrain_config(vocab_size=10, **{k: "nope"})
        with pytest.raises(InputError, match="medclip"):
            visual_config(mode="medclip", **{k: MLRG_OPTIONS[k][1]})
    with pytest.raises(InputError, match="text_pooling"):
        pretrain_config(vocab_size=10, text_pooling="max")
    with pytest.raises(InputError, match="proj_dim"):
        pretrain_config(vocab_size=10, projection="mlrg", d_model=32, proj_dim=16)
    assert {k: v[0] for k, v in MLRG_OPTIONS.items()} == {k: pretrain_config(vocab_size=10)[k] for k in MLRG_OPTIONS}


def test_defaults_unchanged():
    """The default config gives the initial weights and loss of the code before these options (values recorded from
    it at the same seed)."""
    res = {}
    for name, kw in [("mlrg", {}), ("medclip", {"mode": "medclip"})]:
        seed_everything(0)
        m = MLRGPretrainModel(
            vocab_size=60, image_size=32, d_model=32, proj_dim=16, text_dim=32, fusion_heads=4, **kw
        ).train()
        b = dummy_batch(4, 32, max_views=3, vocab_size=60, seed=0)
        with torch.no_grad():
            out = m(b)
        sd = m.state_dict()
        wsum = float(sum(v.double().sum() for v in sd.values() if v.is_floating_point()))
        res[name] = (wsum, float(out["loss"]))
    assert res["mlrg"][0] == pytest.approx(1856.3292713666644, rel=1e-9)
    assert res["mlrg"][1] == pytest.approx(3.231661796569824, abs=1e-5)
    assert res["medclip"][0] == pytest.approx(1476.2004889177374, rel=1e-9)
    assert res["medclip"][1] == pytest.approx(2.0288302898406982, abs=1e-5)


# --- view vocabulary (fidelity 1.6): a row per raw view position, or MLRG's JSON rows ---
VIEW_NAMES = {  # the view position of each image key of SAMPLES
    "a": "PA",
    "b": "XTABLE LATERAL",
    "c": "",
    "d": "LATERAL",
    "e": "AP AXIAL",
    "f": "LL",
    "g": "AP",
    "h": "SWIMMERS",
    "p": "PA",
    "q": "AP",
    "r": "LATERAL",
}


def named_batch():
    "keyed_batch(SAMPLES) with each slot's view position (VIEW_NAMES), as mlrg.data.collate carries it."
    b = keyed_batch(SAMPLES)
    b["view_positions"] = [[VIEW_NAMES.get(k, "") for k in keys] for keys in b["image_keys"]]
    return b


def rows_by_name(batch, table):
    "(B, V+1) rows of `table` (view name -> row) for the batch's used slots, 0 elsewhere, written out."
    return torch.tensor(
        [
            [table[n] if used else 0 for n, used in zip(names, mask.tolist())]
            for names, mask in zip(batch["view_positions"], batch["image_mask"])
        ]
    )


def test_raw_view_vocab_gives_each_view_its_row():
    batch = named_batch()
    m = model(view_vocab="raw").train()
    assert m.visual.view_embed.weight.shape[0] == len(MIMIC_VIEW_POSITIONS) + 1 == 16
    rows = m.visual.slot_view_ids(batch)
    want = rows_by_name(batch, {n: i + 1 for i, n in enumerate(MIMIC_VIEW_POSITIONS)})
    assert torch.equal(rows, want)
    assert int(rows[0, 1]) == 13 and int(rows[3, 0]) == 3 and int(rows[2, 0]) == 15  # XTABLE LATERAL, LATERAL, ""
    with torch.no_grad():  # the model adds exactly those rows (MLRG's forward written out, fed the rows)
        ref = mlrg_reference(m, {**batch, "view_ids": want})
        assert torch.allclose(m(batch)["loss"], ref["loss"], atol=1e-5)
    # collapsed: XTABLE LATERAL and AP AXIAL share "other"; raw: two rows, so the projected tokens differ
    c = view_rows(batch["view_positions"], batch["image_mask"], "collapsed")  # mlrg.data.view_id of each name
    assert int(c[0, 1]) == int(c[3, 1]) == VIEW_POSITIONS.index("other") + 1 and int(rows[0, 1]) != int(rows[3, 1])
    with pytest.raises(InputError, match="view_positions"):
        m.visual.slot_view_ids({k: v for k, v in batch.items() if k != "view_positions"})
    bad = {**batch, "view_positions": [list(v) for v in batch["view_positions"]]}
    bad["view_positions"][4][0] = "OBLIQUE"
    with pytest.raises(InputError, match="'OBLIQUE' of item s4"):
        m(bad)


def test_mlrg_view_json_gives_mlrg_rows(tmp_path):
    # MLRG's form, rows in another order than mlrg's list: rows follow the file, by name
    vp2id = {n: i for i, n in enumerate(reversed(MIMIC_VIEW_POSITIONS))}
    path = tmp_path / "five_work_mimic_cxr_view_position_v1.1.json"
    path.write_text(json.dumps(vp2id))
    m = model(view_vocab=str(path)).train()
    assert m.config["view_vocab"] == vp2id  # the checkpoint's config holds the names, not only the path
    assert m.visual.view_embed.weight.shape[0] == len(vp2id) + 1
    batch = named_batch()
    want = rows_by_name(batch, {n: r + 1 for n, r in vp2id.items()})  # MLRG's vp_pos_embed[r] is row r + 1 here
    assert torch.equal(m.visual.slot_view_ids(batch), want)
    with torch.no_grad():
        vp_pos_embed = m.visual.view_embed.weight[1:]  # MLRG's table
        b, k = 0, 1  # XTABLE LATERAL; eval mode: BatchNorm's running statistics, so one image alone computes the same
        x = m.eval().visual.image_encoder(batch["images"][b, k][None])[0]
        ori = m.visual.image_proj(m.visual.ln_1(x + vp_pos_embed[vp2id["XTABLE LATERAL"]]))
        assert torch.allclose(m.visual(batch)["tokens"][b, k], ori[0], atol=1e-5)
        m.train()
        ref = mlrg_reference(m, {**batch, "view_ids": want})
        assert torch.allclose(m(batch)["loss"], ref["loss"], atol=1e-5)
    # the pretrain parameter reaches the model config (the mimic preset: raw; the default: the model config's)
    from mlrg.data import Vocab
    from mlrg.pretrain import PRETRAIN, PRETRAIN_PRESETS, model_config_for

    v = Vocab("a b c".split())
    assert model_config_for(PRETRAIN.check(view_vocab=str(path)), v)["view_vocab"] == vp2id
    assert PRETRAIN_PRESETS["mimic"].values["view_vocab"] == "raw"
    assert model_config_for(PRETRAIN.check(), v)["view_vocab"] == "collapsed"
    with pytest.raises(InputError, match="view_vocab"):
        model_config_for(PRETRAIN.check(view_vocab="rows.json"), v)


def test_view_vocab_default_is_collapsed():
    assert DEFAULT_PRETRAIN_CONFIG["view_vocab"] == "collapsed" and "view_vocab" in VISUAL_KEYS
    assert "view_vocab" not in MLRG_STAGE1  # set by the presets' parameter, not by the model options
    m = MLRGPretrainModel(TINY)
    assert m.visual.view_embed.weight.shape[0] == len(VIEW_POSITIONS) + 1 and m.config["view_vocab"] == "collapsed"
    batch = keyed_batch(SAMPLES)  # no view_positions needed
    assert m.visual.slot_view_ids(batch) is batch["view_ids"]
    with pytest.raises(InputError, match="medclip"):
        visual_config(mode="medclip", view_vocab="raw")
    with pytest.raises(InputError, match="view_vocab"):
        pretrain_config(vocab_size=10, view_vocab=["PA"])


def test_stage2_from_a_stage1_checkpoint_of_another_view_vocab(tmp_path):
    from mlrg.finetune import FINETUNE, FINETUNE_PRESETS, load_stage1
    from mlrg.finetune import model_config_for as stage2_config
    from mlrg.data import Vocab
    from mlrg.models import VisualEncoder, load_visual_state

    s1 = model(view_vocab="raw")
    torch.save({"model": s1.state_dict(), "config": {"model": s1.config}}, tmp_path / "best.pt")
    # stage 2 takes stage 1's vocabulary with its architecture
    vocab = Vocab("heart size normal".split())
    p = FINETUNE.check(
        {**FINETUNE_PRESETS["mimic"].values, "decoder": "small", "select_metric": "bleu4+ce14"},
        pretrained_path=str(tmp_path / "best.pt"),
        decoder_path="gpt2",
        prompt_heads=4,
        decoder_heads=4,
        decoder_layers=1,
    )
    assert stage2_config(p, vocab, {"config": {"model": s1.config}})["visual"]["view_vocab"] == "raw"
    # a model of another vocabulary size: an error naming it, not a silently new view embedding
    other = VisualEncoder({**TINY, **MLRG_STAGE1})
    with pytest.raises(InputError, match="16 rows .* 7 in this model: another view vocabulary"):
        load_visual_state(other, tmp_path / "best.pt", print_fn=None)
    with pytest.raises(InputError, match="another view vocabulary"):
        load_stage1(model(), tmp_path / "best.pt", print_fn=None)
    assert (load_stage1(model(view_vocab="raw"), tmp_path / "best.pt", print_fn=None).status == "loaded").all()

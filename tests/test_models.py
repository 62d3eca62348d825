"""Tests of mlrg.models: encoders, fusion, losses (against hand computations), the stage-1 model's ablation flags, and
the visual encoder loaded from a stage-1 checkpoint."""

import math
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mlrg.core import InputError, seed_everything
from mlrg.engine import save_checkpoint
from mlrg.models import (
    CLIP_SCALE_INIT,
    IMAGE_ENCODERS,
    MODELS,
    VISUAL_KEYS,
    ImageEncoder,
    LongitudinalFusion,
    MLRGPretrainModel,
    VisualEncoder,
    build_image_encoder,
    build_text_encoder,
    clip_loss,
    dummy_batch,
    list_image_encoders,
    load_visual_state,
    load_weights_file,
    multi_positive_contrastive,
    pool_grid,
    pretrain_config,
    soft_infonce,
    study_groups,
    visual_config,
)

torch.set_num_threads(min(2, torch.get_num_threads()))
VOCAB = 60


def lse(v):
    "log-sum-exp of a 1-D numpy array, written out."
    m = np.max(v)
    return m + np.log(np.sum(np.exp(v - m)))


# ---------------------------------------------------------------- losses vs hand computations


def test_mpc_loss_three_images_by_hand():
    e = np.array([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])  # unit vectors; images 0, 1 one study, image 2 alone
    # row 0: positive 1, negatives {2}; row 1: positive 0, negatives {2}; row 2: no positive -> excluded
    r0 = -(0.6 / 0.5) + np.log(np.exp(0.6 / 0.5) + np.exp(0.0 / 0.5))
    r1 = -(0.6 / 0.5) + np.log(np.exp(0.6 / 0.5) + np.exp(0.8 / 0.5))
    loss, rows = multi_positive_contrastive(torch.tensor(e, dtype=torch.float32), [3, 3, 4], 0.5, return_rows=True)
    assert rows == 2
    assert loss.item() == pytest.approx((r0 + r1) / 2, abs=1e-6)


def test_mpc_loss_soft_targets_by_hand():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(5, 3))
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    groups = [0, 0, 0, 1, 2]  # rows 0-2 have two positives each (1/2 weight), row 3 and row 4 have none
    S = z @ z.T / 0.5
    losses = []
    for i in range(5):
        others = [j for j in range(5) if j != i]
        pos = [j for j in others if groups[j] == groups[i]]
        if not pos:
            continue
        denom = lse(S[i, others])
        losses.append(sum(-(1 / len(pos)) * (S[i, j] - denom) for j in pos))
    loss, rows = multi_positive_contrastive(torch.tensor(z), torch.tensor(groups), 0.5, return_rows=True)
    assert rows == 3
    assert loss.item() == pytest.approx(np.mean(losses), abs=1e-9)
    # the function normalises: scaling the inputs changes nothing
    assert multi_positive_contrastive(torch.tensor(z) * 3, groups).item() == pytest.approx(loss.item(), abs=1e-9)


def test_mpc_loss_no_positive_is_zero_and_attached():
    x = torch.randn(3, 4, requires_grad=True)
    loss, rows = multi_positive_contrastive(x, [0, 1, 2], return_rows=True)
    assert rows == 0 and loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


def test_soft_infonce_by_hand():
    img = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    txt = np.array([[0.6, 0.8], [1.0, 0.0], [0.0, 1.0]])
    groups = [0, 0, 1]  # samples 0 and 1 are anchors of the same study
    L = img @ txt.T / 0.5
    T = np.array([[0.5, 0.5, 0], [0.5, 0.5, 0], [0, 0, 1]])
    i2t = np.mean([-sum(T[i, j] * (L[i, j] - lse(L[i])) for j in range(3)) for i in range(3)])
    t2i = np.mean([-sum(T[j, i] * (L[i, j] - lse(L[:, j])) for i in range(3)) for j in range(3)])
    got = soft_infonce(torch.tensor(img), torch.tensor(txt), groups, 0.5).item()
    assert got == pytest.approx((i2t + t2i) / 2, abs=1e-9)
    # all different studies -> ordinary symmetric InfoNCE
    hard = 0.5 * (
        np.mean([lse(L[i]) - L[i, i] for i in range(3)]) + np.mean([lse(L[:, j]) - L[j, j] for j in range(3)])
    )
    assert soft_infonce(torch.tensor(img), torch.tensor(txt), [0, 1, 2], 0.5).item() == pytest.approx(hard, abs=1e-9)


def test_clip_loss_by_hand_and_cap():
    img = np.array([[1.0, 0.0], [0.0, 1.0]])
    txt = np.array([[0.6, 0.8], [1.0, 0.0]])
    for scale in (1 / 0.07, 1000.0):
        K = min(scale, 100.0) * img @ txt.T
        want = 0.5 * (
            np.mean([lse(K[i]) - K[i, i] for i in range(2)]) + np.mean([lse(K[:, j]) - K[j, j] for j in range(2)])
        )
        got = clip_loss(torch.tensor(img), torch.tensor(txt), torch.tensor(math.log(scale), dtype=torch.float64)).item()
        assert got == pytest.approx(want, rel=1e-9)
    s = torch.tensor(CLIP_SCALE_INIT, requires_grad=True)
    clip_loss(torch.tensor(img, dtype=torch.float32), torch.tensor(txt, dtype=torch.float32), s).backward()
    assert s.grad is not None and s.grad.item() != 0.0
    assert math.exp(CLIP_SCALE_INIT) == pytest.approx(1 / 0.07)


# ---------------------------------------------------------------- image encoders


@pytest.fixture
def no_download(monkeypatch):
    "Any attempt to download weights fails the test."

    def boom(*a, **k):
        raise AssertionError("tried to download")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", boom)
    monkeypatch.setattr(torch.hub, "download_url_to_file", boom)


def test_registry_names_and_unknown():
    names = list_image_encoders()
    for n in ("small_cnn", "small_vit", "resnet18", "resnet50", "vit_b_16", "xrv_densenet121", "rad_dino"):
        assert n in names
    with pytest.raises(InputError, match="unknown image encoder"):
        build_image_encoder("resnet1000")


@pytest.mark.parametrize(
    "name,size,n_tokens,dim",
    [
        ("small_cnn", 64, 1 + 4 * 4, 256),
        ("small_cnn", 112, 1 + 7 * 7, 256),
        ("small_vit", 64, 1 + 4 * 4, 128),
        ("resnet18", 64, 1 + 2 * 2, 512),
        ("resnet18", 100, 1 + 4 * 4, 512),
        ("resnet50", 96, 1 + 3 * 3, 2048),
    ],
)
def test_encoder_token_shapes(no_download, name, size, n_tokens, dim):
    torch.manual_seed(0)
    enc = build_image_encoder(name, image_size=size).eval()
    assert (enc.n_tokens, enc.dim) == (n_tokens, dim)
    with torch.no_grad():
        t, g = enc(torch.randn(2, 1, size, size))
    assert t.shape == (2, n_tokens, dim) and g.shape == (2, dim)
    assert torch.equal(g, t[:, 0])
    if name.startswith("resnet") or name == "small_cnn":  # the global token is the mean of the grid
        assert torch.allclose(g, t[:, 1:].mean(1), atol=1e-5)


def test_vit_b_16_at_224_and_position_interpolation(no_download, tmp_path):
    torch.manual_seed(0)
    enc = build_image_encoder("vit_b_16", image_size=224).eval()
    assert (enc.n_tokens, enc.dim) == (197, 768)
    with torch.no_grad():
        t, g = enc(torch.randn(1, 1, 224, 224))
    assert t.shape == (1, 197, 768) and torch.equal(g, t[:, 0])
    with pytest.raises(InputError, match="built for 224"):
        enc(torch.randn(1, 1, 112, 112))
    torch.save(enc.net.state_dict(), tmp_path / "vit.pth")  # 224-px weights (no head) load at 64 px
    small = build_image_encoder("vit_b_16", image_size=64, pretrained_path=tmp_path / "vit.pth").eval()
    assert torch.equal(small.net.class_token, enc.net.class_token)
    with torch.no_grad():
        assert small(torch.randn(1, 1, 64, 64))[0].shape == (1, 17, 768)


def test_local_weights_round_trip_and_errors(no_download, tmp_path):
    import torchvision

    torch.manual_seed(1)
    ref = torchvision.models.resnet18(weights=None).eval()
    torch.save(ref.state_dict(), tmp_path / "r18.pth")
    torch.save({"state_dict": {"module." + k: v for k, v in ref.state_dict().items()}}, tmp_path / "wrapped.pth")
    x = torch.randn(2, 1, 64, 64)
    feats = torch.nn.Sequential(*list(ref.children())[:-2])
    for f in ("r18.pth", "wrapped.pth"):
        enc = build_image_encoder("resnet18", pretrained_path=tmp_path / f, image_size=64).eval()
        with torch.no_grad():
            assert torch.allclose(enc(x)[1], feats(enc.imagenet_rgb(x)).mean((2, 3)), atol=1e-5)
    rgb = build_image_encoder("resnet18", image_size=64).imagenet_rgb(
        x
    )  # gray repeated, ImageNet-normalised per channel
    assert rgb.shape == (2, 3, 64, 64)
    unit = x * 0.280 + 0.586
    assert torch.allclose(rgb[:, 1:2], (unit - 0.456) / 0.224, atol=1e-5)
    with pytest.raises(InputError, match="not found"):
        build_image_encoder("resnet18", pretrained_path=tmp_path / "missing.pth")
    with pytest.raises(InputError, match="do not fit"):
        build_image_encoder("small_cnn", pretrained_path=tmp_path / "r18.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="junk.pth"):
        load_weights_file(tmp_path / "junk.pth")


def test_freeze():
    enc = build_image_encoder("small_cnn", image_size=64, freeze=True)
    assert not any(p.requires_grad for p in enc.parameters())
    enc.train()
    assert not enc.training and not any(m.training for m in enc.modules())
    t, _ = enc(torch.randn(2, 1, 64, 64))
    assert not t.requires_grad
    seed_everything(0)
    m = MLRGPretrainModel(dict(vocab_size=VOCAB, image_size=64, freeze_image_encoder=True)).train()
    assert not m.visual.image_encoder.training
    m(dummy_batch(4, 64, vocab_size=VOCAB))["loss"].backward()
    assert all(p.grad is None for p in m.visual.image_encoder.parameters())
    assert m.visual.image_proj.weight.grad is not None
    bn = next(x for x in m.visual.image_encoder.modules() if isinstance(x, torch.nn.BatchNorm2d))
    assert torch.equal(bn.running_mean, torch.zeros_like(bn.running_mean))  # statistics untouched in train mode


def _hide(monkeypatch, pkg):
    monkeypatch.setitem(sys.modules, pkg, None)  # makes `import pkg` raise ImportError


def test_xrv_needs_package(monkeypatch):
    _hide(monkeypatch, "torchxrayvision")
    with pytest.raises(InputError, match="pip install torchxrayvision"):
        build_image_encoder("xrv_densenet121")


def test_xrv_needs_local_weights(monkeypatch, tmp_path):
    xrv = pytest.importorskip("torchxrayvision")
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(InputError, match="local disk") as e:
        build_image_encoder("xrv_densenet121")
    assert ".torchxrayvision" in str(e.value)
    with pytest.raises(InputError, match="not found"):
        build_image_encoder("xrv_densenet121", pretrained_path=tmp_path / "nope.pt")
    torch.manual_seed(0)
    net = xrv.models.DenseNet(weights=None, num_classes=18)
    torch.save(net.state_dict(), tmp_path / "xrv_sd.pt")
    enc = build_image_encoder("xrv_densenet121", pretrained_path=tmp_path / "xrv_sd.pt", image_size=64).eval()
    with torch.no_grad():
        t, g = enc(torch.randn(2, 1, 64, 64))
    assert t.shape == (2, 1 + 2 * 2, 1024) == (2, enc.n_tokens, enc.dim)
    torch.save(net, tmp_path / "xrv_full.pt")  # torchxrayvision's own files are pickled models
    with pytest.raises(InputError, match="trust_pickle"):
        build_image_encoder("xrv_densenet121", pretrained_path=tmp_path / "xrv_full.pt", image_size=64)
    enc2 = build_image_encoder(
        "xrv_densenet121", pretrained_path=tmp_path / "xrv_full.pt", image_size=64, trust_pickle=True
    ).eval()
    with torch.no_grad():
        assert torch.allclose(enc2(torch.ones(1, 1, 64, 64))[1], enc(torch.ones(1, 1, 64, 64))[1])


def test_hub_encoders_need_package_or_weights(monkeypatch, tmp_path):
    _hide(monkeypatch, "transformers")
    with pytest.raises(InputError, match=r'pip install "mlrg\[hub\]"'):
        build_image_encoder("rad_dino", pretrained_path=tmp_path)
    with pytest.raises(InputError, match=r'pip install "mlrg\[hub\]"'):
        build_text_encoder("cxr_bert", pretrained_path=tmp_path)
    monkeypatch.undo()
    try:
        import transformers  # noqa: F401
    except ImportError:
        return
    with pytest.raises(InputError, match="no config.json"):
        build_image_encoder("rad_dino", pretrained_path=tmp_path)
    with pytest.raises(InputError, match="local folder"):
        build_text_encoder("cxr_bert", pretrained_path=None)


# ---------------------------------------------------------------- text encoder and fusion


def test_text_encoder_pooling_and_padding():
    torch.manual_seed(0)
    te = build_text_encoder("small", vocab_size=VOCAB, dim=32, heads=4).eval()
    ids = torch.tensor([[2, 10, 11, 3, 0, 0], [2, 12, 3, 0, 0, 0]])
    t, p = te(ids)
    assert t.shape == (2, 6, 32) and torch.allclose(p[0], t[0, :4].mean(0), atol=1e-6)
    longer = torch.cat([ids, torch.zeros(2, 4, dtype=torch.long)], 1)  # extra padding changes nothing
    assert torch.allclose(te(longer)[1], p, atol=1e-5)
    first = build_text_encoder("small", vocab_size=VOCAB, dim=32, heads=4, pooling="first").eval()
    t2, p2 = first(ids)
    assert torch.equal(p2, t2[:, 0])
    with pytest.raises(InputError):
        build_text_encoder("small", vocab_size=VOCAB, pooling="max")
    with pytest.raises(InputError, match="unknown text encoder"):
        build_text_encoder("gpt", vocab_size=VOCAB)


def test_fusion_masking_and_empty_memory():
    torch.manual_seed(0)
    fu = LongitudinalFusion(32, depth=2, heads=8).eval()
    a, mem = torch.randn(2, 5, 32), torch.randn(2, 6, 32)
    pad = torch.tensor([[False] * 2 + [True] * 4, [True] * 6])
    out = fu(a, mem, pad)
    mem2 = mem.clone()
    mem2[0, 2:] = 100.0
    mem2[1] = -7.0
    assert torch.allclose(fu(a, mem2, pad), out, atol=1e-6)
    assert torch.isfinite(fu(a)).all() and torch.allclose(fu(a)[1], out[1], atol=1e-6)  # all masked == no memory
    mem3 = mem.clone()
    mem3[0, 0] += torch.randn(32)  # (a constant shift would vanish in the LayerNorm)
    assert not torch.allclose(fu(a, mem3, pad)[0], out[0], atol=1e-4)


# ---------------------------------------------------------------- the stage-1 model


def _model(seed=0, **kw):
    seed_everything(seed)
    return MLRGPretrainModel(dict(vocab_size=VOCAB, image_size=64, **kw))


def _batch(seed=0, **kw):
    return dummy_batch(4, 64, max_views=3, vocab_size=VOCAB, seed=seed, **kw)


def _perturb(batch, slots):
    b = {**batch, "images": batch["images"].clone()}
    b["images"][:, slots] += torch.randn_like(b["images"][:, slots])
    return b


@pytest.mark.parametrize("flag,slots", [("is_prior_scan", [3]), ("is_multiview_learning", [1, 2])])
def test_ablation_flags_change_what_the_anchor_sees(flag, slots):
    b = _batch()
    b2 = _perturb(b, slots)
    off = _model(**{flag: False}).train()  # train mode too: an unused image must not even reach BatchNorm statistics
    with torch.no_grad():
        assert torch.equal(off.encode_images(b), off.encode_images(b2))
    on = _model(**{flag: True}).eval()
    with torch.no_grad():
        e1, e2 = on.encode_images(b), on.encode_images(b2)
    has = b["image_mask"][:, slots].any(1)  # samples that have such images change, the others do not
    assert has.any() and (~has).any()
    assert (e1 - e2)[has].abs().max() > 1e-4
    assert torch.allclose(e1[~has], e2[~has], atol=1e-6)


def test_anchor_pixels_always_matter():
    m = _model(is_prior_scan=False, is_multiview_learning=False).eval()
    b = _batch()
    with torch.no_grad():
        assert (m.encode_images(b) - m.encode_images(_perturb(b, [0]))).abs().max() > 1e-4


def test_mpc_flag_and_loss_sum():
    b = _batch()
    on = _model().eval()(b)
    assert torch.allclose(on["loss"], on["loss_text"] + on["loss_mpc"])
    assert on["n_mpc_rows"] == 7  # all 7 current images of the batch have another view of their study
    off = _model(using_mpc_loss=False).eval()(b)
    assert "loss_mpc" not in off and torch.equal(off["loss"], off["loss_text"])
    single = _model(is_multiview_learning=False).eval()(b)
    assert single["n_mpc_rows"] == 4  # only the anchors; samples 2k and 2k+1 share a study
    assert not hasattr(_model(using_mpc_loss=False), "mpc_head") or _model(using_mpc_loss=False).mpc_head is None


def test_gradients_reach_every_trainable_parameter():
    m = _model().train()
    out = m(_batch())
    out["loss"].backward()
    dead = [n for n, p in m.named_parameters() if p.requires_grad and (p.grad is None or p.grad.abs().sum() == 0)]
    assert dead == []


def test_deterministic_under_seed():
    o1, o2 = _model(seed=3).train()(_batch(1)), _model(seed=3).train()(_batch(1))
    assert torch.equal(o1["loss"], o2["loss"]) and torch.equal(o1["image_emb"], o2["image_emb"])
    o3 = _model(seed=4).train()(_batch(1))
    assert not torch.equal(o1["loss"], o3["loss"])


def test_encode_helpers_match_forward():
    m = _model().eval()
    b = _batch()
    with torch.no_grad():
        out, img, txt = m(b), m.encode_images(b), m.encode_texts(b)
    assert img.shape == txt.shape == (4, m.config["proj_dim"])
    assert torch.allclose(img, out["image_emb"]) and torch.allclose(txt, out["text_emb"])
    assert torch.allclose(img.norm(dim=1), torch.ones(4), atol=1e-5)


def test_medclip_mode():
    m = _model(mode="medclip").train()
    b = _batch()
    out = m(b)
    assert set(k for k in out if k.startswith("loss")) == {"loss", "loss_clip"}
    assert torch.allclose(out["loss"], clip_loss(out["image_emb"], out["text_emb"], m.logit_scale))
    assert out["logit_scale"].item() == pytest.approx(1 / 0.07, rel=1e-5)
    out["loss"].backward()
    assert m.logit_scale.grad is not None
    with torch.no_grad():  # only the anchor is looked at
        assert torch.equal(m.eval().encode_images(b), m.encode_images(_perturb(b, [1, 2, 3])))
    with pytest.raises(InputError, match="medclip"):
        _model(mode="medclip", is_prior_scan=True)


def test_config_errors_and_groups():
    with pytest.raises(InputError, match="unknown config"):
        pretrain_config(vocab_size=10, fusion_layers=2)
    with pytest.raises(InputError, match="vocab_size"):
        pretrain_config()
    with pytest.raises(InputError, match="mode"):
        pretrain_config(vocab_size=10, mode="clip")
    with pytest.raises(InputError, match="fusion_heads"):
        MLRGPretrainModel(dict(vocab_size=10, d_model=100, fusion_heads=8))
    cfg = pretrain_config(vocab_size=10)
    assert cfg["is_prior_scan"] and cfg["is_multiview_learning"] and cfg["using_mpc_loss"]
    g = study_groups({"images": torch.zeros(4), "study_id": [7, None, 7, None]})
    assert g[0] == g[2] and len({int(g[1]), int(g[3]), int(g[0])}) == 3
    b = _batch()
    b["image_mask"][1, 0] = False
    with pytest.raises(InputError, match="anchor"):
        _model()(b)


# ---------------------------------------------------------------- the visual encoder and stage-1 checkpoints


def test_visual_encoder_is_the_models_visual_half():
    m = _model().eval()
    assert isinstance(m.visual, VisualEncoder) and m.visual.config == visual_config(m.config)
    assert set(m.visual.config) == set(VISUAL_KEYS) and "vocab_size" not in m.visual.config
    b = _batch()
    with torch.no_grad():
        vis = m.encode_visual(b)
        assert torch.equal(m.visual.global_embedding(vis), vis["fused_global"])
        tokens, used = m.visual.encode_slots(b)
        emb = m.visual.embed_slots(tokens, b)
        assert torch.equal(m.visual.fuse(emb, used), vis["fused_tokens"]) and torch.equal(
            emb[:, 0], vis["anchor_tokens"]
        )
    assert vis["fused_tokens"].shape == (4, m.visual.n_tokens, m.visual.dim)
    assert not any(
        n.startswith(("image_encoder.", "fusion.", "image_proj.")) for n in m.state_dict()
    )  # all under visual.
    mc = _model(mode="medclip")
    assert not hasattr(mc.visual, "fusion") and "fused_tokens" not in mc.visual(b)
    with pytest.raises(InputError, match="medclip"):
        VisualEncoder(mode="medclip", is_prior_scan=True)


def test_load_visual_state_from_a_saved_stage1_checkpoint(tmp_path):
    seed_everything(0)
    trained = MLRGPretrainModel(dict(vocab_size=VOCAB, image_size=32)).train()
    opt = torch.optim.AdamW(trained.parameters(), lr=1e-2)
    for s in range(2):
        opt.zero_grad()
        trained(dummy_batch(4, 32, vocab_size=VOCAB, seed=s))["loss"].backward()
        opt.step()
    save_checkpoint(
        {"model": trained.state_dict(), "config": {"model": trained.config}, "vocab": ["x"] * VOCAB},
        tmp_path / "best.pt",
    )
    seed_everything(1)
    fresh = VisualEncoder(trained.config)
    lines = []
    table = load_visual_state(fresh, tmp_path / "best.pt", print_fn=lines.append)
    assert set(table.status) == {"loaded"} and len(table) == len(fresh.state_dict())
    assert lines and "0 of" not in lines[0]
    want = {k[len("visual.") :]: v for k, v in trained.state_dict().items() if k.startswith("visual.")}
    got = fresh.state_dict()
    assert set(got) == set(want)
    for k, v in got.items():
        assert torch.equal(v, want[k]), k
    b = dummy_batch(4, 32, vocab_size=VOCAB, seed=5)
    fresh.eval()
    trained.eval()
    with torch.no_grad():
        mine, theirs = fresh(b), trained.visual(b)
    assert mine.keys() == theirs.keys()
    for k in mine:
        assert torch.equal(mine[k], theirs[k]), k


def test_load_visual_state_reports_what_does_not_fit():
    seed_everything(0)
    src = MLRGPretrainModel(dict(vocab_size=VOCAB, image_size=32))
    narrow = VisualEncoder(src.config, d_model=64)
    before = {k: v.clone() for k, v in narrow.state_dict().items()}
    with pytest.raises(InputError, match="shape mismatch"):
        load_visual_state(narrow, src, strict=True)
    assert all(torch.equal(v, before[k]) for k, v in narrow.state_dict().items())  # strict: nothing copied
    lines = []
    t = load_visual_state(narrow, src.state_dict(), print_fn=lines.append)
    status = dict(zip(t.name, t.status))
    assert status["image_proj.weight"] == "shape mismatch" and status["fusion.null"] == "shape mismatch"
    assert all(s == "loaded" for k, s in status.items() if k.startswith("image_encoder."))
    assert torch.equal(narrow.image_proj.weight, before["image_proj.weight"])  # a mismatch keeps its fresh value
    assert any("shape mismatch" in line for line in lines)  # and is printed, not silent
    med = VisualEncoder(src.config, mode="medclip", is_multiview_learning=False, is_prior_scan=False)
    t2 = load_visual_state(med, {"model": src.state_dict()}, print_fn=None)
    assert set(t2[t2.status == "unexpected"].name.str.split(".").str[0]) == {"view_embed", "temporal_embed", "fusion"}
    sd = {k: v for k, v in src.state_dict().items() if k != "visual.image_proj.bias"}
    assert (
        dict(zip(*load_visual_state(VisualEncoder(src.config), sd, print_fn=None)[["name", "status"]].T.values))[
            "image_proj.bias"
        ]
        == "missing"
    )
    with pytest.raises(InputError, match="no tensor name starts with"):
        load_visual_state(narrow, src, prefix="vision.")
    with pytest.raises(InputError, match="cannot read weights"):
        load_visual_state(narrow, 3)


def test_models_notebook_parameters():
    assert MODELS.check(image_size="64")["image_size"] == 64
    assert all(not p.cli for p in MODELS.params.values())
    with pytest.raises(InputError, match="did you mean 'image_size'"):
        MODELS.check(image_sise=64)
    with pytest.raises(InputError, match="parameter 'image_encoder'"):
        MODELS.check(image_encoder="resnet1")


# ---------------------------------------------------------------- tokens per image (token_grid)


@pytest.mark.parametrize("batch_images", ["slots", "dedup"])
def test_token_grid_counts_and_native_grid_is_identity(batch_images):
    "small_cnn at 64 px: 1 + 4 x 4 tokens; token_grid=g gives 1 + g x g, pooled from them; g = 4 changes nothing."
    b, kw = _batch(), {"batch_images": batch_images}
    native = _model(**kw).train()
    sd = {k: v.clone() for k, v in native.state_dict().items()}
    out = {None: native(b)}
    for g, n in ((4, 17), (2, 5), (1, 2)):
        m = _model(token_grid=g, **kw).train()
        assert m.visual.n_tokens == n and m.visual.config["token_grid"] == g
        # no weights of its own: the same seed builds the same model, and stage 1's weights load as they are
        assert m.state_dict().keys() == sd.keys() and all(torch.equal(v, sd[k]) for k, v in m.state_dict().items())
        out[g] = m(b)
        out[g]["loss"].backward()
        with torch.no_grad():
            vis = m.eval().encode_visual(b)
            assert vis["fused_tokens"].shape == (4, n, m.visual.dim) and vis["tokens"].shape[2] == n
            idx = m.visual.used_slots(b).nonzero(as_tuple=True)
            own = m.visual.image_encoder(b["images"][idx])[0]
            assert own.shape[1] == 17
            torch.testing.assert_close(m.visual.encoder_tokens(b, idx), pool_grid(own, g))
    assert torch.equal(out[4]["loss"], out[None]["loss"])  # the native grid: the identity
    assert not torch.allclose(out[2]["loss"], out[None]["loss"])  # fewer tokens: another model


def test_pool_grid_averages_windows():
    t = torch.randn(3, 1 + 6 * 6, 5)
    p = pool_grid(t, 3)
    grid = t[:, 1:].reshape(3, 6, 6, 5)
    assert p.shape == (3, 10, 5) and torch.equal(p[:, 0], t[:, 0])
    torch.testing.assert_close(p[:, 1 + 1 * 3 + 2], grid[:, 2:4, 4:6].mean((1, 2)))  # window (row 1, col 2)
    assert torch.equal(pool_grid(t, 6), t)
    torch.testing.assert_close(pool_grid(t, 1)[:, 1], grid.mean((1, 2)))


class _Registers(ImageEncoder):
    "A toy encoder with a CLS and a register token before its 2 x 2 grid, as RAD-DINO has (2 + s x s tokens)."

    def __init__(self, image_size, **kw):
        super().__init__(8, image_size)

    def count_tokens(self, size):
        return 2 + 2 * 2

    def tokens(self, x):
        return x.new_zeros(len(x), 6, 8)


def test_token_grid_errors(monkeypatch):
    for bad in (0, 2.5, True, "4"):
        with pytest.raises(InputError, match="token_grid"):
            pretrain_config(vocab_size=VOCAB, token_grid=bad)
    assert pretrain_config(vocab_size=VOCAB, token_grid=2.0)["token_grid"] == 2 and "token_grid" in VISUAL_KEYS
    with pytest.raises(InputError, match="1 to 4"):
        VisualEncoder(image_size=64, token_grid=5)  # pooling only shrinks the 4 x 4 grid
    monkeypatch.setitem(IMAGE_ENCODERS, "registers", (lambda image_size, **kw: _Registers(image_size), "toy", False))
    assert VisualEncoder(image_encoder="registers", image_size=32).n_tokens == 6  # fine without token_grid
    with pytest.raises(InputError, match=r"6 tokens per image, not 1 \+ a square grid"):
        VisualEncoder(image_encoder="registers", image_size=32, token_grid=1)


@pytest.mark.parametrize("name,size,grid,n", [("small_vit", 64, 2, 5), ("resnet18", 64, 1, 2)])
def test_token_grid_on_other_grid_encoders(no_download, name, size, grid, n):
    torch.manual_seed(0)
    v = VisualEncoder(image_encoder=name, image_size=size, d_model=32, fusion_heads=4, token_grid=grid).eval()
    b = dummy_batch(2, size, max_views=2, vocab_size=VOCAB)
    with torch.no_grad():
        out = v(b)
    assert v.n_tokens == n and out["fused_tokens"].shape == (2, n, 32)

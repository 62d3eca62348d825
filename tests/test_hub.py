"""MLRG's own backbones from local folders, without any download: tiny random RAD-DINO (Dinov2), CXR-BERT (BERT) and
DistilGPT2 (GPT-2) models and a BPE tokenizer trained on phantom reports are written with `save_pretrained`, then
stage 1 and stage 2 run end to end from those folders with the `mimic` preset scaled down. Also: the decoder computes
what transformers' GPT-2 computes from the same weights, a cvt2distilgpt2-style checkpoint loads by name and shape,
and a missing folder, a folder of another kind of model or mismatched sizes is an error naming the folder."""

import json

import pytest
import torch

transformers = pytest.importorskip(
    "transformers"
)  # the hub extra; the dev extra (the README's test command) installs it
tokenizers = pytest.importorskip("tokenizers")

from mlrg.core import InputError
from mlrg.data import BPETokenizer, read_annotation, vocab_from_state
from mlrg.decoder import ReportDecoder, gpt2_decoder_config, load_gpt2_weights
from mlrg.engine import load_checkpoint
from mlrg.data import collate
from mlrg.finetune import build_finetune, dataset_for, finetune, load_report_model, FINETUNE
from mlrg.models import MLRG_STAGE1, build_image_encoder, build_text_encoder
from mlrg.inputs import write_tiny_phantom
from mlrg.pretrain import PRETRAIN, pretrain

transformers.utils.logging.set_verbosity_error()
SMALL = dict(
    progress=False, num_threads=2, num_workers=0, eval_batch_size=8
)  # the mimic preset's bf16 autocast stays on (CPU too)


def test_tiny_backbones_end_to_end(hub, tmp_path):
    """Stage 1 then stage 2 from the folders at the mimic preset scaled down; checkpoints record what they used and
    reload."""
    root, ann = hub
    pt = pretrain(
        preset="mimic",
        data_path=str(ann),
        image_pretrained_path=str(root / "dino"),
        text_pretrained_path=str(root / "bert"),
        tokenizer_path=str(root / "gpt2"),
        text_layers=1,
        image_size=28,
        batch_size=4,
        grad_accum=1,
        max_steps=2,
        model_config={"d_model": 32, "proj_dim": 32, **MLRG_STAGE1},
        linear_probe=False,
        model_save_path=str(tmp_path / "pt"),
        **SMALL,
    )
    ck1 = load_checkpoint(pt["best_checkpoint"])
    assert (
        ck1["config"]["model"]["image_encoder"] == "rad_dino" and ck1["config"]["model"]["freeze_image_encoder"] is True
    )
    assert {k: ck1["config"][k] for k in ("amp", "grad_clip", "seed", "lr", "scheduler")} == dict(
        amp="bf16", grad_clip=0.1, seed=9233, lr=5e-5, scheduler="plateau"
    )
    assert (
        ck1["config"]["backbones"]["text_pretrained_path"] == str(root / "bert")
        and "gpt2 BPE" in ck1["config"]["backbones"]["tokenizer"]
    )
    vocab = vocab_from_state(ck1["vocab"])
    assert isinstance(vocab, BPETokenizer) and len(vocab) == len(BPETokenizer.from_folder(root / "gpt2"))
    assert not any(k.startswith("text_encoder.net.encoder.layer.1.") for k in ck1["model"])  # cut to 1 of 2 layers
    dino = {k: v for k, v in ck1["model"].items() if k.startswith("visual.image_encoder.net.")}
    fresh = build_image_encoder("rad_dino", str(root / "dino"), image_size=28).state_dict()
    assert dino and all(
        torch.equal(v, fresh[k[len("visual.image_encoder.") :]]) for k, v in dino.items()
    )  # frozen: unchanged

    ft = finetune(
        preset="mimic",
        data_path=str(ann),
        pretrained_path=pt["best_checkpoint"],
        decoder_path=str(root / "gpt2"),
        select_metric="bleu4+ce14",
        batch_size=4,
        grad_accum=1,
        max_steps=2,
        eval_steps=2,
        val_max_samples=6,
        num_beams=2,
        max_length=40,
        meteor=False,
        model_save_path=str(tmp_path / "ft"),
        **SMALL,
    )
    assert ft["init"]["counts"]["loaded"] > 0 and ft["init"]["decoder_counts"]["loaded"] > 0
    assert ft["model"]["prompt"]["encoder"] == "cxr_bert" and ft["model"]["decoder"]["activation"] == "gelu_tanh"
    assert ft["model"]["decoder"]["n_positions"] == 128 and ft["backbones"]["decoder"] == "distilgpt2"
    assert ft["test"]["n"] > 0
    ck2 = load_checkpoint(ft["best_checkpoint"])
    assert ck2["vocab"] == ck1["vocab"]
    # the preset's stage 2 is MLRG's: stage 1's text ProjectionHead on the prompt, BERT's fusion layer, MLRG's scoring
    assert {ft["model"][k] for k in ("prompt_projection", "memory_tokens", "prompt_fusion", "type_init")} == {"mlrg"}
    head = {k for k in ck1["model"] if k.startswith("text_proj.")}
    assert head and head <= set(ck2["model"]) and ft["test"]["protocol"]["name"] == "mlrg"
    # the reloaded checkpoint writes the reports the run wrote
    model, vocab2, ck = load_report_model(ft["best_checkpoint"])
    items = read_annotation(ann)["test"][:3]
    ds = dataset_for(ck, items, ann.parent.parent / "mimic" / "files", vocab2)
    ids = model.generate(collate([ds[i] for i in range(len(ds))], vocab2.pad_id), num_beams=2, max_length=40)
    written = {r["id"]: r["generated"] for r in json.loads((tmp_path / "ft" / "test_predictions.json").read_text())}
    assert [vocab2.decode(x) for x in ids] == [written[it["id"]] for it in items]


def test_gpt2_decoder_matches_transformers(tmp_path):
    """ReportDecoder with GPT-2's weights gives transformers' GPT-2 logits (cross-attention included), and a prefixed
    checkpoint loads."""
    torch.manual_seed(1)
    cfg = transformers.GPT2Config(
        vocab_size=90,
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
    dec = ReportDecoder(dict(vocab_size=90, max_length=20, **gpt2_decoder_config(tmp_path / "gpt2"))).eval()
    table = load_gpt2_weights(dec, tmp_path / "gpt2", print_fn=None)
    assert set(table.status) == {"loaded"}
    toks, mem = torch.randint(0, 90, (2, 9)), torch.randn(2, 5, 32)
    torch.testing.assert_close(
        dec(toks, mem), hf(input_ids=toks, encoder_hidden_states=mem).logits, atol=1e-5, rtol=1e-5
    )
    # a cvt2distilgpt2-style checkpoint: GPT-2 names under a prefix, another vocabulary (token embeddings stay new)
    sd = {f"decoder.encoder_decoder.decoder.{k}": v for k, v in hf.state_dict().items()}
    sd["decoder.encoder_decoder.decoder.transformer.wte.weight"] = torch.randn(70, 32)
    torch.save({"state_dict": sd, "epoch": 8}, tmp_path / "cvt.ckpt")
    dec2 = ReportDecoder(dict(vocab_size=90, max_length=20, **gpt2_decoder_config(tmp_path / "gpt2")))
    t2 = load_gpt2_weights(dec2, tmp_path / "cvt.ckpt", print_fn=None).set_index("name")
    assert (
        t2.loc["tok.weight", "status"] == "new (shape mismatch)"
        and t2.loc["blocks.0.cross.kv.weight", "status"] == "loaded"
    )
    torch.testing.assert_close(dec2.blocks[1].cross.kv.weight, dec.blocks[1].cross.kv.weight)


def test_folder_errors_name_the_folder(hub, tmp_path):
    """A missing folder, a folder holding another kind of model, or mismatched sizes: an error naming the folder and
    what was expected."""
    root, ann = hub
    with pytest.raises(InputError, match="no such folder"):
        build_image_encoder("rad_dino", str(tmp_path / "absent"), image_size=28)
    with pytest.raises(InputError, match=r"holds a 'bert' model.*dinov2"):
        build_image_encoder("rad_dino", str(root / "bert"), image_size=28)
    with pytest.raises(InputError, match=r"holds a 'dinov2' model"):
        build_text_encoder("cxr_bert", vocab_size=50, pretrained_path=str(root / "dino"))
    with pytest.raises(InputError, match="multiple of the patch size 14"):
        build_image_encoder("rad_dino", str(root / "dino"), image_size=30)
    with pytest.raises(InputError, match="text_layers=3 but .* has 2 layers"):
        build_text_encoder("cxr_bert", vocab_size=50, pretrained_path=str(root / "bert"), n_layers=3)
    import shutil

    shutil.copytree(
        root / "bert", tmp_path / "remote"
    )  # a folder whose config names its own model code (as CXR-BERT's does)
    cfg = json.loads((tmp_path / "remote" / "config.json").read_text())
    (tmp_path / "remote" / "config.json").write_text(
        json.dumps({**cfg, "auto_map": {"AutoModel": "modeling_cxrbert.CXRBertModel"}})
    )
    with pytest.raises(InputError, match="trust_remote_code=True"):
        build_text_encoder("cxr_bert", vocab_size=50, pretrained_path=str(tmp_path / "remote"))
    with pytest.raises(InputError, match="no GPT-2 tokenizer files"):
        BPETokenizer.from_folder(root / "dino")
    with pytest.raises(InputError, match="decoder_path"):
        FINETUNE.check(decoder="distilgpt2")
    with pytest.raises(InputError, match=r"holds a 'bert' model"):
        gpt2_decoder_config(root / "bert")
    # the mimic preset asks for its folders before any work
    with pytest.raises(InputError, match="text_pretrained_path"):
        PRETRAIN.check(
            preset="mimic",
            data_path=str(ann),
            image_pretrained_path=str(root / "dino"),
            tokenizer_path=str(root / "gpt2"),
        )
    # stage 1 trained with one RAD-DINO; stage 2 pointed at a folder of another size
    pt = pretrain(
        data_path=str(ann),
        image_encoder="rad_dino",
        image_pretrained_path=str(root / "dino"),
        image_size=28,
        max_steps=1,
        batch_size=4,
        model_config={"d_model": 32, "proj_dim": 32},
        linear_probe=False,
        model_save_path=str(tmp_path / "pt"),
        **SMALL,
    )
    transformers.Dinov2Model(
        transformers.Dinov2Config(
            patch_size=14,
            image_size=28,
            hidden_size=48,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
        )
    ).save_pretrained(tmp_path / "dino48")
    p = FINETUNE.check(
        data_path=str(ann),
        pretrained_path=pt["best_checkpoint"],
        image_pretrained_path=str(tmp_path / "dino48"),
        max_steps=1,
        model_save_path=str(tmp_path / "ft"),
        **SMALL,
    )
    with pytest.raises(InputError, match=r"dino48"):
        build_finetune(p)

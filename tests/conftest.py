"""Shared fixtures: tiny random backbones in the Hugging Face layout (for the hub tests and the mimic study)."""

import json

import pytest
import torch


def _tokenizer(texts, folder, vocab_size=400):
    "A GPT-2-style byte-level BPE tokenizer trained on `texts`, saved in `folder` as GPT-2's is."
    import tokenizers
    import transformers

    bpe = tokenizers.ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=1, special_tokens=["<|endoftext|>"])
    transformers.GPT2TokenizerFast(
        tokenizer_object=bpe._tokenizer, bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>"
    ).save_pretrained(folder)


@pytest.fixture(scope="session")
def hub(tmp_path_factory):
    """A tiny phantom (16 patients, prepared) and tiny random backbones in the save_pretrained layout: dino/ (Dinov2,
    patch 14), bert/ (2 layers), gpt2/ (2 layers, with a BPE tokenizer trained on the phantom's reports)."""
    transformers = pytest.importorskip(
        "transformers"
    )  # the hub extra; the dev extra (the README's test command) installs it
    pytest.importorskip("tokenizers")
    from mlrg.data import read_annotation
    from mlrg.inputs import write_tiny_phantom

    transformers.utils.logging.set_verbosity_error()
    root = tmp_path_factory.mktemp("hub")
    ann = write_tiny_phantom(root, patients=16, seed=3)
    items = read_annotation(ann)
    torch.manual_seed(0)
    d = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    transformers.Dinov2Model(transformers.Dinov2Config(patch_size=14, image_size=28, **d)).save_pretrained(
        root / "dino"
    )
    (root / "dino" / "preprocessor_config.json").write_text(  # RAD-DINO's BitImageProcessor settings, at 28 px
        json.dumps(
            {
                "image_processor_type": "BitImageProcessor",
                "do_resize": True,
                "size": {"shortest_edge": 28},
                "resample": 3,
                "do_center_crop": True,
                "crop_size": {"height": 28, "width": 28},
                "do_rescale": True,
                "rescale_factor": 1 / 255,
                "do_normalize": True,
                "image_mean": [0.5] * 3,
                "image_std": [0.25] * 3,
                "do_convert_rgb": True,
            }
        )
    )
    transformers.BertModel(transformers.BertConfig(vocab_size=100, max_position_embeddings=256, **d)).save_pretrained(
        root / "bert"
    )
    transformers.GPT2LMHeadModel(
        transformers.GPT2Config(vocab_size=420, n_embd=32, n_layer=2, n_head=2, n_positions=128)
    ).save_pretrained(root / "gpt2")
    _tokenizer(
        [it["findings"] for it in items["train"]] + [it.get("indication_pure") or "" for it in items["train"]],
        root / "gpt2",
    )
    return root, ann

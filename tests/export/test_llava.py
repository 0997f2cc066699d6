"""Export to transformers' LLaVA format: the same logits (within 1e-5), token ids and pixels, loaded without vlmkit."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from PIL import Image

from vlmkit.errors import ConfigError
from vlmkit.export.llava import save_llava

TINY_SIGLIP = {"model_type": "siglip_vision_model", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
               "num_attention_heads": 2, "image_size": 32, "patch_size": 8}
TINY_REGNET = {"model_type": "regnet", "embedding_size": 8, "hidden_sizes": [8, 16], "depths": [1, 1],
               "groups_width": 8, "layer_type": "y"}
QUESTION = "What colour is the circle?"

# Run in a fresh interpreter where `import vlmkit` fails: the export must stand on transformers alone.
STANDALONE = textwrap.dedent("""
    import sys
    sys.modules["vlmkit"] = None
    import torch
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model_dir, image_path, out = sys.argv[1:]
    model = LlavaForConditionalGeneration.from_pretrained(model_dir).eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    turn = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": %r}]}
    text = processor.apply_chat_template([turn], add_generation_prompt=True, tokenize=False)
    inputs = processor(text=text, images=[Image.open(image_path)], return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
        generated = model.generate(**inputs, max_new_tokens=6, do_sample=False,
                                   suppress_tokens=[model.config.image_token_id])
    torch.save({**inputs, "logits": logits, "generated": generated}, out)
""" % QUESTION)


@pytest.fixture(scope="module")
def tokenizer(train_records):
    from vlmkit.processing.tokenizer_training import train_tokenizer
    from vlmkit.train.run import _texts

    return train_tokenizer(_texts(train_records), 400)


def built(tokenizer, **overrides):
    from tests.conftest import tiny_model_config  # noqa: I001 -- pytest has imported it under this name

    from vlmkit.model.build import build

    torch.manual_seed(0)
    result = build(tiny_model_config(**overrides), tokenizer=tokenizer)
    with torch.no_grad():  # a spread of weights that makes every token's logits differ
        for name, parameter in result.model.named_parameters():
            if "norm" not in name:
                parameter.normal_(0, 0.5)
    return result.model.eval(), result.processor


def vlmkit_inputs(processor, image):
    messages = [{"role": "user", "content": "<image>\n" + QUESTION}]
    ids = processor.encode_text(messages, [1], add_generation_prompt=True)["input_ids"][None]
    return ids, processor.image_inputs([image])["pixel_values"]


def test_export_loads_without_vlmkit_and_gives_the_same_logits_and_tokens(tokenizer, tmp_path):
    model, processor = built(tokenizer)
    save_llava(model, processor, tmp_path / "llava")
    image = Image.new("RGB", (40, 28), (200, 30, 10))
    image.save(tmp_path / "image.png")
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-c", STANDALONE, str(tmp_path / "llava"), str(tmp_path / "image.png"),
                    str(tmp_path / "out.pt")], check=True, env=env, timeout=300)
    exported = torch.load(tmp_path / "out.pt")

    ids, pixel_values = vlmkit_inputs(processor, image)
    assert torch.equal(exported["input_ids"], ids), "LLaVA's processor must give vlmkit's token ids"
    assert torch.allclose(exported["pixel_values"], pixel_values, atol=1e-5)
    with torch.no_grad():
        logits = model(input_ids=ids, pixel_values=pixel_values).logits
        generated = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixel_values,
                                   max_new_tokens=6, do_sample=False, suppress_tokens=[model.config.image_token_id])
    assert (exported["logits"] - logits).abs().max() < 1e-5
    assert torch.equal(exported["generated"], generated)


@pytest.mark.parametrize("overrides", [
    {"vision_feature_select_strategy": "full", "projector": "linear", "vision_feature_layer": -2,
     "image_resize_mode": "squash"},
    {"vision_config": TINY_SIGLIP, "projector_args": {"act": "silu"}},
], ids=["clip-full-linear-layer-2", "siglip-mlp"])
def test_other_exportable_architectures_give_the_same_logits(tokenizer, tmp_path, overrides):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model, processor = built(tokenizer, **overrides)
    save_llava(model, processor, tmp_path)
    llava = LlavaForConditionalGeneration.from_pretrained(tmp_path).eval()
    llava_processor = AutoProcessor.from_pretrained(tmp_path)
    image = Image.new("RGB", (30, 44), (20, 90, 200))
    ids, pixel_values = vlmkit_inputs(processor, image)
    text = llava_processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}],
        add_generation_prompt=True, tokenize=False)
    inputs = llava_processor(text=text, images=[image], return_tensors="pt")
    assert torch.equal(inputs["input_ids"], ids)
    assert torch.allclose(inputs["pixel_values"], pixel_values, atol=1e-5)
    with torch.no_grad():
        difference = llava(**inputs).logits - model(input_ids=ids, pixel_values=pixel_values).logits
    assert difference.abs().max() < 1e-5


@pytest.mark.parametrize("overrides, reason", [
    ({"vision_config": TINY_REGNET, "image_size": 32}, "regnet vision tower is convolutional"),
    ({"projector_args": {"pos_embed": True}}, "position embeddings"),
    ({"projector_args": {"layernorm": True}}, "LayerNorm"),
    ({"projector_args": {"hidden_size": 48}}, "hidden size 48 differs"),
    ({"projector_args": {"pool": 2}}, "averages 2x2 blocks"),
], ids=["cnn-tower", "pos-embed", "layernorm", "mlp-width", "pooled"])
def test_unexportable_architectures_are_refused_clearly(tokenizer, tmp_path, overrides, reason):
    model, processor = built(tokenizer, **overrides)
    with pytest.raises(ConfigError, match=f"cannot export: .*{reason}"):
        save_llava(model, processor, tmp_path)
    assert not any(tmp_path.iterdir()), "nothing may be written for a refused export"


def test_export_command_line(tiny, tmp_path):
    from vlmkit.cli import main

    model_dir, out = tmp_path / "model", tmp_path / "out"
    tiny.model.save_pretrained(model_dir)
    tiny.processor.save_pretrained(model_dir)
    assert main(["export", "--model", str(model_dir), "--format", "llava", "--out", str(out)]) == 0
    assert (out / "model.safetensors").is_file() and not list(out.glob("*.bin"))

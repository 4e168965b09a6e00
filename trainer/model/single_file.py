"""Diffusers components -> one original-layout (LDM / SGM) checkpoint, as A1111, ComfyUI and kohya read it.

This is the inverse of diffusers.loaders.single_file_utils' conversions (it reuses their key tables), so
`load_model(save_single_file(...))` gives back the same weights. Used to save merged checkpoints and to
build original-layout test files of the tiny models.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING
from safetensors.torch import save_file

from trainer.model.family import detect_family

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
# (prefix, layout) of each text encoder in the original checkpoint, in the family's encoder order.
TEXT_ENCODER_LAYOUTS = {
    "sd1": [("cond_stage_model.transformer.", "clip")],
    "sd2": [("cond_stage_model.model.", "openclip")],
    "sdxl": [
        ("conditioner.embedders.0.transformer.", "clip"),
        ("conditioner.embedders.1.model.", "openclip"),
    ],
}

_UNET_TOP = {
    **DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"],
    **DIFFUSERS_TO_LDM_MAPPING["unet"]["addition_embed_type"],
}
_RESNET_PARTS = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def _resnet(rest: str) -> str:
    head, _, tail = rest.partition(".")
    return _join(_RESNET_PARTS.get(head, head), tail)


def unet_name_to_original(name: str, unet_config: Mapping) -> str:
    """A diffusers UNet parameter or module name -> its original (LDM/SGM) name, without the model prefix.

    e.g. down_blocks.1.attentions.0.proj_in -> input_blocks.4.1.proj_in and
    up_blocks.0.upsamplers.0.conv -> output_blocks.2.2.conv (the table in LORA_FORMAT.md).
    """
    if name in _UNET_TOP:
        return _UNET_TOP[name]
    step = int(unet_config["layers_per_block"]) + 1
    parts = name.split(".")
    kind = parts[0]
    if kind == "mid_block":
        index = {"resnets": 2 * int(parts[2]), "attentions": 1}[parts[1]]
        rest = _join(*parts[3:])
        return _join(f"middle_block.{index}", _resnet(rest) if parts[1] == "resnets" else rest)
    block, sub = int(parts[1]), parts[2]
    rest = _join(*parts[4:])
    if kind == "down_blocks":
        if sub == "downsamplers":  # ".0.conv" -> ".0.op"
            return _join(f"input_blocks.{(block + 1) * step}.0.op", _join(*parts[5:]))
        n = 1 + block * step + int(parts[3])
        return (
            _join(f"input_blocks.{n}.0", _resnet(rest))
            if sub == "resnets"
            else _join(f"input_blocks.{n}.1", rest)
        )
    if kind == "up_blocks":
        if sub == "upsamplers":
            # the upsampler follows the resnet (and the attention, when the block has one)
            slot = 2 if "CrossAttn" in unet_config["up_block_types"][block] else 1
            return _join(f"output_blocks.{block * step + step - 1}.{slot}", rest)
        n = block * step + int(parts[3])
        return (
            _join(f"output_blocks.{n}.0", _resnet(rest))
            if sub == "resnets"
            else _join(f"output_blocks.{n}.1", rest)
        )
    raise KeyError(f"unexpected UNet key {name}")


def unet_to_original(state_dict: Mapping[str, torch.Tensor], unet_config: Mapping) -> dict[str, torch.Tensor]:
    return {UNET_PREFIX + unet_name_to_original(k, unet_config): v for k, v in state_dict.items()}


_VAE_TOP = DIFFUSERS_TO_LDM_MAPPING["vae"]
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _vae_key(key: str, num_up_blocks: int) -> str:
    if key in _VAE_TOP:
        return _VAE_TOP[key]
    coder, kind, *parts = key.split(".")
    if kind == "mid_block":
        group, index, rest = parts[0], int(parts[1]), _join(*parts[2:])
        if group == "resnets":
            return _join(coder, f"mid.block_{index + 1}", rest.replace("conv_shortcut", "nin_shortcut"))
        for new, old in _VAE_ATTENTION.items():
            if rest.startswith(new + "."):
                return _join(coder, "mid.attn_1", old + rest[len(new) :])
    block, group = int(parts[0]), parts[1]
    # LDM numbers decoder levels from the bottom, diffusers from the top
    level, name = (
        (f"down.{block}", "downsample")
        if coder == "encoder"
        else (f"up.{num_up_blocks - 1 - block}", "upsample")
    )
    if group == "resnets":
        return _join(
            coder, level, f"block.{parts[2]}", _join(*parts[3:]).replace("conv_shortcut", "nin_shortcut")
        )
    return _join(coder, level, name, _join(*parts[3:]))  # ...samplers.0.conv.weight -> ...sample.conv.weight


def vae_to_original(state_dict: Mapping[str, torch.Tensor], vae_config: Mapping) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state_dict.items():
        new = VAE_PREFIX + _vae_key(key, len(vae_config["up_block_types"]))
        # the original mid-block attention uses 1x1 convs where diffusers uses Linear layers
        if ".mid.attn_1." in new and new.endswith("weight") and value.ndim == 2:
            value = value[:, :, None, None]
        out[new] = value
    return out


def clip_to_original(state_dict: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    # transformers >= 5 drops the `text_model.` level of CLIPTextModel; the original layout keeps it.
    return {
        prefix + (k if k.startswith(("text_model.", "text_projection")) else "text_model." + k): v
        for k, v in state_dict.items()
    }


_OPENCLIP_TOP = {k: v for k, v in DIFFUSERS_TO_LDM_MAPPING["openclip"]["layers"].items()}
_OPENCLIP_LAYER = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}


def openclip_to_original(state_dict: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """OpenCLIP keeps q/k/v as one in_proj matrix and its text projection transposed."""
    sd = {
        k if k.startswith(("text_model.", "text_projection")) else "text_model." + k: v
        for k, v in state_dict.items()
    }
    out = {}
    for key, value in sd.items():
        if key in _OPENCLIP_TOP:
            out[prefix + _OPENCLIP_TOP[key]] = (
                value.T.contiguous() if key == "text_projection.weight" else value
            )
            continue
        layer, _, rest = key.removeprefix("text_model.encoder.layers.").partition(".")
        if rest.startswith("self_attn.") and rest.split(".")[1] in ("q_proj", "k_proj", "v_proj"):
            if rest.startswith("self_attn.q_proj."):
                kind = rest.rsplit(".", 1)[1]  # weight | bias
                base = f"text_model.encoder.layers.{layer}.self_attn."
                qkv = [sd[f"{base}{p}_proj.{kind}"] for p in "qkv"]
                out[f"{prefix}transformer.resblocks.{layer}.attn.in_proj_{kind}"] = torch.cat(qkv)
            continue
        for new, old in _OPENCLIP_LAYER.items():
            if rest.startswith(new + "."):
                out[f"{prefix}transformer.resblocks.{layer}.{old}{rest[len(new) :]}"] = value
                break
        else:
            raise KeyError(f"unexpected OpenCLIP key {key}")
    return out


def to_original_state_dict(components: Mapping) -> dict[str, torch.Tensor]:
    """One original-layout state dict from {"unet", "vae", "text_encoder"[, "text_encoder_2"]}."""
    encoders = [components[k] for k in ("text_encoder", "text_encoder_2") if components.get(k) is not None]
    family = detect_family(components["unet"].config, [e.config for e in encoders])
    out = unet_to_original(components["unet"].state_dict(), components["unet"].config)
    out.update(vae_to_original(components["vae"].state_dict(), components["vae"].config))
    for encoder, (prefix, layout) in zip(encoders, TEXT_ENCODER_LAYOUTS[family.name]):
        convert = clip_to_original if layout == "clip" else openclip_to_original
        out.update(convert(encoder.state_dict(), prefix))
    return out


def save_single_file(
    components: Mapping,
    path: str | os.PathLike,
    dtype: torch.dtype | None = None,
    metadata: dict | None = None,
) -> Path:
    """Write the components as one .safetensors checkpoint in the original layout."""
    state = to_original_state_dict(components)
    # safetensors refuses shared storage; contiguous copies also drop views made by the conversions
    state = {
        k: (v.to(dtype) if dtype is not None else v).detach().cpu().contiguous().clone()
        for k, v in state.items()
    }
    path = Path(path)
    save_file(state, str(path), metadata={"format": "pt", **(metadata or {})})
    return path

"""What differs between SD1, SD2 and SDXL, in one small object per family.

The training loop asks its family object how to turn captions into UNet conditioning, what to name the
LoRA keys and what to write into the metadata, so it never branches on the model type itself.
Prompt encoding mirrors diffusers' pipelines exactly: a LoRA is trained on the same text features the
pipeline computes at inference.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from networks.errors import SdloraError
from networks.metadata import ARCHITECTURE, BASE_MODEL_VERSION
from networks.naming import TE1_PREFIX, TE2_PREFIX, TE_PREFIX, UNET_PREFIX

OPENAI_PAD = "<|endoftext|>"
OPENCLIP_PAD = "!"
Size = tuple[int, int]  # (height, width), the order SDXL's micro-conditioning uses
Sizes = Sequence[Size] | None  # one per sample; None: the sample's own size

@dataclass
class PromptEmbeds:
    """What the UNet is conditioned on: per-token states and, for SDXL, the pooled TE2 embedding."""

    encoder_hidden_states: torch.Tensor
    pooled: torch.Tensor | None = None

    def to(self, *args, **kwargs) -> PromptEmbeds:
        pooled = None if self.pooled is None else self.pooled.to(*args, **kwargs)
        return PromptEmbeds(self.encoder_hidden_states.to(*args, **kwargs), pooled)

def _attention_mask(ids: torch.Tensor) -> torch.Tensor:
    """The tokenizer's mask (1 up to and including the first EOS). CLIP's EOS is its highest id, and
    OpenAI CLIP pads with EOS too, so the pad id alone cannot tell padding from text."""
    eos = ids == ids.max(dim=1, keepdim=True).values
    first_eos = eos.int().argmax(dim=1, keepdim=True)
    return (torch.arange(ids.shape[1]) <= first_eos).long()

def _chunked_ids(tokenizer, captions: list[str], chunks: int) -> torch.Tensor:
    """[batch, chunks, 77]: BOS + up to 75 caption tokens + EOS + padding per chunk (an empty chunk reads
    as the empty prompt). Built by hand because tokenizers frame only the whole text, not its windows."""
    window = tokenizer.model_max_length - 2
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    tokens = tokenizer(captions, add_special_tokens=False, truncation=True, max_length=window * chunks).input_ids
    rows = [[bos, *part, eos] + [pad] * (window - len(part))
            for ids in tokens for part in (ids[c * window:(c + 1) * window] for c in range(chunks))]
    return torch.tensor(rows, dtype=torch.long).reshape(len(captions), chunks, window + 2)


def _device_of(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device

@dataclass(frozen=True)
class ModelFamily:
    """SD1 by default; SD2 and SDXL override the few things that differ."""

    name: str = "sd1"
    pipeline_class_name: str = "StableDiffusionPipeline"
    text_encoder_attrs: tuple[str, ...] = ("text_encoder",)
    tokenizer_attrs: tuple[str, ...] = ("tokenizer",)
    tokenizer_pad_tokens: tuple[str, ...] = (OPENAI_PAD,)
    text_encoder_lora_prefixes: tuple[str, ...] = (TE_PREFIX,)
    unet_lora_prefix: str = UNET_PREFIX
    # SDXL LoRA keys must use the original (SGM) UNet names; SD1/SD2 loaders read diffusers names.
    unet_key_style: str = "diffusers"
    modelspec_implementation: str = "https://github.com/Stability-AI/generative-models"

    @property
    def is_v2(self) -> bool:
        return self.name == "sd2"

    @property
    def is_sdxl(self) -> bool:
        return self.name == "sdxl"

    def base_model_version(self, prediction_type: str = "epsilon") -> str:
        """kohya's `ss_base_model_version` (the table lives with the file format in networks/metadata)."""
        return BASE_MODEL_VERSION[(self.name, prediction_type == "v_prediction")]

    def modelspec_architecture(self, prediction_type: str = "epsilon") -> str:
        return ARCHITECTURE[(self.name, prediction_type == "v_prediction")]

    def default_resolution(self, prediction_type: str = "epsilon") -> int:
        return 512

    def shipped_config_name(self, prediction_type: str = "epsilon") -> str:
        """The folder under trainer/assets/configs that describes the real model of this family."""
        return "sd15"

    def pipeline_extras(self) -> dict:
        """Constructor arguments the family's diffusers pipeline needs besides the model parts."""
        return dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False)

    def tokenize(self, tokenizers: Sequence, captions: list[str], chunks: int = 1) -> list[torch.Tensor]:
        """One [batch, chunks, 77] id tensor per text encoder: each chunk is a window of 75 caption tokens
        with its own start/end tokens and padding, exactly as the tokenizer frames a prompt that short."""
        return [_chunked_ids(tok, captions, chunks) for tok in tokenizers]

    def encode_ids(
        self, text_encoders: Sequence[torch.nn.Module], input_ids: list[torch.Tensor], clip_skip: int = 1
    ) -> PromptEmbeds:
        # StableDiffusionPipeline.encode_prompt: the last hidden state (final norm applied); with clip skip
        # (A1111/kohya numbering: 2 = penultimate) that layer's states, then the final norm, as diffusers
        # does with its clip_skip = ours - 1. For SD2 the last layer is already OpenCLIP's penultimate:
        # diffusers' SD2 text encoder has 23 layers.
        (encoder,), (ids,) = text_encoders, input_ids
        mask = (
            _attention_mask(ids).to(_device_of(encoder))
            if getattr(encoder.config, "use_attention_mask", False)
            else None
        )
        out = encoder(ids.to(_device_of(encoder)), attention_mask=mask, output_hidden_states=clip_skip > 1)
        states = out[0]
        if clip_skip > 1:  # transformers 5 flattened CLIPTextModel: final_layer_norm may sit on the model itself
            final_norm = getattr(encoder, "text_model", encoder).final_layer_norm
            states = final_norm(out.hidden_states[-clip_skip])
        return PromptEmbeds(states.to(encoder.dtype))

    def encode_prompt(
        self, text_encoders: Sequence[torch.nn.Module], tokenizers: Sequence, captions: list[str],
        clip_skip: int = 1, chunks: int = 1,
    ) -> PromptEmbeds:
        """Per-token states [batch, 77 * chunks, dim] and, for SDXL, the pooled embedding. Long prompts are
        read as A1111 and ComfyUI read them (kohya's max_token_length): each 75-token window is encoded on
        its own and the windows' states are laid side by side; the pooled embedding is the first window's."""
        ids = self.tokenize(tokenizers, captions, chunks)
        batch = len(captions)
        embeds = self.encode_ids(text_encoders, [i.flatten(0, 1) for i in ids], clip_skip)
        states = embeds.encoder_hidden_states
        states = states.reshape(batch, chunks * states.shape[1], states.shape[2])
        pooled = None if embeds.pooled is None else embeds.pooled.reshape(batch, chunks, -1)[:, 0]
        return PromptEmbeds(states, pooled)

    def unet_added_kwargs(self, prompt_embeds: PromptEmbeds, original_sizes: Sizes = None,
                          crop_top_lefts: Sizes = None, target_sizes: Sizes = None) -> dict | None:
        """SDXL's `added_cond_kwargs` for the UNet; SD1/SD2 take none."""
        return None

@dataclass(frozen=True)
class SD2Family(ModelFamily):
    name: str = "sd2"
    tokenizer_pad_tokens: tuple[str, ...] = (OPENCLIP_PAD,)

    def default_resolution(self, prediction_type: str = "epsilon") -> int:
        return 768 if prediction_type == "v_prediction" else 512

    def shipped_config_name(self, prediction_type: str = "epsilon") -> str:
        return "sd21" if prediction_type == "v_prediction" else "sd21-base"

@dataclass(frozen=True)
class SDXLFamily(ModelFamily):
    name: str = "sdxl"
    pipeline_class_name: str = "StableDiffusionXLPipeline"
    text_encoder_attrs: tuple[str, ...] = ("text_encoder", "text_encoder_2")
    tokenizer_attrs: tuple[str, ...] = ("tokenizer", "tokenizer_2")
    tokenizer_pad_tokens: tuple[str, ...] = (OPENAI_PAD, OPENCLIP_PAD)
    text_encoder_lora_prefixes: tuple[str, ...] = (TE1_PREFIX, TE2_PREFIX)
    unet_key_style: str = "sgm"

    def default_resolution(self, prediction_type: str = "epsilon") -> int:
        return 1024

    def shipped_config_name(self, prediction_type: str = "epsilon") -> str:
        return "sdxl-base"

    def pipeline_extras(self) -> dict:
        return {}

    def encode_ids(
        self, text_encoders: Sequence[torch.nn.Module], input_ids: list[torch.Tensor], clip_skip: int = 1
    ) -> PromptEmbeds:
        # StableDiffusionXLPipeline.encode_prompt: both encoders' penultimate hidden states side by side
        # (clip skip moves up from there, as diffusers' clip_skip = ours - 1), pooled = the first 2-D
        # output, i.e. TE2's projected text_embeds.
        states, pooled = [], None
        for encoder, ids in zip(text_encoders, input_ids):
            out = encoder(ids.to(_device_of(encoder)), output_hidden_states=True)
            if pooled is None and out[0].ndim == 2:
                pooled = out[0]
            states.append(out.hidden_states[-(clip_skip + 1)])
        dtype = text_encoders[-1].dtype
        return PromptEmbeds(torch.cat(states, dim=-1).to(dtype), pooled.to(dtype))

    def unet_added_kwargs(self, prompt_embeds: PromptEmbeds, original_sizes: Sizes = None,
                          crop_top_lefts: Sizes = None, target_sizes: Sizes = None) -> dict:
        """{"text_embeds", "time_ids"}; time_ids = original size + crop top-left + target size, per sample."""
        pooled = prompt_embeds.pooled
        if original_sizes is None or target_sizes is None:
            raise ValueError("SDXL conditioning needs original_sizes and target_sizes for every sample.")
        crops = crop_top_lefts if crop_top_lefts is not None else [(0, 0)] * len(original_sizes)
        rows = [list(o) + list(c) + list(t) for o, c, t in zip(original_sizes, crops, target_sizes)]
        time_ids = torch.tensor(rows, dtype=pooled.dtype, device=pooled.device)
        return {"text_embeds": pooled, "time_ids": time_ids}

SD1 = ModelFamily()
SD2 = SD2Family()
SDXL = SDXLFamily()
FAMILIES = {f.name: f for f in (SD1, SD2, SDXL)}

def get_family(name: str) -> ModelFamily:
    """The family object for "sd1", "sd2" or "sdxl"."""
    try:
        return FAMILIES[str(name).lower()]
    except KeyError:
        raise SdloraError(f"Unknown model family {name!r}; use one of sd1, sd2, sdxl or auto.") from None

def _get(config, key: str, default=None):
    if isinstance(config, Mapping):
        return config.get(key, default)
    return getattr(config, key, default)

def detect_family(unet_config, text_encoder_configs: Sequence) -> ModelFamily:
    """The family of a diffusers model from its UNet and text-encoder configs (dicts or config objects).

    SDXL: two text encoders / text_time conditioning. SD2: OpenCLIP's plain "gelu" text encoder or linear
    attention projections (SD1 uses quick_gelu CLIP and 1x1 conv projections).
    """
    if _get(unet_config, "addition_embed_type") == "text_time" or len(text_encoder_configs) == 2:
        return SDXL
    act = _get(text_encoder_configs[0], "hidden_act") if text_encoder_configs else None
    if act == "gelu" or _get(unet_config, "use_linear_projection", False):
        return SD2
    return SD1


def unet_conditioning(family, encoded: dict, placements: Sequence, device, dtype):
    """(encoder_hidden_states, added_cond_kwargs) for captions encoded like Trainer._encode_captions
    ({"hidden", "pooled"?}) and each sample's placement as seen (mirrored for flipped samples)."""
    pooled = encoded.get("pooled")
    embeds = PromptEmbeds(encoded["hidden"].to(device, dtype), pooled.to(device, dtype) if pooled is not None else None)
    added = family.unet_added_kwargs(embeds, original_sizes=[p.original_size[::-1] for p in placements],
                                     crop_top_lefts=[p.crop_left_top[::-1] for p in placements],
                                     target_sizes=[p.bucket[::-1] for p in placements])
    return embeds.encoder_hidden_states, added

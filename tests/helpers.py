"""Shared helpers for tests on the tiny models."""

import torch

from networks.network import LoraNetwork
from networks.spec import NetworkSpec
from trainer.model.tiny_models import build_tiny_pipeline_components


def text_encoders(components):
    return [components[k] for k in ("text_encoder", "text_encoder_2") if k in components]


def unet_inputs(components, seed=0):
    unet = components["unet"]
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(2, 4, 8, 8, generator=g)
    context = torch.randn(2, 5, unet.config.cross_attention_dim, generator=g)
    kwargs = {}
    if unet.config.addition_embed_type == "text_time":
        pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(2, pooled, generator=g),
                                       "time_ids": torch.tensor([[64, 64, 0, 0, 64, 64]] * 2).float()}
    return sample, torch.tensor([10, 500]), context, kwargs


def unet_out(components, seed=0):
    sample, t, context, kwargs = unet_inputs(components, seed)
    with torch.no_grad():
        return components["unet"](sample, t, context, **kwargs).sample


def randomise_up(network, seed=1, std=0.2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for adapter in network.adapters.values():
            w = adapter.lora_up.weight
            w.copy_(torch.randn(w.shape, generator=g) * std)


def attached(family, kind, seed=0, **spec_kwargs):
    components = build_tiny_pipeline_components(family, seed=seed)
    spec = NetworkSpec(type=kind, rank=4, alpha_ratio=0.5, conv_rank=2, conv_alpha_ratio=1.0,
                       train_text_encoder=True, **spec_kwargs)
    network = LoraNetwork.create(family, components["unet"], text_encoders(components), spec).attach()
    return components, network

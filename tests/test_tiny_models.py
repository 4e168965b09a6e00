"""The built-in tiny models and the shipped CLIP tokenizer."""

import pytest
import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

from networks.errors import SdloraError
from trainer.model.tiny_models import (
    build_tiny_pipeline_components,
    demo_model_path,
    load_clip_tokenizer,
    save_demo_model,
)


def test_tokenizer_matches_clip_test_vector():
    tok = load_clip_tokenizer()
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tok.model_max_length == 77
    assert len(tok) == 49408
    assert tok.pad_token_id == 49407


def test_openclip_tokenizer_pads_with_bang():
    tok = load_clip_tokenizer("!")
    ids = tok("a cat", padding="max_length", max_length=6).input_ids
    assert ids == [49406, 320, 2368, 49407, 0, 0]


@pytest.mark.parametrize(
    "family, pipeline_class, prediction_type, proj_kind",
    [
        ("sd1", StableDiffusionPipeline, "epsilon", torch.nn.Conv2d),
        ("sd2", StableDiffusionPipeline, "v_prediction", torch.nn.Linear),
        ("sdxl", StableDiffusionXLPipeline, "epsilon", torch.nn.Linear),
    ],
)
def test_demo_model_folder_opens_offline_and_has_every_adapted_module_kind(
    tmp_path, family, pipeline_class, prediction_type, proj_kind
):
    save_demo_model(tmp_path / "m", family)
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "m")
    assert type(pipe) is pipeline_class
    assert pipe.vae_scale_factor == 8
    assert pipe.scheduler.config.prediction_type == prediction_type
    assert pipe.scheduler.config.beta_schedule == "scaled_linear"
    names = dict(pipe.unet.named_modules())
    proj_in = [m for n, m in names.items() if n.endswith("proj_in")]
    assert proj_in and all(type(m) is proj_kind for m in proj_in)
    for suffix in (
        "downsamplers.0.conv",
        "upsamplers.0.conv",
        "conv_shortcut",
        "time_emb_proj",
        "attn2.to_k",
        "ff.net.2",
    ):
        assert any(n.endswith(suffix) for n in names), suffix
    image = pipe("a photo of a cat", num_inference_steps=2, output_type="np").images
    assert image.shape == (1, 64, 64, 3)


def test_sdxl_unet_takes_text_time_conditioning():
    c = build_tiny_pipeline_components("sdxl")
    te2 = c["text_encoder_2"].config
    cross = c["text_encoder"].config.hidden_size + te2.hidden_size
    assert c["unet"].config.cross_attention_dim == cross
    added = {"text_embeds": torch.zeros(1, te2.projection_dim), "time_ids": torch.zeros(1, 6)}
    out = c["unet"](torch.zeros(1, 4, 8, 8), 10, torch.zeros(1, 77, cross), added_cond_kwargs=added).sample
    assert out.shape == (1, 4, 8, 8)
    assert c["tokenizer"].pad_token == "<|endoftext|>" and c["tokenizer_2"].pad_token == "!"


def test_weights_are_deterministic_in_the_seed():
    a = build_tiny_pipeline_components("sd1", seed=3)["unet"].conv_in.weight
    b = build_tiny_pipeline_components("sd1", seed=3)["unet"].conv_in.weight
    c = build_tiny_pipeline_components("sd1", seed=4)["unet"].conv_in.weight
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_demo_model_path_builds_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SDLORA_CACHE", str(tmp_path))
    first = demo_model_path("sd1")
    stamp = (first / "model_index.json").stat().st_mtime_ns
    second = demo_model_path("sd1")
    assert first == second and first.is_relative_to(tmp_path)
    assert (second / "model_index.json").stat().st_mtime_ns == stamp
    leftovers = [p.name for p in first.parent.iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_user_errors_are_one_sentence(tmp_path):
    with pytest.raises(SdloraError, match="Unknown model family 'sd3'"):
        save_demo_model(tmp_path / "x", "sd3")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "a.txt").write_text("x")
    with pytest.raises(SdloraError, match="is not empty"):
        save_demo_model(tmp_path / "full", "sd1")

"""Per-family behaviour: prompt encoding equals diffusers' pipelines, metadata names, detection."""

import pytest
import torch

from networks.errors import SdloraError
from trainer.model.family import SD1, SD2, SDXL, detect_family, get_family
from trainer.model.tiny_models import build_tiny_pipeline

CAPTIONS = ["a photo of a cat", "an oil painting of a lighthouse at dusk, thick brush strokes"]


@pytest.fixture(scope="module")
def pipes():
    return {name: build_tiny_pipeline(name) for name in ("sd1", "sd2", "sdxl")}


def _parts(pipe, family):
    encoders = [getattr(pipe, a) for a in family.text_encoder_attrs]
    tokenizers = [getattr(pipe, a) for a in family.tokenizer_attrs]
    return encoders, tokenizers


@pytest.mark.parametrize("name", ["sd1", "sd2"])
def test_sd_prompt_embeds_equal_the_pipeline(pipes, name):
    pipe, family = pipes[name], get_family(name)
    ours = family.encode_prompt(*_parts(pipe, family), CAPTIONS)
    theirs, _ = pipe.encode_prompt(CAPTIONS, torch.device("cpu"), 1, False)
    assert ours.pooled is None
    assert ours.encoder_hidden_states.shape == (2, 77, 32)
    torch.testing.assert_close(ours.encoder_hidden_states, theirs, atol=1e-6, rtol=0)
    assert family.unet_added_kwargs(ours, [(64, 64)] * 2, None, [(64, 64)] * 2) is None


def test_sdxl_prompt_embeds_and_time_ids_equal_the_pipeline(pipes):
    pipe = pipes["sdxl"]
    ours = SDXL.encode_prompt(*_parts(pipe, SDXL), CAPTIONS)
    embeds, _, pooled, _ = pipe.encode_prompt(
        CAPTIONS, device=torch.device("cpu"), do_classifier_free_guidance=False
    )
    assert ours.encoder_hidden_states.shape == (2, 77, 32 + 64)
    torch.testing.assert_close(ours.encoder_hidden_states, embeds, atol=1e-6, rtol=0)
    torch.testing.assert_close(ours.pooled, pooled, atol=1e-6, rtol=0)

    added = SDXL.unet_added_kwargs(ours, [(96, 64), (64, 64)], [(8, 0), (0, 0)], [(64, 64), (64, 64)])
    expected = pipe._get_add_time_ids(
        (96, 64), (8, 0), (64, 64), torch.float32, pipe.text_encoder_2.config.projection_dim
    )
    assert torch.equal(added["time_ids"][0:1], expected)
    assert added["time_ids"].tolist()[1] == [64, 64, 0, 0, 64, 64]
    assert added["text_embeds"] is ours.pooled
    out = pipe.unet(torch.zeros(2, 4, 8, 8), 5, ours.encoder_hidden_states, added_cond_kwargs=added).sample
    assert out.shape == (2, 4, 8, 8)


LONG = ", ".join(["red"] * 60)  # 119 CLIP tokens (60 words, 59 commas): a 75-token window and 44 more
LONG_TAIL = ", " + ", ".join(["red"] * 22)  # tokens 76-119 of LONG: a comma first, then 22 words


@pytest.mark.parametrize("name", ["sd1", "sd2", "sdxl"])
def test_long_prompts_are_read_in_75_token_windows_side_by_side(pipes, name):
    pipe, family = pipes[name], get_family(name)
    parts = _parts(pipe, family)
    two = family.encode_prompt(*parts, [LONG, "a cat"], chunks=2)
    one = family.encode_prompt(*parts, [LONG, "a cat"])
    rest = family.encode_prompt(*parts, [LONG_TAIL, ""])
    states = two.encoder_hidden_states
    assert states.shape == (2, 2 * 77, one.encoder_hidden_states.shape[-1])
    # The first window is the prompt as one window reads it; the second reads what follows on its own
    # (the empty prompt for a short caption), framed by its own start and end tokens.
    torch.testing.assert_close(states[:, :77], one.encoder_hidden_states, atol=1e-6, rtol=0)
    torch.testing.assert_close(states[:, 77:], rest.encoder_hidden_states, atol=1e-6, rtol=0)
    assert not torch.allclose(states[0, 77:], states[1, 77:])  # the long caption's tail was not dropped
    if family.is_sdxl:  # the pooled embedding is the first window's
        torch.testing.assert_close(two.pooled, one.pooled, atol=1e-6, rtol=0)


def test_metadata_names_per_family():
    assert [SD1.base_model_version(), SD2.base_model_version(), SD2.base_model_version("v_prediction")] == [
        "sd_v1",
        "sd_v2",
        "sd_v2_v",
    ]
    assert SDXL.base_model_version() == "sdxl_base_v1-0"
    assert SD1.modelspec_architecture() == "stable-diffusion-v1/lora"
    assert SD2.modelspec_architecture() == "stable-diffusion-v2-512/lora"
    assert SD2.modelspec_architecture("v_prediction") == "stable-diffusion-v2-768-v/lora"
    assert SDXL.modelspec_architecture() == "stable-diffusion-xl-v1-base/lora"
    assert [SD1.default_resolution(), SD2.default_resolution("v_prediction"), SDXL.default_resolution()] == [
        512,
        768,
        1024,
    ]
    assert SD1.text_encoder_lora_prefixes == SD2.text_encoder_lora_prefixes == ("lora_te_",)
    assert SDXL.text_encoder_lora_prefixes == ("lora_te1_", "lora_te2_")
    assert (SD1.unet_key_style, SD2.unet_key_style, SDXL.unet_key_style) == ("diffusers", "diffusers", "sgm")
    assert SD2.is_v2 and not SD1.is_v2 and SDXL.is_sdxl


def test_detect_family_from_configs(pipes):
    for name, pipe in pipes.items():
        family = get_family(name)
        te_configs = [getattr(pipe, a).config for a in family.text_encoder_attrs]
        assert detect_family(pipe.unet.config, te_configs) is family
    # the real models' config values, as plain dicts
    assert detect_family({"cross_attention_dim": 768}, [{"hidden_act": "quick_gelu"}]) is SD1
    assert detect_family({"use_linear_projection": True}, [{"hidden_act": "gelu"}]) is SD2
    assert detect_family({"addition_embed_type": "text_time"}, [{}, {}]) is SDXL


def test_unknown_family_name_is_a_user_error():
    assert get_family("SDXL") is SDXL
    with pytest.raises(SdloraError, match="Unknown model family 'sd3'"):
        get_family("sd3")


def test_attention_mask_matches_the_tokenizer_for_both_pad_styles(pipes):
    from trainer.model.family import _attention_mask

    for tok in (pipes["sd1"].tokenizer, pipes["sd2"].tokenizer):
        batch = tok(CAPTIONS, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        assert torch.equal(_attention_mask(batch.input_ids), batch.attention_mask)


def test_prompt_embeds_with_attention_mask_equal_the_pipeline():
    pipe = build_tiny_pipeline("sd1")
    pipe.text_encoder.config.use_attention_mask = True  # a few fine-tunes set it
    ours = SD1.encode_prompt(*_parts(pipe, SD1), CAPTIONS)
    theirs, _ = pipe.encode_prompt(CAPTIONS, torch.device("cpu"), 1, False)
    torch.testing.assert_close(ours.encoder_hidden_states, theirs, atol=1e-6, rtol=0)
    pipe.text_encoder.config.use_attention_mask = False
    unmasked = SD1.encode_prompt(*_parts(pipe, SD1), CAPTIONS).encoder_hidden_states
    # causal attention: text positions agree, padding positions differ, so the mask was really applied
    torch.testing.assert_close(unmasked[0, :7], ours.encoder_hidden_states[0, :7], atol=1e-6, rtol=0)
    assert not torch.allclose(unmasked[0, 7:], ours.encoder_hidden_states[0, 7:])


@pytest.mark.parametrize("name", ["sd1", "sd2"])
def test_clip_skip_2_reads_the_penultimate_layer_through_the_final_norm(pipes, name):
    import copy

    pipe, family = pipes[name], get_family(name)
    encoders, tokenizers = _parts(pipe, family)
    shorter = copy.deepcopy(encoders[0])  # the same encoder without its last layer
    layers = shorter.text_model.encoder.layers if hasattr(shorter, "text_model") else shorter.encoder.layers
    del layers[-1]
    skipped = family.encode_prompt(encoders, tokenizers, CAPTIONS, clip_skip=2).encoder_hidden_states
    expected = family.encode_prompt([shorter], tokenizers, CAPTIONS).encoder_hidden_states
    torch.testing.assert_close(skipped, expected, atol=1e-6, rtol=0)
    assert not torch.allclose(skipped, family.encode_prompt(encoders, tokenizers, CAPTIONS).encoder_hidden_states)


def test_sdxl_clip_skip_equals_the_pipelines_one_layer_up(pipes):
    pipe = pipes["sdxl"]
    ours = SDXL.encode_prompt(*_parts(pipe, SDXL), CAPTIONS, clip_skip=2)
    embeds, _, pooled, _ = pipe.encode_prompt(CAPTIONS, device=torch.device("cpu"),
                                              do_classifier_free_guidance=False, clip_skip=1)
    torch.testing.assert_close(ours.encoder_hidden_states, embeds, atol=1e-6, rtol=0)
    torch.testing.assert_close(ours.pooled, pooled, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", ["sd1", "sdxl"])
def test_sample_prompts_are_read_with_the_runs_clip_skip(pipes, name):
    from trainer.config import SamplePrompt
    from trainer.run.sampling import prompt_kwargs

    pipe, family = pipes[name], get_family(name)
    prompt = SamplePrompt(prompt="a cat", negative_prompt="blurry", steps=1, width=64, height=64)
    assert prompt_kwargs(pipe, prompt, family, 1) == {"prompt": "a cat", "negative_prompt": "blurry"}
    kwargs = prompt_kwargs(pipe, prompt, family, 2)
    if name == "sdxl":
        assert kwargs == {"prompt": "a cat", "negative_prompt": "blurry", "clip_skip": 1}
    else:
        states = family.encode_prompt(*_parts(pipe, family), ["a cat", "blurry"], clip_skip=2).encoder_hidden_states
        assert torch.equal(kwargs["prompt_embeds"], states[:1]) and torch.equal(kwargs["negative_prompt_embeds"],
                                                                                states[1:])
    image = pipe(**kwargs, num_inference_steps=1, width=64, height=64, output_type="np").images[0]
    assert image.shape == (64, 64, 3)


@pytest.mark.parametrize("name", ["sd1", "sdxl"])
def test_long_sample_prompts_reach_the_pipeline_in_windows(pipes, name):
    from trainer.config import SamplePrompt
    from trainer.run.sampling import prompt_kwargs

    pipe, family = pipes[name], get_family(name)
    prompt = SamplePrompt(prompt=LONG, negative_prompt="", steps=1, width=64, height=64)
    kwargs = prompt_kwargs(pipe, prompt, family, 1, chunks=2)
    expected = family.encode_prompt(*_parts(pipe, family), [LONG, ""], chunks=2)
    assert kwargs["prompt_embeds"].shape[1] == 154
    torch.testing.assert_close(kwargs["prompt_embeds"], expected.encoder_hidden_states[:1])
    if name == "sdxl":
        torch.testing.assert_close(kwargs["pooled_prompt_embeds"], expected.pooled[:1])
        # An empty negative prompt is zeros, as the SDXL pipeline makes it (force_zeros_for_empty_prompt).
        assert pipe.config.force_zeros_for_empty_prompt
        assert not kwargs["negative_prompt_embeds"].any() and not kwargs["negative_pooled_prompt_embeds"].any()
    else:
        torch.testing.assert_close(kwargs["negative_prompt_embeds"], expected.encoder_hidden_states[1:])
    image = pipe(**kwargs, num_inference_steps=1, width=64, height=64, output_type="np").images[0]
    assert image.shape == (64, 64, 3)

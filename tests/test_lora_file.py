"""The exported .safetensors: kohya layout, loaded by diffusers and LyCORIS with nothing dropped."""

import logging
import warnings

import pytest
import torch
from safetensors import safe_open

from networks.errors import SdloraError
from networks.lora_file import read_lora, save_lora
from networks.metadata import network_metadata
from networks.network import LoraNetwork
from networks.spec import FAMILIES, NetworkSpec
from tests.helpers import attached, randomise_up, text_encoders, unet_inputs, unet_out
from trainer.model.tiny_models import build_tiny_pipeline, build_tiny_pipeline_components

PROMPT_IDS = torch.tensor([[49406, 320, 1125, 539, 320, 2368, 49407] + [49407] * 3])


def text_outputs(encoders):
    with torch.no_grad():
        return [encoder(PROMPT_IDS, output_hidden_states=True).hidden_states[-2] for encoder in encoders]


def export(tmp_path, family, kind, dtype=torch.float32, minimal=False):
    components, network = attached(family, kind)
    randomise_up(network)
    path = tmp_path / f"{family}-{kind}.safetensors"
    save_lora(path, network.kohya_state_dict(dtype), network_metadata(network, kind, minimal=minimal))
    return components, network, path


class WarningCatcher(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.records = []

    def emit(self, record):
        self.records.append(record.getMessage())


@pytest.mark.parametrize("kind", ["lora", "locon"])
@pytest.mark.parametrize("family", FAMILIES)
def test_diffusers_loads_every_key_and_matches_outputs(tmp_path, family, kind):
    components, network, path = export(tmp_path, family, kind)
    expected_unet = unet_out(components)
    expected_text = text_outputs(text_encoders(components))

    pipe = build_tiny_pipeline(family, seed=0)
    catcher = WarningCatcher()
    loggers = [logging.getLogger(name) for name in ("diffusers", "peft", "transformers")]
    for logger in loggers:
        logger.addHandler(catcher)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pipe.load_lora_weights(str(path), adapter_name="sdlora")
    finally:
        for logger in loggers:
            logger.removeHandler(catcher)
    assert catcher.records == []
    assert [str(w.message) for w in caught if "lora" in str(w.message).lower()] == []

    # every module of the file became a peft LoRA layer in the pipeline
    peft_layers = sum(1 for part in [pipe.unet, *text_encoders(vars(pipe) | {
        "text_encoder": pipe.text_encoder, "text_encoder_2": getattr(pipe, "text_encoder_2", None)})]
        if part is not None for _, m in part.named_modules() if hasattr(m, "lora_A") and "sdlora" in m.lora_A)
    assert peft_layers == len(network.adapters)

    pipe_components = {"unet": pipe.unet}
    torch.testing.assert_close(unet_out(pipe_components), expected_unet, rtol=1e-4, atol=1e-5)
    pipe_encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if family == "sdxl" else [])
    for got, want in zip(text_outputs(pipe_encoders), expected_text):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["lora", "locon"])
def test_lycoris_merge_gives_the_same_outputs(tmp_path, kind, monkeypatch):
    lycoris_kohya = pytest.importorskip("lycoris.kohya")
    # lycoris 4.1.3's default preset names time_embedding twice on diffusers UNets (duplicate-name assert)
    monkeypatch.setattr(lycoris_kohya.LycorisNetworkKohya, "UNET_TARGET_REPLACE_NAME", [])
    components, network, path = export(tmp_path, "sd1", kind)
    expected = unet_out(components)
    expected_text = text_outputs(text_encoders(components))

    fresh = build_tiny_pipeline_components("sd1", seed=0)
    # lycoris names TE modules from named_modules(); transformers 5 dropped the `text_model.` level that
    # A1111/ComfyUI names carry, so give lycoris the transformers-4 layout it was written for.
    te_as_v4 = torch.nn.Module()
    te_as_v4.text_model = fresh["text_encoder"]
    state, _ = read_lora(path)
    lyco, _ = lycoris_kohya.create_network_from_weights(1.0, None, None, te_as_v4, fresh["unet"],
                                                        weights_sd=state)
    assert len(lyco.unet_loras) + len(lyco.text_encoder_loras) == len(network.adapters)  # none dropped
    lyco.merge_to(te_as_v4, fresh["unet"], state, torch.float32, "cpu")
    torch.testing.assert_close(unet_out(fresh), expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(text_outputs([fresh["text_encoder"]])[0], expected_text[0], rtol=1e-4, atol=1e-5)


def test_file_holds_only_portable_keys_with_float32_alpha_and_string_metadata(tmp_path):
    _, network, path = export(tmp_path, "sdxl", "locon", dtype=torch.float16)
    with safe_open(str(path), framework="pt") as handle:
        keys = list(handle.keys())
        metadata = handle.metadata()
        assert all(k.rsplit(".", 1)[0].endswith(("lora_down", "lora_up")) or k.endswith(".alpha") for k in keys)
        assert len(keys) == 3 * len(network.adapters)
        for key in keys:
            tensor = handle.get_tensor(key)
            if key.endswith(".alpha"):
                assert tensor.dim() == 0 and tensor.dtype == torch.float32
            else:
                assert tensor.dtype == torch.float16
    assert all(isinstance(v, str) for v in metadata.values())
    assert metadata["ss_base_model_version"] == "sdxl_base_v1-0"
    assert metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert metadata["ss_network_dim"] == "4" and metadata["ss_network_alpha"] == "2"
    te_names = {k.split(".")[0] for k in keys if k.startswith("lora_te")}
    assert te_names and all(n.count("text_model_") == 1 for n in te_names)
    assert {n[:9] for n in te_names} == {"lora_te1_", "lora_te2_"}
    assert any(k.startswith("lora_unet_input_blocks_") for k in keys)
    assert not any("down_blocks" in k for k in keys)


def test_sd1_and_sd2_text_encoder_prefix_is_lora_te(tmp_path):
    for family in ("sd1", "sd2"):
        state, _ = read_lora(export(tmp_path, family, "lora")[2])
        te = [k for k in state if k.startswith("lora_te")]
        assert te and all(k.startswith("lora_te_text_model_encoder_layers_") for k in te)


def test_minimal_metadata_drops_training_facts(tmp_path):
    _, network, _ = export(tmp_path, "sd1", "lora")
    full = network_metadata(network, "lora", training={"ss_tag_frequency": {"a": {"cat": 2}}, "ss_steps": 10})
    minimal = network_metadata(network, "lora", training={"ss_tag_frequency": {"a": {"cat": 2}}}, minimal=True)
    assert full["ss_tag_frequency"] == '{"a": {"cat": 2}}' and full["ss_steps"] == "10"
    assert "ss_tag_frequency" not in minimal and "modelspec.date" not in minimal
    assert minimal["ss_network_dim"] == "4"


@pytest.mark.parametrize("family", FAMILIES)
def test_load_of_save_equals_original(tmp_path, family):
    components, network, path = export(tmp_path, family, "locon")
    expected = unet_out(components)
    network.detach()
    state, _ = read_lora(path)
    loaded = LoraNetwork.from_state_dict(family, components["unet"], text_encoders(components), state,
                                         source=str(path)).attach()
    assert loaded.kohya_state_dict().keys() == state.keys()
    for key, value in loaded.kohya_state_dict().items():
        assert torch.equal(value, state[key]), key
    torch.testing.assert_close(unet_out(components), expected, rtol=1e-6, atol=1e-6)


def test_foreign_trainer_spellings_load(tmp_path):
    """diffusers-style SDXL UNet names (LyCORIS) and 2-D 1x1-conv weights load into the same modules."""
    components = build_tiny_pipeline_components("sdxl")
    network = LoraNetwork.create("sdxl", components["unet"], [], NetworkSpec(type="locon", rank=2, conv_rank=2))
    state = {}
    for name, adapter in network.adapters.items():
        diffusers_name = "lora_unet_" + network.paths[name].replace(".", "_")
        state[f"{diffusers_name}.lora_down.weight"] = adapter.lora_down.weight.detach()
        state[f"{diffusers_name}.lora_up.weight"] = adapter.lora_up.weight.detach()
    loaded = LoraNetwork.from_state_dict("sdxl", components["unet"], [], state)
    assert set(loaded.adapters) == set(network.adapters)
    assert all(a.alpha == a.rank for a in loaded.adapters.values())  # a missing alpha means scale 1


def test_bad_files_are_one_sentence(tmp_path):
    components = build_tiny_pipeline_components("sd1")
    encoders = text_encoders(components)
    text = tmp_path / "notes.safetensors"
    text.write_text("hello, not a tensor file")
    with pytest.raises(SdloraError, match=r"is not a readable \.safetensors file .*choose a LoRA"):
        read_lora(text)
    with pytest.raises(SdloraError, match="does not exist; check the path"):
        read_lora(tmp_path / "missing.safetensors")
    foreign = {"lora_unet_nonexistent_block.lora_down.weight": torch.zeros(2, 4),
               "lora_unet_nonexistent_block.lora_up.weight": torch.zeros(4, 2)}
    with pytest.raises(SdloraError, match=r"1 module name\(s\) in x.safetensors match no module of this sd1 "
                                          r"model: lora_unet_nonexistent_block;"):
        LoraNetwork.from_state_dict("sd1", components["unet"], encoders, foreign, source="x.safetensors")
    with pytest.raises(SdloraError, match="not lora_down/lora_up/alpha"):
        save_lora(tmp_path / "y.safetensors", {"model.diffusion_model.weight": torch.zeros(2)})
    assert not (tmp_path / "y.safetensors").exists()
    wrong = LoraNetwork.create("sd1", components["unet"], [], NetworkSpec(rank=2)).kohya_state_dict()
    name = next(k for k in wrong if k.endswith("to_q.lora_down.weight"))
    wrong[name] = torch.zeros(2, 7)
    with pytest.raises(SdloraError, match=r"has shape \(2, 7\) but the model needs"):
        LoraNetwork.from_state_dict("sd1", components["unet"], [], wrong)


def test_unet_inputs_helper_is_deterministic():
    components = build_tiny_pipeline_components("sd1")
    a, b = unet_inputs(components), unet_inputs(components)
    assert torch.equal(a[0], b[0]) and torch.equal(a[2], b[2])

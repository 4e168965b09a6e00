"""The load check after export: every file sdlora writes passes; each way a file fails to load is named."""

import pytest
import torch
from safetensors.torch import save_file

from networks.load_check import check_lora_file, check_lora_structure
from networks.lora_file import read_lora, save_lora
from networks.metadata import network_metadata
from networks.spec import FAMILIES
from tests.helpers import attached, randomise_up, text_encoders


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """{(family, kind): (components, network, path)} for every file kind sdlora writes."""
    folder = tmp_path_factory.mktemp("exports")
    files = {}
    for family in FAMILIES:
        for kind in ("lora", "locon"):
            components, network = attached(family, kind)
            randomise_up(network)
            path = folder / f"{family}-{kind}.safetensors"
            save_lora(path, network.kohya_state_dict(torch.float16), network_metadata(network, kind))
            files[family, kind] = components, network, path
    return files


def check(exported, family, kind, path=None):
    components, _, own = exported[family, kind]
    return check_lora_file(path or own, family, components["unet"], text_encoders(components))


@pytest.mark.parametrize("kind", ["lora", "locon"])
@pytest.mark.parametrize("family", FAMILIES)
def test_every_file_sdlora_writes_passes(exported, family, kind):
    _, network, path = exported[family, kind]
    result = check(exported, family, kind)
    assert result.problems == []
    assert result.ok and result.modules == len(network.adapters)
    assert check_lora_structure(path, family).ok


def rewrite(tmp_path, source, change, metadata=None):
    """A copy of `source` with `change(state)` applied, written without sdlora's own safety checks."""
    state, meta = read_lora(source)
    change(state)
    target = tmp_path / "changed.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(target), metadata=metadata or meta)
    return target


def first(state, suffix):
    return next(k for k in sorted(state) if k.endswith(suffix))


def test_a_renamed_key_is_rejected(exported, tmp_path):
    def rename(state):
        key = first(state, "attn1_to_q.lora_down.weight")
        name = key.split(".")[0]
        for suffix in ("lora_down.weight", "lora_up.weight", "alpha"):
            state[f"{name.replace('attn1', 'attn7')}.{suffix}"] = state.pop(f"{name}.{suffix}")

    result = check(exported, "sd1", "lora", rewrite(tmp_path, exported["sd1", "lora"][2], rename))
    assert not result.ok
    assert len(result.problems) == 1 and "attn7_to_q' matches no module of this sd1 model" in result.problems[0]


def test_a_wrong_shape_is_rejected(exported, tmp_path):
    def widen(state):
        key = first(state, "ff_net_2.lora_down.weight")
        state[key] = torch.zeros(state[key].shape[0], state[key].shape[1] + 1, dtype=state[key].dtype)

    result = check(exported, "sd2", "lora", rewrite(tmp_path, exported["sd2", "lora"][2], widen))
    assert not result.ok and len(result.problems) == 1
    assert "ff_net_2.lora_down.weight' has shape [4, 129] but the model's Linear needs [4, 128]" \
        in result.problems[0]


def test_a_conv_down_with_another_kernel_is_rejected(exported, tmp_path):
    def one_by_one(state):
        key = first(state, "conv1.lora_down.weight")
        state[key] = state[key][:, :, :1, :1].clone()

    result = check(exported, "sd1", "locon", rewrite(tmp_path, exported["sd1", "locon"][2], one_by_one))
    assert [p for p in result.problems if "conv1.lora_down.weight' has shape" in p and "[2, 32, 3, 3]" in p]


def test_a_missing_alpha_is_rejected(exported, tmp_path):
    def drop(state):
        del state[first(state, ".alpha")]

    result = check(exported, "sdxl", "lora", rewrite(tmp_path, exported["sdxl", "lora"][2], drop))
    assert not result.ok and len(result.problems) == 1
    assert "lacks alpha; a missing alpha silently means scale 1" in result.problems[0]


def test_an_fp16_alpha_is_rejected(exported, tmp_path):
    def half(state):
        key = first(state, ".alpha")
        state[key] = state[key].half()

    result = check_lora_structure(rewrite(tmp_path, exported["sd1", "locon"][2], half), "sd1")
    assert not result.ok and len(result.problems) == 1
    assert ".alpha' is F16 with shape []; loaders expect a 0-dim float32" in result.problems[0]


def test_extra_keys_and_non_string_metadata_are_rejected(exported, tmp_path):
    source = exported["sd1", "lora"][2]
    extra = rewrite(tmp_path, source, lambda s: s.update({"lora_unet_x.lora_mid.weight": torch.ones(3)}))
    assert any("'lora_unet_x.lora_mid.weight' is not lora_down/lora_up/alpha" in p
               for p in check_lora_structure(extra).problems)
    state, _ = read_lora(source)
    handmade = tmp_path / "meta.safetensors"
    save_file(state, str(handmade), metadata={"ss_network_dim": "4"})
    raw = handmade.read_bytes()
    patched = raw.replace(b'"ss_network_dim":"4"', b'"ss_network_dim":4  ')  # same header length
    handmade.write_bytes(patched)
    assert check_lora_structure(handmade).problems == [
        "Metadata 'ss_network_dim' is a int, not a string; loaders reject the header."]


def test_family_naming_rules_without_a_model(exported, tmp_path):
    components, network, _ = exported["sdxl", "lora"]
    state = {}
    for name, adapter in network.adapters.items():
        plain = name if network.roles[name] != "unet" else "lora_unet_" + network.paths[name].replace(".", "_")
        state[f"{plain}.lora_down.weight"] = adapter.lora_down.weight.detach().clone()
        state[f"{plain}.lora_up.weight"] = adapter.lora_up.weight.detach().clone()
        state[f"{plain}.alpha"] = torch.tensor(adapter.alpha)
    diffusers_names = tmp_path / "diffusers-names.safetensors"
    save_file(state, str(diffusers_names))
    result = check_lora_structure(diffusers_names, "sdxl")
    unet_modules = sum(1 for r in network.roles.values() if r == "unet")
    assert len(result.problems) == unet_modules
    assert all("uses diffusers UNet names; SDXL files need the SGM names" in p for p in result.problems)
    # against the model, the same names are recognised as the spelling only some loaders read
    full = check_lora_file(diffusers_names, "sdxl", components["unet"], text_encoders(components))
    assert sum("all read 'lora_unet_input_blocks_" in p or "all read 'lora_unet_output_blocks_" in p
               or "all read 'lora_unet_middle_block_" in p for p in full.problems) == unet_modules
    # SD2 written with SDXL's lora_te1_ prefix is ignored by A1111
    sd2_state, _ = read_lora(exported["sd2", "lora"][2])
    te1 = tmp_path / "te1.safetensors"
    save_file({k.replace("lora_te_", "lora_te1_"): v for k, v in sd2_state.items()}, str(te1))
    assert any("does not start with lora_unet_, lora_te_ for sd2" in p for p in check_lora_structure(te1, "sd2").problems)


def test_a_foreign_file_is_one_problem(tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x01\x00")
    result = check_lora_structure(junk)
    assert not result.ok and len(result.problems) == 1 and "is not a readable safetensors file" in result.problems[0]
    fields = result.event_fields("checkpoints/x.safetensors")
    assert fields["ok"] is False and fields["path"] == "checkpoints/x.safetensors"

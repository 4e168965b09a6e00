"""Resize (fixed and dynamic rank) and extract (tuned - base) against full-matrix math, and diffusers loading."""

import copy
import warnings

import pytest
import torch

from networks.analysis import lora_factors
from networks.errors import SdloraError
from networks.extract import extract_lora
from networks.lora_file import read_lora, save_lora
from networks.metadata import network_metadata
from networks.naming import components_for, kohya_name
from networks.network import LoraNetwork
from networks.resize import RankChoice, resize_lora, resize_state
from tests.helpers import attached, randomise_up, text_encoders, unet_out
from trainer.model.tiny_models import build_tiny_pipeline, build_tiny_pipeline_components


@pytest.fixture(scope="module")
def sd1_locon(tmp_path_factory):
    """A tiny SD1 LoCon with random (non-zero) up weights: linear rank 4, conv rank 2."""
    components, network = attached("sd1", "locon")
    randomise_up(network)
    path = tmp_path_factory.mktemp("resize") / "sd1-locon.safetensors"
    save_lora(path, network.kohya_state_dict(), network_metadata(network, "locon"))
    return path


def deltas(state):
    return {name: module.delta() for name, module in lora_factors(state).items()}


def relative_errors(before, after):
    return {n: float((before[n] - after[n]).norm() / before[n].norm()) for n in before}


def test_resize_to_full_rank_is_lossless_and_kohya_shaped(sd1_locon, tmp_path):
    state, _ = read_lora(sd1_locon)
    out = tmp_path / "same.safetensors"
    report = resize_lora(sd1_locon, out, RankChoice(rank=4))
    resized, metadata = read_lora(out)
    assert resized.keys() == state.keys()
    before, after = deltas(state), deltas(resized)
    for name in before:
        torch.testing.assert_close(after[name], before[name], atol=1e-5, rtol=1e-5)
        down, up = state[f"{name}.lora_down.weight"], resized[f"{name}.lora_down.weight"]
        rank = report[name]["rank_after"]
        assert rank == down.shape[0]  # 4 asked, conv modules only have 2
        assert up.shape == (rank, *down.shape[1:])  # conv: [r, in, kh, kw] kept
        assert resized[f"{name}.lora_up.weight"].shape[2:] == state[f"{name}.lora_up.weight"].shape[2:]
        assert float(resized[f"{name}.alpha"]) == 4  # one alpha per file: the most common rank
        assert report[name]["relative_error"] < 1e-6
    assert metadata["ss_network_dim"] == "4" and metadata["ss_network_alpha"] == "4"
    assert '"conv_dim": "2", "conv_alpha": "4"' in metadata["ss_network_args"]
    assert metadata["sdlora_derived"] == "resize rank 4"


def test_resize_to_lower_rank_reports_the_true_error_and_energy(sd1_locon):
    state, _ = read_lora(sd1_locon)
    resized, report = resize_state(state, RankChoice(rank=2))
    errors = relative_errors(deltas(state), deltas(resized))
    for name, row in report.items():
        assert row["rank_after"] == 2
        assert errors[name] == pytest.approx(row["relative_error"], abs=1e-5)
        assert row["energy_kept"] == pytest.approx(1 - row["relative_error"] ** 2, abs=1e-9)
    assert max(errors.values()) > 0.05  # the linear rank-4 modules really lost something


def test_dynamic_energy_keeps_the_reported_energy_with_the_fewest_directions(sd1_locon):
    state, _ = read_lora(sd1_locon)
    resized, report = resize_state(state, RankChoice(energy=0.8))
    errors = relative_errors(deltas(state), deltas(resized))
    for name, module in lora_factors(state).items():
        s = torch.linalg.svdvals(module.delta())
        energy = torch.cumsum(s**2, 0) / (s**2).sum()
        k = report[name]["rank_after"]
        assert float(energy[k - 1]) >= 0.8 - 1e-9
        assert k == 1 or float(energy[k - 2]) < 0.8  # one fewer would not do
        assert 1 - errors[name] ** 2 == pytest.approx(report[name]["energy_kept"], abs=1e-5)
    assert len({row["rank_after"] for row in report.values()}) > 1  # ranks differ by module


def test_dynamic_sv_ratio_and_rank_cap(sd1_locon):
    state, _ = read_lora(sd1_locon)
    _, report = resize_state(state, RankChoice(sv_ratio=2.0))
    for name, module in lora_factors(state).items():
        s = torch.linalg.svdvals(module.delta())
        assert report[name]["rank_after"] == int((s >= s[0] / 2).sum())
    _, capped = resize_state(state, RankChoice(energy=1.0, rank=3))
    assert max(row["rank_after"] for row in capped.values()) == 3


def test_resized_file_loads_in_diffusers_with_no_missing_keys(sd1_locon, tmp_path):
    out = tmp_path / "r2.safetensors"
    resize_lora(sd1_locon, out, RankChoice(energy=0.9), dtype=torch.float16)
    state, _ = read_lora(out)
    assert state["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"].dtype == torch.float16
    ranks = {v.shape[0] for k, v in state.items() if k.endswith("lora_down.weight")}
    alphas = {float(v) for k, v in state.items() if k.endswith(".alpha")}
    # varying ranks under one alpha: diffusers ignores per-module alphas of attention modules
    assert len(ranks) > 1 and len(alphas) == 1
    components = build_tiny_pipeline_components("sd1")
    LoraNetwork.from_state_dict("sd1", components["unet"], text_encoders(components), state).attach()
    expected = unet_out(components)

    pipe = build_tiny_pipeline("sd1")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. peft's "alpha_pattern keys did not match": a wrong scale
        pipe.load_lora_weights(str(out), adapter_name="resized")
    parts = [pipe.unet, pipe.text_encoder]
    loaded = sum(1 for part in parts for _, m in part.named_modules() if hasattr(m, "lora_A") and "resized" in m.lora_A)
    assert loaded == len(lora_factors(state))  # every module of the file became a LoRA layer
    torch.testing.assert_close(unet_out({"unet": pipe.unet}), expected, rtol=1e-3, atol=1e-4)


def test_kohya_files_with_fp16_alpha_resize(sd1_locon):
    state, _ = read_lora(sd1_locon)
    half = {k: v.half() for k, v in state.items()}  # kohya saves alpha in the weights' dtype
    resized, report = resize_state(half, RankChoice(rank=4))
    assert resized["lora_unet_mid_block_attentions_0_proj_in.lora_up.weight"].dtype == torch.float16
    assert resized["lora_unet_mid_block_attentions_0_proj_in.alpha"].dtype == torch.float32
    assert max(row["relative_error"] for row in report.values()) < 1e-6


def test_resize_errors_name_the_module_and_the_limit(sd1_locon):
    state, _ = read_lora(sd1_locon)
    with pytest.raises(SdloraError, match=r"^rank 64 exceeds module lora_unet_down_blocks_0_attentions_0_proj_in's "
                                          r"maximum 32; choose a rank <= 32 or a dynamic rank\.$"):
        resize_state(state, RankChoice(rank=64))
    with pytest.raises(SdloraError, match=r"energy fraction must be in \(0, 1\] \(got 1.5\)"):
        resize_state(state, RankChoice(energy=1.5))
    with pytest.raises(SdloraError, match="either an energy fraction or an sv ratio"):
        resize_state(state, RankChoice(energy=0.5, sv_ratio=3))


# -- extract ------------------------------------------------------------------------------------
def tuned_copy(components, rank=3, seed=7):
    """A deep copy whose to_q (Linear), proj_in (1x1 conv), conv1 (3x3) and TE fc1 modules moved by a rank-r B A."""
    tuned = {role: copy.deepcopy(components[role]) for role in ("unet", "text_encoder")}
    g = torch.Generator().manual_seed(seed)
    expected = {}
    for part in components_for("sd1", tuned["unet"], [tuned["text_encoder"]]):
        for path, module in part.model.named_modules():
            if not path.endswith(("attn1.to_q", "attentions.0.proj_in", "resnets.0.conv1", "layers.1.mlp.fc1")):
                continue
            w = module.weight
            b = torch.randn(w.shape[0], rank, generator=g, dtype=torch.float64)
            a = torch.randn(rank, w[0].numel(), generator=g, dtype=torch.float64) * 0.1
            with torch.no_grad():
                w += (b @ a).reshape(w.shape).float()
            expected[kohya_name(part, path)] = (b @ a, tuple(w.shape))
    return tuned, expected


def test_extract_recovers_a_rank_r_update():
    components = build_tiny_pipeline_components("sd1")
    base = {"unet": components["unet"], "text_encoder": components["text_encoder"]}
    tuned, expected = tuned_copy(components)
    state, report = extract_lora("sd1", base, tuned, RankChoice(rank=3))
    got = deltas(state)
    assert set(got) == set(expected)  # unchanged modules are left out
    for name, (delta, shape) in expected.items():
        # float32 weights: the update is recovered up to their rounding
        torch.testing.assert_close(got[name], delta, atol=1e-5, rtol=1e-4)
        down = state[f"{name}.lora_down.weight"]
        assert down.shape == (3, *shape[1:])  # 3x3 conv -> [r, in, 3, 3], 1x1 -> [r, in, 1, 1], Linear [r, in]
        assert state[f"{name}.lora_up.weight"].shape == (shape[0], 3, *([1, 1] if len(shape) == 4 else []))
        assert report[name]["relative_error"] < 1e-5
    # it loads into the base model and reproduces the tuned UNet
    LoraNetwork.from_state_dict("sd1", components["unet"], [components["text_encoder"]], state).attach()
    torch.testing.assert_close(unet_out(components), unet_out({"unet": tuned["unet"]}), atol=1e-4, rtol=1e-4)


def test_extract_dynamic_and_lora_only():
    components = build_tiny_pipeline_components("sd1")
    base = {"unet": components["unet"], "text_encoder": components["text_encoder"]}
    tuned, expected = tuned_copy(components, rank=3)
    state, report = extract_lora("sd1", base, tuned, RankChoice(energy=0.999), locon=False, text_encoder=False)
    assert set(report) == {n for n in expected if n.startswith("lora_unet_") and "conv1" not in n}
    assert all(row["rank_after"] <= 3 for row in report.values())


def test_extract_errors():
    components = build_tiny_pipeline_components("sd1")
    base = {"unet": components["unet"], "text_encoder": components["text_encoder"]}
    with pytest.raises(SdloraError, match="equals the base model in every adaptable module; there is nothing"):
        extract_lora("sd1", base, base, RankChoice(rank=2))
    tuned, _ = tuned_copy(components)
    with pytest.raises(SdloraError, match=r"^rank 64 exceeds module lora_unet_down_blocks_0_attentions_0_proj_in's "
                                          r"maximum 32; choose a rank <= 32 or a dynamic rank\.$"):
        extract_lora("sd1", base, tuned, RankChoice(rank=64))
    sd2 = build_tiny_pipeline_components("sd2")
    with pytest.raises(SdloraError, match=r"is \(32, 32, 1, 1\) in the base model but \(32, 32\) in the tuned one"):
        extract_lora("sd1", base, {"unet": sd2["unet"], "text_encoder": sd2["text_encoder"]}, RankChoice(rank=2))

"""Mixing LoRAs into one LoRA (exact and truncated) and baking LoRAs into a base model (folder and single file)."""

import pytest
import torch
from safetensors.torch import save_file

from networks.analysis import lora_factors
from networks.errors import SdloraError
from networks.lora_file import read_lora, save_lora
from networks.metadata import network_metadata
from networks.mix import mix_loras, mix_states
from networks.network import LoraNetwork
from networks.resize import RankChoice
from tests.helpers import attached, randomise_up, text_encoders, unet_out
from trainer.model.merge_checkpoint import merge_checkpoint
from trainer.model.model_loading import load_model
from trainer.model.tiny_models import build_tiny_pipeline_components, save_demo_model


def export(path, family="sd1", kind="locon", seed=1, **spec):
    # the model seed also seeds lora_down's init: a different one per file, or the files share row spaces
    components, network = attached(family, kind, seed=seed, **spec)
    randomise_up(network, seed=seed)
    save_lora(path, network.kohya_state_dict(), network_metadata(network, kind))
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("mix")
    return {"a": export(root / "a.safetensors", seed=1),  # UNet LoCon + text encoder
            "b": export(root / "b.safetensors", kind="lora", seed=2)}  # plain LoRA: no conv modules


def deltas(state):
    return {name: module.delta() for name, module in lora_factors(state).items()}


def test_lossless_mix_is_the_weighted_sum_including_modules_in_one_file_only(files, tmp_path):
    state_a, state_b = read_lora(files["a"])[0], read_lora(files["b"])[0]
    out = tmp_path / "mix.safetensors"
    report = mix_loras([files["a"], files["b"]], [1.0, -0.5], out, RankChoice())
    mixed, metadata = read_lora(out)
    da, db, dm = deltas(state_a), deltas(state_b), deltas(mixed)
    only_a = set(da) - set(db)
    assert only_a and any("conv1" in n for n in only_a)  # LoCon conv modules come from file a alone
    assert set(dm) == set(da) | set(db)
    for name, delta in dm.items():
        expected = da.get(name, 0) * 1.0 + db.get(name, 0) * -0.5
        torch.testing.assert_close(delta, expected, atol=1e-5, rtol=1e-5)
        assert report[name]["sources"] == (2 if name in db and name in da else 1)
        assert report[name]["rank_after"] == int(torch.linalg.matrix_rank(expected))
    assert metadata["ss_base_model_version"] == "sd_v1" and "mix" in metadata["sdlora_derived"]


def test_mix_to_a_chosen_rank_reports_the_true_error(files):
    sources = [(read_lora(files[k])[0], w, k) for k, w in (("a", 0.7), ("b", 0.3))]
    exact, _ = mix_states(sources, RankChoice())
    small, report = mix_states(sources, RankChoice(rank=4))
    exact_d, small_d = deltas(exact), deltas(small)
    for name, row in report.items():
        assert row["rank_after"] <= 4
        error = float((exact_d[name] - small_d[name]).norm() / exact_d[name].norm())
        assert error == pytest.approx(row["relative_error"], abs=1e-5)
    assert max(r["relative_error"] for r in report.values()) > 0.01  # rank 8 -> 4 really truncated


def test_mix_errors(files, tmp_path):
    sdxl = export(tmp_path / "xl.safetensors", family="sdxl", kind="lora")
    with pytest.raises(SdloraError, match=r"made for different model families \(.*a.safetensors is sd1, "
                                          r".*xl.safetensors is sdxl\); mix files of one family\.$"):
        mix_loras([files["a"], sdxl], None, tmp_path / "x.safetensors", RankChoice())
    with pytest.raises(SdloraError, match=r"^Got 1 weight\(s\) for 2 LoRA file\(s\); give one weight per file\.$"):
        mix_loras([files["a"], files["b"]], [1.0], tmp_path / "x.safetensors", RankChoice())
    with pytest.raises(SdloraError, match="rank 40 exceeds module .*'s maximum 32"):
        mix_loras([files["a"], files["b"]], None, tmp_path / "x.safetensors", RankChoice(rank=40))


# -- merge into a model -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sd1_folder(tmp_path_factory):
    return save_demo_model(tmp_path_factory.mktemp("base") / "sd1", "sd1")


def base_plus_lora_output(path, multiplier):
    components = build_tiny_pipeline_components("sd1")
    state, _ = read_lora(path)
    network = LoraNetwork.from_state_dict("sd1", components["unet"], text_encoders(components), state).attach()
    network.set_multiplier(multiplier)
    return unet_out(components)


def test_merged_checkpoint_matches_base_plus_lora(files, sd1_folder, tmp_path):
    expected = base_plus_lora_output(files["a"], 1.0)
    result = merge_checkpoint(str(sd1_folder), [files["a"]], [1.0], tmp_path / "merged",
                              tmp_path / "merged.safetensors")
    assert result.family == "sd1" and result.merged == {str(files["a"]): len(lora_factors(read_lora(files["a"])[0]))}
    folder = load_model(str(result.folder))
    torch.testing.assert_close(unet_out({"unet": folder.unet}), expected, atol=1e-4, rtol=1e-4)
    single = load_model(str(result.single_file), config_dir=sd1_folder)
    torch.testing.assert_close(unet_out({"unet": single.unet}), expected, atol=1e-4, rtol=1e-4)
    # the text encoder was merged too: its weights moved by exactly the LoRA's update
    state, _ = read_lora(files["a"])
    name = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    base, merged = (q_proj(load_model(str(sd1_folder))), q_proj(folder))
    torch.testing.assert_close((merged - base).double(), lora_factors(state)[name].delta(), atol=1e-6, rtol=1e-5)


def q_proj(model):
    """The first layer's q_proj weight (transformers 5 has no `text_model.` level in CLIPTextModel)."""
    return next(m.weight for n, m in model.text_encoders[0].named_modules()
                if n.endswith("layers.0.self_attn.q_proj"))


def test_merge_weights_scale_each_lora(files, sd1_folder, tmp_path):
    half = base_plus_lora_output(files["b"], 0.5)
    result = merge_checkpoint(str(sd1_folder), [files["b"]], [0.5], tmp_path / "half")
    torch.testing.assert_close(unet_out({"unet": load_model(str(result.folder)).unet}), half, atol=1e-4, rtol=1e-4)
    assert result.single_file is None


def test_merge_errors(files, sd1_folder, tmp_path):
    sdxl = export(tmp_path / "xl.safetensors", family="sdxl", kind="lora")
    with pytest.raises(SdloraError, match=r"module name\(s\) in .*xl.safetensors match no module of this sd1 model: "
                                          r".*; check that the file was made for sd1\.$"):
        merge_checkpoint(str(sd1_folder), [files["a"], sdxl], None, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(SdloraError, match=r"already exists and is not empty; choose a new folder\.$"):
        merge_checkpoint(str(sd1_folder), [files["a"]], None, tmp_path / "full")
    not_lora = tmp_path / "ckpt.safetensors"
    save_file({"model.diffusion_model.x.weight": torch.zeros(1)}, str(not_lora))
    with pytest.raises(SdloraError, match=r"ckpt.safetensors' has 1 key\(s\) that are not lora_down/lora_up/alpha "
                                          r"\(e.g. 'model.diffusion_model.x.weight'\); it is not a kohya-layout"):
        merge_checkpoint(str(sd1_folder), [not_lora], None, tmp_path / "out2")

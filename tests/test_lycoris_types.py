"""LyCORIS LoHa and LoKr (network.type = "loha" / "lokr"): LyCORIS's own code reads sdlora's files and gives
the same outputs as sdlora's merged weights, sdlora reads LyCORIS's files, and the trainer trains them."""

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from networks.errors import SdloraError
from networks.inspect import inspect_lora
from networks.load_check import check_lora_file, check_lora_structure
from networks.lokr import factorization
from networks.lora_file import read_lora, save_lora
from networks.metadata import network_metadata
from networks.naming import to_sgm_path
from networks.network import LoraNetwork
from networks.resize import RankChoice, resize_lora
from networks.spec import NetworkSpec
from tests.helpers import text_encoders, unet_out
from tests.test_lora_file import text_outputs
from tests.test_training import events, resume_run, stop_at, tiny_config
from trainer.demo.demo_data import make_demo_dataset
from trainer.model.tiny_models import build_tiny_pipeline_components
from trainer.preflight import preflight_report
from trainer.run.loop import train

lycoris_kohya = pytest.importorskip("lycoris.kohya")

LOHA_KEYS = {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"}


@pytest.fixture(autouse=True)
def lycoris_default_preset_fixed(monkeypatch):
    # lycoris 4.1.3's default preset names time_embedding twice on diffusers UNets (duplicate-name assert)
    monkeypatch.setattr(lycoris_kohya.LycorisNetworkKohya, "UNET_TARGET_REPLACE_NAME", [])


def relative(got, want, base):
    return float((got - want).norm() / (want - base).norm())


def exported(tmp_path, family, kind, convs, **spec):
    """A randomised network of `kind` on a fresh tiny model, its output merged, and the file it writes."""
    components = build_tiny_pipeline_components(family, seed=0)
    base = unet_out(components)
    settings = {"rank": 4, "alpha_ratio": 0.5, "conv_rank": 2, "conv_alpha_ratio": 1.0, **spec}
    network = LoraNetwork.create(family, components["unet"], text_encoders(components),
                                 NetworkSpec(type=kind, train_text_encoder=True, include_convs=convs,
                                             **settings)).attach()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=g) * 0.3)
    network.merge()
    merged = unet_out(components), text_outputs(text_encoders(components))
    path = tmp_path / f"{family}-{kind}.safetensors"
    save_lora(path, network.kohya_state_dict(), network_metadata(network, kind))
    return network, base, merged, path


def sgm_view(unet):
    """The UNet's Linear/Conv2d modules under their SGM paths: kohya's and ComfyUI's SDXL module tree, on which
    LyCORIS's loader matches the file's `lora_unet_input_blocks_...` names (the modules themselves are the
    diffusers UNet's, so what LyCORIS changes is what the UNet computes)."""
    root = nn.Module()
    for path, module in unet.named_modules():
        if not isinstance(module, nn.Linear | nn.Conv2d):
            continue
        node, parts = root, to_sgm_path(path, unet.config).split(".")
        for part in parts[:-1]:
            if part not in node._modules:
                node.add_module(part, nn.Module())
            node = node._modules[part]
        node.add_module(parts[-1], module)
    return root


def lycoris_view(family, components):
    """(text encoders, UNet) as LyCORIS's kohya loader walks them: transformers 4's CLIPTextModel layout (a
    `text_model` level, which transformers 5 dropped from the first encoder), SGM names for SDXL."""
    first = nn.Module()
    first.text_model = components["text_encoder"]
    if family == "sdxl":
        return [first, components["text_encoder_2"]], sgm_view(components["unet"])
    return first, components["unet"]


@pytest.mark.parametrize("convs", [False, True], ids=["lora-style", "with-convs"])
@pytest.mark.parametrize("kind", ["loha", "lokr"])
@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_lycoris_loads_sdlora_files_and_matches_the_merged_weights(tmp_path, family, kind, convs):
    network, base, (want_unet, want_text), path = exported(tmp_path, family, kind, convs)
    fresh = build_tiny_pipeline_components(family, seed=0)
    encoders, unet = lycoris_view(family, fresh)
    state, _ = read_lora(path)
    lyco, _ = lycoris_kohya.create_network_from_weights(1.0, None, None, encoders, unet, weights_sd=state)
    loaded = lyco.unet_loras + lyco.text_encoder_loras
    assert len(loaded) == len(network.adapters)  # none dropped
    assert {type(m).__name__ for m in loaded} == {"loha": {"LohaModule"}, "lokr": {"LokrModule"}}[kind]
    assert_lycoris_gives(lyco, (encoders, unet), fresh, state, base, (want_unet, want_text))


def assert_lycoris_gives(lyco, view, fresh, state, base, want):
    """LyCORIS's network, read from `state` onto `view` (lycoris_view of the `fresh` components), gives the
    wanted (UNet, text) outputs through its forward (what ComfyUI and A1111 compute) and its merge into the
    weights, within 1e-4."""
    (encoders, unet), (want_unet, want_text) = view, want
    lyco.apply_to(encoders, unet, apply_text_encoder=True, apply_unet=True)
    assert relative(unet_out(fresh), want_unet, base) < 1e-4
    got_text = text_outputs(text_encoders(fresh))
    assert max(float((g - w).norm() / w.norm()) for g, w in zip(got_text, want_text)) < 1e-4
    for module in lyco.unet_loras + lyco.text_encoder_loras:
        module.restore()
    lyco.merge_to(encoders, unet, state, torch.float32, "cpu")
    assert relative(unet_out(fresh), want_unet, base) < 1e-4


def test_lokr_with_both_halves_decomposed_loads_in_lycoris(tmp_path):
    network, base, (want_unet, _), path = exported(tmp_path, "sd1", "lokr", True, rank=1, decompose_both=True,
                                                   conv_rank=1)
    state, _ = read_lora(path)
    assert any(k.endswith(".lokr_w1_a") for k in state) and any(k.endswith(".lokr_w2_a") for k in state)
    fresh = build_tiny_pipeline_components("sd1", seed=0)
    encoders, unet = lycoris_view("sd1", fresh)
    lyco, _ = lycoris_kohya.create_network_from_weights(1.0, None, None, encoders, unet, weights_sd=state)
    assert len(lyco.unet_loras) + len(lyco.text_encoder_loras) == len(network.adapters)
    lyco.merge_to(encoders, unet, state, torch.float32, "cpu")
    assert relative(unet_out(fresh), want_unet, base) < 1e-4


@pytest.mark.parametrize("kind", ["loha", "lokr"])
def test_sdlora_reads_files_lycoris_trains(tmp_path, kind):
    """A file from LyCORIS's own network (alpha 1 at dim 4, not folded) gives LyCORIS's output in sdlora."""
    # LyCORIS's "full" preset for SD (its default also lists TimestepEmbedding, naming time_embedding twice)
    preset = tmp_path / "preset.toml"
    preset.write_text('enable_conv = true\nunet_target_module = ["Transformer2DModel", "ResnetBlock2D", '
                      '"Downsample2D", "Upsample2D"]\nunet_target_name = []\n'
                      'text_encoder_target_module = ["CLIPAttention", "CLIPMLP"]\ntext_encoder_target_name = []\n')
    components = build_tiny_pipeline_components("sd1", seed=0)
    encoders, unet = lycoris_view("sd1", components)
    base = unet_out(components)
    lyco = lycoris_kohya.create_network(1.0, 4, 1, None, encoders, unet, algo=kind, conv_dim=2, conv_alpha=1,
                                        factor=4, preset=str(preset))
    lyco.apply_to(encoders, unet, apply_text_encoder=True, apply_unet=True)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for parameter in lyco.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=g) * 0.3)
    want = unet_out(components)
    state = {k: v.detach().clone() for k, v in lyco.state_dict().items()}
    for module in lyco.unet_loras + lyco.text_encoder_loras:
        module.restore()
    assert torch.allclose(unet_out(components), base)

    loaded = LoraNetwork.from_state_dict("sd1", components["unet"], text_encoders(components), state).attach()
    assert len(loaded.adapters) == len(lyco.unet_loras) + len(lyco.text_encoder_loras)
    assert relative(unet_out(components), want, base) < 1e-4


@pytest.mark.parametrize(("dimension", "factor"), [(320, -1), (320, 8), (1280, -1), (768, 4), (127, -1),
                                                   (360, 16), (2048, 16), (96, 5)])
def test_factorization_is_lycoris_own(dimension, factor):
    from lycoris.functional import factorization as lycoris_factorization

    assert factorization(dimension, factor) == lycoris_factorization(dimension, factor)


@pytest.mark.parametrize("kind", ["loha", "lokr"])
def test_file_keys_alpha_and_metadata(tmp_path, kind):
    network, _, _, path = exported(tmp_path, "sdxl", kind, True, factor=4)
    state, meta = read_lora(path)
    modules = {}
    for key, tensor in state.items():
        name, suffix = key.split(".", 1)
        modules.setdefault(name, {})[suffix] = tensor
    assert set(modules) == set(network.adapters)
    for name, parts in modules.items():
        adapter = network.adapters[name]
        assert parts["alpha"].dtype == torch.float32 and float(parts["alpha"]) == adapter.rank  # scale folded in
        if kind == "loha":
            assert set(parts) == LOHA_KEYS
            out, flat_in = adapter.base.weight.shape[0], adapter.base.weight[0].numel()
            assert tuple(parts["hada_w1_a"].shape) == (out, adapter.rank)
            assert tuple(parts["hada_w2_b"].shape) == (adapter.rank, flat_in)
        else:
            w1 = parts.get("lokr_w1")
            w2 = parts["lokr_w2"] if "lokr_w2" in parts else parts["lokr_w2_a"] @ parts["lokr_w2_b"]
            assert w1 is not None and w1.shape[0] * w2.shape[0] == adapter.base.weight.shape[0]
    args = json.loads(meta["ss_network_args"])
    assert meta["ss_network_module"] == "lycoris.kohya"
    assert args["algo"] == kind and args["conv_dim"] == "2" and (kind == "loha" or args["factor"] == "4")
    assert meta["ss_network_dim"] == "4" and meta["ss_base_model_version"] == "sdxl_base_v1-0"


@pytest.mark.parametrize("kind", ["loha", "lokr"])
def test_load_check_passes_and_says_diffusers_does_not_load_it(tmp_path, kind):
    network, _, _, path = exported(tmp_path, "sdxl", kind, True)
    components = build_tiny_pipeline_components("sdxl")
    check = check_lora_file(path, "sdxl", components["unet"], text_encoders(components))
    assert check.ok, check.problems
    assert check.modules == len(network.adapters)
    assert check.event_fields("x")["not_loaded_by"] == ["diffusers load_lora_weights"]

    state, meta = read_lora(path)
    dropped = next(k for k in state if k.endswith((".hada_w2_b", ".lokr_w2_a")))
    save_lora(tmp_path / "broken.safetensors", {k: v for k, v in state.items() if k != dropped}, meta)
    problems = check_lora_structure(tmp_path / "broken.safetensors", "sdxl").problems
    name, suffix = dropped.split(".")
    label = {"loha": "LoHa", "lokr": "LoKr"}[kind]
    assert problems == [f"{label} module '{name}' lacks {suffix}."]


@pytest.mark.parametrize("kind", ["loha", "lokr"])
def test_inspect_reports_the_true_update_norm_and_resize_says_why_not(tmp_path, kind):
    network, _, _, path = exported(tmp_path, "sd1", kind, True)
    report = inspect_lora(path)
    assert report["type"] == kind and report["module_count"] == len(network.adapters)
    for name, adapter in network.adapters.items():
        want = float(adapter.delta_weight().norm())
        assert report["modules"][name]["norm"] == pytest.approx(want, rel=1e-4)
        assert report["modules"][name]["kind"] == ("conv" if adapter.base.weight.dim() == 4
                                                   and adapter.base.weight.shape[-1] == 3 else "linear")
    label = {"loha": "LoHa", "lokr": "LoKr"}[kind]
    with pytest.raises(SdloraError, match=f"is a LyCORIS {label} file, whose update is a Hadamard or Kronecker "
                                          "product with no rank-r factors"):
        resize_lora(path, tmp_path / "small.safetensors", RankChoice(rank=2))
    assert not (tmp_path / "small.safetensors").exists()


def test_preflight_marks_that_diffusers_does_not_load_loha(tmp_path):
    make_demo_dataset(tmp_path / "data", count=2, seed=0)
    lokr = tiny_config(tmp_path / "data", tmp_path / "run", "network.type=\"lokr\"", "train.loraplus_ratio=16")
    report = preflight_report(lokr)
    assert report.data["load_targets"] == {"loads_in": ["A1111/Forge", "ComfyUI", "LyCORIS"],
                                           "not_loaded_by": ["diffusers load_lora_weights"]}
    assert any(line.startswith("Loads in: A1111/Forge, ComfyUI, LyCORIS. Not in diffusers: network.type lokr")
               for line in report.info)
    assert any("train.loraplus_ratio 16 raises only lora_up" in line for line in report.warnings)
    plain = preflight_report(tiny_config(tmp_path / "data", tmp_path / "run2"))
    assert plain.data["load_targets"]["not_loaded_by"] == []


@pytest.mark.parametrize("kind", ["loha", "lokr"])
def test_spec_refuses_inits_that_move_the_base(kind):
    components = build_tiny_pipeline_components("sd1")
    with pytest.raises(SdloraError, match=f"network.init pissa is for lora and locon; {kind} starts as LyCORIS"):
        LoraNetwork.create("sd1", components["unet"], [], NetworkSpec(type=kind, init="pissa"))


# -- training --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["loha", "lokr"])
def test_training_lowers_the_loss_and_writes_a_file_lycoris_reads(tmp_path, kind):
    make_demo_dataset(tmp_path / "one", count=1, seed=3)
    learning_rate = {"loha": 3e-3, "lokr": 1e-2}[kind]  # LoKr's small halves take larger steps (LyCORIS's advice)
    cfg = tiny_config(tmp_path / "one", tmp_path / "run", f"network.type=\"{kind}\"", "network.include_convs=true",
                      "train.max_steps=40", f"train.learning_rate={learning_rate}", "network.conv_rank=2")
    train(cfg, progress=False)
    log = events(tmp_path / "run")
    losses = [e["loss"] for e in log if e["event"] == "step"]
    assert sum(losses[-10:]) / 10 < 0.8 * sum(losses[:10]) / 10, losses
    check = next(e for e in log if e["event"] == "load_check")
    assert check["ok"] and check["not_loaded_by"] == ["diffusers load_lora_weights"]

    state, meta = read_lora(tmp_path / "run" / "demo-lora.safetensors")
    suffixes = {key.split(".", 1)[1] for key in state}
    assert suffixes == (LOHA_KEYS if kind == "loha" else {"lokr_w1", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "alpha"})
    assert json.loads(meta["ss_network_args"])["algo"] == kind
    components = build_tiny_pipeline_components("sd1")
    encoders, unet = lycoris_view("sd1", components)
    lyco, _ = lycoris_kohya.create_network_from_weights(1.0, None, None, encoders, unet, weights_sd=state)
    assert len(lyco.unet_loras) == len({key.split(".")[0] for key in state})


@pytest.mark.parametrize("kind", ["loha", "lokr"])
def test_stop_then_resume_equals_an_uninterrupted_run(tmp_path, kind):
    make_demo_dataset(tmp_path / "data", count=4, seed=0)
    flags = [f"network.type=\"{kind}\"", "network.include_convs=true", "train.max_steps=4", "train.batch_size=2",
             "network.rank_dropout=0.2", "network.module_dropout=0.1", "train.scale_weight_norms=1.0"]
    train(tiny_config(tmp_path / "data", tmp_path / "straight", *flags), progress=False)
    assert train(tiny_config(tmp_path / "data", tmp_path / "stopped", *flags), progress=False, on_step=stop_at(2)) is None
    resume_run(tmp_path / "stopped")
    straight, _ = read_lora(Path(tmp_path / "straight" / "demo-lora.safetensors"))
    resumed, _ = read_lora(Path(tmp_path / "stopped" / "demo-lora.safetensors"))
    assert straight.keys() == resumed.keys() and any(".hada_" in k or ".lokr_" in k for k in straight)
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key


@pytest.mark.parametrize("kind", ["loha", "lokr"])
def test_max_norm_caps_each_module_change(kind):
    from networks.max_norm import apply_max_norm

    components = build_tiny_pipeline_components("sd1")
    network = LoraNetwork.create("sd1", components["unet"], [], NetworkSpec(type=kind, rank=4, include_convs=True))
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.normal_(std=0.3)
    norms = {name: float(a.delta_weight().norm()) for name, a in network.adapters.items()}
    limit = sorted(norms.values())[len(norms) // 2]  # half the modules above it
    stats = apply_max_norm(dict(network.adapters), limit)
    assert stats.keys_scaled == sum(1 for n in norms.values() if n > limit)
    for name, adapter in network.adapters.items():
        assert float(adapter.delta_weight().norm()) == pytest.approx(min(norms[name], limit), rel=1e-4)

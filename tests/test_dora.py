"""DoRA (network.type = "dora"): a LoRA/LoCon plus a learned magnitude per input column. It starts as a no-op; the
file's tensors give the merged weight of LyCORIS's own LoConModule (wd_on_out=False) and of the ComfyUI / A1111
formula; LyCORIS's output-axis files read correctly; it trains from the CLI, passes the load check, is read by
Inspect, merges and unmerges exactly, and the form and the kohya_ss import take it."""

import json
import logging

import pytest
import torch
from torch import nn

from app.cli import main
from networks.adapter_types import type_owning
from networks.dora import DORA_SCALE, DoraModule
from networks.errors import SdloraError
from networks.inspect import inspect_lora, render_inspect
from networks.load_check import check_lora_file, check_lora_structure
from networks.lora_file import read_lora, save_lora
from networks.max_norm import apply_max_norm
from networks.metadata import network_metadata
from networks.network import LoraNetwork
from networks.resize import RankChoice, resize_lora
from networks.spec import NetworkSpec
from tests.helpers import text_encoders, unet_out
from tests.test_lora_file import text_outputs
from tests.test_lycoris_types import lycoris_default_preset_fixed, lycoris_view  # noqa: F401 (autouse fixture)
from tests.training_support import events, tiny_config
from trainer.config.kohya_import import import_kohya_preset
from trainer.model.fp8 import store_fp8
from trainer.model.tiny_models import build_tiny_pipeline, build_tiny_pipeline_components
from trainer.preflight import preflight_report

lycoris_kohya = pytest.importorskip("lycoris.kohya")
from lycoris.modules.locon import LoConModule  # noqa: E402 (after the skip)


def comfyui_dora(weight, up, down, alpha, dora_scale, strength=1.0):
    """ComfyUI's comfy/weight_adapter/base.py (Forge's copy; A1111's finalize_updown for the input axis), as
    /tmp/team/loaders.md transcribes it: the reference every generator computes."""
    rank = down.shape[0]
    lora_diff = (up.flatten(1) @ down.flatten(1)).reshape(weight.shape) * (alpha / rank)
    weight_calc = weight + lora_diff
    if dora_scale.shape[0] == weight_calc.shape[0]:  # output axis: ComfyUI takes the ORIGINAL weight's norm
        rest = [1] * (weight.dim() - 1)
        weight_norm = weight.reshape(weight.shape[0], -1).norm(dim=1, keepdim=True).reshape(weight.shape[0], *rest)
    else:
        rest = [1] * (weight.dim() - 1)
        weight_norm = (weight_calc.transpose(0, 1).reshape(weight_calc.shape[1], -1).norm(dim=1, keepdim=True)
                       .reshape(weight_calc.shape[1], *rest).transpose(0, 1))
    weight_norm = weight_norm + torch.finfo(weight.dtype).eps
    weight_calc = weight_calc * (dora_scale / weight_norm)
    return weight + strength * (weight_calc - weight)


def layers():
    return [nn.Linear(24, 40), nn.Conv2d(6, 10, 3, stride=2, padding=1)]


def randomised(module: DoraModule, seed=0) -> DoraModule:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        module.lora_up.weight.copy_(torch.randn(module.lora_up.weight.shape, generator=g) * 0.3)
        module.dora_scale.mul_(1 + 0.2 * torch.randn(module.dora_scale.shape, generator=g))
    return module


def op(layer, x, weight):
    if isinstance(layer, nn.Conv2d):
        return nn.functional.conv2d(x, weight, layer.bias, layer.stride, layer.padding)
    return nn.functional.linear(x, weight, layer.bias)


def sample_input(layer):
    return torch.randn(3, 6, 9, 9) if isinstance(layer, nn.Conv2d) else torch.randn(3, 24)


def relative(got, want, base):
    return float((got - want).norm() / (want - base).norm())


def exported(tmp_path, family, convs, **spec):
    """A randomised DoRA network on a fresh tiny model, its outputs merged, and the file it writes."""
    components = build_tiny_pipeline_components(family, seed=0)
    base = unet_out(components)
    settings = {"rank": 4, "alpha_ratio": 0.5, "conv_rank": 2, "conv_alpha_ratio": 1.0, **spec}
    network = LoraNetwork.create(family, components["unet"], text_encoders(components),
                                 NetworkSpec(type="dora", train_text_encoder=True, include_convs=convs,
                                             **settings)).attach()
    for seed, adapter in enumerate(network.adapters.values()):
        randomised(adapter, seed)
    network.merge()
    merged = unet_out(components), text_outputs(text_encoders(components))
    path = tmp_path / f"{family}-dora.safetensors"
    save_lora(path, network.kohya_state_dict(), network_metadata(network, "dora"))
    network.unmerge()  # the adapters' base weights are the original ones again (delta_weight is taken from them)
    return network, base, merged, path


# -- the module ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layer", layers(), ids=["linear", "conv"])
def test_starts_as_a_no_op_with_the_magnitude_on_the_input_axis(layer):
    module = DoraModule(layer, 4, 2.0)
    want_shape = (1, 24) if isinstance(layer, nn.Linear) else (1, 6, 1, 1)
    assert tuple(module.dora_scale.shape) == want_shape
    x = sample_input(layer)
    with torch.no_grad():
        plain = layer(x)
        module.hook()
        assert float((layer(x) - plain).abs().max()) < 1e-6
        assert float(module.delta_weight().abs().max()) < 1e-6
    module.unhook()


@pytest.mark.parametrize("layer", layers(), ids=["linear", "conv"])
def test_lycoris_module_and_the_comfyui_formula_give_the_merged_weight(layer):
    module = randomised(DoraModule(layer, 4, 2.0))
    weight = layer.weight.detach().clone()
    mine = weight + module.delta_weight()
    lyco = LoConModule("lora_unet_x", layer, 1.0, 4, 2.0, weight_decompose=True, wd_on_out=False)
    with torch.no_grad():
        for key in ("lora_down.weight", "lora_up.weight", DORA_SCALE):
            lyco.get_parameter(key).copy_(module.get_parameter(key))
    assert float((lyco.get_merged_weight(1.0)[0].detach() - mine).abs().max()) < 1e-4 * float(weight.abs().max())
    up, down, scale = module.lora_up.weight.detach(), module.lora_down.weight.detach(), module.dora_scale.detach()
    assert torch.allclose(comfyui_dora(weight, up, down, 2.0, scale), mine, atol=1e-6)
    # the forward at multiplier 0.6 is the base op on A1111's / ComfyUI's W + 0.6 (W' - W)
    module.hook()
    module.multiplier = 0.6
    x = sample_input(layer)
    with torch.no_grad():
        want = op(layer, x, comfyui_dora(weight, up, down, 2.0, scale, strength=0.6))
        assert float((layer(x) - want).abs().max()) < 1e-5
    module.unhook()


def test_an_output_axis_module_from_lycoris_reads_with_lycoris_math():
    layer = nn.Conv2d(6, 10, 3, padding=1)
    lyco = LoConModule("lora_unet_x", layer, 1.0, 4, 2.0, weight_decompose=True)  # wd_on_out=True, its default
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        lyco.lora_up.weight.copy_(torch.randn(lyco.lora_up.weight.shape, generator=g) * 0.3)
        lyco.dora_scale.mul_(1.3)
    state = {key: tensor.detach().clone() for key, tensor in lyco.custom_state_dict().items()}
    assert tuple(state[DORA_SCALE].shape) == (10, 1, 1, 1)
    assert type_owning(state) is DoraModule and type_owning({"lora_down.weight", "lora_up.weight"}) is not DoraModule
    module = DoraModule.read(layer, state, float(state["alpha"]), "lora_unet_x", "lyco.safetensors")
    assert module.on_output and tuple(module.dora_scale.shape) == (10, 1, 1, 1)
    want = lyco.get_merged_weight(1.0)[0]
    assert float((layer.weight + module.delta_weight() - want).abs().max()) < 1e-5
    module.hook()
    x = torch.randn(2, 6, 8, 8)
    with torch.no_grad():
        assert float((layer(x) - op(layer, x, want)).abs().max()) < 1e-4
    module.unhook()
    assert module.export().tensors[DORA_SCALE].shape == (10, 1, 1, 1)  # written back on its own axis
    with pytest.raises(SdloraError, match=r"lyco.safetensors: lora_unet_x.dora_scale has shape \(7, 1\) but the "
                                          r"model needs \[1, 6\] \(or \[10, 1\]\)"):
        DoraModule.read(layer, {**state, DORA_SCALE: torch.ones(7, 1)}, 2.0, "lora_unet_x", "lyco.safetensors")


def test_sdlora_reads_a_lycoris_network_with_the_magnitude_per_output_row(tmp_path):
    """LyCORIS's and kohya's default DoRA (wd_on_output=True) file gives LyCORIS's outputs in sdlora."""
    preset = tmp_path / "preset.toml"
    preset.write_text('enable_conv = true\nunet_target_module = ["ResnetBlock2D"]\nunet_target_name = []\n'
                      'text_encoder_target_module = []\ntext_encoder_target_name = []\n')
    components = build_tiny_pipeline_components("sd1", seed=0)
    encoders, unet = lycoris_view("sd1", components)
    base = unet_out(components)
    lyco = lycoris_kohya.create_network(1.0, 4, 2, None, encoders, unet, algo="locon", conv_dim=2, conv_alpha=1,
                                        dora_wd=True, preset=str(preset))
    lyco.apply_to(encoders, unet, apply_text_encoder=True, apply_unet=True)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, parameter in lyco.named_parameters():
            noise = torch.randn(parameter.shape, generator=g)
            parameter.mul_(1 + 0.2 * noise) if name.endswith(DORA_SCALE) else parameter.copy_(noise * 0.3)
    want = unet_out(components)
    state = {k: v.detach().clone() for k, v in lyco.state_dict().items()}
    assert any(k.endswith(DORA_SCALE) and v.shape[0] > 1 for k, v in state.items())  # [out, 1, ...]
    for module in lyco.unet_loras + lyco.text_encoder_loras:
        module.restore()
    loaded = LoraNetwork.from_state_dict("sd1", components["unet"], text_encoders(components), state).attach()
    assert len(loaded.adapters) == len(lyco.unet_loras) + len(lyco.text_encoder_loras)
    assert all(isinstance(a, DoraModule) and a.on_output for a in loaded.adapters.values())
    assert relative(unet_out(components), want, base) < 1e-4


def test_merge_and_unmerge_restore_the_weight_exactly():
    components = build_tiny_pipeline_components("sd1")
    network = LoraNetwork.create("sd1", components["unet"], [], NetworkSpec(type="dora", rank=4,
                                                                            include_convs=True)).attach()
    for seed, adapter in enumerate(network.adapters.values()):
        randomised(adapter, seed)
    before = {name: a.base.weight.detach().clone() for name, a in network.adapters.items()}
    changes = {name: a.delta_weight() for name, a in network.adapters.items()}
    network.set_multiplier(0.7)
    network.merge()  # W + 0.7 (W' - W), as A1111 and ComfyUI merge (the forward's equality: the tests above)
    for name, adapter in network.adapters.items():
        assert torch.allclose(adapter.base.weight, before[name] + 0.7 * changes[name], atol=1e-6)
    network.unmerge()
    assert all(torch.equal(a.base.weight, before[name]) for name, a in network.adapters.items())


def test_fp8_base_computes_in_the_run_dtype():
    layer = nn.Conv2d(6, 10, 3, padding=1)
    store_fp8(layer, torch.float32)
    module = DoraModule(layer, 4, 2.0)
    weight = layer.weight.to(torch.float32)  # what the fp8 layer computes with
    assert torch.allclose(module.dora_scale, weight.transpose(0, 1).flatten(1).norm(dim=1).view(1, 6, 1, 1))
    randomised(module)
    up, down, scale = module.lora_up.weight.detach(), module.lora_down.weight.detach(), module.dora_scale.detach()
    module.hook()
    x = torch.randn(2, 6, 8, 8)
    with torch.no_grad():
        assert float((layer(x) - op(layer, x, comfyui_dora(weight, up, down, 2.0, scale))).abs().max()) < 1e-4
    module.unhook()


def test_max_norm_caps_the_direction_and_loraplus_keeps_the_magnitude_at_the_base_rate():
    components = build_tiny_pipeline_components("sd1")
    network = LoraNetwork.create("sd1", components["unet"], [], NetworkSpec(type="dora", rank=4))
    for seed, adapter in enumerate(network.adapters.values()):
        randomised(adapter, seed)
    magnitudes = {name: a.dora_scale.detach().clone() for name, a in network.adapters.items()}
    norms = {name: float(a.direction_change().norm()) for name, a in network.adapters.items()}
    limit = sorted(norms.values())[len(norms) // 2]
    stats = apply_max_norm(dict(network.adapters), limit)
    assert stats.keys_scaled == sum(1 for n in norms.values() if n > limit)
    for name, adapter in network.adapters.items():
        assert float(adapter.direction_change().norm()) == pytest.approx(min(norms[name], limit), rel=1e-4)
        assert torch.equal(adapter.dora_scale, magnitudes[name])
    groups = network.parameter_groups()["unet"]
    assert all(any(p is a.dora_scale for p in groups["down"]) for a in network.adapters.values())
    assert {id(p) for p in groups["up"]} == {id(a.lora_up.weight) for a in network.adapters.values()}


def test_spec_refuses_inits_that_move_the_base():
    components = build_tiny_pipeline_components("sd1")
    with pytest.raises(SdloraError, match="network.init pissa moves the base weight, whose norms dora's magnitude "
                                          "starts from; use network.init kaiming or gaussian with dora"):
        LoraNetwork.create("sd1", components["unet"], [], NetworkSpec(type="dora", init="pissa"))


# -- the file: LyCORIS, the load check, Inspect --------------------------------------------------------
def test_each_file_module_in_lycoris_gives_sdlora_merged_weight(tmp_path):
    network, base, (want_unet, want_text), path = exported(tmp_path, "sd1", True)
    state, meta = read_lora(path)
    args = json.loads(meta["ss_network_args"])
    assert meta["ss_network_module"] == "lycoris.kohya"
    assert (args["algo"], args["dora_wd"], args["wd_on_output"], args["conv_dim"]) == ("locon", "True", "False", "2")
    fresh = build_tiny_pipeline_components("sd1", seed=0)
    again = LoraNetwork.from_state_dict("sd1", fresh["unet"], text_encoders(fresh), state)
    assert any(a.base.weight.dim() == 4 and a.base.weight.shape[-1] == 3 for a in again.adapters.values())
    for name, adapter in network.adapters.items():
        parts = {key.split(".", 1)[1]: t for key, t in state.items() if key.split(".", 1)[0] == name}
        layer = again.adapters[name].base
        in_dim, rest = layer.weight.shape[1], [1] * (layer.weight.dim() - 2)
        assert tuple(parts[DORA_SCALE].shape) == (1, in_dim, *rest)
        assert float(parts["alpha"]) == adapter.alpha  # its own alpha, nothing folded into the magnitude
        lyco = LoConModule(name, layer, 1.0, parts["lora_down.weight"].shape[0], float(parts["alpha"]),
                           weight_decompose=True, wd_on_out=False)
        with torch.no_grad():
            for key in ("lora_down.weight", "lora_up.weight", DORA_SCALE):
                lyco.get_parameter(key).copy_(parts[key].reshape(lyco.get_parameter(key).shape))
        want = layer.weight + adapter.delta_weight()  # sdlora's merge into the same base weight
        assert float((lyco.get_merged_weight(1.0)[0] - want).abs().max()) < 1e-4 * float(want.abs().max()), name
        assert torch.allclose(comfyui_dora(layer.weight.detach(), parts["lora_up.weight"], parts["lora_down.weight"],
                                           float(parts["alpha"]), parts[DORA_SCALE]), want, atol=1e-5)
    # sdlora reads its own file back to the same outputs
    again.attach()
    assert relative(unet_out(fresh), want_unet, base) < 1e-5


def test_diffusers_drops_the_magnitude(tmp_path):
    """Why the file says "not diffusers": its kohya converter filters dora_scale out (a warning) and loads the
    rest as a plain LoRA, so the images differ from every DoRA-aware loader's."""
    network, base, (want_unet, _), path = exported(tmp_path, "sd1", False)
    pipe = build_tiny_pipeline("sd1")
    warnings = []
    handler = logging.Handler()
    handler.emit = lambda record: warnings.append(record.getMessage())
    diffusers_logger = logging.getLogger("diffusers")  # it does not propagate to pytest's; conftest quiets it
    level = diffusers_logger.level
    diffusers_logger.addHandler(handler)
    diffusers_logger.setLevel(logging.WARNING)
    try:
        pipe.load_lora_weights(str(path), adapter_name="x")
    finally:
        diffusers_logger.removeHandler(handler)
        diffusers_logger.setLevel(level)
    assert any("filter out the keys associated to 'dora_scale`" in message for message in warnings), warnings
    got = unet_out({"unet": pipe.unet})
    assert relative(got, want_unet, base) > 0.05


def test_lycoris_network_with_wd_on_output_false_loads_the_file(tmp_path):
    """kohya's way to continue a LyCORIS DoRA: create_network with the file's network_args, then load_weights."""
    network, base, (want_unet, want_text), path = exported(tmp_path, "sd1", False)
    fresh = build_tiny_pipeline_components("sd1", seed=0)
    encoders, unet = lycoris_view("sd1", fresh)
    preset = tmp_path / "preset.toml"
    preset.write_text('enable_conv = true\nunet_target_module = ["Transformer2DModel"]\nunet_target_name = []\n'
                      'text_encoder_target_module = ["CLIPAttention", "CLIPMLP"]\ntext_encoder_target_name = []\n')
    args = json.loads(read_lora(path)[1]["ss_network_args"])
    assert args == {"algo": "lora", "dora_wd": "True", "wd_on_output": "False"}  # what LyCORIS is given
    lyco = lycoris_kohya.create_network(1.0, 4, 2, None, encoders, unet, preset=str(preset), **args)
    lyco.apply_to(encoders, unet, apply_text_encoder=True, apply_unet=True)  # before load_weights, as sd-scripts
    loaded = lyco.load_weights(str(path))
    assert "unexpected keys" not in loaded and "missing keys" not in loaded
    assert relative(unet_out(fresh), want_unet, base) < 1e-4
    got_text = text_outputs(text_encoders(fresh))
    assert max(float((g - w).norm() / w.norm()) for g, w in zip(got_text, want_text)) < 1e-4


def test_load_check_inspect_and_resize(tmp_path):
    network, _, _, path = exported(tmp_path, "sdxl", True)
    components = build_tiny_pipeline_components("sdxl")
    check = check_lora_file(path, "sdxl", components["unet"], text_encoders(components))
    assert check.ok, check.problems
    assert check.modules == len(network.adapters) and check.not_loaded_by == ["diffusers load_lora_weights"]

    report = inspect_lora(path)
    assert report["type"] == "dora" and report["module_count"] == len(network.adapters)
    for name, adapter in network.adapters.items():
        row = report["modules"][name]
        assert row["norm"] == pytest.approx(float(adapter.direction_change().norm()), rel=1e-4)
        assert row["rank"] == adapter.rank and row["shapes"][DORA_SCALE] == list(adapter.dora_scale.shape)
    assert "DoRA: " in render_inspect(report) and "learned magnitude (dora_scale)" in render_inspect(report)
    with pytest.raises(SdloraError, match="is a DoRA file, whose learned magnitude renormalises every column"):
        resize_lora(path, tmp_path / "small.safetensors", RankChoice(rank=2))

    state, meta = read_lora(path)
    name = next(iter(network.adapters))
    save_lora(tmp_path / "broken.safetensors", {**state, f"{name}.{DORA_SCALE}": torch.ones(1, 7)}, meta)
    problems = check_lora_structure(tmp_path / "broken.safetensors", "sdxl").problems
    in_dim, out_dim = state[f"{name}.lora_down.weight"].shape[1], state[f"{name}.lora_up.weight"].shape[0]
    assert problems == [f"'{name}.dora_scale' has shape [1, 7], but its lora_down takes {in_dim} inputs and lora_up "
                        f"gives {out_dim} outputs; DoRA loaders read [1, {in_dim}] (or [{out_dim}, 1])."]


# -- the trainer, the form, the pre-flight, the import ------------------------------------------------------
def test_trains_from_the_cli_and_the_file_passes_the_load_check(tmp_path, data4, capsys):
    run = tmp_path / "run"
    flags = ["model.path=demo:sd1", "network.type=dora", "network.rank=4", "network.include_convs=true",
             "network.conv_rank=2", "train.max_steps=3", "train.learning_rate=1e-2", "sample.every_steps=0",
             "sample.at_start=false", "save.every_steps=0", "dataset.resolution=64", "save.precision=fp32",
             "train.scale_weight_norms=1.0", "train.loraplus_ratio=4"]
    argv = ["train", "--data", str(data4), "--preset", "demo", "--output", str(run), "--no-progress",
            *[arg for flag in flags for arg in ("--set", flag)]]
    assert main(argv) == 0, capsys.readouterr().err
    check = next(e for e in events(run) if e["event"] == "load_check")
    assert check["ok"] and check["not_loaded_by"] == ["diffusers load_lora_weights"]
    state, meta = read_lora(run / "demo-lora.safetensors")
    modules = {key.split(".", 1)[0] for key in state}
    assert {key.split(".", 1)[1] for key in state} == {"lora_down.weight", "lora_up.weight", DORA_SCALE, "alpha"}
    assert all(f"{name}.{DORA_SCALE}" in state for name in modules)
    assert any(t.dim() == 4 and t.shape[-1] == 3 for t in state.values())  # the LoCon convs, include_convs
    components = build_tiny_pipeline_components("sd1")
    start = LoraNetwork.create("sd1", components["unet"], [], NetworkSpec(type="dora", include_convs=True))
    moved = [not torch.allclose(state[f"{name}.{DORA_SCALE}"], a.dora_scale.detach().reshape(
        state[f"{name}.{DORA_SCALE}"].shape), atol=1e-6) for name, a in start.adapters.items() if name in modules]
    assert any(moved)  # the magnitude trained
    assert json.loads(meta["ss_network_args"])["dora_wd"] == "True"


def test_preflight_says_where_it_loads(tmp_path, data4):
    report = preflight_report(tiny_config(data4, tmp_path / "run", "network.type=\"dora\"", "train.loraplus_ratio=4"))
    assert report.data["load_targets"] == {"loads_in": ["A1111/Forge", "ComfyUI", "LyCORIS"],
                                           "not_loaded_by": ["diffusers load_lora_weights"]}
    assert any(line.startswith("Loads in: A1111/Forge, ComfyUI, LyCORIS. Not in diffusers: network.type dora writes "
                               "dora_scale") for line in report.info)
    assert not any("loraplus_ratio" in line for line in report.warnings)  # DoRA has a lora_up for LoRA+


def test_kohya_lycoris_locon_with_dora_wd_imports_as_dora():
    preset = {"LoRA_type": "LyCORIS/LoCon", "network_dim": "16", "network_alpha": "8", "conv_dim": 8,
              "conv_alpha": 4, "dora_wd": True}
    imported = import_kohya_preset(preset, source="dora.json")
    net = imported.config["network"]
    assert (net["type"], net["rank"], net["alpha_ratio"], net["include_convs"], net["conv_rank"],
            net["conv_alpha_ratio"]) == ("dora", 16, 0.5, True, 8, 0.5)
    assert any("per input column (LyCORIS's wd_on_output=False" in note for note in imported.notes)
    # sd-scripts' network_args spelling, on a plain LoRA, already on the input axis: no note; the rest listed
    args = import_kohya_preset({"LoRA_type": "Standard", "network_dim": 8, "network_alpha": 4,
                                "network_args": ["dora_wd=True", "wd_on_output=False", "use_tucker=True"]},
                               source="args.json")
    assert (args.config["network"]["type"], args.config["network"]["include_convs"]) == ("dora", False)
    assert not args.notes and args.meaningful_unmapped() == {"network_args": "use_tucker=True"}
    loha = import_kohya_preset({"LoRA_type": "LyCORIS/LoHa", "network_dim": 8, "dora_wd": "true"}, source="h.json")
    assert loha.config["network"]["type"] == "loha" and loha.unmapped["dora_wd"] == "true"
    assert any("dora_wd was not imported: sdlora's DoRA is a LoRA/LoCon" in note for note in loha.notes)

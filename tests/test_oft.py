"""OFT (network.type = "oft", LyCORIS's diag-oft): a block-diagonal rotation of each weight's output rows.
LyCORIS's own code and the ComfyUI / A1111 formula read sdlora's files with the same merged weights, the
constraint is folded into the file, and the trainer, the load check, Inspect and the kohya_ss import take it
(the Train tab's form: tests/test_config_form.py, for every network type)."""

import json

import pytest
import torch
from torch import nn

from app.cli import main
from networks.analysis import spectrum
from networks.errors import SdloraError
from networks.inspect import inspect_lora, render_inspect
from networks.load_check import check_lora_file, check_lora_structure
from networks.lora_file import read_lora, save_lora
from networks.max_norm import apply_max_norm
from networks.network import LoraNetwork
from networks.oft import OftModule, skew
from networks.resize import RankChoice, resize_lora
from networks.spec import NetworkSpec
from tests.helpers import text_encoders, unet_out
from tests.test_lycoris_types import (  # noqa: F401 (the autouse fixture)
    assert_lycoris_gives,
    exported,
    lycoris_default_preset_fixed,
    lycoris_view,
)
from tests.training_support import events, tiny_config
from trainer.config.kohya_import import import_kohya_preset
from trainer.model.fp8 import store_fp8
from trainer.model.tiny_models import build_tiny_pipeline, build_tiny_pipeline_components
from trainer.preflight import preflight_report

lycoris_kohya = pytest.importorskip("lycoris.kohya")
from lycoris.modules.diag_oft import DiagOFTModule  # noqa: E402 (after the skip)


def comfyui_oft(weight, blocks, alpha, strength=1.0):
    """ComfyUI's comfy/weight_adapter/oft.py as /tmp/team/loaders.md transcribes it (alpha used as is)."""
    count, size, _ = blocks.shape
    eye = torch.eye(size)
    q = blocks - blocks.transpose(1, 2)
    if alpha > 0:
        q_norm = q.norm() + 1e-8
        if q_norm > alpha:
            q = q * alpha / q_norm
    r = (eye + q) @ (eye - q).float().inverse()
    diff = torch.einsum("k n m, k n ... -> k m ...", r * strength - strength * eye,
                        weight.view(count, size, *weight.shape[1:])).view(weight.shape)
    return weight + diff


def randomised(module: OftModule, seed=0, std=0.3) -> OftModule:
    with torch.no_grad():
        module.oft_blocks.copy_(torch.randn(module.oft_blocks.shape, generator=torch.Generator().manual_seed(seed)) * std)
    return module


def layers():
    torch.manual_seed(0)
    return [nn.Linear(24, 40), nn.Conv2d(8, 12, 3, padding=1)]


def relative(got, want, base):
    return float((got - want).norm() / (want - base).norm())


@pytest.fixture(scope="module")
def sd1_file(tmp_path_factory):
    """One exported SD1 OFT file (UNet with convs and text encoder, COFT bound 0.05) for the file tests."""
    return exported(tmp_path_factory.mktemp("oft"), "sd1", "oft", True, alpha=0.05)


# -- the rotation ----------------------------------------------------------------------------------
def test_starts_as_a_no_op_and_writes_zero_blocks(tmp_path):
    components = build_tiny_pipeline_components("sd1", seed=0)
    base = unet_out(components)
    network = LoraNetwork.create("sd1", components["unet"], [], NetworkSpec(type="oft", rank=4)).attach()
    assert torch.equal(unet_out(components), base)
    state = network.kohya_state_dict()
    assert {key.split(".", 1)[1] for key in state} == {"oft_blocks", "alpha"}
    assert all(not tensor.any() for tensor in state.values())
    groups = next(iter(network.adapters.values())).learning_rate_groups()  # LoRA+ raises nothing: no B side
    assert [p.shape for p in groups["down"]] == [next(iter(network.adapters.values())).oft_blocks.shape]
    assert groups["up"] == []


@pytest.mark.parametrize(("width", "rank", "blocks"), [(40, 4, (10, 4)), (40, 8, (8, 5)), (320, 32, (32, 10)),
                                                      (320, 24, (20, 16)), (1280, 32, (40, 32))])
def test_block_size_is_lycoris_diag_oft_split(width, rank, blocks):
    module = OftModule(nn.Linear(8, width), rank, 0.0)
    lycoris = DiagOFTModule("x", nn.Linear(8, width), lora_dim=rank)
    assert tuple(module.oft_blocks.shape[:2]) == blocks == (lycoris.block_num, lycoris.block_size)


@pytest.mark.parametrize("layer", [0, 1], ids=["linear", "conv"])
def test_rotation_is_orthogonal_and_keeps_each_row_block_norms(layer):
    base = layers()[layer]
    module = randomised(OftModule(base, 4, 0.0))
    rotation = module.rotation().detach()
    eye = torch.eye(rotation.shape[-1]).expand_as(rotation)
    assert float((rotation.transpose(1, 2) @ rotation - eye).abs().max()) < 1e-5
    merged = (base.weight + module.delta_weight()).detach()
    assert float(module.delta_weight().norm()) > 0.1 * float(base.weight.detach().norm())  # it does rotate
    count, size = module.oft_blocks.shape[:2]
    # each block of rows turns as a whole: the norm of every column of each block is kept
    before = base.weight.detach().reshape(count, size, -1).norm(dim=1)
    after = merged.reshape(count, size, -1).norm(dim=1)
    assert torch.allclose(after, before, atol=1e-5)


@pytest.mark.parametrize("layer", [0, 1], ids=["linear", "conv"])
@pytest.mark.parametrize("constraint", [0.0, 0.01], ids=["free", "coft"])
def test_lycoris_module_and_comfyui_formula_give_the_merged_weight(layer, constraint):
    base = layers()[layer]
    module = randomised(OftModule(base, 4, constraint))
    exported_module = module.export()
    assert exported_module.alpha == 0.0 and exported_module.alpha_rule == "own"
    blocks = exported_module.tensors["oft_blocks"]
    want = (base.weight + module.delta_weight()).detach()
    with torch.no_grad():
        lycoris = DiagOFTModule.make_module_from_state_dict("x", base, blocks, None, torch.tensor(0.0))
        assert float((lycoris.make_weight(1) - want).abs().max()) < 1e-5
        assert float((comfyui_oft(base.weight, blocks, 0.0) - want).abs().max()) < 1e-5
        x = torch.randn(2, *((24,) if layer == 0 else (8, 6, 6)))
        module.multiplier = lycoris.multiplier = 0.5  # both scale R - I linearly
        got = lycoris(x)  # LyCORIS's forward around the base module's own
        module.hook()
        assert float((base(x) - got).abs().max()) < 1e-5
        module.unhook()


def test_the_constraint_is_folded_into_the_written_blocks():
    base = layers()[0]
    module = randomised(OftModule(base, 4, 0.01))  # bound 0.01 x 40 rows = 0.4
    q = skew(module.oft_blocks.detach())
    assert float(q.norm()) > 1.0  # well past the bound, so it applies
    written = module.export().tensors["oft_blocks"]
    assert float(skew(written).norm()) == pytest.approx(0.4, rel=1e-5)
    assert torch.allclose(skew(written), module.generator().detach(), atol=1e-6)
    # A1111 and LyCORIS (alpha x rows) and ComfyUI (alpha as is) read alpha 0 as "no bound": all the same R
    with torch.no_grad():
        lycoris = DiagOFTModule.make_module_from_state_dict("x", base, written, None, torch.tensor(0.0))
        assert torch.allclose(lycoris.get_r(), module.rotation(), atol=1e-6)


def test_merge_and_unmerge_restore_the_weight_exactly(sd1_file):
    network = sd1_file[0]  # merged, its UNet and text encoder linear and conv modules rotated
    network.unmerge()
    before = {name: a.base.weight.detach().clone() for name, a in network.adapters.items()}
    network.set_multiplier(0.7)
    network.merge()
    for name, adapter in list(network.adapters.items())[::7]:  # W + m (R^T - I) W, from the original W
        written = adapter.export().tensors["oft_blocks"]  # the run's COFT bound folded in
        want = before[name] + 0.7 * (comfyui_oft(before[name], written, 0.0) - before[name])
        assert float((adapter.base.weight.detach() - want).abs().max()) < 1e-5, name
    network.unmerge()
    assert all(torch.equal(a.base.weight, before[n]) for n, a in network.adapters.items())
    network.set_multiplier(1.0)
    network.merge()  # as the fixture left it


def test_fp8_base_computes_in_the_run_dtype():
    layer = nn.Linear(24, 40)
    store_fp8(layer, torch.float32)
    module = randomised(OftModule(layer, 4, 0.0))
    weight = layer.weight.to(torch.float32)  # what the fp8 layer computes with
    want = comfyui_oft(weight, module.oft_blocks.detach(), 0.0)
    module.hook()
    x = torch.randn(3, 24)
    with torch.no_grad():
        assert float((layer(x) - nn.functional.linear(x, want, layer.bias)).abs().max()) < 1e-5
    module.unhook()


def test_max_norm_bounds_q():
    components = build_tiny_pipeline_components("sd1")
    network = LoraNetwork.create("sd1", components["unet"], [], NetworkSpec(type="oft", rank=4))
    for seed, adapter in enumerate(network.adapters.values()):
        randomised(adapter, seed, std=0.05 * (1 + seed % 5))
    norms = {name: float(skew(a.oft_blocks.detach()).norm()) for name, a in network.adapters.items()}
    limit = sorted(norms.values())[len(norms) // 2]
    stats = apply_max_norm(dict(network.adapters), limit)
    assert stats.keys_scaled == sum(1 for n in norms.values() if n > limit)
    for name, adapter in network.adapters.items():
        assert float(skew(adapter.oft_blocks.detach()).norm()) == pytest.approx(min(norms[name], limit), rel=1e-5)


def test_spec_refuses_inits_that_move_the_base():
    components = build_tiny_pipeline_components("sd1")
    with pytest.raises(SdloraError, match="network.init pissa is for lora and locon; oft starts as LyCORIS"):
        LoraNetwork.create("sd1", components["unet"], [], NetworkSpec(type="oft", init="pissa"))


# -- the file in LyCORIS, the load check, Inspect ---------------------------------------------------
def test_lycoris_loads_sdlora_files_and_matches_the_merged_weights(sd1_file):
    # SD1 with convs and the text encoder; SDXL's names are the same as LoHa's (tests/test_lycoris_types.py)
    family, convs = "sd1", True
    network, base, (want_unet, want_text), path = sd1_file
    state, meta = read_lora(path)
    assert all(float(t) == 0.0 for k, t in state.items() if k.endswith(".alpha"))  # the bound is folded in
    assert meta["ss_network_module"] == "lycoris.kohya" and json.loads(meta["ss_network_args"])["algo"] == "diag-oft"
    fresh = build_tiny_pipeline_components(family, seed=0)
    encoders, unet = lycoris_view(family, fresh)
    lyco, _ = lycoris_kohya.create_network_from_weights(1.0, None, None, encoders, unet, weights_sd=state)
    loaded = lyco.unet_loras + lyco.text_encoder_loras
    assert len(loaded) == len(network.adapters) and {type(m).__name__ for m in loaded} == {"DiagOFTModule"}
    assert any(a.base.weight.dim() == 4 for a in network.adapters.values()) == convs
    assert_lycoris_gives(lyco, (encoders, unet), fresh, state, base, (want_unet, want_text))

    # sdlora reads its own file back to the same outputs
    again = build_tiny_pipeline_components(family, seed=0)
    LoraNetwork.from_state_dict(family, again["unet"], text_encoders(again), state).attach()
    assert relative(unet_out(again), want_unet, base) < 1e-5


def test_load_check_inspect_and_analysis(tmp_path, sd1_file):
    network, _, _, path = sd1_file
    components = build_tiny_pipeline_components("sd1")
    check = check_lora_file(path, "sd1", components["unet"], text_encoders(components))
    assert check.ok, check.problems
    assert check.modules == len(network.adapters) and check.not_loaded_by == ["diffusers load_lora_weights"]

    report = inspect_lora(path)
    assert report["type"] == "oft" and report["module_count"] == len(network.adapters)
    for name, adapter in network.adapters.items():
        row = report["modules"][name]
        q = adapter.generator().detach()  # bounded by the run's COFT alpha, as the file holds it
        assert (row["blocks"], row["block_size"], row["rank"]) == (*adapter.oft_blocks.shape[:2], adapter.rank)
        assert row["q_norm"] == pytest.approx(float(q.norm()), rel=1e-5)
        eigen = torch.linalg.eigvals(adapter.rotation().detach()).angle().abs().max()  # R's largest turn
        assert row["angle_degrees"] == pytest.approx(float(torch.rad2deg(eigen)), rel=1e-4)
    assert "OFT: " in render_inspect(report) and "spectra do not apply" in render_inspect(report)
    with pytest.raises(SdloraError, match="is LyCORIS OFT, whose update rotates the base weight's output rows"):
        spectrum(read_lora(path)[0], str(path))
    with pytest.raises(SdloraError, match="is a LyCORIS OFT file, whose update rotates each base weight's output rows"):
        resize_lora(path, tmp_path / "small.safetensors", RankChoice(rank=2))
    assert not (tmp_path / "small.safetensors").exists()

    state, meta = read_lora(path)
    name = next(iter(network.adapters))
    bad = {**state, f"{name}.oft_blocks": torch.zeros(2, 3, 4)}
    save_lora(tmp_path / "broken.safetensors", bad, meta)
    problems = check_lora_structure(tmp_path / "broken.safetensors", "sd1").problems
    assert problems == [f"OFT module '{name}' has factors that do not multiply (oft_blocks [2, 3, 4])."]


def test_diffusers_refuses_oft_files(sd1_file):
    pipe = build_tiny_pipeline("sd1")
    with pytest.raises(ValueError, match=r"(?s)have not been correctly renamed:.*\.oft_blocks"):
        pipe.load_lora_weights(str(sd1_file[-1]), adapter_name="x")  # its kohya converter knows no oft_blocks


# -- the trainer, the import -------------------------------------------------------------------
def test_trains_from_the_cli_and_the_file_passes_the_load_check(tmp_path, data4, capsys):
    run = tmp_path / "run"
    flags = ["model.path=demo:sd1", "network.type=oft", "network.rank=4", "network.include_convs=true",
             "network.conv_rank=4", "network.alpha=0.001", "train.max_steps=3", "train.learning_rate=1e-3",
             "sample.every_steps=0", "sample.at_start=false", "save.every_steps=0", "dataset.resolution=64",
             "save.precision=fp32", "train.scale_weight_norms=1.0"]
    argv = ["train", "--data", str(data4), "--preset", "demo", "--output", str(run), "--no-progress",
            *[arg for flag in flags for arg in ("--set", flag)]]
    assert main(argv) == 0, capsys.readouterr().err
    log = events(run)
    check = next(e for e in log if e["event"] == "load_check")
    assert check["ok"] and check["not_loaded_by"] == ["diffusers load_lora_weights"]
    state, meta = read_lora(run / "demo-lora.safetensors")
    assert {key.split(".", 1)[1] for key in state} == {"oft_blocks", "alpha"}
    assert any(bool(t.any()) for k, t in state.items() if k.endswith(".oft_blocks"))  # it trained
    assert any(t.dim() == 3 and t.shape[-1] == 4 for t in state.values())
    assert meta["ss_network_module"] == "lycoris.kohya" and json.loads(meta["ss_network_args"])["algo"] == "diag-oft"
    # the written rotations respect the run's bound: ||Q|| <= 0.001 x rows
    for key, blocks in state.items():
        if key.endswith(".oft_blocks"):
            assert float(skew(blocks).norm()) <= 0.001 * blocks.shape[0] * blocks.shape[1] * (1 + 1e-5)


def test_preflight_says_where_it_loads_and_what_rank_and_alpha_mean(tmp_path, data4):
    cfg = tiny_config(data4, tmp_path / "run", "network.type=\"oft\"", "network.alpha=0.01")
    report = preflight_report(cfg)
    assert report.data["load_targets"] == {"loads_in": ["A1111/Forge", "ComfyUI", "LyCORIS"],
                                           "not_loaded_by": ["diffusers load_lora_weights"]}
    assert any(line.startswith("Loads in: A1111/Forge, ComfyUI, LyCORIS. Not in diffusers: network.type oft")
               for line in report.info)
    assert ("OFT: each weight's output rows turn in blocks of 4 (LyCORIS's diag-oft split of each layer's width), "
            "with no alpha / r scale; network.alpha 0.01 bounds ||Q|| to 0.01 x each layer's width (COFT).") \
        in report.info
    assert not any(line.startswith("Scale: ") for line in report.info)


def test_kohya_diag_oft_preset_imports_as_oft():
    preset = {"LoRA_type": "LyCORIS/Diag-OFT", "network_dim": "8", "network_alpha": "1", "conv_dim": 4,
              "conv_alpha": 1, "constrain": "0.0001", "rescaled": True}
    imported = import_kohya_preset(preset, source="oft.json")
    net = imported.config["network"]
    assert (net["type"], net["rank"], net["alpha"], net["include_convs"], net["conv_rank"]) == ("oft", 8, 0.0001, True, 4)
    assert imported.meaningful_unmapped() == {"rescaled": True}  # LyCORIS's rescale vector has no counterpart
    unconstrained = import_kohya_preset({**preset, "constrain": "0"}, source="oft.json").config["network"]
    assert "alpha" not in unconstrained
    with pytest.raises(SdloraError, match="LoRA_type 'LyCORIS/BOFT' in boft.json is not supported"):
        import_kohya_preset({**preset, "LoRA_type": "LyCORIS/BOFT"}, source="boft.json")

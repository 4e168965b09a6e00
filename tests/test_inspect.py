"""`sdlora lora inspect` and the other lora commands end to end: reports, text, JSON, PNG, exit codes."""

import json

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from app.cli import main
from app.ui.inspect_frames import modules_frame, summary_markdown
from networks.analysis import lora_factors, spectrum
from networks.errors import SdloraError
from networks.inspect import inspect_lora, lora_family, render_inspect
from networks.lora_file import read_lora, save_lora
from networks.metadata import network_metadata
from tests.helpers import attached, randomise_up
from trainer.model.tiny_models import save_demo_model


def export(path, family="sd1", kind="locon", minimal=False, seed=0):
    _, network = attached(family, kind, seed=seed)
    randomise_up(network)
    save_lora(path, network.kohya_state_dict(), network_metadata(network, kind, minimal=minimal,
                                                                 training={"ss_tag_frequency": {"d": {"cat": 3}}}))
    return network


@pytest.fixture(scope="module")
def sd1_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("inspect") / "style.safetensors"
    return path, export(path)


def test_inspect_report_counts_ranks_alphas_and_norms(sd1_file):
    path, network = sd1_file
    report = inspect_lora(path)
    assert report["family"] == "sd1" and report["type"] == "locon" and report["dtype"] == "float32"
    assert report["module_count"] == len(network.adapters)
    unet = sum(1 for n in network.adapters if n.startswith("lora_unet_"))
    assert report["components"] == {"unet": unet, "te": len(network.adapters) - unet}
    convs = sum(1 for a in network.adapters.values() if a.lora_down.weight.shape[2:] == (3, 3))
    assert report["rank_alpha"] == [{"kind": "conv", "rank": 2, "alpha": 2.0, "modules": convs},
                                    {"kind": "linear", "rank": 4, "alpha": 2.0, "modules": len(network.adapters) - convs}]
    for name, adapter in network.adapters.items():
        row = report["modules"][name]
        assert row["norm"] == pytest.approx(float(adapter.delta_weight().detach().norm()), rel=1e-5)
        assert (row["rank"], row["alpha"], row["scale"]) == (adapter.rank, adapter.alpha, adapter.alpha / adapter.rank)
    blocks = report["blocks"]
    assert sum(b["modules"] for b in blocks.values()) == len(network.adapters)
    assert blocks["unet down_blocks.0"]["ranks"] == [2, 4]  # attention (4) and resnet convs (2)
    assert report["metadata"]["ss_tag_frequency"] == '{"d": {"cat": 3}}'


def test_text_rendering_shows_blocks_and_cuts_long_metadata(sd1_file):
    path, _ = sd1_file
    report = inspect_lora(path)
    report["metadata"]["ss_tag_frequency"] = "x" * 500
    text = render_inspect(report, per_module=True)
    assert "family: sd1" in text and "type: locon" in text
    assert "rank / alpha: conv 2/2 x" in text
    line = next(line for line in text.splitlines() if line.startswith("unet mid_block"))
    assert line.split()[2] == str(blocks_count(report, "unet mid_block"))
    assert "x" * 160 + "... (500 chars)" in text and "x" * 161 not in text
    assert "lora_unet_mid_block_attentions_0_proj_in" in text


def blocks_count(report, block):
    return report["blocks"][block]["modules"]


def test_family_from_metadata_or_keys(tmp_path):
    for family in ("sd1", "sd2", "sdxl"):
        export(tmp_path / f"{family}.safetensors", family, "lora", minimal=True)
        state, metadata = read_lora(tmp_path / f"{family}.safetensors")
        assert lora_family(state, metadata) == family
        assert lora_family(state, {}) == family  # key names (SDXL) or proj_in's shape (SD1 4-D, SD2 2-D)
    assert lora_family({"lora_unet_x.lora_down.weight": torch.zeros(1, 2)}, {}) is None


def test_cli_inspect_json_and_errors(sd1_file, tmp_path, capsys):
    path, network = sd1_file
    assert main(["lora", "inspect", str(path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["module_count"] == len(network.adapters) and data["file"] == str(path)
    checkpoint = tmp_path / "model.safetensors"
    save_file({"model.diffusion_model.out.2.weight": torch.zeros(4, 4)}, str(checkpoint))
    assert main(["lora", "inspect", str(checkpoint)]) == 1
    err = capsys.readouterr().err.strip()
    assert err == (f"error: '{checkpoint}' has 1 key(s) that are not lora_down/lora_up/alpha "
                   "(e.g. 'model.diffusion_model.out.2.weight'); it is not a kohya-layout LoRA file.")
    assert main(["lora", "inspect", str(tmp_path / "nope.safetensors")]) == 1
    assert "does not exist; check the path" in capsys.readouterr().err


def test_cli_resize_and_spectrum(sd1_file, tmp_path, capsys):
    path, _ = sd1_file
    out = tmp_path / "r.safetensors"
    assert main(["lora", "resize", str(path), "--rank", "2", "--output", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert {row["rank_after"] for row in report.values()} == {2}
    assert {v.shape[0] for k, v in read_lora(out)[0].items() if k.endswith("down.weight")} == {2}
    assert main(["lora", "resize", str(path), "--rank", "64", "--output", str(tmp_path / "x.safetensors")]) == 1
    assert "rank 64 exceeds module " in capsys.readouterr().err
    assert main(["lora", "resize", str(path), "--output", str(tmp_path / "x.safetensors")]) == 1
    assert "Give --rank R, --energy F or --sv-ratio X" in capsys.readouterr().err

    assert main(["lora", "spectrum", str(out), "--json"]) == 0
    spectrum = json.loads(capsys.readouterr().out)
    assert all(len(m["singular_values"]) == 2 for m in spectrum["modules"].values())
    assert main(["lora", "spectrum", str(out)]) == 0
    assert capsys.readouterr().out.splitlines()[1].startswith("unet down_blocks.0")


def test_cli_similarity_png_is_the_heatmap(sd1_file, tmp_path, capsys):
    path, _ = sd1_file
    png = tmp_path / "phi.png"
    name = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q"
    assert main(["lora", "similarity", str(path), str(path), "--module", name, "--png", str(png)]) == 0
    assert f"heatmap: {png}" in capsys.readouterr().out
    image = Image.open(png).convert("RGB")
    assert image.size == (4 * 16, 4 * 16)  # rank 4 x rank 4 cells
    assert image.getpixel((8, 8)) == (253, 231, 37)  # phi(1, 1) = 1 with itself: the top colour
    assert image.getpixel((3 * 16 + 8, 3 * 16 + 8)) == (253, 231, 37)
    other = tmp_path / "other.safetensors"
    export(other, seed=5)
    assert main(["lora", "similarity", str(path), str(other), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert 0 < data["modules"][name]["top1"] < 1


def test_cli_merge_extract_round_trip(sd1_file, tmp_path, capsys):
    """merge a LoRA into a model, extract it back from (merged - base): the same update per module."""
    path, _ = sd1_file
    base = save_demo_model(tmp_path / "base", "sd1")
    assert main(["lora", "merge", str(path), "--model", str(base), "--output", str(tmp_path / "merged")]) == 0
    assert "into the sd1 model" in capsys.readouterr().out
    out = tmp_path / "extracted.safetensors"
    assert main(["lora", "extract", "--base", str(base), "--tuned", str(tmp_path / "merged"), "--output", str(out),
                 "--rank", "4", "--conv-rank", "2"]) == 0
    original, extracted = lora_factors(read_lora(path)[0]), lora_factors(read_lora(out)[0])
    assert set(extracted) == set(original)
    for name, module in original.items():
        torch.testing.assert_close(extracted[name].delta(), module.delta(), atol=2e-5, rtol=1e-4)
    assert read_lora(out)[1]["ss_base_model_version"] == "sd_v1"
    assert main(["lora", "merge", str(path), "--model", str(base), "--output", str(tmp_path / "m.safetensors")]) == 1
    assert "--output is a folder" in capsys.readouterr().err


ODD = "lora_unet_mid_block_attentions_0_proj_out"
ODD_CASES = {  # the odd module's tensors, and the sentence naming it
    "nan": ({"lora_up.weight": torch.full((32, 4), float("nan"))},
            f"Module '{ODD}' was left out: its lora_up.weight holds NaN or infinite values, so its update is "
            "undefined."),
    "rank0": ({"lora_down.weight": torch.zeros(0, 32), "lora_up.weight": torch.zeros(32, 0)},
              f"Module '{ODD}' was left out: it has rank 0 (lora_down.weight is [0, 32]), so it changes nothing."),
    "zero_dim": ({"lora_down.weight": torch.tensor(1.0)},
                 f"Module '{ODD}' was left out: its lora_down.weight is a 0-dim tensor, not a matrix; the file is "
                 "damaged there."),
}


def odd_file(tmp_path, case):
    """Two modules of a valid LoRA, the second made odd as `case` says."""
    g = torch.Generator().manual_seed(0)
    state = {}
    for name in ("lora_unet_mid_block_attentions_0_proj_in", ODD):
        state |= {f"{name}.lora_down.weight": torch.randn(4, 32, generator=g),
                  f"{name}.lora_up.weight": torch.randn(32, 4, generator=g), f"{name}.alpha": torch.tensor(2.0)}
    state |= {f"{ODD}.{key}": tensor for key, tensor in ODD_CASES[case][0].items()}
    path = tmp_path / f"{case}.safetensors"
    save_file(state, str(path))
    return path, state


@pytest.mark.parametrize("case", list(ODD_CASES))
def test_cli_inspect_names_odd_modules_and_reports_the_rest(tmp_path, capsys, case):
    path, state = odd_file(tmp_path, case)
    assert main(["lora", "inspect", str(path)]) == 1
    out = capsys.readouterr().out
    assert f"1 module(s) left out of this report:\n  {ODD_CASES[case][1]}" in out
    assert "unet mid_block                   1" in out  # the sound module is still reported
    assert main(["lora", "inspect", str(path), "--json"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert data["left_out"] == {ODD: ODD_CASES[case][1]}
    sound = "lora_unet_mid_block_attentions_0_proj_in"
    assert list(data["modules"]) == [sound] and data["module_count"] == 1
    expected = (2.0 / 4) * state[f"{sound}.lora_up.weight"].double() @ state[f"{sound}.lora_down.weight"].double()
    assert data["modules"][sound]["norm"] == pytest.approx(float(expected.norm()), rel=1e-9)


@pytest.mark.parametrize("case", list(ODD_CASES))
def test_analysis_leaves_odd_modules_out_by_name_and_refuses_them_where_it_must_use_them(tmp_path, capsys, case):
    path, state = odd_file(tmp_path, case)
    report = spectrum(state, str(path))
    assert list(report["modules"]) == ["lora_unet_mid_block_attentions_0_proj_in"]
    assert report["left_out"] == {ODD: ODD_CASES[case][1]}
    reason = ODD_CASES[case][1].split(" was left out: ", 1)[1]
    with pytest.raises(SdloraError) as error:
        lora_factors(state, "odd.safetensors")
    assert str(error.value) == f"Module '{ODD}' in odd.safetensors cannot be analysed: {reason}"
    assert main(["lora", "resize", str(path), "--rank", "2", "--output", str(tmp_path / "out.safetensors")]) == 1
    assert f"Module '{ODD}' in {path} cannot be analysed" in capsys.readouterr().err


def test_the_inspect_tab_summary_names_the_odd_module(tmp_path):
    path, _ = odd_file(tmp_path, "nan")
    report = inspect_lora(str(path))
    summary = summary_markdown(report)
    assert summary.endswith(f"**1 module(s) left out of this report:**\n- {ODD_CASES['nan'][1]}")
    assert list(modules_frame(report)["module"]) == ["lora_unet_mid_block_attentions_0_proj_in"]

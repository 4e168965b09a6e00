"""The Inspect tab's spectrum plots and subspace similarity: the builders on LoRAs with a designed spectrum
and designed shared directions, then the two endpoints through the served page with gradio_client.

A designed module stores down = diag(s) V^T and up = U (U, V orthonormal columns) with alpha = r, so its
update U diag(s) V^T has exactly the singular values s, and its lora_down's top singular directions are
V's columns in order: a second file that reuses V's first columns shares exactly those directions.
"""
import math

import numpy as np
import pytest
import torch
from gradio_client import Client
from PIL import Image

from app.lora_commands import VIRIDIS, heatmap_image, save_heatmap_png
from app.ui import heatmap_axes
from app.ui import inspect_frames as frames
from app.ui.inspect_tab import lines_settings, lines_value, plot_settings
from networks.analysis import spectrum, subspace_similarity
from networks.lora_file import read_lora, save_lora
from tests.ui_support import served_ui

YELLOW, PURPLE = VIRIDIS[-1], VIRIDIS[0]

# name -> (out, shape of lora_down past r, singular values): two blocks with two modules each, one of them
# mixing ranks 4 and 2, a conv, and a block whose only module is zero.
MODULES = {
    "lora_unet_down_blocks_0_attentions_0_proj_in": (32, (24, 1, 1), [8.0, 4.0, 2.0, 1.0]),
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": (32, (32,), [4.0, 3.0, 2.0, 2.0]),
    "lora_unet_mid_block_resnets_0_conv1": (16, (8, 3, 3), [6.0, 3.0, 1.5, 0.75]),
    "lora_unet_up_blocks_0_attentions_0_proj_out": (32, (32,), [0.0, 0.0, 0.0, 0.0]),
    "lora_te_text_model_encoder_layers_0_self_attn_q_proj": (32, (32,), [8.0, 4.0, 2.0, 1.0]),
    "lora_te_text_model_encoder_layers_0_self_attn_k_proj": (32, (32,), [3.0, 1.5]),
}


def basis(rows: int, cols: int, generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(rows, cols, generator=generator, dtype=torch.float64))[0]


def designed_state(modules: dict, seed: int = 0, like: dict | None = None, shared: int = 0) -> dict:
    """A kohya state dict whose module updates have the given singular values; with `like` (another designed
    state) each module's top `shared` lora_down directions are that state's."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, (out, down_shape, values) in modules.items():
        rank, width = len(values), math.prod(down_shape)
        v = basis(width, rank, generator)
        if like is not None and shared:
            rows = like[f"{name}.lora_down.weight"].flatten(1).double()  # s_i v_i^T
            v = torch.linalg.qr(torch.cat([(rows / rows.norm(dim=1, keepdim=True)).T[:, :shared], v[:, shared:]], 1))[0]
        up = basis(out, rank, generator)
        kernel = (1, 1) if len(down_shape) == 3 else ()
        state[f"{name}.lora_down.weight"] = (torch.tensor(values, dtype=torch.float64)[:, None] * v.T).reshape(
            rank, *down_shape).float().contiguous()
        state[f"{name}.lora_up.weight"] = up.reshape(out, rank, *kernel).float().contiguous()
        state[f"{name}.alpha"] = torch.tensor(float(rank))
    return state


def tiny_sd1_pair(folder, rank: int = 8, shared: int = 2) -> tuple:
    """Two rank-`rank` files with the tiny SD1 model's module names and shapes (the browser test and the
    README screenshot): spectra decaying slower from block to block, the second sharing the first's top
    `shared` directions in every module."""
    from networks.analysis import block_of, block_order
    from tests.helpers import attached

    state = attached("sd1", "lora")[1].kohya_state_dict()
    names = sorted({key.split(".", 1)[0] for key in state}, key=lambda n: (block_order(n), n))
    blocks = list(dict.fromkeys(block_of(name) for name in names))
    modules = {}
    for name in names:
        decay = 0.3 + 0.6 * blocks.index(block_of(name)) / max(len(blocks) - 1, 1)
        down = state[f"{name}.lora_down.weight"]
        modules[name] = (state[f"{name}.lora_up.weight"].shape[0], tuple(down.shape[1:]),
                         [decay ** k for k in range(rank)])
    first = designed_state(modules)
    second = designed_state(modules, seed=1, like=first, shared=shared)
    return save(folder / "style-a.safetensors", first), save(folder / "style-b.safetensors", second)


def save(path, state):
    save_lora(path, state, {"ss_network_module": "networks.lora"})
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """a: the designed file; b: its twin sharing each module's top 2 directions; c: b less one module;
    wide: the same names at other widths; other: no name in common."""
    folder = tmp_path_factory.mktemp("inspect-ui")
    a = designed_state(MODULES)
    live = {k: v for k, v in MODULES.items() if v[2][0] > 0}
    b = designed_state(live, seed=1, like=a, shared=2)
    wide = {name: (out * 2, (down[0] * 2, *down[1:]), s) for name, (out, down, s) in live.items()}
    other = {"lora_unet_x_proj": (16, (16,), [1.0, 0.5])}
    c = {k: v for k, v in b.items() if not k.startswith("lora_te_text_model_encoder_layers_0_self_attn_k_proj")}
    (folder / "notes.txt").write_text("not a LoRA")
    return {"a": save(folder / "a.safetensors", a), "b": save(folder / "b.safetensors", b),
            "c": save(folder / "c.safetensors", c), "wide": save(folder / "wide.safetensors", designed_state(wide)),
            "other": save(folder / "other.safetensors", designed_state(other)), "text": folder / "notes.txt"}


def report_of(path):
    return spectrum(read_lora(path)[0], str(path))


# -- spectrum --------------------------------------------------------------------------------------
def test_the_effective_rank_frames_hold_the_spectrum_block_means(files):
    report = report_of(files["a"])
    blocks = list(report["blocks"])
    assert blocks == ["unet down_blocks.0", "unet mid_block", "unet up_blocks.0", "te layers.0"]
    long = frames.effective_rank_frame(report)
    assert list(long["measure"].unique()) == ["rank r", "energy rank 99%", "energy rank 90%", "entropy rank"]
    for key, label in frames.RANK_MEASURES:
        rows = long[long["measure"] == label]
        assert list(rows["block"]) == blocks
        assert list(rows["rank"]) == [report["blocks"][b][key] for b in blocks]
    # Known by design: s = 6, 3, 1.5, 0.75 (energies 36, 9, 2.25, 0.5625): 90% needs 2 values, 99% all 4.
    mid = long[long["block"] == "unet mid_block"].set_index("measure")["rank"]
    p = np.array([6, 3, 1.5, 0.75]) / 11.25
    assert (mid["rank r"], mid["energy rank 90%"], mid["energy rank 99%"]) == (4, 2, 4)
    assert mid["entropy rank"] == pytest.approx(math.exp(-(p * np.log(p)).sum()), rel=1e-5)
    # down_blocks.0: [8, 4, 2, 1] needs 2 for 90% and [4, 3, 2, 2] (energy 16, 25, 29 of 33) needs 4.
    table = frames.effective_rank_table(report).set_index("block")
    assert table.loc["unet down_blocks.0", "energy rank 90%"] == 3
    assert table.loc["unet down_blocks.0", "modules"] == 2
    assert table.loc["te layers.0", "rank r"] == 3.0  # ranks 4 and 2
    assert table.loc["unet up_blocks.0", "entropy rank"] == 0.0  # a zero update has no direction
    assert table.loc["unet mid_block", "norm"] == pytest.approx(math.sqrt(36 + 9 + 2.25 + 0.5625), rel=1e-5)


def test_singular_value_lines_average_each_blocks_normalised_spectra(files):
    lines = frames.singular_value_frame(report_of(files["a"]))
    by_block = {block: rows.set_index("k")["relative"].to_dict() for block, rows in lines.groupby("block", sort=False)}
    assert list(by_block) == ["unet down_blocks.0", "unet mid_block", "te layers.0"]  # up_blocks.0 is zero
    expected = {"unet down_blocks.0": {1: 1, 2: (0.5 + 0.75) / 2, 3: (0.25 + 0.5) / 2, 4: (0.125 + 0.5) / 2},
                "unet mid_block": {1: 1, 2: 0.5, 3: 0.25, 4: 0.125},
                "te layers.0": {1: 1, 2: (0.5 + 0.5) / 2, 3: 0.25, 4: 0.125}}  # k_proj has only 2 values
    for block, line in expected.items():
        assert by_block[block] == pytest.approx(line, abs=1e-6), block


def test_the_component_radio_picks_the_lines_of_one_model_part(files):
    lines = frames.singular_value_frame(report_of(files["a"]))
    assert frames.components(lines) == ["unet", "te"]
    te = frames.component_lines(lines, "te")
    assert set(te["block"]) == {"te layers.0"} and list(te["k"]) == [1, 2, 3, 4]
    # Colours are counted within a component, so the lines shown together differ.
    assert frames.block_colors(lines) == {"unet down_blocks.0": frames.PALETTE[0], "unet mid_block": frames.PALETTE[1],
                                          "te layers.0": frames.PALETTE[0]}
    # The plots' second step names the blocks: x order in model order, legend and colours of the lines shown.
    settings = {"lines": lines, "blocks": list(report_of(files["a"])["blocks"]), "top": 4.0}
    norms, ranks, values = plot_settings(settings, "te")
    assert norms.sort == ranks.sort == ["unet down_blocks.0", "unet mid_block", "unet up_blocks.0", "te layers.0"]
    assert ranks.y_lim == [0, pytest.approx(4.4)]
    assert values.colors_in_legend == ["te layers.0"] and values.color_map == frames.block_colors(lines)
    assert lines_settings(settings, "unet").colors_in_legend == ["unet down_blocks.0", "unet mid_block"]
    assert lines_value(settings, "unet").equals(frames.component_lines(lines, "unet"))
    assert lines_value(settings, None) is None  # a file whose updates are all zero has no lines


# -- heatmaps --------------------------------------------------------------------------------------
def test_heatmap_image_cells_and_palette(tmp_path):
    matrix = [[0.0, 0.5, 1.0], [1.0, 1.0, 2.0]]  # values past 1 are clipped
    image = heatmap_image(matrix, cell=16)
    assert image.size == (3 * 16, 2 * 16)
    pixels = np.asarray(image)
    assert tuple(pixels[0, 0]) == PURPLE and tuple(pixels[0, 16]) == VIRIDIS[2] and tuple(pixels[31, 47]) == YELLOW
    saved = save_heatmap_png(matrix, str(tmp_path / "deep" / "phi.png"), cell=16)  # the CLI's PNG, same pixels
    assert np.array_equal(np.asarray(Image.open(saved)), pixels)
    # In the page the cells are about 320 pixels whatever r (at least 4 pixels each), inside numbered axes
    # and beside a colour bar.
    axes = heatmap_axes.MARGIN_LEFT + heatmap_axes.BAR_GAP + heatmap_axes.BAR_WIDTH + heatmap_axes.MARGIN_RIGHT
    assert [frames.heatmap([[0.5] * n] * n).size[0] - axes for n in (4, 8, 64, 100)] == [320, 320, 320, 400]
    assert heatmap_axes._ticks(8) == [1, 2, 3, 4, 5, 6, 7, 8] and heatmap_axes._ticks(64) == [1, 9, 17, 25, 33, 41, 49, 57, 64]


def cell_pixels(image, side: int = 320) -> np.ndarray:
    """The heatmap's cells, without the numbered axes and the colour bar around them."""
    top, left = heatmap_axes.MARGIN_TOP, heatmap_axes.MARGIN_LEFT
    return np.asarray(image)[top:top + side, left:left + side]


def test_a_file_against_itself_is_the_same_subspace_everywhere(files):
    state = read_lora(files["a"])[0]
    for side in ("down", "up"):
        live = {k: v for k, v in state.items() if "up_blocks_0" not in k}  # a zero update has no subspace
        report = subspace_similarity(live, live, side)
        table = frames.similarity_frame(report)
        assert list(table["phi(1,1)"]) == list(table["phi(r,r)"]) == [1.0] * 5, side
    report = subspace_similarity(live, live, "down")
    table = frames.similarity_frame(report).set_index("module")
    assert table.loc["lora_unet_mid_block_resnets_0_conv1", "chance r/d"] == round(4 / 72, 4)  # d = 8 x 3 x 3
    assert table.loc["lora_te_text_model_encoder_layers_0_self_attn_k_proj", "r"] == 2
    pixels = cell_pixels(frames.heatmap(report["mean"]))
    assert pixels.shape == (320, 320, 3)
    assert all(tuple(pixels[i * 80 + 40, i * 80 + 40]) == YELLOW for i in range(4))  # the diagonal
    assert (pixels == YELLOW).all()  # top-i of a file lies in its own top-j for every i, j


def test_two_files_sharing_two_directions(files):
    report = subspace_similarity(read_lora(files["a"])[0], read_lora(files["c"])[0], "down", "a", "c")
    table = frames.similarity_frame(report)
    assert list(table["phi(1,1)"]) == [1.0] * 4  # the top direction is shared in every common module
    for row in report["modules"].values():
        phi = np.array(row["phi"])
        assert phi[1, 1] == pytest.approx(1.0, abs=1e-6)  # so is the top-2 subspace
        assert 0.5 - 1e-6 <= phi[3, 3] < 1  # 2 of 4 directions, plus chance overlap of the other two
    assert report["only_in_a"] == ["lora_te_text_model_encoder_layers_0_self_attn_k_proj",
                                   "lora_unet_up_blocks_0_attentions_0_proj_out"]
    mean = cell_pixels(frames.module_heatmap(report, frames.MEAN))
    assert tuple(mean[40, 40]) == tuple(mean[120, 120]) == YELLOW and tuple(mean[280, 280]) != YELLOW
    name = "lora_unet_mid_block_resnets_0_conv1"
    assert np.array_equal(np.asarray(frames.module_heatmap(report, name)), np.asarray(frames.heatmap(report["modules"][name]["phi"])))
    assert frames.module_choices(report)[:2] == [("mean over 4 modules (4 x 4)", frames.MEAN),
                                                  ("lora_unet_down_blocks_0_attentions_0_proj_in",) * 2]
    text = frames.similarity_markdown(report, "a", "c")
    assert "4 common modules; mean phi(1,1) 1.000" in text and "2 module(s) only in a, left out." in text
    assert "only in c" not in text


# -- through the page ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def client(tmp_path_factory):
    with served_ui(tmp_path_factory.mktemp("inspect-served")) as demo:
        yield Client(demo.local_url, verbose=False)


def test_the_inspect_view_returns_spectrum_plots_and_table(client, files):
    outputs = client.predict(None, str(files["a"]), None, api_name="/inspect_view")
    assert outputs[0].startswith('<div class="sd-notice sd-ok"') and "a.safetensors: 6 modules." in outputs[0]
    report = report_of(files["a"])
    ranks = outputs[6]
    assert ranks["columns"] == ["block", "measure", "rank"]
    expected = frames.effective_rank_frame(report).values.tolist()
    assert [row[:2] for row in ranks["data"]] == [row[:2] for row in expected]
    assert [row[2] for row in ranks["data"]] == pytest.approx([row[2] for row in expected], abs=1e-9)
    assert outputs[7]["data"] == frames.effective_rank_table(report).values.tolist()
    unet = outputs[8]["data"]  # the first component's lines: sigma_k / sigma_1 per block
    assert {row[0] for row in unet} == {"unet down_blocks.0", "unet mid_block"}
    mid = [row[1:] for row in unet if row[0] == "unet mid_block"]
    assert mid == [[1, 1.0], [2, pytest.approx(0.5)], [3, pytest.approx(0.25)], [4, pytest.approx(0.125)]]
    assert outputs[9]["choices"] == [["unet", "unet"], ["te", "te"]] and outputs[9]["value"] == "unet"


def test_the_similarity_endpoint_compares_two_files(client, files):
    notice, image, text, module, table = client.predict(None, str(files["a"]), None, None, str(files["b"]), None,
                                                        "down", api_name="/inspect_similarity")
    assert "a.safetensors vs b.safetensors: 5 common modules." in notice
    expected = subspace_similarity(read_lora(files["a"])[0], read_lora(files["b"])[0], "down")
    assert table["headers"] == ["module", "block", "r", "phi(1,1)", "phi(r,r)", "chance r/d"]
    assert [row[0] for row in table["data"]] == list(expected["modules"])
    assert [row[3] for row in table["data"]] == [1.0] * 5
    assert [row[4] for row in table["data"]] == [round(m["full"], 4) for m in expected["modules"].values()]
    k_proj = next(row for row in table["data"] if row[0].endswith("k_proj"))
    assert k_proj[2:5] == [2, 1.0, 1.0]  # r 2: both of its directions are shared
    pixels = np.asarray(Image.open(image).convert("RGB"))
    top, left = heatmap_axes.MARGIN_TOP, heatmap_axes.MARGIN_LEFT  # the cells sit inside numbered axes
    assert pixels.shape[0] == top + 320 + heatmap_axes.MARGIN_BOTTOM and tuple(pixels[top + 40, left + 40]) == YELLOW
    assert module["value"] == frames.MEAN and len(module["choices"]) == 6
    assert "**a.safetensors** (rows) vs **b.safetensors** (columns)" in text


@pytest.mark.parametrize("first, second, sentence", [
    ("a", "wide", "proj_in&#x27; is 32x24 in a.safetensors but 64x48 in wide.safetensors; the files were made for different "
                  "base models."),
    ("a", "other", "a.safetensors and other.safetensors share no module names; compare two LoRAs made for the same "
                   "base model."),
    ("a", "text", "The LoRA file notes.txt is not a .safetensors file; choose one that is."),
    ("a", None, "Choose a second LoRA to compare with from a run, enter a file path or upload a .safetensors file."),
])
def test_a_bad_pair_is_one_sentence_in_the_notice(client, files, first, second, sentence):
    outputs = client.predict(None, str(files[first]), None, None, str(files[second]) if second else "", None, "down",
                             api_name="/inspect_similarity")
    notice = outputs[0]
    assert 'class="sd-notice sd-error"' in notice and sentence in notice
    assert "\n" not in notice and "Traceback" not in notice
    assert all(value == {"__type__": "update"} for value in outputs[1:])  # the last good result stays

"""What the Inspect tab shows, as plain data: reports in, DataFrames, Markdown and PIL images out.

Pure functions of the dicts from networks.inspect.inspect_lora, networks.analysis.spectrum and
networks.analysis.subspace_similarity, so they are tested without a page.
"""
from __future__ import annotations

from collections import Counter

import pandas as pd

from app.ui.heatmap_axes import heatmap_with_axes

LONG_VALUE = 200
MEAN = "(mean)"  # the module dropdown's value for the mean heatmap
HEATMAP_PIXELS = 320  # a heatmap is drawn about this wide, whatever r (cells of at least 4 pixels)
# The effective ranks of a block, in the order the plot's legend lists them: key in the report, label.
RANK_MEASURES = (("mean_rank", "rank r"), ("mean_energy_rank_99", "energy rank 99%"),
                 ("mean_energy_rank_90", "energy rank 90%"), ("mean_entropy_rank", "entropy rank"))
# Tableau's 20 colours: one per block line, distinct up to 20 blocks (SDXL's UNet has 18).
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2", "#c7c7c7",
           "#dbdb8d", "#9edae5")


# -- inspect_lora ----------------------------------------------------------------------------------
def summary_markdown(report: dict) -> str:
    components = ", ".join(f"{name} {count}" for name, count in report["components"].items())
    groups = "; ".join(f"{g['kind']} r {g['rank']} / alpha {g['alpha']:g} ({g['modules']} modules)"
                       for g in report["rank_alpha"])
    left_out = [f"- {sentence}" for sentence in report.get("left_out", {}).values()]
    return "\n".join([
        f"### {report['file'].rsplit('/', 1)[-1]}",
        f"- **{report['type']}** for **{report['family'] or 'an unknown family'}**, "
        f"{report['module_count']} modules ({components}), {report['dtype']}, "
        f"{report['size_bytes'] / 1e6:.2f} MB",
        f"- Rank / alpha: {groups}",
        *([f"\n**{len(left_out)} module(s) left out of this report:**", *left_out] if left_out else []),
    ])


def blocks_frame(report: dict) -> pd.DataFrame:
    rows = [[block, row["modules"], _join(row["ranks"]), _join(row["alphas"]), round(row["norm"], 6)]
            for block, row in report["blocks"].items()]
    return pd.DataFrame(rows, columns=["block", "modules", "rank", "alpha", "norm"])


def norms_frame(report: dict) -> pd.DataFrame:
    return pd.DataFrame({"block": list(report["blocks"]), "norm": [b["norm"] for b in report["blocks"].values()]})


def modules_frame(report: dict) -> pd.DataFrame:
    rows = [[name, m["block"], m["kind"], m["rank"], m["alpha"], round(m["norm"], 6)]
            for name, m in report["modules"].items()]
    return pd.DataFrame(rows, columns=["module", "block", "kind", "rank", "alpha", "norm"])


def metadata_frame(report: dict) -> pd.DataFrame:
    rows = [[key, value if len(value) <= LONG_VALUE else value[:LONG_VALUE] + f"… ({len(value)} chars)"]
            for key, value in report["metadata"].items()]
    return pd.DataFrame(rows, columns=["key", "value"])


def _join(values) -> str:
    return ", ".join(f"{v:g}" for v in values)


# -- spectrum --------------------------------------------------------------------------------------
def effective_rank_frame(spectrum: dict) -> pd.DataFrame:
    """Long form for the line plot: one row per (block, measure), the block's mean over its modules."""
    rows = [[block, label, row[key]] for key, label in RANK_MEASURES for block, row in spectrum["blocks"].items()]
    return pd.DataFrame(rows, columns=["block", "measure", "rank"])


def effective_rank_table(spectrum: dict) -> pd.DataFrame:
    rows = [[block, row["modules"], *(round(row[key], 3) for key, _ in RANK_MEASURES), round(row["norm"], 6)]
            for block, row in spectrum["blocks"].items()]
    return pd.DataFrame(rows, columns=["block", "modules", *(label for _, label in RANK_MEASURES), "norm"])


def singular_value_frame(spectrum: dict) -> pd.DataFrame:
    """One line per block: sigma_k / sigma_1 against k, averaged over the block's modules that have a k-th
    singular value (a LoCon block mixes ranks); modules whose update is zero have no shape and are left out."""
    sums: dict[str, dict[int, list[float]]] = {}
    for module in spectrum["modules"].values():
        values = module["singular_values"]
        if not values or values[0] <= 0:
            continue
        line = sums.setdefault(module["block"], {})
        for k, value in enumerate(values, start=1):
            line.setdefault(k, []).append(value / values[0])
    rows = [[block, k, sum(ratios) / len(ratios)] for block in spectrum["blocks"] if block in sums
            for k, ratios in sorted(sums[block].items())]
    return pd.DataFrame(rows, columns=["block", "k", "relative"])


def components(lines: pd.DataFrame) -> list[str]:
    """The model parts with singular-value lines, in model order: 'unet', 'te' (or 'te1', 'te2')."""
    return list(dict.fromkeys(block.split(" ", 1)[0] for block in lines["block"]))


def component_lines(lines: pd.DataFrame, component: str) -> pd.DataFrame:
    """The singular-value lines of one component's blocks."""
    return lines[lines["block"].str.split(" ", n=1).str[0] == component].reset_index(drop=True)


def block_colors(lines: pd.DataFrame) -> dict[str, str]:
    """A colour per block, counted within its component: the lines shown together differ up to 20 blocks."""
    counts: Counter = Counter()
    colors = {}
    for block in dict.fromkeys(lines["block"]):
        component = block.split(" ", 1)[0]
        colors[block] = PALETTE[counts[component] % len(PALETTE)]
        counts[component] += 1
    return colors


# -- subspace similarity ---------------------------------------------------------------------------
def heatmap(matrix: list[list[float]]) -> object:
    """A phi matrix as a PIL image, its cells about HEATMAP_PIXELS wide (square, at least 4 pixels), with
    numbered axes and a colour bar."""
    size = max(len(matrix), len(matrix[0]) if matrix else 1)
    return heatmap_with_axes(matrix, max(4, HEATMAP_PIXELS // max(size, 1)), "i (file above)", "j (second file)")


def module_heatmap(report: dict, module: str | None) -> object:
    """The mean heatmap for MEAN (or nothing chosen), else that module's."""
    if not module or module == MEAN:
        return heatmap(report["mean"])
    return heatmap(report["modules"][module]["phi"])


def module_choices(report: dict) -> list[tuple[str, str]]:
    shape, count = _mean_shape(report)
    return [(f"mean over {count} modules ({shape[0]} x {shape[1]})", MEAN)] + [(name, name) for name in report["modules"]]


def similarity_frame(report: dict) -> pd.DataFrame:
    """Per common module: phi(1, 1), phi(r, r) with r the smaller rank, and what independent random
    subspaces of the same dimension d would give at (r, r) on average, r / d."""
    rows = []
    for name, m in report["modules"].items():
        r = min(len(m["phi"]), len(m["phi"][0]))
        rows.append([name, m["block"], r, round(m["top1"], 4), round(m["full"], 4), round(r / m["dim"], 4)])
    return pd.DataFrame(rows, columns=["module", "block", "r", "phi(1,1)", "phi(r,r)", "chance r/d"])


def similarity_markdown(report: dict, name_a: str, name_b: str) -> str:
    side = ("the input directions each lora_down reads, as in the LoRA paper" if report["side"] == "down"
            else "the output directions each lora_up writes")
    modules = report["modules"].values()
    top1 = sum(m["top1"] for m in modules) / len(modules)
    full = sum(m["full"] for m in modules) / len(modules)
    lines = [f"**{name_a}** (rows) vs **{name_b}** (columns), side **{report['side']}**: {side}.",
             f"- {len(modules)} common modules; mean phi(1,1) {top1:.3f}, mean phi(r,r) {full:.3f}.",
             "- phi(i, j) is how much of the top-i directions of one lie in the top-j of the other: "
             "yellow 1 = the same subspace, dark purple 0 = unrelated (random subspaces give about max(i, j) / d)."]
    for which, name in (("only_in_a", name_a), ("only_in_b", name_b)):
        if report[which]:
            lines.append(f"- {len(report[which])} module(s) only in {name}, left out.")
    return "\n".join(lines)


def _mean_shape(report: dict) -> tuple[tuple[int, int], int]:
    shapes = Counter((len(m["phi"]), len(m["phi"][0])) for m in report["modules"].values())
    mean = report["mean"]
    shape = (len(mean), len(mean[0]))
    return shape, shapes[shape]

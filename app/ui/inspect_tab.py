"""Inspect tab: what a LoRA file holds (metadata, modules per block, rank and alpha, update norms)."""
from __future__ import annotations

import gradio as gr
import pandas as pd

from app.security import user_file
from app.ui.context import UIContext
from app.ui.notices import guarded, ok
from app.ui.try_tab import lora_choices
from networks.errors import SdloraError
from networks.inspect import inspect_lora

LONG_VALUE = 200


def summary_markdown(report: dict) -> str:
    components = ", ".join(f"{name} {count}" for name, count in report["components"].items())
    groups = "; ".join(f"{g['kind']} r {g['rank']} / alpha {g['alpha']:g} ({g['modules']} modules)"
                       for g in report["rank_alpha"])
    return "\n".join([
        f"### {report['file'].rsplit('/', 1)[-1]}",
        f"- **{report['type']}** for **{report['family'] or 'an unknown family'}**, "
        f"{report['module_count']} modules ({components}), {report['dtype']}, "
        f"{report['size_bytes'] / 1e6:.2f} MB",
        f"- Rank / alpha: {groups}",
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


def chosen_file(uploaded, typed: str, chosen: str):
    source = uploaded or (typed or "").strip() or chosen
    if not source:
        raise SdloraError("Choose a LoRA from a run, enter a file path or upload a .safetensors file.")
    return user_file(source, "LoRA file", suffixes=(".safetensors",))


def build(ctx: UIContext):
    with gr.Row(elem_classes="sd-align-end"):
        with gr.Column(scale=3):
            chosen = gr.Dropdown(lora_choices(ctx), label="LoRA from a run", elem_id="inspect-lora")
            typed = gr.Textbox(label="...or a file path", placeholder="/path/to/lora.safetensors",
                               elem_id="inspect-path", info="Used instead of the list when filled.")
        with gr.Column(scale=2):
            uploaded = gr.File(label="...or upload a .safetensors file", file_types=[".safetensors"],
                               type="filepath", height=150)
            go = gr.Button("Inspect", variant="primary", elem_id="inspect-go")
    message = gr.HTML(elem_id="inspect-notice")
    summary = gr.Markdown()
    with gr.Row():
        # Created empty (None, not an empty frame, which would keep the plot from drawing later data).
        norms = gr.BarPlot(None, x="block", y="norm", title="Update norm |scale x up @ down| per block",
                           height=300, x_label_angle=-40, sort=None, y_lim=[0, None], elem_id="inspect-norms")
        blocks = gr.Dataframe(label="Modules per block", interactive=False, max_height=300)
    with gr.Accordion("Every module", open=False):
        modules = gr.Dataframe(interactive=False, max_height=400)
    with gr.Accordion("Metadata", open=False):
        metadata = gr.Dataframe(interactive=False, max_height=400, wrap=True)

    @guarded(6)
    def on_inspect(file, path_text, choice):
        path = chosen_file(file, path_text, choice)
        report = inspect_lora(path)
        return (ok(f"{path.name}: {report['module_count']} modules."), summary_markdown(report),
                norms_frame(report), blocks_frame(report), modules_frame(report), metadata_frame(report))

    go.click(on_inspect, [uploaded, typed, chosen], [message, summary, norms, blocks, modules, metadata],
             api_name="inspect_view", api_visibility="undocumented")
    return chosen, lambda: gr.Dropdown(choices=lora_choices(ctx))

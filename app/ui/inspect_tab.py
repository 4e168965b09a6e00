"""Inspect tab: what a LoRA file holds (metadata, modules per block, rank and alpha, update norms), its
singular-value spectrum and effective ranks per block, and its subspace similarity to a second file.

Layout and handlers only; the frames, Markdown and images come from app.ui.inspect_frames.
"""
from __future__ import annotations

import gradio as gr

from app.security import user_file
from app.ui import inspect_frames as frames
from app.ui.context import UIContext
from app.ui.notices import guarded, ok
from app.ui.try_tab import LoraList, lora_choices, refreshed_choice
from networks.analysis import SIDES, spectrum, subspace_similarity
from networks.errors import SdloraError
from networks.inspect import inspect_lora
from networks.lora_file import read_lora


def chosen_file(uploaded, typed: str, chosen: str, what: str = "LoRA"):
    source = uploaded or (typed or "").strip() or chosen
    if not source:
        raise SdloraError(f"Choose a {what} from a run, enter a file path or upload a .safetensors file.")
    return user_file(source, "LoRA file", suffixes=(".safetensors",))


def file_inputs(ctx: UIContext, suffix: str = ""):
    """The run list, a typed path and an upload: (uploaded, typed, chosen)."""
    with gr.Column(scale=3):
        chosen = gr.Dropdown(lora_choices(ctx), label="LoRA from a run", elem_id=f"inspect-lora{suffix}")
        typed = gr.Textbox(label="...or a file path", placeholder="/path/to/lora.safetensors",
                           elem_id=f"inspect-path{suffix}", info="Used instead of the list when filled.")
    with gr.Column(scale=2):
        uploaded = gr.File(label="...or upload a .safetensors file", file_types=[".safetensors"],
                           type="filepath", height=150)
    return uploaded, typed, chosen


def build(ctx: UIContext):
    with gr.Row(elem_classes="sd-align-end"):
        uploaded, typed, chosen = file_inputs(ctx)
        go = gr.Button("Inspect", variant="primary", elem_id="inspect-go", scale=1)
    message = gr.HTML(elem_id="inspect-notice")
    empty = gr.Markdown(EMPTY_INSPECT, elem_id="inspect-empty", elem_classes="sd-muted")
    with gr.Column(visible=False, elem_id="inspect-results") as results:  # no empty tables and plots before a file
        summary = gr.Markdown()
        # Plots are created empty (None, not an empty frame, which would keep a plot from drawing later data).
        with gr.Row():
            norms = gr.BarPlot(None, x="block", y="norm", title="Update norm |scale x up @ down| per block",
                               height=300, x_label_angle=-40, sort=None, y_lim=[0, None], elem_id="inspect-norms")
            blocks = gr.Dataframe(label="Modules per block", interactive=False, max_height=300)
        with gr.Row():
            ranks = gr.LinePlot(None, x="block", y="rank", color="measure", sort=None, height=320, x_label_angle=-40,
                                y_lim=[0, None], title="Effective rank per block (mean over its modules)",
                                y_title="rank", elem_id="inspect-ranks")
            with gr.Column():
                values = gr.LinePlot(None, x="k", y="relative", color="block", height=280, y_lim=[0, 1.05],
                                     title="Singular values sigma_k / sigma_1 (mean over each block's modules)",
                                     x_title="k", y_title="sigma_k / sigma_1", elem_id="inspect-spectrum",
                                     x_axis_format="d")
                component = gr.Radio([], label="Lines for the blocks of", elem_id="inspect-component")
        with gr.Accordion("Effective ranks per block", open=False):
            gr.Markdown("Energy rank p: the fewest singular values holding p of |dW|_F^2. Entropy rank: "
                        "exp(entropy of sigma / sum sigma), r for r equal values, 1 for a single direction.")
            rank_table = gr.Dataframe(interactive=False, max_height=400, elem_id="inspect-rank-table")
        with gr.Accordion("Every module", open=False):
            modules = gr.Dataframe(interactive=False, max_height=400)
        with gr.Accordion("Metadata", open=False):
            metadata = gr.Dataframe(interactive=False, max_height=400, wrap=True)
    view = gr.State(None)  # what the plots' settings need: every block's line, the block order, the top rank

    @guarded(11)
    def on_inspect(file, path_text, choice):
        path = chosen_file(file, path_text, choice)
        report = inspect_lora(path)
        spec = spectrum(read_lora(path)[0], str(path))
        ranks_frame, all_lines = frames.effective_rank_frame(spec), frames.singular_value_frame(spec)
        parts = frames.components(all_lines)  # none when every update is zero (a fresh checkpoint)
        part = parts[0] if parts else None
        settings = {"lines": all_lines, "blocks": list(report["blocks"]), "top": float(ranks_frame["rank"].max())}
        return (ok(f"{path.name}: {report['module_count']} modules."), frames.summary_markdown(report),
                frames.norms_frame(report), frames.blocks_frame(report), frames.modules_frame(report),
                frames.metadata_frame(report), ranks_frame, frames.effective_rank_table(spec),
                lines_value(settings, part), gr.Radio(parts, value=part), settings)

    go.click(on_inspect, [uploaded, typed, chosen],
             [message, summary, norms, blocks, modules, metadata, ranks, rank_table, values, component, view],
             api_name="inspect_view", api_visibility="undocumented").then(
        plot_settings, [view, component], [norms, ranks, values], api_visibility="private", show_progress="hidden"
    ).then(shown_when_done, view, [results, empty], api_visibility="private", show_progress="hidden")
    component.input(lines_value, [view, component], values, api_visibility="private").then(
        lines_settings, [view, component], values, api_visibility="private", show_progress="hidden")
    chosen_b = build_similarity(uploaded, typed, chosen, ctx)
    newest_listed = gr.State(chosen.value)  # a dropdown starts on its first (newest) file

    def refresh_lists(current, newest_before, _current_b):
        choices, value, newest = refreshed_choice(ctx, current, newest_before)
        return gr.Dropdown(choices=choices, value=value), newest, gr.Dropdown(choices=choices)

    return LoraList(refresh_lists, [chosen, newest_listed, chosen_b])


MIN_AXIS_SPAN = 5  # a count axis spanning fewer units gets half-unit ticks (0.5, 1.5) from the plot library
EMPTY_INSPECT = ("Nothing inspected yet: choose a LoRA from a run, type its path or upload a .safetensors file, "
                 "then press **Inspect** for its modules, ranks, update norms and singular-value spectrum.")
EMPTY_COMPARE = ("Nothing compared yet: inspect a file above, choose a second one here and press **Compare** for "
                 "the phi heatmap and the per-module table.")


def shown_when_done(result):
    """The results once there are some; until then the sentence saying what to do."""
    return gr.Column(visible=result is not None), gr.Markdown(visible=result is None)


# A plot redraws in full only when one of its settings changes, and then from the data it held before that
# same update (gradio 6.31); a data-only update keeps the old x order and colour domain, which hides the
# lines of blocks it did not know. So new data goes first, and the settings that name blocks follow.
def lines_value(settings, part: str | None):
    if settings is None:
        return gr.skip()
    return None if part is None else frames.component_lines(settings["lines"], part)


def lines_settings(settings, part: str | None):
    if settings is None or part is None:
        return gr.skip()
    lines = frames.component_lines(settings["lines"], part)
    legend = list(dict.fromkeys(lines["block"]))
    # k counts singular values: an axis at least MIN_AXIS_SPAN wide gets whole-number ticks (1, 2, 3...).
    return gr.LinePlot(colors_in_legend=legend, color_map=frames.block_colors(settings["lines"]),
                       x_lim=[1, max(int(lines["k"].max()), 1 + MIN_AXIS_SPAN)])


def plot_settings(settings, part: str | None):
    if settings is None:
        return gr.skip(), gr.skip(), gr.skip()
    return (gr.BarPlot(sort=settings["blocks"]),  # model order on the x axis, not alphabetical
            gr.LinePlot(sort=settings["blocks"], y_lim=[0, 1.1 * max(settings["top"], 1.0)]),
            lines_settings(settings, part))


def build_similarity(uploaded, typed, chosen, ctx: UIContext):
    """Subspace similarity (LoRA paper, section 7.2) between the file above and a second one."""
    gr.Markdown("### Compare with a second LoRA: subspace similarity")
    with gr.Row(elem_classes="sd-align-end"):
        uploaded_b, typed_b, chosen_b = file_inputs(ctx, "-b")
        with gr.Column(scale=1):
            side = gr.Radio(list(SIDES), value="down", label="Side", elem_id="inspect-side",
                            info="down: input directions (the paper's choice); up: output directions.")
            compare = gr.Button("Compare", variant="primary", elem_id="inspect-compare")
    notice = gr.HTML(elem_id="inspect-compare-notice")
    empty = gr.Markdown(EMPTY_COMPARE, elem_id="inspect-compare-empty", elem_classes="sd-muted")
    with gr.Column(visible=False, elem_id="inspect-compare-results") as results:
        with gr.Row():
            image = gr.Image(None, type="pil", format="png", label="phi(i, j): rows i = the file above, columns j = "
                             "the second file", height=360, interactive=False, elem_id="inspect-heatmap", scale=2)
            with gr.Column(scale=3):
                explained = gr.Markdown()
                module = gr.Dropdown([], label="Heatmap of", elem_id="inspect-module",
                                     info="The mean over modules, or one module.")
        table = gr.Dataframe(interactive=False, max_height=420, elem_id="inspect-similarity",
                             column_widths=["46%", "16%", "6%", "10%", "10%", "12%"])
    report = gr.State(None)

    @guarded(6)
    def on_compare(file_a, path_a, choice_a, file_b, path_b, choice_b, which):
        first = chosen_file(file_a, path_a, choice_a)
        second = chosen_file(file_b, path_b, choice_b, "second LoRA to compare with")
        result = subspace_similarity(read_lora(first)[0], read_lora(second)[0], which or "down",
                                     first.name, second.name)
        return (ok(f"{first.name} vs {second.name}: {len(result['modules'])} common modules."),
                frames.heatmap(result["mean"]), frames.similarity_markdown(result, first.name, second.name),
                gr.Dropdown(frames.module_choices(result), value=frames.MEAN), frames.similarity_frame(result), result)

    compare.click(on_compare, [uploaded, typed, chosen, uploaded_b, typed_b, chosen_b, side],
                  [notice, image, explained, module, table, report],
                  api_name="inspect_similarity", api_visibility="undocumented").then(
        shown_when_done, report, [results, empty], api_visibility="private", show_progress="hidden")
    module.input(lambda result, name: gr.skip() if result is None else frames.module_heatmap(result, name),
                 [report, module], image, api_visibility="private")
    return chosen_b

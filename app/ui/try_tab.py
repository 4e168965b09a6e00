"""Try tab: the same prompt and seed without and with a LoRA, side by side, at any weight."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import gradio as gr

from app.security import user_file
from app.ui.context import UIContext
from app.ui.notices import guarded, ok
from networks.errors import SdloraError
from trainer.demo.demo_data import TRIGGER
from trainer.run.sampling import SAMPLERS


@dataclass(frozen=True)
class LoraList:
    """A tab's LoRA list refresh, for the page's events (page load, opening the tab) to call: its inputs
    and outputs are `components`."""
    refresh: Callable
    components: list


def lora_choices(ctx: UIContext) -> list[tuple[str, str]]:
    """(label, path) of every final file and checkpoint in the runs folder, newest run first."""
    choices = []
    for run in ctx.runs.list_runs():
        if run.final_file is not None:
            choices.append((f"{run.folder} / {run.final_file.name}", str(run.final_file)))
        for checkpoint in reversed(ctx.runs.checkpoints(run.path)):
            choices.append((f"{run.folder} / {checkpoint.name}", str(checkpoint)))
    return choices


def refreshed_choice(ctx: UIContext, current: str | None,
                     newest_before: str | None) -> tuple[list, str | None, str | None]:
    """(choices, value, newest file) for the LoRA list made again: a file newer than any the list had
    before (a run just finished) is chosen, since that is what a user opens the tab to try; otherwise the
    file the user picked stays chosen while it exists."""
    choices = lora_choices(ctx)
    paths = [path for _, path in choices]
    newest = paths[0] if paths else None
    keep = current in paths and newest == newest_before
    return choices, current if keep else newest, newest


def check_settings(steps, guidance, size, weight) -> None:
    if steps is None or not 1 <= int(steps) <= 150:
        raise SdloraError(f"Steps must be between 1 and 150 (got {steps}).")
    if guidance is None or not 0 <= float(guidance) <= 30:
        raise SdloraError(f"Guidance must be between 0 and 30 (got {guidance}).")
    if size is None or (int(size) and (int(size) < 64 or int(size) % 8)):
        raise SdloraError(f"Size must be 0 (the model's own) or a multiple of 8 of at least 64 (got {size}).")
    if weight is None or not -4 <= float(weight) <= 4:
        raise SdloraError(f"The LoRA weight must be between -4 and 4 (got {weight}).")


def build(ctx: UIContext):
    with gr.Row():
        with gr.Column(scale=2, elem_classes="sd-panel"):
            model = gr.Textbox("demo:shapes", label="Base model", elem_id="try-model",
                               info="Diffusers folder, .safetensors/.ckpt, or demo:shapes.")
            with gr.Row(elem_classes="sd-align-end"):
                lora = gr.Dropdown(lora_choices(ctx), label="LoRA from a run", scale=4, elem_id="try-lora",
                                   allow_custom_value=False)
                newest_listed = gr.State(lora.value)  # a dropdown starts on its first (newest) file
                refresh = gr.Button("Refresh", size="sm", scale=1, min_width=90)
            lora_path = gr.Textbox(label="...or a LoRA file path", placeholder="/path/to/lora.safetensors",
                                   elem_id="try-lora-path", info="Used instead of the list when filled.")
            prompt = gr.Textbox(f"{TRIGGER}, a teal triangle", label="Prompt", lines=2, elem_id="try-prompt")
            negative = gr.Textbox(label="Negative prompt")
            with gr.Row():
                seed = gr.Number(1, label="Seed", precision=0, min_width=90)
                steps = gr.Number(20, label="Steps", precision=0, min_width=90)
                guidance = gr.Number(5.0, label="Guidance", step=0.5, min_width=90)
            with gr.Row():
                sampler = gr.Dropdown(list(SAMPLERS), value="ddim", label="Sampler", min_width=120)
                size = gr.Number(0, label="Size (px)", precision=0, info="0 = the model's own.", min_width=120)
            weight = gr.Slider(-1.0, 2.0, value=1.0, step=0.05, label="LoRA weight", elem_id="try-weight")
            generate = gr.Button("Generate", variant="primary", elem_id="try-generate")
            message = gr.HTML(elem_id="try-notice")
        with gr.Column(scale=3):
            with gr.Row():
                without = gr.Image(label="Without LoRA", interactive=False, height=360, elem_id="try-without",
                                   elem_classes="sd-preview")
                with_lora = gr.Image(label="With LoRA", interactive=False, height=360, elem_id="try-with",
                                     elem_classes="sd-preview")
            timing = gr.Markdown(elem_classes="sd-muted")

    @guarded(4)
    def on_generate(model_spec, chosen, typed, prompt_text, negative_text, seed_value, steps_value, guidance_value,
                    size_value, sampler_name, weight_value):
        if not (prompt_text or "").strip():
            raise SdloraError("Enter a prompt.")
        check_settings(steps_value, guidance_value, size_value, weight_value)
        source = (typed or "").strip() or chosen
        path = user_file(source, "LoRA file", suffixes=(".safetensors",)) if source else None
        result = ctx.preview.compare(model_spec, path, prompt_text, negative_text, int(seed_value or 0),
                                     int(steps_value), float(weight_value), float(guidance_value),
                                     int(size_value or 0), sampler_name,
                                     training=ctx.runs.newest_active() is not None)
        loaded = f"loaded in {result.load_seconds:.1f} s, " if result.load_seconds > 0.05 else ""
        if path is None:
            return (ok("The base model alone; choose a LoRA to see it beside the same image with the LoRA."),
                    result.without, None, f"{loaded}1 image in {result.render_seconds:.1f} s")
        return (ok(f"{path.name} at weight {float(weight_value):g}."), result.without, result.with_lora,
                f"{loaded}2 images in {result.render_seconds:.1f} s")

    def refresh_list(current, newest_before):
        choices, value, newest = refreshed_choice(ctx, current, newest_before)
        return gr.Dropdown(choices=choices, value=value), newest

    refresh.click(refresh_list, [lora, newest_listed], [lora, newest_listed], api_visibility="private")
    generate.click(on_generate, [model, lora, lora_path, prompt, negative, seed, steps, guidance, size, sampler, weight],
                   [message, without, with_lora, timing], api_name="try_lora")
    return LoraList(refresh_list, [lora, newest_listed])

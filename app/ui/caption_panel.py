"""Dataset tab: caption the opened folder's images automatically (BLIP, Florence-2 or a WD14 tagger), the
images that have no caption or all of them, with a progress bar; the gallery shows the new captions after.

The run is trainer/captioning's, the same as `sdlora caption`, so both write the same files.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from app.ui.notices import guarded, ok
from networks.errors import SdloraError
from trainer.captioning.settings import GENERAL_THRESHOLD
from trainer.captioning.sources import KINDS

MISSING, ALL = "Images without a caption", "All images (replaces their captions)"
CHOICES = [("BLIP: a short sentence", "blip"), ("Florence-2: a detailed sentence", "florence2"),
           ("WD14 tagger: booru tags", "wd14")]


@dataclass
class CaptionPanel:
    kind: gr.Dropdown
    model_id: gr.Textbox
    which: gr.Radio
    prefix: gr.Textbox
    threshold: gr.Slider
    button: gr.Button
    status: gr.HTML  # where the progress bar runs, then the summary


def build() -> CaptionPanel:
    """The controls, placed where this is called; `wire` connects them once the tab's outputs exist."""
    with gr.Accordion("Caption automatically", open=False, elem_id="autocaption"):
        kind = gr.Dropdown(CHOICES, value="blip", label="Captioner", elem_id="autocaption-kind")
        model_id = gr.Textbox(label="Model id or folder", placeholder=KINDS["blip"].default_id,
                              elem_id="autocaption-model",
                              info="Empty: the default shown. Offline: `hf download ID --local-dir DIR` "
                                   "elsewhere, copy DIR here and enter it.")
        which = gr.Radio([MISSING, ALL], value=MISSING, label="Caption", elem_id="autocaption-which")
        with gr.Row(elem_classes="sd-align-end"):
            prefix = gr.Textbox(label="Prefix / trigger word", placeholder="mystyle", scale=3,
                                elem_id="autocaption-prefix")
            threshold = gr.Slider(0.05, 1.0, value=GENERAL_THRESHOLD, step=0.05, label="Tag threshold", scale=2,
                                  visible=False, elem_id="autocaption-threshold")
        button = gr.Button("Caption images", variant="primary", elem_id="autocaption-run")
        status = gr.HTML(_status(""), elem_id="autocaption-status")
    return CaptionPanel(kind, model_id, which, prefix, threshold, button, status)


def wire(panel: CaptionPanel, state: gr.State, resolution: gr.Number, outputs: list,
         refresh: Callable[[dict, int, str], tuple]) -> None:
    """`refresh(saved dataset, resolution, note)` gives `outputs`' values: the tab re-scanned, with the note."""
    from trainer.captioning.folder import FolderRequest, caption_folder
    from trainer.captioning.settings import CaptionerSettings

    def on_kind(kind):
        return gr.Textbox(placeholder=KINDS[kind].default_id), gr.Slider(visible=kind == "wd14")

    @guarded(len(outputs) + 1)
    def run(saved, res, kind, model_id, which, prefix, threshold, progress=gr.Progress()):
        if not saved:
            raise SdloraError("Open a dataset folder first.")
        settings = CaptionerSettings(kind=kind, model_id=model_id or "", threshold=float(threshold))
        request = FolderRequest(Path(saved["folder"]), overwrite=which == ALL, prefix=prefix or "",
                                extension=saved["extension"])

        def show(event):
            if event.kind == "loading":
                progress(0.0, desc=f"Loading the {KINDS[kind].label}")
            elif event.kind == "captioned":
                progress((event.done, event.total), desc=f"Captioned {event.image}", unit="images")

        note = caption_folder(request, settings, on_event=show).sentence(kept_hint=f" (choose '{ALL}' to replace them)")
        return (*refresh(saved, res, note), _status(ok(note)))

    panel.kind.change(on_kind, [panel.kind], [panel.model_id, panel.threshold], api_visibility="private")
    panel.button.click(run, [state, resolution, panel.kind, panel.model_id, panel.which, panel.prefix,
                             panel.threshold], [*outputs, panel.status], show_progress_on=[panel.status],
                       api_name="captions_auto", api_visibility="undocumented")


def _status(content: str) -> str:
    # Room for gradio's progress bar, which overlays the block and would be clipped on an empty one.
    return f'<div style="min-height: 64px">{content}</div>'

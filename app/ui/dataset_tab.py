"""Dataset tab: open a folder, see every image with its caption, edit captions, check the stats.

The scan is the trainer's own (trainer/data/dataset.py) with the trainer's own options (`DatasetSection.options()`)
built from the Train tab's dataset settings, so what this tab reports (usable images, skipped files and why,
buckets) is exactly what the Train tab's Check and the training will use.
"""
from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
import pandas as pd

from app.security import new_folder, user_folder
from app.ui import caption_panel
from app.ui.caption_files import add_trigger_everywhere, read_caption, replace_everywhere, write_caption
from app.ui.context import UIContext
from app.ui.notices import guarded, notice, ok
from app.ui.thumbnails import PREVIEW_SIDE, thumbnail
from networks.errors import SdloraError
from trainer.config import ConfigError, TrainConfig, config_from_dict
from trainer.data.dataset import DatasetReport, Item, scan_folder
from trainer.demo.demo_data import make_demo_dataset

GALLERY_LIMIT = 500  # thumbnails shown; stats always cover the whole folder
LISTED_PROBLEMS = 20


@dataclass
class Scan:
    folder: Path
    items: list[Item]
    report: DatasetReport
    extension: str
    settings: dict  # the dataset settings (config keys of [dataset], but its path) the scan used

    @property
    def images(self) -> list[Path]:
        return [item.path for item in self.items]


def scan(folder_text: str, resolution: int | float | None = None, settings: dict | None = None) -> Scan:
    """The folder as training would read it with the dataset `settings` (the Train tab's; None: the
    defaults), at `resolution` when one is given."""
    folder = user_folder(folder_text, "dataset folder")
    try:
        cfg = dataset_config(str(folder), resolution, settings)
    except ConfigError as error:
        raise SdloraError(str(error).replace("dataset.resolution", "The bucket resolution", 1)) from None
    options = cfg.dataset.options()
    items, report = scan_folder(options)
    return Scan(folder, items, report, options.caption_suffix, cfg.dataset.model_dump(mode="json", exclude={"path"}))


def dataset_config(folder: str, resolution: int | float | None, settings: dict | None) -> TrainConfig:
    """A config whose [dataset] is `settings` for `folder`, at `resolution` when one is given."""
    data = {key: value for key, value in (settings or {}).items() if key != "path"}
    if resolution:
        data["resolution"] = int(resolution)
    return config_from_dict({"dataset": {**data, "path": folder}})


def buckets_line(settings: dict) -> str:
    """How the buckets were made, in the Train tab's words."""
    low, high = settings.get("min_bucket_side"), settings.get("max_bucket_side")
    sides = f"sides {low or 'auto'} to {high or 'auto'} px" if settings.get("enable_buckets", True) else "no buckets"
    upscale = "; small images are not upscaled" if settings.get("bucket_no_upscale") else ""
    return (f"- Buckets with the Train tab's settings: resolution {settings.get('resolution')} px, {sides}, "
            f"step {settings.get('bucket_step')}{upscale}")


def gallery_entries(images: list[Path], extension: str) -> tuple[list[tuple[str, str]], list[str]]:
    """(thumbnail, caption) pairs and the images they show, in gallery order (a click gives an index).

    Thumbnails are cached, so this is cheap after the first call.
    """
    entries, shown = [], []
    for image in images[:GALLERY_LIMIT]:
        thumb = thumbnail(image)
        if thumb is not None:
            caption = read_caption(image, extension)
            entries.append((str(thumb), _short(caption) if caption else "(no caption)"))
            shown.append(str(image))
    return entries, shown


def stats_markdown(result: Scan) -> str:
    report, sizes = result.report, [item.size for item in result.items]
    (common, times), = Counter(sizes).most_common(1)
    smallest, largest = min(sizes, key=lambda s: s[0] * s[1]), max(sizes, key=lambda s: s[0] * s[1])
    captioned = report.usable - len(report.captions_missing)
    lines = [
        f"**{report.usable} usable images** of {report.images_found} in `{result.folder}` "
        f"· {report.samples_per_epoch} samples per epoch",
        f"- Sizes: {_size(smallest)} to {_size(largest)}; most common {_size(common)} ({times}x)",
        f"- Captions: {captioned} of {report.usable} have a `{result.extension}` file",
        f"- Unreadable files: {len(report.skipped) or 'none'}",
        buckets_line(result.settings),
    ]
    if len(result.items) > GALLERY_LIMIT:
        lines.append(f"- The gallery shows the first {GALLERY_LIMIT} images.")
    return "\n".join(lines)


def problems_markdown(report: DatasetReport) -> str:
    lines = [f"- Unreadable: `{s.name}`: {s.reason}" for s in report.skipped[:LISTED_PROBLEMS]]
    lines += [f"- Ignored folder `{s.name}`: {s.reason}" for s in report.ignored_folders[:LISTED_PROBLEMS]]
    missing = report.captions_missing
    if missing:
        shown = ", ".join(f"`{name}`" for name in missing[:LISTED_PROBLEMS])
        more = f" and {len(missing) - LISTED_PROBLEMS} more" if len(missing) > LISTED_PROBLEMS else ""
        lines.append(f"- No caption: {shown}{more}")
    return "\n".join(["#### Problems", *lines]) if lines else "No problems found."


def bucket_frame(report: DatasetReport) -> pd.DataFrame:
    rows = sorted(report.bucket_counts.items(), key=lambda kv: kv[0][0] / kv[0][1])
    return pd.DataFrame({"bucket": [f"{w}x{h}" for (w, h), _ in rows], "images": [n for _, n in rows]})


def create_demo(folder_text: str, count: int | float | None, ctx: UIContext) -> Path:
    ctx.datasets_dir.mkdir(parents=True, exist_ok=True)  # the default home; other parents must exist
    folder = new_folder(folder_text or ctx.free_demo_folder(), "demo dataset folder")
    count = int(count or 12)
    if not 1 <= count <= 200:
        raise SdloraError(f"Make between 1 and 200 demo images (got {count}).")
    make_demo_dataset(folder, count=count)
    return folder


def _short(text: str, limit: int = 90) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _size(size: tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]}"


DEMO_INTRO = ("### No images yet? Create the demo dataset\n"
              "Twelve generated pictures in one style, with captions: the `demo` preset (Train tab) teaches it to "
              "the built-in demo:shapes model in a few minutes on a CPU.")


@dataclass
class DatasetTab:
    folder: gr.Textbox
    state: gr.State  # {"folder", "images", "shown", "extension"} of the last dataset opened successfully
    opened: list  # events after which `state` may hold a newly opened dataset
    resolution: gr.Number  # mirrors the Train tab's Resolution
    settings: gr.State  # the Train tab's dataset settings
    follow_settings: object  # (saved, resolution, settings) -> view outputs: a rescan when the settings changed
    view_outputs: list


def build(ctx: UIContext, start_resolution: int) -> DatasetTab:
    """`start_resolution`: the Train form's resolution as the page opens."""
    state = gr.State(None)  # {"folder", "images", "extension"} of the opened dataset
    settings = gr.State(None)  # the Train tab's dataset settings (set as the page loads); None: the defaults
    with gr.Row(elem_classes="sd-align-end"):
        folder = gr.Textbox(label="Dataset folder", placeholder="/path/to/images", scale=5, elem_id="dataset-folder",
                            info="Images with a .txt caption beside each (cat.png + cat.txt); kohya "
                                 "'10_name' sub-folders work too.")
        resolution = gr.Number(start_resolution, label="Bucket resolution", precision=0, scale=1,
                               min_width=120, elem_id="dataset-resolution",
                               info="The Train tab's Resolution.")
        open_button = gr.Button("Open", variant="primary", scale=1, min_width=100, elem_id="dataset-open")
    # Open on the first screen, not folded away: a newcomer without images starts here.
    with gr.Group(elem_id="demo-dataset"):
        gr.Markdown(DEMO_INTRO, elem_id="demo-intro", padding=True)
        with gr.Row(elem_classes="sd-align-end"):
            demo_folder = gr.Textbox(str(ctx.free_demo_folder()), label="New folder", scale=5,
                                     elem_id="demo-folder")
            demo_count = gr.Number(12, label="Images", precision=0, scale=1, min_width=100)
            demo_button = gr.Button("Create demo dataset", variant="primary", scale=1, min_width=160,
                                    elem_id="demo-create")
    message = gr.HTML(elem_id="dataset-notice")
    with gr.Row():
        with gr.Column(scale=3):
            gallery = gr.Gallery(label="Images", columns=6, height=460, object_fit="cover", allow_preview=False,
                                 elem_id="dataset-gallery")
        with gr.Column(scale=2):
            preview = gr.Image(label="Selected image", height=240, interactive=False, elem_id="caption-preview")
            editing = gr.State(None)  # the image whose caption the editor holds
            caption = gr.Textbox(label="Caption", lines=3, placeholder="Click an image to edit its caption.",
                                 elem_id="caption-text")
            save_caption = gr.Button("Save caption", elem_id="caption-save")
            with gr.Accordion("Edit all captions", open=False):
                with gr.Row(elem_classes="sd-align-end"):
                    trigger = gr.Textbox(label="Trigger word", placeholder="mystyle", scale=3)
                    add_trigger = gr.Button("Add to all", scale=1, min_width=110)
                with gr.Row(elem_classes="sd-align-end"):
                    find = gr.Textbox(label="Find", scale=2)
                    replace = gr.Textbox(label="Replace with", scale=2)
                    replace_button = gr.Button("Replace all", scale=1, min_width=110)
            captioner = caption_panel.build()
    with gr.Row():
        stats = gr.Markdown(elem_id="dataset-stats")
        buckets = gr.BarPlot(None, x="bucket", y="images", title="Images per bucket (w x h)", height=220,
                             elem_id="bucket-plot", sort=None, y_lim=[0, None], visible=False, y_axis_format="d")
    problems = gr.Markdown()

    view_outputs = [message, gallery, stats, buckets, problems, state]

    def view(result: Scan, note: str) -> tuple:
        entries, shown = gallery_entries(result.images, result.extension)
        saved = {"folder": str(result.folder), "images": [str(p) for p in result.images], "shown": shown,
                 "extension": result.extension, "settings": result.settings, "scan": time.time_ns()}  # a new scan is a change: the editor follows
        counts = bucket_frame(result.report)
        # Whole-number ticks: a count axis under 5 images high would get 0.5 steps from the plot library.
        histogram = gr.BarPlot(counts, visible=True, y_lim=[0, max([5, *counts["images"]])])
        return (ok(note), entries, stats_markdown(result), histogram,
                problems_markdown(result.report), saved)

    @guarded(len(view_outputs) + 1)
    def on_open(folder_text, res, train_settings):
        result = scan(folder_text, res, train_settings)
        return (*view(result, f"Opened {result.folder.name}: {result.report.usable} images."), str(result.folder))

    @guarded(len(view_outputs) + 2)
    def on_create(target, count, res, train_settings):
        created = create_demo(target, count, ctx)
        result = scan(str(created), res, train_settings)
        return (*view(result, f"Created the demo dataset in {created}."), str(created), str(ctx.free_demo_folder()))

    def _image(saved, image) -> Path:
        if not saved or image not in saved["shown"]:
            raise SdloraError("Click an image first.")
        return Path(image)

    @guarded(4)
    def on_select(saved, evt: gr.SelectData):
        if not saved or not 0 <= evt.index < len(saved["shown"]):
            raise SdloraError("Click an image first.")
        image = Path(saved["shown"][evt.index])
        return notice(), str(thumbnail(image, PREVIEW_SIDE) or ""), read_caption(image, saved["extension"]) or "", \
            str(image)

    def follow(saved, image):
        """After any (re)scan: the editor shows the caption as it is on disk now, or empties when its image
        is not in the dataset shown (another folder), so Save never writes stale text."""
        if saved and image in saved["shown"]:
            return gr.skip(), read_caption(Path(image), saved["extension"]) or "", image
        return None, "", None

    @guarded(2)
    def on_save(saved, image, text):
        image = _image(saved, image)
        write_caption(image, text, Path(saved["folder"]), saved["extension"])
        entries, _ = gallery_entries([Path(p) for p in saved["shown"]], saved["extension"])
        shown_at = saved["shown"].index(str(image))
        return ok(f"Saved the caption of {image.name}."), gr.Gallery(entries, selected_index=shown_at)

    def bulk(action):
        @guarded(len(view_outputs))
        def run(saved, res, *args):
            if not saved:
                raise SdloraError("Open a dataset folder first.")
            folder_path = Path(saved["folder"])
            changed = action([Path(p) for p in saved["images"]], *args, folder_path, saved["extension"])
            return view(scan(saved["folder"], res, saved["settings"]), f"Changed {changed} caption file(s).")
        return run

    opened = [
        open_button.click(on_open, [folder, resolution, settings], [*view_outputs, folder], api_name="dataset_open",
                          api_visibility="undocumented"),
        folder.submit(on_open, [folder, resolution, settings], [*view_outputs, folder], api_visibility="private"),
        demo_button.click(on_create, [demo_folder, demo_count, resolution, settings], [*view_outputs, folder, demo_folder],
                          api_name="dataset_create_demo", api_visibility="undocumented"),
    ]
    gallery.select(on_select, [state], [message, preview, caption, editing], api_visibility="private")
    state.change(follow, [state, editing], [preview, caption, editing], api_visibility="private",
                 show_progress="hidden")
    save_caption.click(on_save, [state, editing, caption], [message, gallery], api_name="caption_save",
                       api_visibility="undocumented")
    add_trigger.click(bulk(add_trigger_everywhere), [state, resolution, trigger], view_outputs,
                      api_name="captions_add_trigger", api_visibility="undocumented")
    replace_button.click(bulk(replace_everywhere), [state, resolution, find, replace], view_outputs,
                         api_name="captions_replace", api_visibility="undocumented")
    caption_panel.wire(captioner, state, resolution, view_outputs,
                       lambda saved, res, note: view(scan(saved["folder"], res, saved["settings"]), note))
    @guarded(len(view_outputs))
    def follow_settings(saved, res, train_settings):
        if not saved or _settings_of(saved["folder"], res, train_settings) == saved.get("settings"):
            return (gr.skip(),) * len(view_outputs)
        return view(scan(saved["folder"], res, train_settings), "Buckets updated to the Train tab's settings.")

    return DatasetTab(folder, state, opened, resolution, settings, follow_settings, view_outputs)


def _settings_of(folder: str, resolution, settings: dict | None) -> dict | None:
    """The dataset settings a scan of `folder` would use now (None when they do not validate)."""
    try:
        return dataset_config(folder, resolution, settings).dataset.model_dump(mode="json", exclude={"path"})
    except SdloraError:
        return None


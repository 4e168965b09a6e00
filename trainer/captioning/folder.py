"""Captioning a dataset folder: the images training would use (trainer/data/dataset.py's scan), those without a
caption or all of them, one atomic caption file each, with progress events for the CLI and the UI."""
from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from networks.atomic import write_text_atomic
from trainer.captioning.settings import CaptionerSettings
from trainer.captioning.sources import captioner_kind, resolve
from trainer.data.captions import join_tags, split_tags
from trainer.data.dataset import DatasetOptions, scan_folder
from trainer.data.images import UnreadableImageError, load_image


@dataclass(frozen=True)
class CaptionEvent:
    kind: str  # "loading" (the model), "started", "captioned" (one image), "finished"
    done: int = 0  # images captioned so far
    total: int = 0  # images this run captions
    image: str = ""  # relative to the folder
    caption: str = ""


@dataclass
class CaptionSummary:
    written: list[str] = field(default_factory=list)  # images given a caption file
    kept: list[str] = field(default_factory=list)  # images whose caption was left alone
    empty: list[str] = field(default_factory=list)  # the captioner said nothing: no file written
    unreadable: list[str] = field(default_factory=list)

    def sentence(self, kept_hint: str = "") -> str:
        """One sentence for the user; `kept_hint` follows the kept count (how to replace them)."""
        parts = [f"wrote {len(self.written)} caption file(s)"]
        if self.kept:
            parts.append(f"kept the {len(self.kept)} existing caption(s){kept_hint}")
        if self.empty:
            parts.append(f"{len(self.empty)} image(s) got an empty caption and were left without one")
        if self.unreadable:
            parts.append(f"{len(self.unreadable)} unreadable image(s) were skipped")
        text = "; ".join(parts)
        return text[0].upper() + text[1:] + "."


@dataclass(frozen=True)
class FolderRequest:
    folder: Path
    overwrite: bool = False  # caption every image; otherwise only those without a caption file
    prefix: str = ""  # tags put first, e.g. the trigger word ("mystyle" or "mystyle, 1girl")
    extension: str = ".txt"


def caption_folder(request: FolderRequest, settings: CaptionerSettings,
                   on_event: Callable[[CaptionEvent], None] = lambda event: None) -> CaptionSummary:
    from trainer.captioning import load_captioner

    resolve(captioner_kind(settings.kind), settings.model_id)  # a mistyped model path shows before any work
    folder = Path(request.folder)
    options = DatasetOptions(folder, caption_extension=request.extension)
    items, report = scan_folder(options)
    missing = set(report.captions_missing)
    summary = CaptionSummary(unreadable=[s.name for s in report.skipped])
    todo = []
    for item in items:
        name = item.path.relative_to(folder).as_posix()
        if request.overwrite or name in missing:
            todo.append(item.path)
        else:
            summary.kept.append(name)
    if not todo:  # no model to load
        on_event(CaptionEvent("finished"))
        return summary
    on_event(CaptionEvent("loading", total=len(todo)))
    captioner = load_captioner(settings)
    on_event(CaptionEvent("started", total=len(todo)))
    for start in range(0, len(todo), settings.batch_size):
        batch, images = [], []
        for path in todo[start:start + settings.batch_size]:
            try:
                images.append(load_image(path).rgb)
                batch.append(path)
            except UnreadableImageError:  # changed since the scan
                summary.unreadable.append(path.relative_to(folder).as_posix())
        captions = captioner.caption(images) if images else []
        for path, caption in zip(batch, captions):
            name, text = path.relative_to(folder).as_posix(), ""
            if caption.strip():
                text = with_prefix(caption, request.prefix)
                write_text_atomic(path.with_suffix(options.caption_suffix), text + "\n")
                summary.written.append(name)
            else:
                summary.empty.append(name)
            done = len(summary.written) + len(summary.empty)
            on_event(CaptionEvent("captioned", done, len(todo), name, text))
    del captioner
    _release_gpu_memory()
    on_event(CaptionEvent("finished", len(summary.written) + len(summary.empty), len(todo)))
    return summary


def _release_gpu_memory() -> None:
    """The UI process lives on after a caption run: hand the captioner's GPU memory back for training runs
    and the Try tab. (torch is only asked if a captioner already imported it.)"""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def with_prefix(caption: str, prefix: str) -> str:
    """The prefix's tags first, then the caption without repeating them."""
    head = split_tags(prefix)
    if not head:
        return caption.strip()
    return join_tags(head + [tag for tag in split_tags(caption) if tag not in head])


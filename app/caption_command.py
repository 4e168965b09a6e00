"""`sdlora caption DIR --model blip|florence2|wd14`: write a caption file beside every image that has none
(or, with --overwrite, beside every image). A thin body over trainer.captioning; one line per image as it
is captioned, then one summary sentence."""

from __future__ import annotations

import argparse
import sys

from trainer.captioning.settings import CHARACTER_THRESHOLD, FLORENCE_TASKS, GENERAL_THRESHOLD
from trainer.captioning.sources import KINDS


def add_caption_subcommand(subparsers) -> argparse.ArgumentParser:
    """Register `caption` on the top-level subparsers."""
    defaults = ", ".join(f"{kind.name}: {kind.default_id}" for kind in KINDS.values())
    caption = subparsers.add_parser("caption", help="caption the images of a folder (BLIP, Florence-2, WD14 tagger)")
    caption.add_argument("dir", help="the image folder (kohya '10_name' sub-folders included)")
    caption.add_argument("--model", choices=tuple(KINDS), default="blip",
                         help="blip: a short sentence; florence2: a detailed one; wd14: booru tags (default blip)")
    caption.add_argument("--model-id", default="", metavar="ID_OR_FOLDER",
                         help=f"a Hugging Face id or a local folder (defaults: {defaults})")
    caption.add_argument("--overwrite", action="store_true",
                         help="caption every image, replacing existing captions (default: only images without one)")
    caption.add_argument("--prefix", default="", metavar="TAGS", help="tags put first in every caption, e.g. the trigger word")
    caption.add_argument("--threshold", type=float, default=GENERAL_THRESHOLD, metavar="P",
                         help=f"wd14: write general tags at or above this probability (default {GENERAL_THRESHOLD})")
    caption.add_argument("--character-threshold", type=float, default=CHARACTER_THRESHOLD, metavar="P",
                         help=f"wd14: the same for character tags (default {CHARACTER_THRESHOLD})")
    caption.add_argument("--exclude-tags", default="", metavar="TAGS", help="wd14: comma-separated tags never written")
    caption.add_argument("--task", choices=tuple(FLORENCE_TASKS), default="detailed",
                         help="florence2: caption, detailed or more-detailed (default detailed)")
    caption.add_argument("--max-tokens", type=int, default=0, metavar="N",
                         help="blip/florence2: longest caption in tokens (default blip 75, florence2 256)")
    caption.add_argument("--batch-size", type=int, default=1, metavar="N", help="images per model call (default 1)")
    caption.add_argument("--caption-extension", default=".txt", metavar="EXT", help="default .txt")
    caption.set_defaults(handler=run_caption)
    return caption


def run_caption(args) -> int:
    from transformers.utils import logging as transformers_logging

    from trainer.captioning.folder import FolderRequest, caption_folder
    from trainer.captioning.settings import CaptionerSettings
    from trainer.data.captions import split_tags

    transformers_logging.disable_progress_bar()  # our own line per image is the progress here

    settings = CaptionerSettings(kind=args.model, model_id=args.model_id, max_tokens=args.max_tokens,
                                 florence_task=args.task, threshold=args.threshold,
                                 character_threshold=args.character_threshold,
                                 exclude_tags=tuple(split_tags(args.exclude_tags)), batch_size=args.batch_size)
    request = FolderRequest(args.dir, overwrite=args.overwrite, prefix=args.prefix, extension=args.caption_extension)
    model = args.model_id or KINDS[args.model].default_id

    def show(event) -> None:
        if event.kind == "loading":
            print(f"Loading the {KINDS[args.model].label} {model} for {event.total} image(s)...", file=sys.stderr,
                  flush=True)
        elif event.kind == "captioned":
            print(f"[{event.done}/{event.total}] {event.image}: {event.caption or '(empty: no file written)'}",
                  flush=True)

    summary = caption_folder(request, settings, on_event=show)
    print(summary.sentence(kept_hint=" (--overwrite replaces them)"))
    return 0

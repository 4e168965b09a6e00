"""Captions: which images have one, another extension that would be read instead, kohya's keep-tokens marker
left in the text, and captions longer than the text encoder reads."""

from __future__ import annotations

from functools import lru_cache

from trainer.model.tiny_models import load_clip_tokenizer
from trainer.preflight.context import CheckContext

CAPTION_EXTENSIONS = (".txt", ".caption", ".tags")
KOHYA_KEEP_SEPARATOR = "|||"  # the marker kohya_ss documents and its users write


def check_captions(ctx: CheckContext) -> None:
    dataset, report = ctx.dataset, ctx.report
    if dataset is None:
        return
    found, extension = dataset.report, dataset.options.caption_suffix
    missing = set(found.captions_missing)
    items = [item for item in dataset.items if not item.is_reg]  # reg images usually go by their class word
    others = {ext: sum(1 for item in items if item.path.with_suffix(ext).is_file())
              for ext in CAPTION_EXTENSIONS if ext != extension}
    others = {ext: n for ext, n in others.items() if n}
    with_caption = len(items) - len(missing)
    report.data["captions"] = {"extension": extension, "with_caption": with_caption,
                               "without_caption": sorted(missing), "other_extensions": others}
    report.info.append(f"Captions: {with_caption} of {len(items)} images have a {extension} caption.")
    if with_caption == 0 and others:
        ext, count = max(others.items(), key=lambda kv: kv[1])
        report.warnings.append(f"No image has a {extension} caption, but {count} have {ext} files next to them; "
                               f"use them with --set dataset.caption_extension={ext}.")
    elif with_caption == 0:
        class_words = {item.caption for item in items if item.caption}
        fallback = (f"they train with the folder class word ({', '.join(sorted(class_words)[:3])})"
                    if class_words else "they train with empty captions")
        report.warnings.append(f"None of the {len(items)} images has a caption ({extension}); {fallback}, so "
                               "prompts cannot steer what the LoRA learns: add a caption file next to each image.")
    elif missing:
        shown = ", ".join(sorted(missing)[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        report.warnings.append(f"{len(missing)} of {len(items)} images have no {extension} caption and "
                               f"train with the folder class word or an empty caption: {shown}.")
    marked = [item.path.name for item in dataset.items if KOHYA_KEEP_SEPARATOR in item.caption]
    if marked:  # only left in the text when dataset.keep_tokens_separator is off (or another marker)
        report.warnings.append(f"{len(marked)} caption(s) contain kohya's {KOHYA_KEEP_SEPARATOR} (e.g. {marked[0]}) but "
                               f"dataset.keep_tokens_separator is not {KOHYA_KEEP_SEPARATOR!r}, so the text encoder "
                               f"reads it; add --set dataset.keep_tokens_separator='{KOHYA_KEEP_SEPARATOR}'.")


def check_caption_length(ctx: CheckContext) -> None:
    if ctx.dataset is None:
        return
    items, limit = ctx.dataset.items, ctx.cfg.model.max_token_length
    lengths = {}  # caption -> CLIP tokens (every family's tokenizers share CLIP's BPE)
    for caption in {item.caption for item in items}:
        lengths[caption] = len(_clip_tokenizer()(caption, add_special_tokens=False, verbose=False).input_ids)
    long = [item for item in items if lengths[item.caption] > limit]
    if not long:
        return
    worst = max(long, key=lambda item: lengths[item.caption])
    fits = [n for n in (150, 225) if n > limit and n >= lengths[worst.caption]]
    fix = (f"set model.max_token_length to {fits[0]}" if fits else "shorten them" if limit == 225
           else "set model.max_token_length to 225 and shorten the longest")
    ctx.report.warnings.append(f"{len(long)} caption(s) are longer than the {limit} tokens the text encoder reads "
                               f"(longest: {worst.path.name}, {lengths[worst.caption]} tokens), so their ends are "
                               f"cut off; {fix}.")


@lru_cache(maxsize=1)
def _clip_tokenizer():
    return load_clip_tokenizer()

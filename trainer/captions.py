"""Caption augmentation as pure functions: same caption + same `random.Random` state -> same result.

Captions are comma-separated tags ("sdlorastyle, a red circle, white background"). The first
`keep_tokens` tags (usually the trigger word) are never moved or dropped, as in kohya's trainer.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass

SEPARATOR = ","

# kohya's DreamBooth folder convention: "<repeats>_<class words>", e.g. "10_mystyle" or "5_sks dog".
_KOHYA_FOLDER = re.compile(r"^(\d+)_(.+)$")


@dataclass(frozen=True)
class CaptionOptions:
    shuffle_tags: bool = False
    keep_tokens: int = 0
    caption_dropout: float = 0.0  # probability that a sample trains with the empty caption
    tag_dropout: float = 0.0  # probability that each non-kept tag is left out

    @property
    def varies(self) -> bool:
        """True when a caption can differ between epochs, so text-encoder outputs cannot be cached."""
        return self.shuffle_tags or self.caption_dropout > 0 or self.tag_dropout > 0


def split_tags(caption: str) -> list[str]:
    return [tag.strip() for tag in caption.split(SEPARATOR) if tag.strip()]


def join_tags(tags: list[str]) -> str:
    return f"{SEPARATOR} ".join(tags)


def shuffle_tags(caption: str, keep_tokens: int, rng: random.Random) -> str:
    kept, rest = _split_kept(caption, keep_tokens)
    rng.shuffle(rest)
    return join_tags(kept + rest)


def drop_tags(caption: str, probability: float, keep_tokens: int, rng: random.Random) -> str:
    kept, rest = _split_kept(caption, keep_tokens)
    # One draw per tag even when p is 0, so the rng advances the same way whatever p is.
    survivors = [tag for tag in rest if rng.random() >= probability]
    return join_tags(kept + survivors)


def drop_caption(caption: str, probability: float, rng: random.Random) -> str:
    return "" if rng.random() < probability else caption


def add_trigger(caption: str, trigger: str) -> str:
    """Put `trigger` first unless the caption already has it as a tag."""
    if not trigger or trigger in split_tags(caption):
        return caption
    return join_tags([trigger, *split_tags(caption)])


def augment_caption(caption: str, options: CaptionOptions, rng: random.Random) -> str:
    """Caption dropout, then tag dropout, then shuffle (kohya's order), all from one rng."""
    if not options.varies:
        return caption
    caption = drop_caption(caption, options.caption_dropout, rng)
    if not caption:
        return caption
    if options.tag_dropout > 0:
        caption = drop_tags(caption, options.tag_dropout, options.keep_tokens, rng)
    if options.shuffle_tags:
        caption = shuffle_tags(caption, options.keep_tokens, rng)
    return caption


def parse_kohya_folder(name: str) -> tuple[int, str] | None:
    """"10_mystyle" -> (10, "mystyle"); None when the name does not follow the convention."""
    match = _KOHYA_FOLDER.match(name)
    if not match:
        return None
    return int(match.group(1)), match.group(2).strip()


def _split_kept(caption: str, keep_tokens: int) -> tuple[list[str], list[str]]:
    tags = split_tags(caption)
    return tags[:keep_tokens], tags[keep_tokens:]

"""Caption augmentation as pure functions: same caption + same `random.Random` state -> same result.

Captions are comma-separated tags ("sdlorastyle, a red circle, white background"). The first
`keep_tokens` tags (usually the trigger word) are never moved or dropped, as in kohya's trainer. A caption
may instead mark its fixed parts with kohya's `keep_tokens_separator` ("fixed ||| shuffled ||| fixed end");
the separator is taken out when the dataset is read (`mark_kept`), so the text encoder never sees it and
every caption (cached, validated, counted) is the same plain text; the item keeps how many tags stay put.
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
    keep_tokens_separator: str = ""  # kohya's "|||": marks a caption's fixed head (and tail); "" = off
    dropout_every_n_epochs: int = 0  # every n-th epoch (1-based, as kohya counts) trains with empty captions

    @property
    def varies(self) -> bool:
        """True when a caption can differ between epochs, so text-encoder outputs cannot be cached."""
        return (self.shuffle_tags or self.caption_dropout > 0 or self.tag_dropout > 0
                or self.dropout_every_n_epochs > 0)


def split_tags(caption: str) -> list[str]:
    return [tag.strip() for tag in caption.split(SEPARATOR) if tag.strip()]


def join_tags(tags: list[str]) -> str:
    return f"{SEPARATOR} ".join(tags)


@dataclass(frozen=True)
class Kept:
    """How many leading and trailing tags of a caption never move or drop out."""
    head: int = 0
    tail: int = 0


def mark_kept(caption: str, separator: str) -> tuple[str, Kept | None]:
    """kohya's keep_tokens_separator: "a, b ||| c, d ||| e" -> ("a, b, c, d, e", Kept(2, 1)).

    None when the caption has no separator (then `keep_tokens` applies). A third separator, which kohya
    leaves inside the tail's text, is taken out too: no separator ever reaches the text encoder."""
    if not separator or separator not in caption:
        return caption, None
    head, _, rest = caption.partition(separator)
    middle, _, tail = rest.partition(separator)
    parts = [split_tags(part) for part in (head, middle, tail.replace(separator, SEPARATOR))]
    return join_tags([tag for part in parts for tag in part]), Kept(len(parts[0]), len(parts[2]))


def shuffle_tags(caption: str, kept: Kept | int, rng: random.Random) -> str:
    head, rest, tail = _split_kept(caption, kept)
    rng.shuffle(rest)
    return join_tags(head + rest + tail)


def drop_tags(caption: str, probability: float, kept: Kept | int, rng: random.Random) -> str:
    head, rest, tail = _split_kept(caption, kept)
    # One draw per tag even when p is 0, so the rng advances the same way whatever p is.
    survivors = [tag for tag in rest if rng.random() >= probability]
    return join_tags(head + survivors + tail)


def drop_caption(caption: str, probability: float, rng: random.Random) -> str:
    return "" if rng.random() < probability else caption


def add_trigger(caption: str, trigger: str) -> str:
    """Put `trigger` first unless the caption already has it as a tag."""
    if not trigger or trigger in split_tags(caption):
        return caption
    return join_tags([trigger, *split_tags(caption)])


def augment_caption(caption: str, options: CaptionOptions, rng: random.Random, kept: Kept | None = None,
                    epoch: int = 0) -> str:
    """Caption dropout, then tag dropout, then shuffle (kohya's order), all from one rng. `kept` is the
    caption's own fixed head/tail (from `mark_kept`); without one the first `keep_tokens` tags stay.
    `epoch` counts from 0."""
    if not options.varies:
        return caption
    every = options.dropout_every_n_epochs
    if every and (epoch + 1) % every == 0:
        return ""
    kept = Kept(head=options.keep_tokens) if kept is None else kept
    caption = drop_caption(caption, options.caption_dropout, rng)
    if not caption:
        return caption
    if options.tag_dropout > 0:
        caption = drop_tags(caption, options.tag_dropout, kept, rng)
    if options.shuffle_tags:
        caption = shuffle_tags(caption, kept, rng)
    return caption


def parse_kohya_folder(name: str) -> tuple[int, str] | None:
    """"10_mystyle" -> (10, "mystyle"); None when the name does not follow the convention."""
    match = _KOHYA_FOLDER.match(name)
    if not match:
        return None
    return int(match.group(1)), match.group(2).strip()


def _split_kept(caption: str, kept: Kept | int) -> tuple[list[str], list[str], list[str]]:
    """(fixed head, movable middle, fixed tail); an int is `keep_tokens` (a head only)."""
    kept = Kept(head=kept) if isinstance(kept, int) else kept
    tags = split_tags(caption)
    head = tags[:kept.head]
    tail_start = max(len(head), len(tags) - kept.tail)
    return head, tags[len(head):tail_start], tags[tail_start:]

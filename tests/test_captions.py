"""Caption augmentation: pure functions of (caption, options, rng), kept tokens never touched."""
import random
from collections import Counter

import pytest

from trainer.data.captions import (
    CaptionOptions,
    Kept,
    add_trigger,
    augment_caption,
    drop_caption,
    drop_tags,
    join_tags,
    mark_kept,
    parse_kohya_folder,
    shuffle_tags,
    split_tags,
)

CAPTION = "sks, red circle, blue square, cream background, flat, outline"


@pytest.mark.parametrize(
    "caption, tags",
    [
        ("a, b, c", ["a", "b", "c"]),
        ("  a ,b,,  c  ,", ["a", "b", "c"]),
        ("one sentence only", ["one sentence only"]),
        ("", []),
    ],
)
def test_split_tags(caption, tags):
    assert split_tags(caption) == tags


@pytest.mark.parametrize("keep_tokens", [0, 1, 2, 6, 10])
def test_shuffle_keeps_first_tags_and_the_tag_set(keep_tokens):
    tags = split_tags(CAPTION)
    orders = set()
    for seed in range(30):
        shuffled = split_tags(shuffle_tags(CAPTION, keep_tokens, random.Random(seed)))
        assert shuffled[:keep_tokens] == tags[:keep_tokens]
        assert Counter(shuffled) == Counter(tags)
        orders.add(tuple(shuffled))
    movable = max(0, len(tags) - keep_tokens)
    assert (len(orders) > 1) == (movable > 1)


def test_shuffle_is_deterministic_for_a_given_rng_state():
    assert shuffle_tags(CAPTION, 1, random.Random(7)) == shuffle_tags(CAPTION, 1, random.Random(7))


@pytest.mark.parametrize(
    "probability, keep_tokens, expected",
    [
        (0.0, 0, CAPTION),
        (1.0, 0, ""),
        (1.0, 1, "sks"),
        (1.0, 2, "sks, red circle"),
        (1.0, 99, CAPTION),
    ],
)
def test_tag_dropout_edges(probability, keep_tokens, expected):
    assert drop_tags(CAPTION, probability, keep_tokens, random.Random(0)) == expected


def test_tag_dropout_rate_matches_probability():
    caption = join_tags([f"t{i}" for i in range(2000)])
    kept = split_tags(drop_tags(caption, 0.3, 0, random.Random(1)))
    assert 1300 < len(kept) < 1500  # 70 % of 2000, within ~5 sigma
    assert kept == sorted(kept, key=lambda t: int(t[1:]))  # dropout alone never reorders


@pytest.mark.parametrize("probability, expected", [(0.0, CAPTION), (1.0, "")])
def test_caption_dropout_edges(probability, expected):
    assert drop_caption(CAPTION, probability, random.Random(0)) == expected


def test_caption_dropout_rate():
    rng = random.Random(2)
    empty = sum(drop_caption("x", 0.1, rng) == "" for _ in range(5000))
    assert 400 < empty < 600


@pytest.mark.parametrize(
    "caption, trigger, expected",
    [
        ("red circle", "sks", "sks, red circle"),
        ("sks, red circle", "sks", "sks, red circle"),
        ("red circle, sks", "sks", "red circle, sks"),
        ("", "sks", "sks"),
        ("red circle", "", "red circle"),
        ("sks dog, red", "sks", "sks, sks dog, red"),  # a tag containing the word is not the tag
    ],
)
def test_add_trigger(caption, trigger, expected):
    assert add_trigger(caption, trigger) == expected


@pytest.mark.parametrize(
    "name, parsed",
    [
        ("10_mystyle", (10, "mystyle")),
        ("5_sks dog", (5, "sks dog")),
        ("1_a_b", (1, "a_b")),
        ("0_reg", (0, "reg")),
        ("mystyle", None),
        ("10mystyle", None),
        ("_mystyle", None),
        ("10_", None),
    ],
)
def test_parse_kohya_folder(name, parsed):
    assert parse_kohya_folder(name) == parsed


@pytest.mark.parametrize(
    "options, varies",
    [
        (CaptionOptions(), False),
        (CaptionOptions(keep_tokens=3), False),
        (CaptionOptions(shuffle_tags=True), True),
        (CaptionOptions(caption_dropout=0.05), True),
        (CaptionOptions(tag_dropout=0.1), True),
    ],
)
def test_options_say_whether_captions_vary(options, varies):
    assert options.varies is varies


def test_augment_caption_fixed_options_return_caption_verbatim():
    assert augment_caption("  odd ,spacing ", CaptionOptions(keep_tokens=1), random.Random(0)) == "  odd ,spacing "


def test_augment_caption_combines_ops_and_respects_kept_tokens():
    options = CaptionOptions(shuffle_tags=True, keep_tokens=1, tag_dropout=0.5, caption_dropout=0.2)
    results = [augment_caption(CAPTION, options, random.Random(seed)) for seed in range(400)]
    empty = results.count("")
    assert 40 < empty < 120
    for result in filter(None, results):
        assert split_tags(result)[0] == "sks"
        assert set(split_tags(result)) <= set(split_tags(CAPTION))
    assert results == [augment_caption(CAPTION, options, random.Random(seed)) for seed in range(400)]


@pytest.mark.parametrize(
    "caption, plain, kept",
    [
        ("sks, flat ||| red, blue, green", "sks, flat, red, blue, green", Kept(2, 0)),
        ("sks|||red, blue|||by me, 2024", "sks, red, blue, by me, 2024", Kept(1, 2)),
        ("||| red, blue", "red, blue", Kept(0, 0)),
        ("a ||| b ||| c ||| d", "a, b, c, d", Kept(1, 2)),  # a third separator never reaches the encoder
        ("sks, red, blue", "sks, red, blue", None),  # no separator: keep_tokens decides
    ],
)
def test_keep_tokens_separator_is_taken_out_and_counts_the_fixed_tags(caption, plain, kept):
    assert mark_kept(caption, "|||") == (plain, kept)


def test_separator_off_leaves_the_caption_alone():
    assert mark_kept("a ||| b", "") == ("a ||| b", None)


def test_kept_head_and_tail_never_move_or_drop_and_override_keep_tokens():
    plain, kept = mark_kept("sks, flat ||| one, two, three, four, five ||| artist, 2024", "|||")
    options = CaptionOptions(shuffle_tags=True, tag_dropout=0.3, keep_tokens=4)  # 4 is ignored: the caption says
    middles = set()
    for seed in range(60):
        tags = split_tags(augment_caption(plain, options, random.Random(seed), kept))
        assert tags[:2] == ["sks", "flat"] and tags[-2:] == ["artist", "2024"]
        middle = tags[2:-2]
        assert set(middle) <= {"one", "two", "three", "four", "five"}
        middles.add(tuple(middle))
    assert len(middles) > 20  # the middle is shuffled and thinned
    # Fixed parts longer than the caption (a tail over the head) keep every tag in place.
    assert shuffle_tags("a, b", Kept(2, 2), random.Random(0)) == "a, b"


def test_every_nth_epoch_trains_every_caption_empty_as_kohya_counts_epochs():
    options = CaptionOptions(dropout_every_n_epochs=3)
    assert options.varies  # so the text cache steps aside
    captions = [augment_caption(CAPTION, options, random.Random(0), epoch=epoch) for epoch in range(7)]
    assert captions == [CAPTION, CAPTION, "", CAPTION, CAPTION, "", CAPTION]  # kohya's epochs 3 and 6

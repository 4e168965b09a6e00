"""kohya's sample prompt lines in the config, the UI's prompt box and kohya_ss presets."""

import pytest

from app.ui.config_form import prompts_from_text, prompts_to_text
from networks.errors import SdloraError
from trainer.config import ConfigError, config_from_dict
from trainer.config.kohya_import import import_kohya_preset
from trainer.config.presets import resolve_config
from trainer.config.sample_prompts import parse_prompt_line, parse_prompt_text


def test_a_kohya_line_sets_every_option():
    prompt, ignored = parse_prompt_line("masterpiece, a cat --n blurry, lowres --w 512 --h 768 --d 42 --s 28 --l 7.5")
    assert prompt == {"prompt": "masterpiece, a cat", "negative_prompt": "blurry, lowres", "width": 512,
                      "height": 768, "seed": 42, "steps": 28, "cfg": 7.5}
    assert ignored == []
    assert parse_prompt_line("a--b c --ss euler_a --d 3")[0] == {"prompt": "a--b c", "seed": 3}  # "--" inside a word stays
    assert parse_prompt_line("x --ss euler_a --am 1")[1] == ["ss", "am"]
    assert parse_prompt_line("a photo --no people --W 640")[0] == {"prompt": "a photo --no people", "width": 640}


def test_comments_blank_lines_and_bad_numbers():
    prompts, ignored = parse_prompt_text("# kohya prompt file\r\n\r\na cat --d 1\n  \na dog --ss k_euler\n",
                                         comments=True)
    assert [p["prompt"] for p in prompts] == ["a cat", "a dog"] and ignored == ["ss"]
    assert parse_prompt_text("#1 best photo --d 3")[0] == [{"prompt": "#1 best photo", "seed": 3}]  # the UI box
    with pytest.raises(SdloraError, match=r"^--s in line 1 of the sample prompts must be a whole number "
                                          r"\(got '28.5'\)\.$"):
        parse_prompt_text("a cat --s 28.5", "the sample prompts")


def test_the_ui_box_shows_each_prompts_settings_and_reads_them_back():
    cfg = resolve_config("demo")
    text = prompts_to_text(cfg)
    assert text.splitlines()[0] == "sdlorastyle, a coral circle --w 64 --h 64 --d 1 --l 5"  # 20 steps: the default
    assert config_from_dict({"sample": {"prompts": prompts_from_text(text)}}).sample.prompts == cfg.sample.prompts
    typed = prompts_from_text("a new line")  # what it says is what is drawn: defaults for the rest
    assert typed == [{"prompt": "a new line"}]
    assert config_from_dict({"sample": {"prompts": typed}}).sample.prompts[0].steps == 20
    with pytest.raises(SdloraError, match=r"^The sample prompts use --ss, which sdlora has no per-prompt"):
        prompts_from_text("a cat --ss euler")


def test_what_the_box_shows_reads_back_as_the_same_prompts():
    cfg = config_from_dict({"dataset": {"resolution": 512}, "sample": {"prompts": [
        {"prompt": "#1 best photo", "seed": 3}, {"prompt": "a photo --no people", "cfg": 7.123456789},
        {"prompt": "still life", "negative_prompt": "blurry, lowres", "width": 640, "height": 384, "steps": 30}]}})
    back = config_from_dict({"dataset": {"resolution": 512},
                             "sample": {"prompts": prompts_from_text(prompts_to_text(cfg))}})
    assert back.sample.prompts == cfg.sample.prompts


def test_config_strings_take_the_options_and_reject_unknown_ones():
    cfg = config_from_dict({"sample": {"prompts": ["a cat --w 512 --d 3 --l 6.5", "a dog"]}})
    assert (cfg.sample.prompts[0].width, cfg.sample.prompts[0].seed, cfg.sample.prompts[0].cfg) == (512, 3, 6.5)
    assert cfg.sample.prompts[1].prompt == "a dog" and cfg.sample.prompts[1].seed == 0
    with pytest.raises(ConfigError, match=r"^sample.prompts uses --ss, which sdlora does not support"):
        config_from_dict({"sample": {"prompts": ["a cat --ss euler"]}})
    with pytest.raises(ConfigError, match=r"^sample.prompts\[0\].width must be a multiple of 8 \(got 500\)"):
        config_from_dict({"sample": {"prompts": ["a cat --w 500"]}})


def test_kohya_presets_bring_their_prompts():
    result = import_kohya_preset({"sample_prompts": "a cat --n dog --w 640 --h 512\n# off\nstill life --ss euler_a",
                                  "sample_every_n_steps": 50}, source="p.json")
    assert result.config["sample"]["prompts"] == [
        {"prompt": "a cat", "negative_prompt": "dog", "width": 640, "height": 512}, {"prompt": "still life"}]
    assert result.config["sample"]["every_steps"] == 50 and "sample_prompts" not in result.unmapped
    assert any(note.startswith("Sample prompt option(s) --ss were left out") for note in result.notes)
    assert not any("rounded down" in note for note in result.notes)


def test_kohya_prompts_are_drawn_as_kohya_would():
    result = import_kohya_preset({"sample_prompts": "a cat --W 500 --h 770 --d -1 --s 900"}, source="p.json")
    assert result.config["sample"]["prompts"] == [{"prompt": "a cat", "width": 496, "height": 768, "steps": 500}]
    assert any("rounded down to a multiple of 8" in note for note in result.notes)

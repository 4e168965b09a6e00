"""The training form is a view of TrainConfig: every key has a widget, and values go back unchanged."""
import gradio as gr
import pytest

from app.ui.config_form import PROMPTS_KEY, SKIPPED_KEYS, ConfigForm, from_widget, prompts_to_text
from networks.errors import SdloraError
from networks.spec import NETWORK_TYPES
from trainer.config import TrainConfig, config_field_table
from trainer.config.presets import resolve_config


def built_form(cfg: TrainConfig) -> ConfigForm:
    with gr.Blocks():
        form = ConfigForm(cfg)
        form.add("network.rank", label="Rank r")  # a main-form widget, then everything else
        form.add_remaining()
    return form


def test_every_config_key_gets_exactly_one_widget():
    form = built_form(TrainConfig())
    expected = [f.key for f in config_field_table() if f.key not in SKIPPED_KEYS and f.key != PROMPTS_KEY]
    assert sorted(form.keys) == sorted(expected)
    assert form.widgets["network.type"].choices == [(t, t) for t in ("lora", "locon", "loha", "lokr", "oft", "dora")]


def test_values_read_back_as_the_same_config():
    cfg = resolve_config("demo", ["dataset.path=/data", "network.type=locon", "train.optimizer_args={betas = [0.9, 0.99]}"])
    form = built_form(cfg)
    values = form.values(cfg)
    assert values[form.keys.index("train.optimizer_args")] == '{"betas": [0.9, 0.99]}'
    assert form.to_config("demo", prompts_to_text(cfg), values) == cfg  # the prompt box as the UI fills it


def test_a_cleared_optional_field_beats_the_preset():
    cfg = resolve_config("demo", ["dataset.path=/data"])
    form = built_form(cfg)
    values = form.values(cfg)
    assert values[form.keys.index("train.max_steps")] == str(cfg.train.max_steps)
    values[form.keys.index("train.max_steps")] = ""  # the user emptied "Max steps": train the epochs
    assert cfg.train.max_steps > 0 and form.to_config("demo", "", values).train.max_steps is None


def test_bad_values_are_one_sentence_naming_the_key():
    cfg = resolve_config("demo", ["dataset.path=/data"])
    form = built_form(cfg)
    values = form.values(cfg)
    values[form.keys.index("network.rank")] = 0
    with pytest.raises(SdloraError, match=r"^Rank r must be an integer >= 1; you typed 0\.$"):
        form.to_config("demo", "", values)
    values = form.values(cfg)
    values[form.keys.index("train.optimizer_args")] = "{betas: 1"
    with pytest.raises(SdloraError, match=r"^Optimizer args \(Advanced, Training\) must be JSON, e.g. \{\}; you typed '\{betas: 1'\.$"):
        form.to_config("demo", "", values)


def test_numbers_from_the_browser_become_the_configs_types():
    fields = {f.key: f for f in config_field_table()}
    assert from_widget(fields["train.max_steps"], " 12 ") == 12
    assert from_widget(fields["train.min_snr_gamma"], "5") == 5.0
    assert from_widget(fields["train.max_steps"], "") is None
    with pytest.raises(SdloraError, match=r"^train.max_steps must be a number or empty \(got 'many'\)\.$"):
        from_widget(fields["train.max_steps"], "many")
    assert from_widget(fields["train.epochs"], 3.0) == 3
    assert from_widget(fields["model.config_dir"], "  ") is None
    assert from_widget(fields["validation.timesteps"], "") is None


def test_the_train_tab_shows_the_conv_rank_where_the_network_uses_it():
    """LoCon, and LoHa / LoKr with network.include_convs, adapt the 3x3 convs at conv_rank: the Train tab shows
    the conv fields and the conv alpha for exactly those (the spec's rule, not a second copy of it)."""
    from app.ui.train_tab import adapts_convs, alpha_text

    cases = [("lora", False), ("locon", False), ("loha", False), ("loha", True), ("lokr", True)]
    assert [adapts_convs(kind, convs) for kind, convs in cases] == [False, True, False, True, True]
    assert alpha_text("lokr", 8, 0.5, None, 4, 0.5, None, True).endswith(
        "**conv alpha 2** <span class='sd-muted'>(= 0.5 x 4)</span>")
    assert "conv alpha" not in alpha_text("loha", 8, 0.5, None, 4, 0.5, None, False)


def test_a_saved_form_preset_names_every_field_so_choosing_it_refills_the_form(tmp_path, monkeypatch):
    from app.ui.preset_fill import fill_from_preset
    from trainer.config.presets import load_preset

    monkeypatch.setenv("SDLORA_HOME", str(tmp_path))
    defaults = resolve_config(None, ["dataset.path=/data"])
    form = built_form(defaults)
    form.save_as_preset("mine", None, prompts_to_text(defaults), form.values(defaults))
    saved = load_preset("mine")
    assert saved["dataset"]["resolution"] == 512 and saved["train"]["learning_rate"] == 1e-4  # defaults, named
    assert "path" not in saved["dataset"]  # still nothing that ties it to one run
    demo = resolve_config("demo", ["dataset.path=/data"])
    fill = fill_from_preset(form, "mine", form.values(demo), prompts_to_text(demo))
    # After the demo preset (64 px, lr 2e-3), the saved preset brings its own values back.
    assert fill.updates["dataset.resolution"] == 512
    assert float(fill.updates["train.learning_rate"]) == 1e-4
    assert fill.prompts == prompts_to_text(defaults)


@pytest.mark.parametrize("kind", NETWORK_TYPES)
def test_every_network_type_round_trips_through_the_form(kind):
    cfg = resolve_config("demo", ["dataset.path=/data", f"network.type={kind}", "network.include_convs=true"])
    form = built_form(cfg)
    values = form.values(cfg)
    assert values[form.keys.index("network.type")] == kind
    assert form.to_config("demo", prompts_to_text(cfg), values) == cfg

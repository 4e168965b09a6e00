"""Presets: the shipped ones validate, layering keeps alpha/r, user presets live in SDLORA_HOME."""
import pytest

from networks.errors import SdloraError
from trainer.config import load_config, save_config
from trainer.config.presets import (
    builtin_names,
    list_presets,
    load_preset,
    presets_list_text,
    presets_save_text,
    presets_show_text,
    resolve_config,
    save_user_preset,
    user_presets_dir,
)
from trainer.demo.demo_data import HELD_OUT

CLI_PRESETS = ("style-lora", "style-locon", "demo")


@pytest.fixture(autouse=True)
def sdlora_home(tmp_path, monkeypatch):
    """Every test gets its own empty user folder, so the developer's own presets never leak in."""
    home = tmp_path / "sdlora-home"
    monkeypatch.setenv("SDLORA_HOME", str(home))
    return home


# Collected before the fixture sets SDLORA_HOME, so keep only the shipped ones.
@pytest.mark.parametrize("info", [p for p in list_presets() if p.source == "builtin"], ids=lambda p: p.name)
def test_every_shipped_preset_validates(info):
    assert info.source == "builtin" and info.error is None
    assert info.description and not info.description.startswith("#")
    cfg = resolve_config(info.name)
    assert (cfg.network.rank, cfg.network.type) == (info.rank, info.network_type)
    assert cfg.network.resolved_alpha == info.alpha == info.alpha_ratio * info.rank
    # A preset is a recipe, not a run: it never points at someone's data or run folder.
    assert "path" not in load_preset(info.name).get("dataset", {})
    assert "dir" not in load_preset(info.name).get("output", {})


def test_shipped_names_include_the_cli_contract():
    names = builtin_names()
    assert set(CLI_PRESETS) <= set(names)
    assert {"character-lora", "alpha-equals-rank", "sdxl-style-lora"} <= set(names)


@pytest.mark.parametrize(("name", "net_type", "rank", "alpha", "conv"), [
    ("style-lora", "lora", 16, 8.0, None),
    ("style-locon", "locon", 16, 8.0, (8, 4.0)),
    ("style-dora", "dora", 16, 8.0, (8, 4.0)),
    ("style-oft", "oft", 8, 4.0, (8, 4.0)),  # rank = the block size; alpha is no scale for a rotation
    ("character-lora", "lora", 32, 16.0, None),
    ("alpha-equals-rank", "lora", 16, 16.0, None),
    ("sdxl-style-lora", "lora", 16, 8.0, None),
])
def test_preset_rank_and_alpha(name, net_type, rank, alpha, conv):
    net = resolve_config(name).network
    assert (net.type, net.rank, net.resolved_alpha) == (net_type, rank, alpha)
    if conv:
        assert (net.conv_rank, net.resolved_conv_alpha) == conv


def test_character_and_sdxl_presets_set_what_they_promise():
    character = resolve_config("character-lora")
    assert (character.dataset.flip, character.dataset.keep_tokens, character.train.learning_rate) == \
        (False, 1, 1e-4)
    sdxl = resolve_config("sdxl-style-lora")
    assert (sdxl.model.family, sdxl.dataset.resolution) == ("sdxl", 1024)
    assert (sdxl.dataset.resolved_min_bucket_side, sdxl.dataset.resolved_max_bucket_side) == (512, 2048)


def test_demo_preset_is_small_and_quick():
    cfg = resolve_config("demo")
    assert (cfg.model.path, cfg.dataset.resolution, cfg.train.batch_size) == ("demo:shapes", 64, 4)
    assert cfg.train.max_steps <= 400 and cfg.train.learning_rate == 2e-3  # about a minute on 2 CPU cores
    assert (cfg.sample.every_steps, cfg.save.every_steps, cfg.dataset.path) == (100, 100, "")
    assert cfg.sample.at_start  # the grid's first column is the base model, before any training
    assert len(cfg.sample.prompts) == 2
    assert all(cfg.sample_size(p) == (64, 64) and p.steps <= 20 for p in cfg.sample.prompts)
    # one prompt names a pair the demo dataset never draws, so the grid shows the style, not a copy
    assert any(f"a {colour} {shape}" in p.prompt for p in cfg.sample.prompts for colour, shape in HELD_OUT)


def test_rank_override_keeps_the_ratio_so_alpha_follows():
    net = resolve_config("style-lora", ["network.rank=32"]).network
    assert (net.rank, net.alpha_ratio, net.resolved_alpha) == (32, 0.5, 16.0)
    net = resolve_config("style-locon", ["network.conv_rank=16"]).network
    assert net.resolved_conv_alpha == 8.0


def test_layers_defaults_preset_base_overrides():
    base = {"model": {"path": "/models/sd15.safetensors"}, "dataset": {"path": "/data"},
            "network": {"rank": 4}}
    cfg = resolve_config("demo", ["network.rank=2"], base=base)
    assert cfg.model.path == "/models/sd15.safetensors"  # base beats the preset
    assert cfg.dataset.path == "/data"
    assert cfg.dataset.resolution == 64                   # the preset beats the defaults
    assert cfg.network.rank == 2                          # overrides beat everything
    assert resolve_config(base={"network": {"rank": 4}}).network.resolved_alpha == 2.0


def test_unknown_preset_lists_available_names():
    with pytest.raises(SdloraError) as info:
        resolve_config("styel-lora")
    message = str(info.value)
    assert message.startswith("Unknown preset 'styel-lora'; available presets are: ")
    assert all(name in message for name in CLI_PRESETS)


def test_user_preset_save_list_load(sdlora_home):
    assert user_presets_dir() == sdlora_home / "presets"
    cfg = resolve_config("style-lora", ["network.rank=24", "train.learning_rate=5e-5"],
                         base={"dataset": {"path": "/my/data"}, "output": {"dir": "/runs/1"}, "name": "ink"})
    path = save_user_preset("my-ink", cfg, description="Ink style at r 24")
    assert path == sdlora_home / "presets" / "my-ink.toml"
    partial = load_preset("my-ink")
    # Only differences from the defaults, and nothing that ties the preset to one run.
    assert partial["network"] == {"rank": 24}
    assert partial["train"]["learning_rate"] == 5e-5
    assert "name" not in partial and "output" not in partial and "path" not in partial["dataset"]
    assert resolve_config("my-ink") == resolve_config(base={**partial})
    info = {p.name: p for p in list_presets()}["my-ink"]
    assert (info.source, info.rank, info.alpha, info.alpha_ratio) == ("user", 24, 12.0, 0.5)
    assert info.description == "Ink style at r 24"
    assert "my-ink" in presets_list_text()


def test_user_preset_named_like_a_builtin_is_refused(sdlora_home):
    with pytest.raises(SdloraError, match=r"^'style-lora' is a built-in preset and cannot be overwritten"):
        save_user_preset("style-lora", {"network": {"rank": 4}})
    assert not (sdlora_home / "presets" / "style-lora.toml").exists()


def test_user_preset_from_a_partial_dict_and_bad_names():
    save_user_preset("tiny", {"network": {"rank": 2}})
    assert load_preset("tiny") == {"network": {"rank": 2}}
    with pytest.raises(SdloraError, match="is not usable"):
        save_user_preset("../escape", {})
    with pytest.raises(SdloraError, match="network.rank must be an integer >= 1"):
        save_user_preset("zero", {"network": {"rank": 0}})


def test_broken_user_preset_is_listed_with_its_error_not_raised(sdlora_home):
    (sdlora_home / "presets").mkdir(parents=True)
    (sdlora_home / "presets" / "broken.toml").write_text("# Broken\n[network]\nrnak = 3\n")
    info = {p.name: p for p in list_presets()}["broken"]
    assert info.rank is None
    assert "Unknown config key 'network.rnak'" in info.error
    assert len(list_presets()) == len(builtin_names()) + 1
    with pytest.raises(SdloraError, match=r"Unknown config key 'network.rnak' in .*broken\.toml"):
        resolve_config("broken")


def test_cli_bodies(tmp_path, sdlora_home):
    table = presets_list_text().splitlines()
    assert table[0].split()[:6] == ["name", "source", "type", "r", "alpha", "alpha/r"]
    style = next(line for line in table if line.startswith("style-lora "))
    assert style.split()[:6] == ["style-lora", "builtin", "lora", "16", "8", "0.5"]

    shown = presets_show_text("style-locon")
    assert shown.startswith("# Style LoCon")
    assert shown.rstrip().endswith("# resolved: locon, r 16, alpha 8 (alpha/r 0.5), conv r 8, conv alpha 4")

    run_config = tmp_path / "config.toml"
    save_config(resolve_config("character-lora", ["network.rank=8"]), run_config)
    assert presets_save_text("from-run", run_config) == \
        f"Saved preset 'from-run' to {sdlora_home / 'presets' / 'from-run.toml'}.\n"
    assert resolve_config("from-run").network.rank == 8
    assert load_config(run_config).network.rank == 8
    # A file names its keys on purpose: a default value (512 px) is kept, so the preset sets it when chosen.
    typed = tmp_path / "typed.toml"
    typed.write_text('[dataset]\npath = "/my/data"\nresolution = 512\n[network]\nrank = 4\n')
    presets_save_text("typed", typed)
    assert load_preset("typed") == {"dataset": {"resolution": 512}, "network": {"rank": 4}}

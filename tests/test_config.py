"""The config model: defaults, bounds, one-sentence errors, TOML round trips, --set overrides, field table."""
import math

import pytest
from pydantic import BaseModel

from networks.errors import SdloraError
from trainer.config import (
    ConfigError,
    SamplePrompt,
    TrainConfig,
    apply_overrides,
    config_field_table,
    config_from_dict,
    config_keys,
    dump_config,
    load_config,
    merge_dicts,
    save_config,
)


def _error(data, source=None) -> str:
    with pytest.raises(SdloraError) as info:
        config_from_dict(data, source=source)
    return str(info.value)


def test_defaults_resolve_alpha_from_ratio():
    cfg = TrainConfig()
    assert (cfg.network.rank, cfg.network.alpha_ratio, cfg.network.resolved_alpha) == (16, 0.5, 8.0)
    assert (cfg.network.conv_rank, cfg.network.resolved_conv_alpha) == (8, 4.0)
    assert (cfg.dataset.resolution, cfg.train.learning_rate, cfg.name) == (512, 1e-4, "my-lora")
    # Empty bucket sides follow the resolution (kohya's 256..1024 at 512).
    assert (cfg.dataset.resolved_min_bucket_side, cfg.dataset.resolved_max_bucket_side) == (256, 1024)


def test_the_network_spec_has_the_network_sections_names_and_defaults():
    """NetworkSpec is built from [network] by name, so a renamed key or a differing default fails here."""
    from dataclasses import fields

    from networks.spec import NetworkSpec
    from trainer.config import NetworkSection

    section = NetworkSection()
    for spec_field in fields(NetworkSpec):
        assert spec_field.name in NetworkSection.model_fields, spec_field.name
        assert spec_field.default == getattr(section, spec_field.name), spec_field.name
    assert section.spec() == NetworkSpec()
    typed = config_from_dict({"network": {"type": "locon", "rank": 4, "include_conv_in_out": True,
                                          "target_modules": ["to_q"], "dropout": 0.5}}).network.spec()
    assert (typed.type, typed.rank, typed.include_conv_in_out, typed.target_modules, typed.dropout) == \
        ("locon", 4, True, ("to_q",), 0.5)
    typed.validate()  # what the config accepts, the spec accepts


def test_dataset_options_are_built_from_the_dataset_section():
    cfg = config_from_dict({"dataset": {"path": "/data", "resolution": 256, "bucket_step": 32, "min_bucket_side": 96,
                                        "bucket_no_upscale": True, "keep_tokens": 1, "caption_extension": "caption"}})
    options = cfg.dataset.options()
    assert (options.buckets.resolution, options.buckets.step, options.buckets.smallest, options.buckets.largest,
            options.buckets.no_upscale) == (256, 32, 96, 512, True)
    assert (str(options.folder), options.captions.keep_tokens, options.caption_suffix) == ("/data", 1, ".caption")


def test_absolute_alpha_overrides_ratio_and_alpha_follows_rank_otherwise():
    cfg = config_from_dict({"network": {"rank": 32, "alpha": 4, "conv_rank": 4, "conv_alpha": 1}})
    assert (cfg.network.resolved_alpha, cfg.network.resolved_conv_alpha) == (4.0, 1.0)
    cfg = config_from_dict({"network": {"rank": 64, "alpha_ratio": 0.25}})
    assert cfg.network.resolved_alpha == 16.0


def test_unknown_key_suggests_the_closest_key_and_names_the_file(tmp_path):
    path = tmp_path / "my.toml"
    path.write_text("[network]\nrnak = 8\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"Unknown config key 'network.rnak' in {path}; did you mean 'network.rank'?"
    assert info.value.key == "network.rnak"
    assert _error({"network": {"rnak": 8}}) == "Unknown config key 'network.rnak'; did you mean 'network.rank'?"


@pytest.mark.parametrize(("data", "message"), [
    ({"rank": 4}, "Unknown config key 'rank'; did you mean 'network.rank'?"),  # right key, wrong section
    ({"netwrk": {}}, "Unknown config key 'netwrk'; did you mean 'network'?"),
    ({"train": {"lr": 1}}, "Unknown config key 'train.lr'; did you mean 'train.learning_rate'?"),
    ({"network_dim": 8}, "Unknown config key 'network_dim'; did you mean 'network.rank'?"),  # kohya's name
    ({"sample": {"prompts": [{"promt": "x"}]}},
     "Unknown config key 'sample.prompts[0].promt'; did you mean 'sample.prompts[0].prompt'?"),
    ({"zzzz": 1}, "Unknown config key 'zzzz'; remove it or check the spelling."),
])
def test_unknown_key_messages(data, message):
    assert _error(data) == message


@pytest.mark.parametrize(("data", "message"), [
    ({"network": {"rank": 0}}, "network.rank must be an integer >= 1 (got 0)."),
    ({"network": {"rank": 2048}}, "network.rank must be an integer <= 1024 (got 2048)."),
    ({"network": {"rank": 16.5}}, "network.rank must be an integer (got 16.5)."),
    ({"dataset": {"resolution": 500}}, "dataset.resolution must be a multiple of 64 (got 500)."),
    ({"network": {"alpha": -1}}, "network.alpha must be a number > 0 (got -1)."),
    ({"dataset": {"caption_dropout": 2}}, "dataset.caption_dropout must be a number <= 1 (got 2)."),
    # A dropout of 1 would drop every feature: refused here, not after the model loaded in the trainer.
    ({"network": {"dropout": 1.0}}, "network.dropout must be a number < 1 (got 1.0)."),
    ({"network": {"type": "glora"}},
     "network.type must be 'lora', 'locon', 'loha', 'lokr', 'oft' or 'dora' (got 'glora')."),
    ({"dataset": {"flip": "maybe"}}, "dataset.flip must be true or false (got 'maybe')."),
    ({"network": 5}, "network must be a table of settings (got 5)."),
    ({"validation": {"timesteps": [10, "a"]}}, "validation.timesteps[1] must be an integer (got 'a')."),
    ({"sample": {"prompts": [{"seed": 1}]}}, "sample.prompts[0].prompt is required."),
    ({"model": {"path": "demo:sd3"}}, "model.path must be one of demo:shapes, demo:sd1, demo:sd2, demo:sdxl (got 'demo:sd3')."),
    ({"model": {"family": "sdxl"}}, "model.path demo:sd1 is the tiny sd1 model but model.family is sdxl; "
                                    "set model.family to auto or use demo:sdxl."),
    ({"network": {"train_unet": False}},
     "network.train_unet and network.train_text_encoder are both false; enable at least one."),
    ({"dataset": {"resolution": 2048, "max_bucket_side": 1024}},
     "dataset.min_bucket_side (1024) <= dataset.resolution (2048) <= dataset.max_bucket_side (1024) must "
     "hold; change the bucket sides or leave them empty."),
    ({"train": {"min_timestep": 500, "max_timestep": 500}},
     "train.min_timestep (500) must be below train.max_timestep (500)."),
    ({"train": {"optimizer_args": {"betas": {"a": 1}}}},
     "train.optimizer_args.betas must be a number, an integer, true or false, text in quotes or a list of "
     "numbers (got a table)."),
])
def test_value_errors_are_one_sentence_naming_the_key(data, message):
    assert _error(data) == message


def test_value_error_names_the_file():
    assert _error({"network": {"rank": 0}}, source="my.toml") == \
        "network.rank in my.toml must be an integer >= 1 (got 0)."
    assert _error({"network": {"train_unet": False}}, source="my.toml") == \
        "In my.toml, network.train_unet and network.train_text_encoder are both false; enable at least one."


def test_name_must_be_a_safe_file_stem():
    assert config_from_dict({"name": "ink_style-v2.1"}).name == "ink_style-v2.1"
    for bad in ("../evil", "a/b", "", "con:x", ".hidden", "trailing."):
        assert _error({"name": bad}).startswith("name must be a file name of letters, digits")


def test_auto_bucket_sides_follow_resolution():
    cfg = config_from_dict({"dataset": {"resolution": 1024}})
    assert (cfg.dataset.resolved_min_bucket_side, cfg.dataset.resolved_max_bucket_side) == (512, 2048)
    # 576 / 2 = 288 is not a multiple of the step, so the smallest side rounds down to one.
    cfg = config_from_dict({"dataset": {"resolution": 576}})
    assert cfg.dataset.resolved_min_bucket_side == 256
    cfg = config_from_dict({"dataset": {"resolution": 64}})
    assert (cfg.dataset.resolved_min_bucket_side, cfg.dataset.resolved_max_bucket_side) == (64, 128)


def test_sample_prompts_accept_plain_strings_and_default_to_resolution():
    cfg = config_from_dict({"dataset": {"resolution": 768},
                            "sample": {"prompts": ["a cat", {"prompt": "a dog", "width": 512}]}})
    assert [p.prompt for p in cfg.sample.prompts] == ["a cat", "a dog"]
    assert cfg.sample_size(cfg.sample.prompts[0]) == (768, 768)
    assert cfg.sample_size(cfg.sample.prompts[1]) == (512, 768)


def test_assignment_is_validated_too():
    cfg = TrainConfig()
    with pytest.raises(ValueError):
        cfg.network.rank = 0
    cfg.network.rank = 4
    assert cfg.network.resolved_alpha == 2.0


def test_toml_round_trip_is_equal(tmp_path):
    cfg = config_from_dict({
        "name": "round-trip", "model": {"path": "/models/x.safetensors", "config_dir": "/cfg"},
        "network": {"type": "locon", "rank": 4, "alpha": 2.5},
        "train": {"max_steps": 7, "learning_rate": 3e-5, "optimizer_args": {"betas": [0.9, 0.99], "eps": 1e-8,
                                                                           "decouple": True, "mode": "x"},
                  "max_grad_norm": float("inf"), "min_snr_gamma": 5},
        "sample": {"prompts": [{"prompt": "a cat", "width": 640}, "a dog"], "every_steps": 5},
        "validation": {"timesteps": [100, 500, 900]},
    })
    path = save_config(cfg, tmp_path / "run" / "config.toml")
    assert load_config(path) == cfg
    assert load_config(path).train.max_grad_norm == math.inf
    assert "null" not in path.read_text() and "height" not in path.read_text()  # None is omitted
    assert [p.name for p in path.parent.iterdir()] == ["config.toml"]  # no temporary file left behind
    assert load_config(tmp_path / "run" / "config.toml").sample.prompts[1].prompt == "a dog"
    assert config_from_dict({}) == TrainConfig()
    assert dump_config(TrainConfig()).startswith('name = "my-lora"\n')


def test_toml_syntax_error_names_file_and_line(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[network]\nrank = 16\nalpha_ratio 0.5\n")
    with pytest.raises(SdloraError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(f"Invalid TOML in {path} at line 3, column ")
    assert message.endswith("; fix the syntax there.")


def test_missing_config_file_is_one_sentence(tmp_path):
    with pytest.raises(SdloraError, match=r"^Config file .*nope\.toml does not exist; check the path\.$"):
        load_config(tmp_path / "nope.toml")


def test_overrides_parse_by_type():
    cfg = apply_overrides(TrainConfig(), [
        "train.learning_rate=2e-4", "network.type=locon", "network.rank=32", "train.max_steps=40",
        "dataset.flip=true", "model.path=/x/y.safetensors", "name=123", "validation.timesteps=[100, 500]",
        "train.optimizer_args.betas=[0.9, 0.99]", "train.optimizer_args.decouple=yes",
        "dataset.caption_extension=caption", "network.alpha=4",
    ])
    assert cfg.train.learning_rate == 2e-4
    assert (cfg.network.type, cfg.network.rank, cfg.train.max_steps) == ("locon", 32, 40)
    assert cfg.dataset.flip is True
    assert cfg.model.path == "/x/y.safetensors"
    assert cfg.name == "123"  # a text field keeps digits as text
    assert cfg.validation.timesteps == [100, 500]
    assert cfg.train.optimizer_args == {"betas": [0.9, 0.99], "decouple": "yes"}
    assert cfg.dataset.caption_extension == ".caption"
    assert cfg.network.resolved_alpha == 4.0
    # `none` clears an optional key, so alpha follows the rank again.
    assert apply_overrides(cfg, ["network.alpha=none"]).network.resolved_alpha == 16.0


def test_overrides_work_on_partial_dicts_and_lists():
    cfg = apply_overrides({"sample": {"prompts": [{"prompt": "a"}, {"prompt": "b"}]}},
                          ["sample.prompts.1.seed=9", 'model.path="C:/models/x.ckpt"'])
    assert [p.seed for p in cfg.sample.prompts] == [0, 9]
    assert cfg.model.path == "C:/models/x.ckpt"


@pytest.mark.parametrize(("override", "message"), [
    ("network.rank", "Override 'network.rank' must look like KEY=VALUE, e.g. train.learning_rate=2e-4."),
    ("network.rnak=3", "Unknown config key 'network.rnak'; did you mean 'network.rank'?"),
    ("network.rank=abc", "network.rank must be an integer (got 'abc')."),
    ("network.rank.x=1", "Override 'network.rank.x=1': network.rank is a single value, not a section; "
                         "check the key."),
])
def test_override_errors(override, message):
    with pytest.raises(SdloraError) as info:
        apply_overrides(TrainConfig(), [override])
    assert str(info.value) == message


def test_merge_dicts_is_deep_and_does_not_mutate():
    base = {"network": {"rank": 16, "alpha_ratio": 0.5}, "sample": {"prompts": ["a", "b"]}}
    merged = merge_dicts(base, {"network": {"rank": 32}, "sample": {"prompts": ["c"]}})
    assert merged == {"network": {"rank": 32, "alpha_ratio": 0.5}, "sample": {"prompts": ["c"]}}
    assert base["network"]["rank"] == 16


# The keys the design specifies; scripts and the UI rely on them, so none may be renamed.
SPECIFIED_KEYS = [
    "name", "model.path", "model.family", "model.prediction_type", "model.config_dir",
    *(f"dataset.{k}" for k in (
        "path", "caption_extension", "default_repeats", "resolution", "enable_buckets", "min_bucket_side",
        "max_bucket_side", "bucket_step", "random_crop", "flip", "shuffle_captions", "keep_tokens",
        "caption_dropout", "tag_dropout", "cache_latents", "cache_text_encoder_outputs", "num_workers")),
    *(f"network.{k}" for k in (
        "type", "rank", "alpha_ratio", "alpha", "conv_rank", "conv_alpha_ratio", "conv_alpha", "dropout",
        "rank_dropout", "module_dropout", "init", "train_unet", "train_text_encoder", "include_conv_in_out",
        "include_time_embedding")),
    *(f"train.{k}" for k in (
        "epochs", "max_steps", "batch_size", "gradient_accumulation_steps", "learning_rate", "unet_lr",
        "text_encoder_lr", "loraplus_ratio", "optimizer", "optimizer_args", "weight_decay", "lr_scheduler",
        "lr_warmup_steps", "max_grad_norm", "mixed_precision", "gradient_checkpointing", "noise_offset",
        "min_snr_gamma", "seed")),
    "sample.every_steps", "sample.every_epochs", "sample.prompts", "sample.sampler",
    "save.every_steps", "save.every_epochs", "save.keep_last", "save.precision", "save.metadata",
    "output.dir", "output.tensorboard",
    "validation.images", "validation.folder", "validation.every_steps", "validation.seed", "validation.timesteps",
]


def _leaf_keys(model_cls: type[BaseModel], prefix: str = "") -> set[str]:
    keys = set()
    for name, field in model_cls.model_fields.items():
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            keys |= _leaf_keys(field.annotation, f"{prefix}{name}.")
        else:
            keys.add(prefix + name)
    return keys


def test_field_table_lists_every_leaf_with_description_and_bounds():
    rows = {row.key: row for row in config_field_table()}
    assert set(rows) == _leaf_keys(TrainConfig)
    assert set(SPECIFIED_KEYS) <= set(rows)
    assert all(row.description for row in rows.values())
    rank = rows["network.rank"]
    assert (rank.type, rank.default, rank.bounds) == ("int", 16, {"ge": 1, "le": 1024})
    assert rows["dataset.resolution"].bounds == {"ge": 64, "le": 4096, "multiple_of": 64}
    assert rows["network.alpha"].type == "float | None" and rows["network.alpha"].bounds == {"gt": 0}
    assert rows["network.type"].choices == ("lora", "locon", "loha", "lokr", "oft", "dora")
    assert rows["train.lr_scheduler"].choices == ("constant", "constant_with_warmup", "linear", "cosine",
                                                  "cosine_with_restarts", "polynomial")
    assert rows["sample.prompts"].type == "list[SamplePrompt]" and rows["sample.prompts"].default == []
    assert {row.key for row in config_field_table(SamplePrompt)} == _leaf_keys(SamplePrompt)


def test_cli_contract_keys_exist():
    keys = set(config_keys())
    for key in ("network.type", "network.rank", "network.alpha_ratio", "network.conv_rank",
                "network.conv_alpha_ratio", "train.max_steps", "train.epochs", "train.batch_size",
                "train.learning_rate", "train.seed", "dataset.resolution", "save.every_steps",
                "sample.every_steps"):
        assert key in keys


def test_save_config_disk_error_is_one_sentence(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(SdloraError, match=r"^Cannot write .*config\.toml \(.*\); check that the folder is writable"):
        save_config(TrainConfig(), blocker / "config.toml")


@pytest.mark.parametrize("network", [
    {"train_unet": False}, {"type": "loha", "init": "pissa"}, {"type": "lokr", "factor": 0},
])
def test_network_rules_are_the_specs_own(network):
    """The config asks NetworkSpec for its cross-key rules, so a spec built in code meets the same sentence."""
    from networks.spec import NetworkSpec

    with pytest.raises(SdloraError) as spec_error:
        NetworkSpec(**network).validate()
    assert _error({"network": network}) == str(spec_error.value)

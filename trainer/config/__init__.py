"""The training config: one pydantic model (`TrainConfig`) that presets, CLI flags, the UI form and the run
folder share, split by job:

- `sections` (with `network_section`, `train_section`, `section`, `choices`): the keys, their bounds, defaults
  and descriptions, the enumerations; the network spec and dataset options are built from their sections
  (`NetworkSection.spec()`, `DatasetSection.options()`);
- `files`: TOML in and out; `overrides`: `--set KEY=VALUE` and partial configs laid over others;
- `fields`: the field table the UI form is generated from; `errors`: one-sentence validation errors;
- `presets`, `kohya_import`, `kohya_names`, `sample_prompts`: named partial configs, kohya_ss presets and
  names, kohya's sample-prompt lines.
"""
from trainer.config.choices import DEMO_MODELS, LOSS_TYPES, PREDICTION_TYPES, SEED_MAX
from trainer.config.errors import ConfigError
from trainer.config.fields import ConfigField, config_field_table, config_keys
from trainer.config.files import (
    config_from_dict,
    config_to_dict,
    dump_config,
    load_config,
    parse_toml,
    read_toml,
    save_config,
)
from trainer.config.network_section import NetworkSection
from trainer.config.overrides import apply_overrides, merge_dicts
from trainer.config.sections import DatasetSection, SamplePrompt, TrainConfig
from trainer.config.train_section import TrainSection

__all__ = [
    "DEMO_MODELS", "LOSS_TYPES", "PREDICTION_TYPES", "SEED_MAX", "ConfigError", "ConfigField", "DatasetSection",
    "NetworkSection", "SamplePrompt", "TrainConfig", "TrainSection", "apply_overrides", "config_field_table",
    "config_from_dict", "config_keys", "config_to_dict", "dump_config", "load_config", "merge_dicts", "parse_toml",
    "read_toml", "save_config",
]

"""Import a kohya_ss GUI preset (presets/lora/*.json, or a saved kohya_ss config) as an sdlora preset.

kohya_ss stores an absolute network_alpha; sdlora presets store alpha / r, so alpha follows r when the
rank changes. The import keeps the preset's scale: alpha_ratio = network_alpha / network_dim (conv alike).
kohya_ss writes many values as strings ("0.0001", "1234") and leaves unset ones as "": both are read as
kohya_ss reads them. Keys with no sdlora counterpart are returned (and printed by the CLI), never dropped
silently; a LoRA type or optimizer sdlora does not offer is an error, since the rest would not fit it.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args

from networks.errors import SdloraError
from trainer.config import config_from_dict
from trainer.config.choices import LrScheduler, MixedPrecision, Optimizer
from trainer.config.kohya_names import KOHYA_KEYS
from trainer.config.kohya_network import LOKR_KEYS, import_network
from trainer.config.kohya_values import Builder, is_blank, read_flag, read_integer, read_number, reader_for
from trainer.config.sample_prompts import OPTION_HELP, parse_prompt_text

OPTIMIZERS = {name: name for name in get_args(Optimizer)}  # kohya_ss's names, lowercased, are sdlora's
SCHEDULERS = get_args(LrScheduler)
MIXED_PRECISION = {name: name for name in get_args(MixedPrecision)}
SAVE_PRECISION = {"fp16": "fp16", "bf16": "bf16", "float": "fp32", "fp32": "fp32"}
SAMPLERS = {"euler_a": "euler_a", "k_euler_a": "euler_a", "euler": "euler", "k_euler": "euler", "ddim": "ddim"}
# sd-scripts' timestep_sampling; its sigma, shift and flux_shift (flow-model shifts) have no counterpart.
TIMESTEP_SAMPLING = {"uniform": "uniform", "sigmoid": "sigmoid"}
# kohya_ss keys for one run on one machine; a preset leaves them out (see trainer.presets.RUN_SPECIFIC_KEYS).
RUN_SPECIFIC = ("pretrained_model_name_or_path", "train_data_dir", "reg_data_dir", "output_dir", "logging_dir",
                "output_name", "model_list", "network_weights", "lora_network_weights", "vae")
# Paths with no CLI flag of their own. kohya_ss's GUI names the LoRA to continue lora_network_weights,
# sd-scripts network_weights.
SET_PATHS = {"reg_data_dir": "dataset.reg_path=DIR", "lora_network_weights": "network.weights=FILE",
             "network_weights": "network.weights=FILE", "vae": "model.vae=FILE"}


@dataclass
class KohyaImport:
    config: dict  # a partial sdlora config (nested sections), validated
    unmapped: dict[str, Any] = field(default_factory=dict)  # kohya key -> value, with no sdlora counterpart
    notes: list[str] = field(default_factory=list)  # conversions worth knowing about, one sentence each

    def meaningful_unmapped(self) -> dict[str, Any]:
        """The unmapped keys that were set to something (kohya_ss saves every field, most empty or off)."""
        return {key: value for key, value in self.unmapped.items() if not is_blank(value)}

    def text(self) -> str:
        """What was imported and what was not, for the terminal."""
        lines = [f"  {key} = {value!r}" for key, value in sorted(_flatten(self.config).items())]
        lines = ["Imported:"] + lines
        lines += [f"Note: {note}" for note in self.notes]
        meaningful = self.meaningful_unmapped()
        blank = sorted(set(self.unmapped) - set(meaningful))
        if meaningful:
            lines.append("Not imported (no sdlora counterpart): "
                         + ", ".join(f"{k}={v!r}" for k, v in sorted(meaningful.items())))
        if blank:
            lines.append(f"Not imported, empty or off: {', '.join(blank)}")
        return "\n".join(lines)


# Handled by the functions below (so not "unmapped" even when they end up not setting anything).
SPECIAL = ("LoRA_type", "network_dim", "network_alpha", "conv_dim", "conv_alpha", "learning_rate", "unet_lr",
           "text_encoder_lr", "optimizer", "optimizer_args", "lr_scheduler", "lr_warmup", "max_train_steps",
           "max_train_epochs", "max_resolution", "min_snr_gamma", "mixed_precision", "save_precision",
           "cache_latents", "cache_latents_to_disk", "v_parameterization", "sample_sampler", "sample_prompts",
           "dim_from_weights",  # sdlora always continues a file at its own ranks
           "sdxl_no_half_vae",  # sdlora's VAE is always fp32
           "masked_loss", "dora_wd", "network_args", "timestep_sampling", "sigmoid_scale", "constrain", *LOKR_KEYS)


# The keys copied one to one, each read by its sdlora key's type; the rest are converted by hand below.
DIRECT = {key: (dotted, reader_for(dotted)) for key, dotted in KOHYA_KEYS.items()
          if key not in SPECIAL and key not in RUN_SPECIFIC}


def import_kohya_preset(data: Mapping[str, Any], source: str = "the kohya_ss preset") -> KohyaImport:
    """Convert a kohya_ss preset dict into a validated partial sdlora config."""
    if not isinstance(data, Mapping):
        raise SdloraError(f"{source} is not a kohya_ss preset (a JSON object of settings expected).")
    b = Builder(data, source)
    for key, (dotted, read) in DIRECT.items():
        if b.given(key):
            b.set(dotted, read(key, data[key], source))
    for step in (import_network, _learning_rates, _optimizer, _schedule, _length, _resolution, _precision,
                 _caching, _prediction, _sampler, _sample_prompts, _masked_loss, _timestep_sampling):
        step(b)
    for key, value in data.items():
        if key not in DIRECT and key not in SPECIAL and key not in RUN_SPECIFIC:  # those get a note instead
            b.unmapped[key] = value
    _drop_zero_optional(b)
    config_from_dict(b.config, source=f"the config imported from {source}")  # names the sdlora key at fault
    return KohyaImport(b.config, b.unmapped, b.notes)


def _learning_rates(b: Builder) -> None:
    rates = {key: read_number(key, b.data[key], b.source) if b.given(key) else 0.0
             for key in ("learning_rate", "unet_lr", "text_encoder_lr")}
    for key, value in rates.items():
        if value:
            b.set(f"train.{key}", value)
    unet, text = rates["unet_lr"], rates["text_encoder_lr"]
    # kohya_ss's rule: a zero text-encoder lr (with a UNet lr) trains the UNet only, and the reverse;
    # both zero trains both at learning_rate, and so does sd-scripts when neither flag is given.
    b.set("network.train_unet", not (text and not unet))
    b.set("network.train_text_encoder", not (unet and not text))


def _optimizer(b: Builder) -> None:
    if b.given("optimizer"):
        name = str(b.data["optimizer"]).strip()
        if name.lower() not in OPTIMIZERS:
            raise SdloraError(f"optimizer {name!r} in {b.source} is not offered by sdlora; change it to AdamW, "
                              "AdamW8bit, Lion, Prodigy or Adafactor in the file (and its learning rate with it).")
        b.set("train.optimizer", OPTIMIZERS[name.lower()])
    if b.given("optimizer_args"):
        args, rest = _optimizer_args(b.data["optimizer_args"])
        if "weight_decay" in args:
            b.set("train.weight_decay", args.pop("weight_decay"))
        if args:
            b.set("train.optimizer_args", args)
        if rest:
            b.unmapped["optimizer_args"] = " ".join(rest)
            b.notes.append(f"optimizer_args {' '.join(rest)!r} could not be read as key=value numbers or flags.")


def _optimizer_args(raw: Any) -> tuple[dict[str, Any], list[str]]:
    """'weight_decay=0.1 betas=0.9,0.99 relative_step=False' (or a list of such) -> typed values."""
    tokens = raw if isinstance(raw, list) else str(raw).split()
    args, rest = {}, []
    for token in tokens:
        key, sep, value = str(token).partition("=")
        parsed = _arg_value(value.strip().strip("[]()")) if sep and key.strip() else None
        if parsed is None:
            rest.append(str(token))
        else:
            args[key.strip()] = parsed
    return args, rest


def _arg_value(text: str) -> Any:
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    try:
        numbers = [float(part) for part in text.split(",")]
    except ValueError:
        return None
    return numbers if len(numbers) > 1 else numbers[0]


def _schedule(b: Builder) -> None:
    if b.given("lr_scheduler"):
        name = str(b.data["lr_scheduler"]).strip()
        if name in SCHEDULERS:
            b.set("train.lr_scheduler", name)
        else:
            b.unmapped["lr_scheduler"] = name
            b.notes.append(f"lr_scheduler {name!r} has no sdlora counterpart; the preset keeps sdlora's "
                           f"(choose one of {', '.join(SCHEDULERS)}).")
    if not b.given("lr_warmup") or b.given("lr_warmup_steps"):
        return
    percent = read_number("lr_warmup", b.data["lr_warmup"], b.source)
    steps = read_integer("max_train_steps", b.data["max_train_steps"], b.source) if b.given("max_train_steps") else 0
    if percent and steps:
        warmup = round(percent * steps / 100)  # kohya_ss's own conversion
        b.set("train.lr_warmup_steps", warmup)
        b.notes.append(f"lr_warmup {percent:g}% of max_train_steps {steps} became lr_warmup_steps {warmup}.")
    elif percent:
        b.unmapped["lr_warmup"] = b.data["lr_warmup"]
        b.notes.append(f"lr_warmup is {percent:g}% of the total steps, which depend on the dataset; set "
                       "train.lr_warmup_steps yourself (sdlora check shows the total).")


def _length(b: Builder) -> None:
    if b.given("max_train_steps"):
        steps = read_integer("max_train_steps", b.data["max_train_steps"], b.source)
        if steps > 0:
            b.set("train.max_steps", steps)
    if b.given("max_train_epochs"):
        epochs = read_integer("max_train_epochs", b.data["max_train_epochs"], b.source)
        if epochs > 0:
            b.set("train.epochs", epochs)  # sd-scripts: max_train_epochs overrides epoch


def _resolution(b: Builder) -> None:
    if not b.given("max_resolution"):
        return
    raw = str(b.data["max_resolution"])
    try:
        sides = [int(float(part)) for part in raw.replace("x", ",").split(",") if part.strip()]
    except ValueError:
        sides = []
    if len(sides) not in (1, 2):
        raise SdloraError(f"max_resolution in {b.source} is {raw!r}; kohya_ss writes it as '512,512'.")
    width, height = sides[0], sides[-1]
    side = width if width == height else round(math.sqrt(width * height) / 64) * 64
    if width != height:
        b.notes.append(f"max_resolution {width}x{height} became dataset.resolution {side}: sdlora buckets keep "
                       "about resolution^2 pixels, as kohya's do with width x height.")
    b.set("dataset.resolution", side)


def _precision(b: Builder) -> None:
    b.choose("mixed_precision", "train.mixed_precision", MIXED_PRECISION)
    b.choose("save_precision", "save.precision", SAVE_PRECISION)
    if b.given("min_snr_gamma"):
        gamma = read_number("min_snr_gamma", b.data["min_snr_gamma"], b.source)
        if gamma > 0:  # kohya's 0 means off, sdlora's "off" is an empty value
            b.set("train.min_snr_gamma", gamma)


def _caching(b: Builder) -> None:
    to_disk = b.given("cache_latents_to_disk") and read_flag("cache_latents_to_disk", b.data["cache_latents_to_disk"], b.source)
    in_memory = b.given("cache_latents") and read_flag("cache_latents", b.data["cache_latents"], b.source)
    if to_disk:
        b.set("dataset.cache_latents", "disk")
    elif in_memory:
        b.set("dataset.cache_latents", "memory")
    elif "cache_latents" in b.data:
        b.notes.append("cache_latents = false was not imported: sdlora's latent cache is keyed by image content "
                       "and crop, so it is never stale and stays on (random crops are encoded fresh anyway).")


def _prediction(b: Builder) -> None:
    if b.given("v_parameterization") and read_flag("v_parameterization", b.data["v_parameterization"], b.source):
        b.set("model.prediction_type", "v_prediction")
    for key in ("v2", "sdxl"):
        if key in b.data:
            b.unmapped[key] = b.data[key]
    if b.data.get("sdxl") is True or b.data.get("v2") is True:
        b.notes.append("v2/sdxl were not imported: sdlora detects the model family from the model you train on.")
    for key in (k for k in RUN_SPECIFIC if k not in SET_PATHS):
        if b.given(key):
            b.notes.append(f"{key} is specific to one run; give it with --model/--data/--output/--name instead.")
            break
    for key, how in SET_PATHS.items():
        if b.given(key):
            b.notes.append(f"{key} is specific to one run; give it with --set {how} instead.")


def _masked_loss(b: Builder) -> None:
    if b.given("masked_loss") and read_flag("masked_loss", b.data["masked_loss"], b.source):
        b.set("dataset.loss_mask", "alpha")
        b.notes.append("masked_loss is imported as dataset.loss_mask = alpha (each image's transparency); for a "
                       "folder of mask images use loss_mask = folder with dataset.mask_folder.")


def _timestep_sampling(b: Builder) -> None:
    b.choose("timestep_sampling", "train.timestep_distribution", TIMESTEP_SAMPLING)
    if b.given("sigmoid_scale"):  # read only by kohya's sigmoid (and shift, which is unmapped)
        if b.config.get("train", {}).get("timestep_distribution") == "sigmoid":
            b.set("train.timestep_sigmoid_scale", read_number("sigmoid_scale", b.data["sigmoid_scale"], b.source))
        else:
            b.unmapped["sigmoid_scale"] = b.data["sigmoid_scale"]


def _sampler(b: Builder) -> None:
    b.choose("sample_sampler", "sample.sampler", SAMPLERS)


def _sample_prompts(b: Builder) -> None:
    """kohya_ss keeps the prompt lines themselves in its preset (written to prompt.txt at launch)."""
    if not b.given("sample_prompts"):
        return
    prompts, ignored = parse_prompt_text(str(b.data["sample_prompts"]), f"sample_prompts in {b.source}",
                                         comments=True)
    changed = [_as_kohya_draws(prompt) for prompt in prompts]
    if prompts:
        b.set("sample.prompts", prompts)
    if ignored:
        b.notes.append(f"Sample prompt option(s) {', '.join('--' + name for name in ignored)} were left out: "
                       f"sdlora reads {OPTION_HELP} (the sampler is sample.sampler, one per run).")
    if any(changed):
        b.notes.append("Sample prompt sizes were rounded down to a multiple of 8, steps kept to 1-500 and "
                       "negative seeds dropped, as kohya draws them.")


def _as_kohya_draws(prompt: dict) -> bool:
    """kohya rounds sizes down to a multiple of 8 and treats a negative seed as random; True if changed."""
    before = dict(prompt)
    for side in ("width", "height"):
        if side in prompt:
            prompt[side] = max(64, prompt[side] // 8 * 8)
    if "steps" in prompt:
        prompt["steps"] = min(max(prompt["steps"], 1), 500)
    if prompt.get("seed", 0) < 0:
        del prompt["seed"]
    return prompt != before


def _drop_zero_optional(b: Builder) -> None:
    """kohya's 0 means "unset" for these; sdlora's bounds would reject a 0."""
    dataset = b.config.get("dataset", {})
    for key in ("min_bucket_side", "max_bucket_side"):
        if dataset.get(key) == 0:
            del dataset[key]
    train = b.config.get("train", {})
    for key in ("lr_scheduler_num_cycles", "gradient_accumulation_steps", "batch_size", "epochs",
                "multires_noise_discount", "max_timestep"):
        if train.get(key) == 0:
            del train[key]


def _flatten(config: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict) and key != "optimizer_args":
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


# -- files ----------------------------------------------------------------------------------------------
def read_kohya_preset(path: str | os.PathLike) -> KohyaImport:
    source = Path(path)
    try:
        data = json.loads(source.read_text(encoding="utf-8-sig"))
    except FileNotFoundError:
        raise SdloraError(f"The kohya_ss preset {source} does not exist; check the path.") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise SdloraError(f"{source} is not a readable kohya_ss JSON preset ({error}); export it again from "
                          "kohya_ss.") from None
    return import_kohya_preset(data, source=source.name)


def import_kohya_file(path: str | os.PathLike, name: str) -> tuple[Path, KohyaImport]:
    """Convert a kohya_ss JSON preset and save it as the user preset `name`."""
    from trainer.config.presets import save_user_preset

    result = read_kohya_preset(path)
    description = f"Imported from kohya_ss preset {Path(path).name}"
    return save_user_preset(name, result.config, description=description), result

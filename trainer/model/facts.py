"""What a base model is, found out once: where it lives, its family, prediction type, whether its schedule has
zero terminal SNR and the resolution it was trained at; from its configs or weight names, never its weights.

The loader (trainer/model/model_loading.py), the pre-flight and the UI's start check all ask here, so they
cannot disagree, and each way a model path can fail has one sentence.

Prediction type, when "auto":
- diffusers folder / hub id / demo: the `prediction_type` of the model's scheduler config.
- single file: "v_prediction" when the file holds a `v_pred` key (ComfyUI's marker) or a sidecar
  `<name>.yaml` (A1111's convention) says `parameterization: "v"`; with a sidecar yaml but no such line,
  "epsilon". Otherwise SD2 files are v_prediction (SD2.x 768-v is the common SD2 checkpoint) unless the
  file name contains "base" or "512"; SD1 and SDXL files are epsilon. Always overridable.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from safetensors import SafetensorError, safe_open

from networks.errors import SdloraError
from networks.naming import PREFIXES
from trainer.config import PREDICTION_TYPES
from trainer.model.family import ModelFamily, detect_family, get_family
from trainer.model.tiny_models import ASSETS, demo_model_path

SHIPPED_CONFIGS = ASSETS / "configs"
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth")
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth")
WHAT_MODELS = "give a diffusers folder, a .safetensors/.ckpt file or demo:shapes"
_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")  # owner/name, matched whole
# Keys only adapter files hold (kohya's, peft's, LyCORIS's); a base model never has them.
_ADAPTER_MARKERS = ("lora_down", "lora_up", "lora_A", "lora_B", "hada_w1", "lokr_w1", *PREFIXES.values())
# What torch.save writes: a zip archive, or (before torch 1.6) a pickle stream opening with its protocol.
_TORCH_SAVE_MAGIC = (b"PK\x03\x04", b"\x80")


@dataclass(frozen=True)
class ModelLocation:
    spec: str  # as the user gave it, stripped
    kind: str  # "demo", "folder", "file" or "hub"
    where: Path | str  # what the loader opens: a folder, a file, or the hub id

    @property
    def is_local(self) -> bool:
        """A folder or file the user named (demo models live in the cache, hub ids on the hub)."""
        return self.kind in ("folder", "file")


@dataclass(frozen=True)
class ModelFacts:
    location: ModelLocation
    family: str | None  # model.family when set, else what the files say; None: unknown until it loads
    prediction_type: str
    zero_terminal_snr: bool  # the schedule's last timestep is pure noise (rescale_betas_zero_snr)
    native_resolution: int | None  # the side it was trained at
    found_family: str | None  # what the model's own files say, whatever model.family is
    read_from: str  # "configs", "weights", "name" (a .ckpt is not opened) or "nothing" (a hub id)
    config_folder: Path | None  # the diffusers configs that describe it (a single file's shipped ones)


@dataclass(frozen=True)
class PartConfigs:
    """The configs of a diffusers model's parts, as plain dicts."""

    unet: dict
    text_encoders: list[dict]
    scheduler: dict
    vae: dict

    def family(self) -> ModelFamily:
        return detect_family(self.unet, self.text_encoders)

    def prediction_type(self) -> str:
        return self.scheduler.get("prediction_type", "epsilon")

    def zero_terminal_snr(self) -> bool:
        return bool(self.scheduler.get("rescale_betas_zero_snr", False))

    def native_resolution(self) -> int | None:
        # The UNet's latent sample size x the VAE's factor (8 for SD; 4 for demo:shapes) is its training size.
        levels = len(self.vae.get("block_out_channels") or [0] * 4)
        size = self.unet.get("sample_size")
        return size * 2 ** (levels - 1) if isinstance(size, int) else None


def locate_model(spec: str | Path) -> ModelLocation:
    """Where `spec` points, or the one sentence that says why it names no model (cheap: reads no weights)."""
    spec = str(spec).strip()
    if spec.startswith("demo:"):
        return ModelLocation(spec, "demo", demo_model_path(spec.removeprefix("demo:")))
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise SdloraError(f"The folder {path} has no model_index.json, so it is not a diffusers model; point to "
                              "the folder that holds model_index.json or to a single .safetensors file.")
        return ModelLocation(spec, "folder", path)
    if path.is_file():
        check_checkpoint_file(path)
        return ModelLocation(spec, "file", path)
    if _HUB_ID.fullmatch(spec) and not path.suffix:
        return ModelLocation(spec, "hub", spec)
    raise SdloraError(f"The model {spec} was not found; {WHAT_MODELS}.")


def model_facts(spec: str | Path | ModelLocation, family: str | None = "auto", prediction_type: str | None = "auto",
                config_dir: str | Path | None = None, *, keys: Iterable[str] | None = None,
                configs: PartConfigs | None = None) -> ModelFacts:
    """The facts of the model `spec` names; `family` / `prediction_type` other than auto (or None) win over
    what its files say. `keys` are a single file's weight names when the caller has read them (only a
    .safetensors header is read here; a .ckpt is slow to open); `configs` a hub model's, once it is loaded."""
    wanted_family, wanted_prediction = checked_overrides(family, prediction_type)
    location = spec if isinstance(spec, ModelLocation) else locate_model(spec)
    if location.kind == "file":
        return _file_facts(location, wanted_family, wanted_prediction, config_dir, keys)
    if location.kind == "hub" and configs is None:
        return ModelFacts(location, wanted_family, wanted_prediction or "epsilon", False,
                          _default_resolution(wanted_family, wanted_prediction), None, "nothing", None)
    folder = None if location.kind == "hub" else Path(location.where)
    configs = configs if configs is not None else read_part_configs(folder)
    found = configs.family().name
    return ModelFacts(location, wanted_family or found, wanted_prediction or configs.prediction_type(),
                      configs.zero_terminal_snr(), configs.native_resolution(), found, "configs", folder)


def checked_overrides(family: str | None, prediction_type: str | None) -> tuple[str | None, str | None]:
    """(family, prediction type) a user set, None for auto; one sentence for a value that names neither."""
    if prediction_type not in (None, "auto", *PREDICTION_TYPES):
        raise SdloraError(f"Unknown prediction type {prediction_type!r}; use auto, epsilon or v_prediction.")
    return (None if family in (None, "auto") else get_family(family).name,
            None if prediction_type in (None, "auto") else prediction_type)


def read_part_configs(folder: Path) -> PartConfigs:
    """The part configs of a diffusers folder (a missing part reads as an empty config)."""

    def config(part: str, name: str = "config.json") -> dict | None:
        file = folder / part / name
        if not file.is_file():
            return None
        try:
            return json.loads(file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise SdloraError(f"{file} is not a readable JSON config ({error}); repair or re-download the "
                              "model.") from None

    unet = config("unet")
    if unet is None:
        raise SdloraError(f"The folder {folder} has no unet/config.json, so it is not a diffusers Stable "
                          "Diffusion model; point model.path at the folder that holds model_index.json.")
    encoders = [c for c in (config("text_encoder"), config("text_encoder_2")) if c is not None]
    return PartConfigs(unet, encoders, config("scheduler", "scheduler_config.json") or {}, config("vae") or {})


def _file_facts(location: ModelLocation, wanted_family, wanted_prediction, config_dir, keys) -> ModelFacts:
    path = Path(location.where)
    if keys is None and path.suffix.lower() == ".safetensors":
        keys = safetensors_keys(path)
    if keys is None:  # a pickle not opened: only its name hints at SDXL
        found, read_from = ("sdxl" if "xl" in path.name.lower() else None), "name"
    else:
        keys = list(keys)
        found, read_from = detect_checkpoint_family(keys, path).name, "weights"
    family = wanted_family or found
    if family is None:
        return ModelFacts(location, None, wanted_prediction or "epsilon", False, None, None, read_from, None)
    prediction = wanted_prediction or guess_prediction_type(get_family(family), path, keys or [])
    config = Path(config_dir) if config_dir else SHIPPED_CONFIGS / get_family(family).shipped_config_name(prediction)
    if not (config / "model_index.json").is_file():
        raise SdloraError(f"The config folder {config} has no model_index.json; pass a diffusers model folder as "
                          "config_dir.")
    configs = read_part_configs(config)
    return ModelFacts(location, family, prediction, configs.zero_terminal_snr(), configs.native_resolution(),
                      found, read_from, config)


def _default_resolution(family: str | None, prediction: str | None) -> int | None:
    return get_family(family).default_resolution(prediction or "epsilon") if family else None


def check_checkpoint_file(path: Path) -> None:
    """A file that cannot be a checkpoint gets its sentence before anything opens it (torch.load reads a text
    file's letters as pickle opcodes and fails with a bare KeyError)."""
    if path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
        raise SdloraError(f"The file {path} is not a model checkpoint; use a .safetensors or .ckpt file.")
    if path.suffix.lower() in PICKLE_SUFFIXES:
        with path.open("rb") as handle:
            start = handle.read(4)
        if not start.startswith(_TORCH_SAVE_MAGIC):
            raise not_a_checkpoint(path)


def not_a_checkpoint(path: Path) -> SdloraError:
    return SdloraError(f"The file {path} is not a valid checkpoint (neither the zip nor the pickle format torch.save "
                       "writes); choose a Stable Diffusion .safetensors or .ckpt file.")


def safetensors_keys(path: Path) -> list[str]:
    """The weight names in a .safetensors file's header (the weights are not read)."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            return list(handle.keys())
    except (SafetensorError, OSError) as error:
        raise unreadable_checkpoint(path, error) from None


def unreadable_checkpoint(path: Path, error: Exception) -> SdloraError:
    return SdloraError(f"The file {path} is not a readable model checkpoint ({first_line(error)}).")


def first_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return text[0][:200] if text else type(error).__name__


def detect_checkpoint_family(keys, path: Path | str = "checkpoint") -> ModelFamily:
    """The family of an original-layout checkpoint from its text-encoder keys."""
    keys = list(keys)
    if any(k.startswith("conditioner.embedders.1.") for k in keys):
        return get_family("sdxl")
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        return get_family("sd2")
    if any(k.startswith("cond_stage_model.transformer.") for k in keys):
        return get_family("sd1")
    if any(marker in k for k in keys[:200] for marker in _ADAPTER_MARKERS):
        raise SdloraError(
            f"The file {path} is a LoRA/LyCORIS adapter, not a base model; choose a full SD checkpoint as the model."
        )
    if any(k.startswith("model.diffusion_model.") for k in keys):
        raise SdloraError(
            f"The file {path} holds a UNet but no text encoder; use a full checkpoint or a diffusers folder."
        )
    raise SdloraError(
        f"The file {path} is not a Stable Diffusion 1.x, 2.x or XL checkpoint (none of their weight names are in it)."
    )


def guess_prediction_type(family: ModelFamily, path: Path, keys) -> str:
    """See the module docstring; the user can always override the guess."""
    if "v_pred" in keys:
        return "v_prediction"
    sidecar = path.with_suffix(".yaml")
    if sidecar.is_file():
        v = re.search(
            r"parameterization:\s*[\"']?v[\"']?\s*$", sidecar.read_text(errors="ignore"), re.MULTILINE
        )
        return "v_prediction" if v else "epsilon"
    if family.is_v2 and not re.search(r"base|512", path.name.lower()):
        return "v_prediction"
    return "epsilon"

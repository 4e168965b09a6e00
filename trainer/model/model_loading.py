"""Open a base model (demo:<family>, a diffusers folder, a hub id, or one .safetensors/.ckpt file) offline.

Single files are converted by diffusers' own single-file loaders; the configs they need come from the
folders shipped under trainer/assets/configs (the real SD1.5, SD2.1, SD2.1-base and SDXL-base configs), so
nothing is looked up on the hub.

Prediction type, when "auto":
- diffusers folder / hub id / demo: the `prediction_type` of the model's scheduler config.
- single file: "v_prediction" when the file holds a `v_pred` key (ComfyUI's marker) or a sidecar
  `<name>.yaml` (A1111's convention) says `parameterization: "v"`; with a sidecar yaml but no such line,
  "epsilon". Otherwise SD2 files are v_prediction (SD2.x 768-v is the common SD2 checkpoint) unless the
  file name contains "base" or "512"; SD1 and SDXL files are epsilon. Always overridable.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import pickle
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import diffusers
import torch
from diffusers import AutoencoderKL, DDPMScheduler, DiffusionPipeline, UNet2DConditionModel
from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
from safetensors import SafetensorError
from safetensors.torch import load_file

from networks.errors import SdloraError
from trainer.config import PREDICTION_TYPES
from trainer.model.family import ModelFamily, detect_family, get_family
from trainer.model.tiny_models import ASSETS, demo_model_path, load_clip_tokenizer

SHIPPED_CONFIGS = ASSETS / "configs"
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth")
# Pipeline parts a trainer never needs; not loading them saves time, memory and downloads.
_UNNEEDED_PARTS = ("safety_checker", "feature_extractor", "image_encoder")
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
_ADAPTER_MARKERS = ("lora_down", "lora_up", "lora_A", "lora_B", "hada_w1", "lokr_w1", "lora_unet_", "lora_te")


@dataclass
class LoadedModel:
    """Everything training needs from a base model, on the CPU, in the requested dtype."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoders: list
    tokenizers: list
    noise_scheduler: DDPMScheduler
    family: ModelFamily
    prediction_type: str
    source: str
    vae_identity: str
    scheduler_config: dict = field(default_factory=dict)  # the model's own (inference) scheduler

    def pipeline(self) -> DiffusionPipeline:
        """The diffusers pipeline over these very modules (for sample images), with the model's scheduler."""
        scheduler_class = getattr(diffusers, self.scheduler_config.get("_class_name", "DDIMScheduler"))
        scheduler = scheduler_class.from_config(self.scheduler_config, prediction_type=self.prediction_type)
        parts = dict(zip(self.family.text_encoder_attrs, self.text_encoders))
        parts.update(zip(self.family.tokenizer_attrs, self.tokenizers))
        pipeline_class = getattr(diffusers, self.family.pipeline_class_name)
        return pipeline_class(
            unet=self.unet, vae=self.vae, scheduler=scheduler, **parts, **self.family.pipeline_extras()
        )


def load_model(
    spec: str,
    family: str = "auto",
    prediction_type: str = "auto",
    dtype: torch.dtype = torch.float32,
    config_dir: str | Path | None = None,
    vae: str | Path | None = None,
) -> LoadedModel:
    """Load `spec`; `config_dir` (a diffusers folder) replaces the shipped config for single files; `vae`
    (kohya's --vae: a VAE file or folder) replaces the model's own VAE."""
    model = _load_base(spec, family, prediction_type, dtype, config_dir)
    return with_vae(model, vae, dtype, config_dir) if vae else model


def _load_base(spec, family, prediction_type, dtype, config_dir) -> LoadedModel:
    if prediction_type not in ("auto", *PREDICTION_TYPES):
        raise SdloraError(f"Unknown prediction type {prediction_type!r}; use auto, epsilon or v_prediction.")
    wanted = None if family == "auto" else get_family(family)
    spec = str(spec)
    if spec.startswith("demo:"):
        return _load_pretrained(
            demo_model_path(spec.removeprefix("demo:")), spec, wanted, prediction_type, dtype
        )
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise SdloraError(
                f"The folder {path} has no model_index.json, so it is not a diffusers model; "
                "point to the folder that holds model_index.json or to a single .safetensors file."
            )
        return _load_pretrained(path, spec, wanted, prediction_type, dtype)
    if path.is_file():
        return _load_single_file(path, wanted, prediction_type, dtype, config_dir)
    if _HUB_ID.match(spec) and not path.suffix:
        return _load_pretrained(spec, spec, wanted, prediction_type, dtype)
    check_model_spec(spec)
    raise SdloraError(f"The model {spec} was not found; {WHAT_MODELS}.")


WHAT_MODELS = "give a diffusers folder, a .safetensors/.ckpt file or demo:shapes"


def check_model_spec(spec: str) -> None:
    """One sentence when `spec` can name no model at all (no such file or folder, not a hub id); cheap, so
    it runs before anything is written."""
    spec = str(spec).strip()
    if spec.startswith("demo:"):
        return  # the config accepts only the built-in names
    path = Path(spec).expanduser()
    if not (path.exists() or (_HUB_ID.match(spec) and not path.suffix)):
        raise SdloraError(f"The model {spec} was not found; {WHAT_MODELS}.")


# --- diffusers folders and hub ids ------------------------------------------------------------------


def _fp16_only(folder: Path) -> bool:
    """Some hub folders ship only *.fp16.safetensors weights, which diffusers loads as variant="fp16"."""
    unet = folder / "unet"
    return unet.is_dir() and not any(unet.glob("diffusion_pytorch_model.*")) and any(unet.glob("*.fp16.*"))


def _load_pretrained(where, source: str, wanted, prediction_type: str, dtype) -> LoadedModel:
    kwargs = {}
    if isinstance(where, Path) and _fp16_only(where):
        kwargs["variant"] = "fp16"
    try:
        index = DiffusionPipeline.load_config(where)
        kwargs.update({part: None for part in _UNNEEDED_PARTS if part in index})
        pipe = DiffusionPipeline.from_pretrained(where, dtype=dtype, **kwargs)
    except (OSError, ValueError) as error:
        raise SdloraError(
            f"The model {source} could not be loaded ({_first_line(error)}); check the path or hub id."
        ) from None
    if not isinstance(getattr(pipe, "unet", None), UNet2DConditionModel):
        raise SdloraError(
            f"The model {source} is a {type(pipe).__name__}, not Stable Diffusion 1.x, 2.x or XL."
        )
    encoders = [
        getattr(pipe, a) for a in ("text_encoder", "text_encoder_2") if getattr(pipe, a, None) is not None
    ]
    family = wanted or detect_family(pipe.unet.config, [e.config for e in encoders])
    missing = [
        a for a in family.text_encoder_attrs + family.tokenizer_attrs if getattr(pipe, a, None) is None
    ]
    if missing:
        raise SdloraError(
            f"The model {source} has no {missing[0]}, so it is not an {family.name} model; set family to auto."
        )
    scheduler_config = dict(pipe.scheduler.config)
    if prediction_type == "auto":
        prediction_type = scheduler_config.get("prediction_type", "epsilon")
    return _assemble(
        pipe.unet,
        pipe.vae,
        [getattr(pipe, a) for a in family.text_encoder_attrs],
        [getattr(pipe, a) for a in family.tokenizer_attrs],
        family,
        prediction_type,
        str(where),
        scheduler_config,
    )


# --- single original-layout checkpoints -------------------------------------------------------------


def _first_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return text[0][:200] if text else type(error).__name__


def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """The state dict of a .safetensors or .ckpt file; pickles only through torch.load(weights_only=True)."""
    if path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
        raise SdloraError(f"The file {path} is not a model checkpoint; use a .safetensors or .ckpt file.")
    try:
        if path.suffix.lower() == ".safetensors":
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise SdloraError(
            f"The checkpoint {path} holds Python objects that cannot be loaded safely; convert it to .safetensors first."
        ) from None
    except (SafetensorError, OSError, RuntimeError, EOFError, ValueError) as error:
        raise SdloraError(
            f"The file {path} is not a readable model checkpoint ({_first_line(error)})."
        ) from None
    while isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not state:
        raise SdloraError(
            f"The file {path} holds no model weights; use a Stable Diffusion .safetensors or .ckpt file."
        )
    return state


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


def _text_encoder_classes(config_dir: Path, family: ModelFamily) -> list:
    index = json.loads((config_dir / "model_index.json").read_text())
    classes = []
    for attr in family.text_encoder_attrs:
        library, name = index[attr]
        classes.append(getattr(importlib.import_module(library), name))
    return classes


def _load_single_file(path: Path, wanted, prediction_type: str, dtype, config_dir) -> LoadedModel:
    state = read_checkpoint(path)
    family = wanted or detect_checkpoint_family(state.keys(), path)
    if prediction_type == "auto":
        prediction_type = guess_prediction_type(family, path, state.keys())
    config = Path(config_dir) if config_dir else SHIPPED_CONFIGS / family.shipped_config_name(prediction_type)
    if not (config / "model_index.json").is_file():
        raise SdloraError(
            f"The config folder {config} has no model_index.json; pass a diffusers model folder as config_dir."
        )
    common = dict(config=str(config), local_files_only=True)
    try:
        unet = UNet2DConditionModel.from_single_file(state, subfolder="unet", dtype=dtype, **common)
        vae = AutoencoderKL.from_single_file(state, subfolder="vae", dtype=dtype, **common)
        encoders = [
            create_diffusers_clip_model_from_ldm(cls, state, subfolder=attr, torch_dtype=dtype, **common)
            for cls, attr in zip(_text_encoder_classes(config, family), family.text_encoder_attrs)
        ]
    except (
        ValueError,
        RuntimeError,
        KeyError,
        OSError,
        diffusers.loaders.single_file_utils.SingleFileComponentError,
    ) as error:
        raise SdloraError(
            f"The checkpoint {path} does not fit the {config.name} model layout ({_first_line(error)}); "
            "check the family setting or pass a matching config folder."
        ) from None
    for name, module in (("unet", unet), ("vae", vae), *(("text encoder", e) for e in encoders)):
        _check_complete(module, name, path)
    tokenizers = [load_clip_tokenizer(pad) for pad in family.tokenizer_pad_tokens]
    scheduler_config = dict(DDPMScheduler.load_config(str(config), subfolder="scheduler"))
    return _assemble(unet, vae, encoders, tokenizers, family, prediction_type, str(path), scheduler_config)


def with_vae(model: LoadedModel, spec: str | Path, dtype=torch.float32, config_dir=None) -> LoadedModel:
    """`model` with another VAE: a diffusers folder (its own or a model's vae/), or a single file in the
    original layout (A1111's .safetensors/.ckpt/.pt VAEs, with or without the first_stage_model. prefix),
    read with the base model's VAE config."""
    path = Path(spec).expanduser()
    if path.is_dir():
        folder = path / "vae" if (path / "vae" / "config.json").is_file() else path
        if not (folder / "config.json").is_file():
            raise SdloraError(f"model.vae {path} is a folder without config.json; give a VAE .safetensors file or "
                              "a diffusers VAE folder.")
        vae = AutoencoderKL.from_pretrained(str(folder), torch_dtype=dtype, local_files_only=True)
    elif path.is_file():
        state = read_checkpoint(path)
        root = _vae_config_root(model, config_dir)
        try:
            vae = AutoencoderKL.from_single_file(state, config=str(root), subfolder="vae", dtype=dtype,
                                                 local_files_only=True)
        except (ValueError, RuntimeError, KeyError, OSError,
                diffusers.loaders.single_file_utils.SingleFileComponentError) as error:
            raise SdloraError(f"model.vae {path} does not fit this {model.family.name} model's VAE "
                              f"({_first_line(error)}); choose a VAE made for {model.family.name}.") from None
        _check_complete(vae, "VAE", path)
    else:
        raise SdloraError(f"model.vae {spec} was not found; give a VAE .safetensors file or a diffusers VAE folder.")
    return replace(model, vae=vae, vae_identity=vae_identity(vae))


def _vae_config_root(model: LoadedModel, config_dir) -> Path:
    """Where the base model's VAE config lives: config_dir, the model's own folder, or the shipped one."""
    if config_dir:
        return Path(config_dir)
    source = demo_model_path(model.source.removeprefix("demo:")) if model.source.startswith("demo:") \
        else Path(model.source)
    if (source / "vae" / "config.json").is_file():
        return source
    return SHIPPED_CONFIGS / model.family.shipped_config_name(model.prediction_type)


def _check_complete(module: torch.nn.Module, name: str, path: Path) -> None:
    # Weights a checkpoint lacks stay on the "meta" device after diffusers' low-memory loading.
    missing = [n for n, p in module.named_parameters() if p.device.type == "meta"]
    if missing:
        raise SdloraError(
            f"The checkpoint {path} lacks {len(missing)} {name} weights (e.g. {missing[0]}); it is incomplete or of another model type."
        )


# --- shared ----------------------------------------------------------------------------------------


def vae_identity(vae: AutoencoderKL) -> str:
    """A stable id of what turns images into latents: the VAE config and statistics of encoder weights.

    Only the encoder side counts, so a decoder-only VAE fine-tune (e.g. ft-MSE) keeps latent caches valid.
    The same weights loaded in the same dtype always give the same id.
    """
    config = {k: v for k, v in vae.config.items() if not k.startswith("_") and k != "sample_size"}
    stats = []
    for name, tensor in vae.state_dict().items():
        if name.startswith(("encoder.", "quant_conv.")):
            t = tensor.detach().to("cpu", torch.float64)
            stats.append([name, list(t.shape), f"{t.sum().item():.10g}", f"{t.abs().sum().item():.10g}"])
    text = json.dumps([config, stats], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _assemble(
    unet, vae, encoders, tokenizers, family, prediction_type, source, scheduler_config
) -> LoadedModel:
    # Training noise always follows DDPM with the model's betas; clip_sample only matters when sampling.
    noise_scheduler = DDPMScheduler.from_config(
        scheduler_config, prediction_type=prediction_type, clip_sample=False
    )
    return LoadedModel(
        unet=unet,
        vae=vae,
        text_encoders=list(encoders),
        tokenizers=list(tokenizers),
        noise_scheduler=noise_scheduler,
        family=family,
        prediction_type=prediction_type,
        source=source,
        vae_identity=vae_identity(vae),
        scheduler_config=scheduler_config,
    )

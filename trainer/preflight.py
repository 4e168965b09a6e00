"""The pre-flight check: what a run will do and what will likely ruin it, before any GPU time is spent.

`preflight_report(cfg)` scans the dataset (images, captions, buckets), works out the step count exactly
as the training loop will, explains the adapter's scale alpha/r, estimates GPU memory and time per step
(an uncalibrated formula, docs/PREFLIGHT.md), and warns about settings that commonly ruin a run.
Only errors block a run; warnings are advice. Every line is one sentence, for the CLI and the UI alike.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

from networks.errors import SdloraError
from trainer.config import DEMO_MODELS, TrainConfig
from trainer.data.steps import count_steps

CAPTION_EXTENSIONS = (".txt", ".caption", ".tags")
KOHYA_KEEP_SEPARATOR = "|||"  # the marker kohya_ss documents and its users write
# What the report needs to know of each train.optimizer: its state per adapter parameter beyond the fp32
# weight and gradient (4 + 4 bytes), and its typical learning rate when no preset tells (Lion wants ~3-10x
# less than AdamW, Prodigy finds its own). tests/test_preflight.py holds the keys to the config's choices.
OPTIMIZER_FACTS = {"adamw": (8, 1e-4), "adamw8bit": (2, 1e-4), "lion": (4, 3e-5), "prodigy": (16, 1.0),
                   "adafactor": (1, 1e-4)}
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


@dataclass
class Report:
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    info: list[str] = field(default_factory=list)
    data: dict = field(default_factory=dict)  # structured: dataset, captions, steps, buckets, scale, estimate

    @property
    def ok(self) -> bool:
        """False when training would fail; warnings never block."""
        return not self.errors

    def to_dict(self) -> dict:
        return {"ok": self.ok, "errors": self.errors, "warnings": self.warnings, "info": self.info, **self.data}

    def render(self) -> str:
        verdict = "ready to train" if self.ok else "cannot train"
        lines = [f"Pre-flight check: {verdict} ({len(self.errors)} errors, {len(self.warnings)} warnings)."]
        for title, mark, items in (("Errors", "x", self.errors), ("Warnings", "!", self.warnings),
                                   ("Plan", "-", self.info)):
            if items:
                lines += ["", f"{title}:"] + [f"  {mark} {item}" for item in items]
        if self.data.get("buckets"):
            lines += ["", "Buckets:"] + bucket_histogram(self.data["buckets"])
        return "\n".join(lines)


# -- steps ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StepPlan:
    samples_per_epoch: int  # images x repeats
    batches_per_epoch: int  # all processes together, each bucket rounded up on its own
    batches_per_process: int  # after padding the last round so every process steps alike
    steps_per_epoch: int  # optimizer steps per process
    total_steps: int
    epochs: int  # epochs the run touches (the last may be cut short by max_steps)
    batch_size: int
    accumulation: int
    world_size: int
    limited_by: str  # "epochs" or "max_steps"

    @property
    def rounding(self) -> int:
        """Extra batches per epoch because each bucket's last batch is partial."""
        return self.batches_per_epoch - math.ceil(self.samples_per_epoch / self.batch_size)

    @property
    def images_per_step(self) -> int:
        return self.batch_size * self.accumulation * self.world_size

    def words(self) -> str:
        rounding = f" ({self.rounding} more for partial batches per bucket)" if self.rounding else ""
        split = (f", {self.batches_per_process} on each of {self.world_size} processes"
                 if self.world_size > 1 else "")
        accumulate = f", accumulating {self.accumulation}" if self.accumulation > 1 else ""
        ending = (f"x {self.epochs} epochs = {self.total_steps} steps" if self.limited_by == "epochs" else
                  f"train.max_steps stops it at {self.total_steps} steps ({self.epochs} epochs started)")
        return (f"{self.samples_per_epoch} samples per epoch at batch {self.batch_size} make "
                f"{self.batches_per_epoch} batches{rounding}{split}{accumulate}: {self.steps_per_epoch} steps "
                f"per epoch, {ending}.")


def step_plan(images_with_repeats: int | Sequence[int] | Mapping[object, int], batch_size: int,
              accumulation: int = 1, epochs: int = 1, max_steps: int | None = None,
              world_size: int = 1) -> StepPlan:
    """Optimizer steps as trainer.run.loop counts them. `images_with_repeats` is the number of samples per
    epoch in each bucket (a list or {bucket: count}; a plain int is one bucket), because the dataset
    batches each bucket on its own and rounds its last batch up."""
    if isinstance(images_with_repeats, int):
        per_bucket = [images_with_repeats]
    elif isinstance(images_with_repeats, Mapping):
        per_bucket = list(images_with_repeats.values())
    else:
        per_bucket = list(images_with_repeats)
    for name, value in (("batch_size", batch_size), ("accumulation", accumulation), ("world_size", world_size)):
        if value < 1:
            raise SdloraError(f"{name} is {value}; use 1 or more.")
    batches = sum(math.ceil(n / batch_size) for n in per_bucket if n > 0)
    per_process = math.ceil(batches / world_size)  # the loop pads the last round (DistributedSampler-like)
    count = count_steps(per_process, accumulation, epochs, max_steps)
    return StepPlan(sum(per_bucket), batches, per_process, count.steps_per_epoch, count.total_steps, count.epochs,
                    batch_size, accumulation, world_size, count.limited_by)


# -- memory and time ---------------------------------------------------------------------------------------
# The constants of the estimate; docs/PREFLIGHT.md explains each. None is calibrated on a GPU yet.
WEIGHT_BYTES = {"no": 4, "fp16": 2, "bf16": 2}
# Activation memory per image per pixel kept for the backward pass, at half precision, no checkpointing.
ACTIVATION_BYTES_PER_PIXEL = {"sd1": 10_000, "sd2": 10_000, "sdxl": 18_000}
CHECKPOINTING_ACTIVATIONS = 0.25  # gradient checkpointing keeps about a quarter of them
CHECKPOINTING_COMPUTE = 4 / 3  # ... at the price of one more forward pass
OVERHEAD_BYTES = 0.8e9  # CUDA context, cuBLAS/cuDNN workspaces, allocator slack
SD15_FLOP_PER_IMAGE = 1.73e12  # one training step (forward + backward) of the SD1.5 UNet at 512 x 512
FLOP_PER_PIXEL_FACTOR = {"sd1": 1.0, "sd2": 1.0, "sdxl": 2.6}  # relative to SD1.5, per pixel
ASSUMED_THROUGHPUT = {"half": 20e12, "fp32": 6e12}  # FLOP/s a 24 GB consumer GPU sustains on this work


@dataclass(frozen=True)
class Estimate:
    family: str
    resolution: int
    batch_size: int
    precision: str
    gradient_checkpointing: bool
    parameters: dict  # unet, text_encoders, vae, adapter
    memory_bytes: dict  # weights, vae, adapter, activations, overhead, total
    seconds_per_step: float
    calibrated: bool = False

    def words(self) -> str:
        gb = {k: v / 1e9 for k, v in self.memory_bytes.items()}
        return (f"Estimated GPU memory {gb['total']:.1f} GB (model weights {gb['weights'] + gb['vae']:.1f}, "
                f"adapter and optimizer {gb['adapter']:.2f}, activations {gb['activations']:.1f}, overhead "
                f"{gb['overhead']:.1f}) and {self.seconds_per_step:.2f} s per step for {self.family} at "
                f"{self.resolution} px, batch {self.batch_size}, {self.precision}"
                f"{', gradient checkpointing' if self.gradient_checkpointing else ''}; uncalibrated, expect "
                "+-50% (docs/PREFLIGHT.md).")


@lru_cache(maxsize=4)
def _meta_models(config_name: str):
    """The real model of a shipped config, built on the meta device: shapes without memory."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from trainer.model.family import FAMILIES
    from trainer.model.model_loading import SHIPPED_CONFIGS, _text_encoder_classes

    folder = SHIPPED_CONFIGS / config_name
    family = next(f for f in FAMILIES.values() if config_name in (f.shipped_config_name("epsilon"),
                                                                  f.shipped_config_name("v_prediction")))
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))
        encoders = [cls(cls.config_class.from_pretrained(folder / attr))
                    for cls, attr in zip(_text_encoder_classes(folder, family), family.text_encoder_attrs)]
    return unet, encoders, vae


def model_parameters(family: str, prediction_type: str = "epsilon") -> dict[str, int]:
    """Parameter counts of the family's real UNet, text encoders and VAE (from the shipped configs)."""
    from trainer.model.family import get_family

    unet, encoders, vae = _meta_models(get_family(family).shipped_config_name(prediction_type))
    return {"unet": _count(unet), "text_encoders": sum(_count(e) for e in encoders), "vae": _count(vae)}


def adapter_parameters(family: str, network) -> int:
    """Trainable parameters of the adapter the config's network section describes, on the real model."""
    from networks.naming import components_for
    from networks.network import make_adapter, target_rules
    from networks.targets import find_targets, uses_conv_rank

    spec = network.spec()
    unet, encoders, _ = _meta_models(_config_name(family))
    total = 0
    for part in components_for(family, unet if spec.train_unet else None,
                               encoders if spec.train_text_encoder else []):
        for _, module in find_targets(part.model, part.is_unet, target_rules(spec)):
            rank = spec.conv_rank if uses_conv_rank(module) else spec.rank
            weight = module.weight.shape
            if spec.type == "lokr":  # its halves' sizes follow LyCORIS's factorization; they are small
                total += sum(p.numel() for p in make_adapter(spec, module, rank, 1.0).parameters())
                continue
            low_rank = rank * math.prod(weight[1:]) + weight[0] * rank  # down [r, in, k, k] + up [out, r]
            total += 2 * low_rank if spec.type == "loha" else low_rank  # LoHa: two such pairs
    return total


def _config_name(family: str) -> str:
    from trainer.model.family import get_family

    return get_family(family).shipped_config_name("epsilon")


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def estimate_resources(cfg: TrainConfig, family: str, prediction_type: str = "epsilon") -> Estimate:
    """GPU memory and seconds per optimizer step; the formula is documented in docs/PREFLIGHT.md."""
    train, resolution = cfg.train, cfg.dataset.resolution
    params = {**model_parameters(family, prediction_type), "adapter": adapter_parameters(family, cfg.network)}
    half = train.mixed_precision in ("fp16", "bf16")
    activation = ACTIVATION_BYTES_PER_PIXEL[family] * (1 if half else 2) * resolution ** 2 * train.batch_size
    if train.gradient_checkpointing:
        activation *= CHECKPOINTING_ACTIVATIONS
    memory = {"weights": (params["unet"] + params["text_encoders"]) * WEIGHT_BYTES[train.mixed_precision],
              "vae": params["vae"] * 4,  # sdlora keeps the VAE in fp32 (SDXL's overflows in fp16)
              "adapter": params["adapter"] * (8 + OPTIMIZER_FACTS[train.optimizer][0]),
              "activations": activation, "overhead": OVERHEAD_BYTES}
    memory["total"] = sum(memory.values())
    flop = (SD15_FLOP_PER_IMAGE * FLOP_PER_PIXEL_FACTOR[family] * resolution ** 2 / 512 ** 2
            * train.batch_size * train.gradient_accumulation_steps)
    if train.gradient_checkpointing:
        flop *= CHECKPOINTING_COMPUTE
    seconds = flop / ASSUMED_THROUGHPUT["half" if half else "fp32"]
    return Estimate(family, resolution, train.batch_size, train.mixed_precision if half else "fp32",
                    train.gradient_checkpointing, params, memory, seconds)


# -- the report ------------------------------------------------------------------------------------------
def preflight_report(cfg: TrainConfig, preset: str | None = None) -> Report:
    """Check `cfg` before training; `preset` (its name) is what learning rates are compared against."""
    report = Report()
    family, prediction = _check_model(cfg, report)
    if cfg.model.vae and not Path(cfg.model.vae).expanduser().exists():
        report.errors.append(f"model.vae {cfg.model.vae} was not found; give a VAE .safetensors file or a diffusers "
                             "VAE folder, or leave it empty.")
    _check_network_weights(cfg, family, report)
    _explain_block_weights(cfg, family, report)
    _check_noise_options(cfg, prediction, report)
    dataset = _check_dataset(cfg, report)
    if dataset is not None:
        _check_captions(dataset, report)
        _check_caption_length(cfg, dataset, report)
        _check_masks(cfg, dataset, report)
        train_set = _check_validation(cfg, dataset, report)
        if train_set is not None:
            plan = _plan(cfg, train_set, report)
            _check_dataset_size(cfg, train_set, plan, report)
    _explain_scale(cfg, report)
    _explain_load_targets(cfg, report)
    _explain_init(cfg, report)
    if family is not None:
        _estimate(cfg, family, prediction, report)
        _check_resolution(cfg, family, report)
        _check_precision(cfg, family, report)
    _check_learning_rates(cfg, preset, report)
    _check_sampling_and_saving(cfg, report)
    _check_compile(cfg, report)
    return report


def _check_compile(cfg: TrainConfig, report: Report, cuda: bool | None = None) -> None:
    """torch.compile's default backend builds kernels with Triton on a GPU and a C++ compiler on a CPU;
    without them it fails only at the first step, with torch's own long error."""
    if not cfg.train.compile:
        return
    import importlib.util
    import shutil

    import torch

    cuda = torch.cuda.is_available() if cuda is None else cuda
    if cuda and importlib.util.find_spec("triton") is None:
        report.warnings.append("train.compile is on but Triton is not installed, so compiling will fail at the "
                               "first step; install triton or set train.compile = false.")
    elif not cuda and not any(shutil.which(c) for c in ("c++", "g++", "clang++", "cl")):
        report.warnings.append("train.compile is on but no C++ compiler (c++, g++, clang++ or cl) is on the PATH, "
                               "so compiling will fail at the first step; install one or set train.compile = false.")
    report.info.append("train.compile: the first step (and the first of each new bucket shape) compiles the UNet, "
                       "which takes minutes; later steps are faster, so it pays off on long runs.")


# Where the exported file loads (docs/LORA_FORMAT.md); the UI shows the pre-flight text before Train.
LOAD_TARGETS = {"lora": ("A1111/Forge", "ComfyUI", "diffusers", "LyCORIS"),
                "loha": ("A1111/Forge", "ComfyUI", "LyCORIS"), "lokr": ("A1111/Forge", "ComfyUI", "LyCORIS")}


def _explain_load_targets(cfg: TrainConfig, report: Report) -> None:
    from networks.lycoris_keys import NOT_IN_DIFFUSERS

    kind = cfg.network.type
    targets = LOAD_TARGETS.get(kind, LOAD_TARGETS["lora"])
    report.data["load_targets"] = {"loads_in": list(targets),
                                   "not_loaded_by": [] if "diffusers" in targets else ["diffusers load_lora_weights"]}
    if "diffusers" in targets:
        return
    report.info.append(f"Loads in: {', '.join(targets)}. Not in diffusers: network.type {kind} writes LyCORIS "
                       f"keys, and {NOT_IN_DIFFUSERS}")
    if cfg.train.loraplus_ratio != 1:
        report.warnings.append(f"train.loraplus_ratio {cfg.train.loraplus_ratio:g} raises only lora_up weights' "
                               f"learning rate, and {kind} has none, so it changes nothing (as in LyCORIS); "
                               "set it to 1.")


def _explain_init(cfg: TrainConfig, report: Report) -> None:
    net = cfg.network
    if getattr(net, "init", "kaiming") in ("pissa", "loraga") and getattr(net, "export", "") == "exact":
        report.info.append(f"network.init {net.init} moves the base weights, so the exact export stores the change "
                           f"at rank {2 * net.rank}: the file is twice the size of a rank {net.rank} LoRA "
                           "(network.export = \"svd\" re-ranks it to r).")


def _check_precision(cfg: TrainConfig, family: str, report: Report) -> None:
    if family == "sdxl" and cfg.train.mixed_precision == "fp16":
        report.warnings.append(
            "train.mixed_precision is fp16 on SDXL, whose VAE overflows in fp16 (NaN latents): sdlora keeps the "
            "VAE in fp32, but the SDXL UNet can overflow too; use bf16 if the GPU supports it.")


def _check_model(cfg: TrainConfig, report: Report) -> tuple[str | None, str]:
    """(family, prediction type) of the base model, read from its configs or weight names, not loaded."""
    from trainer.model.family import detect_family, get_family

    path, family = cfg.model.path.strip(), cfg.model.family
    prediction, native = cfg.model.prediction_type, None
    try:
        if path.startswith("demo:"):
            found, how = DEMO_MODELS.get(path, "sd1"), "the built-in tiny demo model"
            found_prediction = "v_prediction" if found == "sd2" else "epsilon"
        elif Path(path).expanduser().is_dir():
            found, found_prediction, native = _folder_family(Path(path).expanduser(), detect_family)
            how = "read from the model folder's configs"
        elif Path(path).expanduser().is_file():
            found, found_prediction, how = _file_family(Path(path).expanduser())
        elif _HUB_ID.match(path) and not Path(path).suffix:
            found, found_prediction = None, "epsilon"
            how = "a hub id (downloaded on first use; set model.family for exact estimates)"
        else:
            report.errors.append(f"model.path {path} was not found; give a diffusers folder, a .safetensors/.ckpt "
                                 "file, a hub id or demo:shapes.")
            return (family if family != "auto" else None), "epsilon"
    except SdloraError as error:
        report.errors.append(str(error))
        return (family if family != "auto" else None), "epsilon"
    if family != "auto" and found and family != found:
        report.warnings.append(f"model.family is {family} but {path} looks like {found}; set model.family to auto "
                               "unless you are sure.")
    family = family if family != "auto" else found
    prediction = prediction if prediction != "auto" else found_prediction
    if family:
        report.info.append(f"Model: {get_family(family).name}, {prediction} prediction; {how}.")
    else:
        report.info.append(f"Model: {path}, family unknown until it loads ({how}).")
    if family and native is None:
        native = get_family(family).default_resolution(prediction)
    report.data["model"] = {"family": family, "prediction_type": prediction, "path": path,
                            "native_resolution": native}
    return family, prediction


def _folder_family(folder: Path, detect_family) -> tuple[str, str, int | None]:
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
    scheduler = config("scheduler", "scheduler_config.json") or {}
    # The UNet's latent sample size x the VAE's factor (8 for SD; 4 for demo:shapes) is its training size.
    vae_levels = len((config("vae") or {}).get("block_out_channels") or [0] * 4)
    native = unet["sample_size"] * 2 ** (vae_levels - 1) if isinstance(unet.get("sample_size"), int) else None
    return detect_family(unet, encoders).name, scheduler.get("prediction_type", "epsilon"), native


def _file_family(path: Path) -> tuple[str | None, str, str]:
    from trainer.model.model_loading import detect_checkpoint_family, guess_prediction_type

    if path.suffix.lower() != ".safetensors":
        guess = "sdxl" if "xl" in path.name.lower() else None
        return guess, "epsilon", "not opened (a .ckpt is slow to read); set model.family for exact estimates"
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            keys = list(handle.keys())
    except (SafetensorError, OSError) as error:
        raise SdloraError(f"model.path {path} is not a readable .safetensors file ({error}); choose a Stable "
                          "Diffusion checkpoint.") from None
    family = detect_checkpoint_family(keys, path)
    return family.name, guess_prediction_type(family, path, keys), "read from the checkpoint's weight names"


def _check_network_weights(cfg: TrainConfig, family: str | None, report: Report) -> None:
    """The LoRA file a run continues: readable, made for this model family, its ranks named."""
    if not cfg.network.weights:
        return
    from networks.inspect import lora_family
    from networks.lora import LORA_DOWN
    from networks.lora_file import read_lora
    from networks.network import check_parts_trained

    path = Path(cfg.network.weights).expanduser()
    try:
        state, metadata = read_lora(path)
    except SdloraError as error:
        report.errors.append(f"network.weights: {error}")
        return
    made_for = lora_family(state, metadata)
    if family and made_for and made_for != family:
        report.errors.append(f"network.weights {path.name} was made for {made_for} but the base model is {family}; "
                             f"continue it on an {made_for} model.")
        return
    try:
        check_parts_trained(state, cfg.network.spec(), path.name)
    except SdloraError as error:
        report.errors.append(str(error))
        return
    ranks = sorted({int(t.shape[0]) for k, t in state.items() if k.endswith("." + LORA_DOWN)})
    modules = sum(1 for k in state if k.endswith("." + LORA_DOWN))
    shown = ", ".join(map(str, ranks[:6])) + (" ..." if len(ranks) > 6 else "")
    report.info.append(f"Continues {path.name}: {modules} modules at rank {shown}, kept at their own rank and "
                       "alpha; modules it lacks start fresh.")


def _check_noise_options(cfg: TrainConfig, prediction: str, report: Report) -> None:
    """kohya's options that do nothing without another, or for this prediction type (kohya refuses them)."""
    train = cfg.train
    if train.scale_v_pred_loss_like_noise_pred and prediction == "epsilon":
        report.warnings.append("train.scale_v_pred_loss_like_noise_pred is for v-prediction models and this one "
                               "predicts epsilon, so it is not applied; turn it off (or use v_pred_like_loss).")
    if train.zero_terminal_snr and prediction == "epsilon":
        report.warnings.append("train.zero_terminal_snr is meant for v-prediction models: at the last timestep an "
                               "epsilon model sees pure noise and can only echo it; turn it off unless you know "
                               "you want it.")
    if train.v_pred_like_loss and prediction == "v_prediction":
        report.warnings.append("train.v_pred_like_loss is for epsilon models and this one predicts v, so it is not "
                               "applied; turn it off.")
    for option, base in (("adaptive_noise_scale", "noise_offset"), ("noise_offset_random_strength", "noise_offset"),
                         ("ip_noise_gamma_random_strength", "ip_noise_gamma")):
        if getattr(train, option) and not getattr(train, base):
            report.warnings.append(f"train.{option} works on train.{base}, which is off, so it does nothing; set "
                                   f"train.{base} or turn it off.")


def _explain_block_weights(cfg: TrainConfig, family: str | None, report: Report) -> None:

    weights = cfg.network.spec().block_weights(family) if family else None
    if weights is None:
        return
    sdxl = family == "sdxl"
    inner = weights[1:-1] if sdxl else weights
    blocks = 9 if sdxl else 12
    down, mid, up = inner[:blocks], inner[blocks:-blocks], inner[-blocks:]
    shown = "; ".join(f"{part} {', '.join(f'{w:g}' for w in values)}"
                      for part, values in (("IN", down), ("MID", mid), ("OUT", up)))
    report.info.append(f"Block learning-rate weights: {shown}. Blocks at 0 get no adapter; the text encoder "
                       "keeps weight 1.")


def _check_dataset(cfg: TrainConfig, report: Report):
    from trainer.data.dataset import ImageDataset

    if not cfg.dataset.path:
        report.errors.append("dataset.path is empty; give the image folder with --data DIR.")
        return None
    try:
        dataset = ImageDataset.scan(cfg.dataset.options(), seed=cfg.train.seed)
    except SdloraError as error:
        report.errors.append(str(error))
        return None
    found = dataset.report
    report.data["dataset"] = found.to_dict()
    repeats = Counter(item.repeats for item in dataset.items if not item.is_reg)
    parts = [f"{n} image{'s' if n > 1 else ''} x {r} repeat{'s' if r > 1 else ''}" for r, n in sorted(repeats.items())]
    report.info.append(f"Dataset: {found.usable} usable images in {found.folder} ({', '.join(parts)}).")
    if found.reg_folder is not None:
        report.info.append(found.reg_summary() + f" Their loss weight is {cfg.train.prior_loss_weight:g} "
                                                 "(train.prior_loss_weight).")
    for problem in found.reg_problems:
        report.warnings.append(f"Regularization: {problem.name} is left out: {problem.reason}.")
    if found.skipped:
        names = ", ".join(f"{s.name} ({s.reason})" for s in found.skipped[:10])
        more = f" and {len(found.skipped) - 10} more" if len(found.skipped) > 10 else ""
        report.warnings.append(f"{len(found.skipped)} image(s) cannot be read and will be skipped: {names}{more}.")
    for folder in found.ignored_folders:
        report.warnings.append(f"The folder {folder.name} is ignored: its {folder.reason}.")
    return dataset


def _check_captions(dataset, report: Report) -> None:
    found, extension = dataset.report, dataset.options.caption_suffix
    missing = set(found.captions_missing)
    items = [item for item in dataset.items if not item.is_reg]  # reg images usually go by their class word
    others = {ext: sum(1 for item in items if item.path.with_suffix(ext).is_file())
              for ext in CAPTION_EXTENSIONS if ext != extension}
    others = {ext: n for ext, n in others.items() if n}
    with_caption = len(items) - len(missing)
    report.data["captions"] = {"extension": extension, "with_caption": with_caption,
                               "without_caption": sorted(missing), "other_extensions": others}
    report.info.append(f"Captions: {with_caption} of {len(items)} images have a {extension} caption.")
    if with_caption == 0 and others:
        ext, count = max(others.items(), key=lambda kv: kv[1])
        report.warnings.append(f"No image has a {extension} caption, but {count} have {ext} files next to them; "
                               f"use them with --set dataset.caption_extension={ext}.")
    elif with_caption == 0:
        class_words = {item.caption for item in items if item.caption}
        fallback = (f"they train with the folder class word ({', '.join(sorted(class_words)[:3])})"
                    if class_words else "they train with empty captions")
        report.warnings.append(f"None of the {len(items)} images has a caption ({extension}); {fallback}, so "
                               "prompts cannot steer what the LoRA learns: add a caption file next to each image.")
    elif missing:
        shown = ", ".join(sorted(missing)[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        report.warnings.append(f"{len(missing)} of {len(items)} images have no {extension} caption and "
                               f"train with the folder class word or an empty caption: {shown}.")
    marked = [item.path.name for item in dataset.items if KOHYA_KEEP_SEPARATOR in item.caption]
    if marked:  # only left in the text when dataset.keep_tokens_separator is off (or another marker)
        report.warnings.append(f"{len(marked)} caption(s) contain kohya's {KOHYA_KEEP_SEPARATOR} (e.g. {marked[0]}) but "
                               f"dataset.keep_tokens_separator is not {KOHYA_KEEP_SEPARATOR!r}, so the text encoder "
                               f"reads it; add --set dataset.keep_tokens_separator='{KOHYA_KEEP_SEPARATOR}'.")


def _check_caption_length(cfg: TrainConfig, dataset, report: Report) -> None:
    limit = cfg.model.max_token_length
    lengths = {}  # caption -> CLIP tokens (every family's tokenizers share CLIP's BPE)
    for caption in {item.caption for item in dataset.items}:
        lengths[caption] = len(_clip_tokenizer()(caption, add_special_tokens=False, verbose=False).input_ids)
    long = [item for item in dataset.items if lengths[item.caption] > limit]
    if not long:
        return
    worst = max(long, key=lambda item: lengths[item.caption])
    fits = [n for n in (150, 225) if n > limit and n >= lengths[worst.caption]]
    fix = (f"set model.max_token_length to {fits[0]}" if fits else "shorten them" if limit == 225
           else "set model.max_token_length to 225 and shorten the longest")
    report.warnings.append(f"{len(long)} caption(s) are longer than the {limit} tokens the text encoder reads "
                           f"(longest: {worst.path.name}, {lengths[worst.caption]} tokens), so their ends are cut "
                           f"off; {fix}.")


@lru_cache(maxsize=1)
def _clip_tokenizer():
    from trainer.model.tiny_models import load_clip_tokenizer

    return load_clip_tokenizer()


def _check_masks(cfg: TrainConfig, dataset, report: Report) -> None:
    # The config keys come with the masked-loss wiring; until then getattr keeps the check a no-op.
    source = getattr(cfg.dataset, "loss_mask", "none")
    if source == "alpha" and not any(item.has_alpha for item in dataset.items):
        report.warnings.append("dataset.loss_mask is alpha but no image has transparency, so every pixel trains; "
                               "use RGBA PNGs or a mask folder.")
    elif source == "folder":
        from trainer.data.loss_mask import LossMasks, missing_masks

        try:
            missing = missing_masks(LossMasks(dataset, "folder", getattr(cfg.dataset, "mask_folder", None)))
        except SdloraError as error:
            report.errors.append(str(error))
            return
        if missing:
            report.warnings.append(f"{len(missing)} image(s) have no mask and train on every pixel: "
                                   f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}.")


def _check_validation(cfg: TrainConfig, dataset, report: Report):
    """The training part of the dataset (held-out validation images removed)."""
    from trainer.objective.validation import split_dataset

    val = cfg.validation
    if (val.images or val.folder) and not val.every_steps:
        report.warnings.append("Validation images are set but validation.every_steps is 0, so no validation loss "
                               "is measured; set it (e.g. 50).")
    if val.every_steps and not (val.images or val.folder):
        report.warnings.append("validation.every_steps is set but there are no validation images; set "
                               "validation.images or validation.folder.")
    if val.folder and not Path(val.folder).is_dir():
        report.errors.append(f"validation.folder {val.folder} does not exist; point it at a folder of images.")
    if not val.images:
        return dataset
    try:
        train_set, held = split_dataset(dataset, val.images, val.seed)
    except SdloraError as error:
        report.errors.append(str(error))
        return None
    report.info.append(f"Validation: {len(held)} images held out of training ({', '.join(i.path.name for i in held[:5])}).")
    return train_set


def _plan(cfg: TrainConfig, dataset, report: Report) -> StepPlan:
    train = cfg.train
    per_bucket: dict = {}
    for item in dataset.items:
        per_bucket[item.bucket] = per_bucket.get(item.bucket, 0) + item.repeats
    world = _world_size()
    plan = step_plan(per_bucket, train.batch_size, train.gradient_accumulation_steps, train.epochs,
                     train.max_steps, world)
    report.data["steps"] = {**asdict(plan), "rounding": plan.rounding, "images_per_step": plan.images_per_step}
    images = Counter(item.bucket for item in dataset.items)
    report.data["buckets"] = [{"width": w, "height": h, "images": images[(w, h)], "samples": per_bucket[(w, h)]}
                              for (w, h) in sorted(per_bucket)]
    report.info.append("Steps: " + plan.words())
    return plan


def _world_size() -> int:
    """Processes of a distributed launch (accelerate/torchrun set WORLD_SIZE); 1 otherwise."""
    import os

    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def _check_dataset_size(cfg: TrainConfig, dataset, plan: StepPlan, report: Report) -> None:
    images = sum(1 for item in dataset.items if not item.is_reg)
    train_share = 1 - dataset.report.reg_samples_per_epoch / max(1, plan.samples_per_epoch)  # reg takes the rest
    views = plan.total_steps * plan.images_per_step * train_share / max(1, images)
    report.data["views_per_image"] = round(views, 1)
    if images < 10 and views > 300:
        report.warnings.append(f"Each of the {images} images is seen about {views:.0f} times ({plan.epochs} epochs); "
                               "with so few images the LoRA will copy them: lower train.epochs or the repeats, or "
                               "add images.")
    smallest = min(b["samples"] for b in report.data["buckets"])
    if cfg.train.batch_size > plan.samples_per_epoch:
        report.warnings.append(f"train.batch_size {cfg.train.batch_size} is larger than the {plan.samples_per_epoch} "
                               "samples of an epoch, so every batch is partial; lower it.")
    elif plan.rounding and smallest < cfg.train.batch_size:
        report.info.append(f"Some buckets hold fewer samples ({smallest}) than a batch, so their batches are "
                           "partial; that is expected with buckets.")


def _explain_scale(cfg: TrainConfig, report: Report) -> None:
    net = cfg.network
    rslora = getattr(net, "rslora", False)  # rsLoRA scales by alpha / sqrt(r)
    scales = {"linear": (net.rank, net.resolved_alpha, net.alpha is not None)}
    if getattr(net, "adapts_convs", net.type == "locon"):
        scales["conv"] = (net.conv_rank, net.resolved_conv_alpha, net.conv_alpha is not None)
    report.data["scale"] = {kind: {"rank": r, "alpha": a, "scale": a / (math.sqrt(r) if rslora else r),
                                   "rslora": rslora} for kind, (r, a, _) in scales.items()}
    for kind, (rank, alpha, absolute) in scales.items():
        scale = report.data["scale"][kind]["scale"]
        label = "" if kind == "linear" else "conv "
        divisor = f"sqrt({label}r {rank})" if rslora else f"{label}r {rank}"
        report.info.append(f"Scale: {label}alpha {alpha:g} / {divisor} = {scale:g}; {_scale_words(scale, absolute, rslora)}")
        if scale <= 1 / 16:
            report.warnings.append(
                f"{label}alpha {alpha:g} with {label}r {rank} scales every update by {scale:.3g}, so the adapter "
                f"barely moves at the usual learning rate; use network.{'conv_' if label else ''}alpha_ratio = 0.5 "
                f"(or raise the learning rate about {0.5 / scale:.0f}x).")


def _scale_words(scale: float, absolute: bool, rslora: bool = False) -> str:
    if math.isclose(scale, 1.0):
        strength = "alpha = r, the update is applied at full strength (the original LoRA setting)"
    elif scale < 1:
        strength = (f"the update is multiplied by {scale:g}, so at the same learning rate it grows "
                    f"{1 / scale:g}x slower than with alpha = r")
    else:
        strength = f"the update is amplified {scale:g}x: lower the learning rate to match"
    if rslora:
        follow = ("rsLoRA: a larger r lowers this scale only as 1/sqrt(r)" if absolute else
                  "rsLoRA with alpha following r: this scale grows as sqrt(r)")
    else:
        follow = ("alpha is absolute, so changing r changes this scale" if absolute else
                  "alpha follows r (alpha_ratio), so changing r keeps this scale")
    return f"{strength}; {follow}."


def _estimate(cfg: TrainConfig, family: str, prediction: str, report: Report) -> None:
    estimate = estimate_resources(cfg, family, prediction)
    report.data["estimate"] = asdict(estimate)
    demo = f"For a full-size {family} model (the demo model is tiny): " if cfg.model.path.startswith("demo:") else ""
    report.info.append(demo + estimate.words())
    steps = report.data.get("steps", {}).get("total_steps")
    if steps:
        report.info.append(f"At that rate the {steps} steps take {_duration(steps * estimate.seconds_per_step)} "
                           "on a GPU (uncalibrated).")
    import torch

    if not torch.cuda.is_available():
        # No CPU formula: a CPU's speed on this work varies too much to guess; the run measures it instead.
        tiny = "the tiny demo model trains in minutes, " if cfg.model.path.startswith("demo:") else ""
        precision = (f" (in fp32: train.mixed_precision {cfg.train.mixed_precision} applies on a GPU only)"
                     if cfg.train.mixed_precision != "no" else "")
        report.info.append(f"No CUDA GPU here: training runs on the CPU{precision}, where {tiny}a full-size model "
                           "hundreds of times slower than on a GPU; the live view shows the measured rate and ETA "
                           "from the first steps.")


def _duration(seconds: float) -> str:
    if seconds < 1:
        return "under a second"
    if seconds < 90:
        return f"about {seconds:.0f} s"
    if seconds < 5400:
        return f"about {seconds / 60:.0f} min"
    return f"about {seconds / 3600:.1f} h"


def _check_resolution(cfg: TrainConfig, family: str, report: Report) -> None:
    native, side = report.data.get("model", {}).get("native_resolution"), cfg.dataset.resolution
    if cfg.model.path.startswith("demo:") or not native:
        return  # the tiny demo models try things out at any size
    if side > 1.5 * native:
        report.warnings.append(f"dataset.resolution {side} is far above this {family} model's native {native} px: "
                               f"it repeats subjects and memory grows with the pixel count; train at {native}.")
    elif side < 0.6 * native:
        report.warnings.append(f"dataset.resolution {side} is far below this {family} model's native {native} px: "
                               f"images come out soft and the LoRA fights the base model; train at {native}.")


def _check_learning_rates(cfg: TrainConfig, preset: str | None, report: Report) -> None:
    train, net = cfg.train, cfg.network
    reference, where = _reference_lr(train.optimizer, preset)
    unet_lr = train.unet_lr or train.learning_rate
    ratio = unet_lr / reference
    if net.train_unet and not 0.1 <= ratio <= 10:
        key = "train.unet_lr" if train.unet_lr else "train.learning_rate"
        report.warnings.append(f"{key} {unet_lr:g} is {ratio:.3g}x {where} ({reference:g} for {train.optimizer}); "
                               f"a learning rate that far off usually {'burns the image' if ratio > 1 else 'learns nothing'}.")
    if net.train_text_encoder and train.optimizer != "prodigy":
        text_lr = train.text_encoder_lr or train.learning_rate
        if text_lr > unet_lr or text_lr > reference:
            report.warnings.append(f"The text-encoder learning rate {text_lr:g} is high (UNet {unet_lr:g}); the text "
                                   "encoder overfits fast and prompts stop working: set train.text_encoder_lr to "
                                   f"about {unet_lr / 2:g}.")


def _reference_lr(optimizer: str, preset: str | None) -> tuple[float, str]:
    if preset:
        from trainer.config.presets import load_preset

        try:
            train = load_preset(preset).get("train", {})
        except SdloraError:
            train = {}
        if "learning_rate" in train and train.get("optimizer", "adamw") == optimizer:
            return float(train["learning_rate"]), f"the {preset} preset's"
    return OPTIMIZER_FACTS[optimizer][1], "the typical rate"


def _check_sampling_and_saving(cfg: TrainConfig, report: Report) -> None:
    if (cfg.sample.every_steps or cfg.sample.every_epochs) and not cfg.sample.prompts:
        report.warnings.append("Samples are scheduled but sample.prompts is empty, so none are drawn; add a prompt.")
    if not (cfg.save.every_steps or cfg.save.every_epochs):
        report.info.append("No intermediate checkpoints (save.every_steps and save.every_epochs are 0): a crash "
                           "loses the run; Stop still saves.")


def bucket_histogram(buckets: list[dict], width: int = 30) -> list[str]:
    """Text bars of samples per bucket, for the terminal."""
    top = max(b["samples"] for b in buckets)
    return [f"  {b['width']:>5}x{b['height']:<5} {b['images']:>5} images {b['samples']:>6} samples "
            f"{'#' * max(1, round(width * b['samples'] / top))}" for b in buckets]

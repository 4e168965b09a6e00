"""GPU memory a run needs, traced from its own training step on the meta device (docs/PREFLIGHT.md).

`predict_memory(cfg)` builds the user's model from its configs on the meta device, attaches the network and
runs the trainer's BatchLoss, backward, clipping, optimizer step and EMA under a mode that counts live
tensor bytes (trainer/memory/live_bytes.py); the same for filling the latent cache and drawing a preview.
What a trace cannot see (the CUDA context, library workspaces, the allocator's slack) is added as named
constants. `changes_to_fit(cfg, budget)` tries the usual memory savers in the order that costs least."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from networks.errors import SdloraError
from trainer.config import TrainConfig
from trainer.config.overrides import apply_overrides
from trainer.memory.meta_model import build_meta_model
from trainer.memory.run_trace import (
    CACHE_BATCH,
    state_bytes,
    text_states_cached,
    trace_cache_fill,
    trace_sampling,
    trace_training,
)
from trainer.memory.tracer import StepTrace
from trainer.model.facts import SHIPPED_CONFIGS, model_facts
from trainer.model.family import get_family

GIB = 2 ** 30
CARD_SIZES_GB = (6, 8, 12, 16, 24)  # the consumer cards people train on (a card's "8 GB" is 8 GiB)
# Costs on a CUDA device that no tensor shows. None is measured on a GPU here yet (bench.memory --gpu does):
CUDA_CONTEXT_BYTES = 500 * 2 ** 20  # the CUDA context and kernels of a PyTorch process: 300-600 MiB in
#   nvidia-smi on CUDA 12 with lazy module loading (PyTorch's CUDA semantics notes: "CUDA context")
CUBLAS_WORKSPACE_BYTES = 32 * 2 ** 20  # PyTorch's default cuBLAS workspace, CUBLAS_WORKSPACE_CONFIG=:4096:8
CUDNN_WORKSPACE_BYTES = 256 * 2 ** 20  # cuDNN's convolution workspace; PyTorch lets cuDNN pick algorithms
#   whose workspace fits free memory, commonly up to a few hundred MiB for SD-sized convolutions (assumed)
ALLOCATOR_SLACK = 0.07  # the caching allocator's rounding and fragmentation: reserved memory runs a few
#   percent above allocated in a steady training loop (torch.cuda.memory_stats; assumed 7%)


@dataclass(frozen=True)
class MemoryPrediction:
    peak_bytes: int  # the run's peak: max of the training step, filling the latent cache, sampling
    parts: dict[str, int]  # the training step's: frozen_weights, trainable, activations, largest_temporary, fixed
    cache_fill_bytes: int  # VAE encode at the largest bucket
    sampling_bytes: int  # the preview pipeline at the sample size
    flops_per_step: float  # one micro-batch's forward + backward

    @property
    def step_bytes(self) -> int:
        return sum(self.parts.values())

    def fits(self) -> list[int]:
        """The card sizes (GB) the peak fits."""
        return [size for size in CARD_SIZES_GB if self.peak_bytes <= size * GIB]

    def words(self) -> str:
        gib = {key: value / GIB for key, value in self.parts.items()}
        cards = self.fits()
        fits = (f"fits {', '.join(map(str, cards))} GB cards" if cards
                else f"fits none of the {', '.join(map(str, CARD_SIZES_GB))} GB cards")
        peaks = "".join(f", {name} {value / GIB:.1f}" for name, value in
                        (("filling the latent cache", self.cache_fill_bytes), ("previews", self.sampling_bytes))
                        if value)
        return (f"Predicted GPU memory peak {self.peak_bytes / GIB:.1f} GiB, traced from the training step "
                f"(training step {self.step_bytes / GIB:.1f}: frozen weights {gib['frozen_weights']:.2f}, adapters "
                f"with gradients and optimizer states {gib['trainable']:.2f}, activations {gib['activations']:.2f}, "
                f"largest temporary {gib['largest_temporary']:.2f}, CUDA context and workspaces "
                f"{gib['fixed']:.2f}{peaks}); it {fits}.")


@dataclass(frozen=True)
class MemoryChange:
    label: str  # e.g. "cache the text-encoder states"
    overrides: dict[str, object]  # dotted config keys -> values, exactly as `--set KEY=VALUE` would set them
    peak_bytes: int  # the predicted peak with this change (and the ones before it) applied


def predict_memory(cfg: TrainConfig, cache_images: int = CACHE_BATCH, budget_bytes: int | None = None
                   ) -> MemoryPrediction:
    """The run's GPU memory peak, traced on the meta device. `cache_images`: the images (flips counted) of
    the largest bucket, when the dataset is known; `budget_bytes`: the memory the run gets, which sets how
    many of them the latent cache encodes at once (cache_encode_batch, as the run does)."""
    step, cache_fills, sampling = _traced(cfg)
    cache_fill = cache_fills[cache_encode_batch(cfg, budget_bytes, cache_images)]
    states = state_bytes(cfg, step.trainable_parameters)  # present through the whole step (tracer.py)
    traced = {"frozen_weights": step.frozen_weights, "trainable": step.trainable + states,
              "activations": step.activations, "largest_temporary": step.largest_temporary}
    parts = {**traced, "fixed": fixed_bytes(sum(traced.values()))}
    if sampling:  # previews are drawn mid-run: all that training holds between steps, then the pipeline
        sampling += step.frozen_weights + step.trainable + states
    peak = max(sum(parts.values()), *(value + fixed_bytes(value) for value in (cache_fill, sampling) if value))
    return MemoryPrediction(peak, parts, cache_fill and cache_fill + fixed_bytes(cache_fill),
                            sampling and sampling + fixed_bytes(sampling), step.flops)


def memory_budget(cfg: TrainConfig) -> tuple[int | None, str]:
    """(bytes, where from): train.memory_budget_gb, else the CUDA card's free memory; None on a CPU."""
    if cfg.train.memory_budget_gb:
        return int(cfg.train.memory_budget_gb * GIB), "train.memory_budget_gb"
    if torch.cuda.is_available():
        free, _total = torch.cuda.mem_get_info()
        return free, f"the free memory of {torch.cuda.get_device_name()}"
    return None, ""


def run_cache_batch(cfg: TrainConfig) -> int:
    """The images the run's latent cache encodes at once: cache_encode_batch under the run's memory budget;
    CACHE_BATCH without one or where the model cannot be traced before it loads (the cache still halves its
    batch on a full card)."""
    budget, _source = memory_budget(cfg)
    if not budget:
        return CACHE_BATCH
    try:
        return cache_encode_batch(cfg, budget)
    except SdloraError:
        return CACHE_BATCH


def cache_encode_batch(cfg: TrainConfig, budget_bytes: int | None, images: int = CACHE_BATCH) -> int:
    """The images the latent cache encodes at once at the largest bucket: its `images`, at most the cache's
    batch, which starts at CACHE_BATCH and halves (as the run's cache does, run_cache_batch) while filling the
    cache would not fit `budget_bytes`, down to one image at a time."""
    batch = CACHE_BATCH
    if budget_bytes and cfg.dataset.cache_latents != "none":
        fills = _traced(cfg)[1]
        while batch > 1 and fills[min(images, batch)] + fixed_bytes(fills[min(images, batch)]) > budget_bytes:
            batch //= 2
    return max(1, min(images, batch))


_TRACES: dict[str, tuple] = {}  # the config less its optimizer -> its traces, for the pre-flight's repeated asks


def _traced(cfg: TrainConfig, device_type: str = "cuda") -> tuple[StepTrace, dict[int, int], int]:
    """(the step, the cache fill by images per encode, the sampling transient), traced once per config; the
    optimizer and EMA settings do not change the trace (their states are counted per parameter).
    `device_type`: whose autocast casts a half-precision step makes (bench.memory measures a CPU step)."""
    data = cfg.model_dump(mode="json")
    data["train"]["optimizer"], data["ema"] = "", {}
    key = json.dumps([data, device_type], sort_keys=True, default=str)
    if key not in _TRACES:
        folder, family, prediction = _model_configs(cfg)
        side = cfg.dataset.resolution  # the largest bucket's area is resolution^2 (trainer/data/buckets.py)
        model = build_meta_model(folder, family, prediction, cfg)
        step = trace_training(cfg, model, side, device_type)
        # The VAE as the step left it (untouched); sampling runs through the attached adapters, as previews do.
        fills = {images: trace_cache_fill(cfg, model, side, images) for images in range(1, CACHE_BATCH + 1)}
        _TRACES[key] = (step, fills, trace_sampling(cfg, model))
        if len(_TRACES) > 64:
            _TRACES.pop(next(iter(_TRACES)))
    return _TRACES[key]


def fixed_bytes(traced: int) -> int:
    return CUDA_CONTEXT_BYTES + CUBLAS_WORKSPACE_BYTES + CUDNN_WORKSPACE_BYTES + int(ALLOCATOR_SLACK * traced)


def _model_configs(cfg: TrainConfig):
    """The diffusers configs that describe the model (a single file's shipped ones), as the loader reads them."""
    model = cfg.model
    facts = model_facts(model.path, model.family, model.prediction_type, model.config_dir)
    if facts.family is None:
        raise SdloraError(f"The family of {model.path} is unknown until it loads; set model.family for a memory "
                          "prediction.")
    family = get_family(facts.family)
    folder = facts.config_folder or SHIPPED_CONFIGS / family.shipped_config_name(facts.prediction_type)
    return Path(folder), family, facts.prediction_type


def changes_to_fit(cfg: TrainConfig, budget_bytes: int, cache_images: int = CACHE_BATCH) -> list[MemoryChange]:
    """The changes, cumulative and cheapest first (least quality and speed lost), that bring the predicted
    peak under `budget_bytes`; stops at the first that does. Empty when the run already fits; the whole list
    (whose last figure is still above the budget) when nothing here is enough. Each figure fills the latent
    cache as the run would under that budget (cache_encode_batch)."""
    current = predict_memory(cfg, cache_images, budget_bytes).peak_bytes
    changes: list[MemoryChange] = []
    for label, overrides in _candidates(cfg):
        if current <= budget_bytes:
            break
        try:
            trial = apply_overrides(cfg, [f"{key}={_literal(value)}" for key, value in overrides.items()])
        except SdloraError:  # a saver this run's other settings refuse (e.g. fp8 with PiSSA)
            continue
        peak = predict_memory(trial, cache_images, budget_bytes).peak_bytes
        if peak >= current:
            continue
        cfg, current = trial, peak
        changes.append(MemoryChange(label, overrides, peak))
    return changes + _smaller_bucket(cfg, budget_bytes, current, cache_images)


def _candidates(cfg: TrainConfig):
    train, network = cfg.train, cfg.network
    if not cfg.dataset.cache_text_encoder_outputs and not network.train_text_encoder:
        yield "cache the text-encoder states", {"dataset.cache_text_encoder_outputs": True}
    if not train.gradient_checkpointing:
        yield "gradient checkpointing", {"train.gradient_checkpointing": True}
    if train.optimizer == "adamw":
        yield "the 8-bit AdamW optimizer (needs bitsandbytes)", {"train.optimizer": "adamw8bit"}
    if hasattr(cfg.model, "fp8_base") and not cfg.model.fp8_base:
        yield "fp8 base weights", {"model.fp8_base": True}
    if train.batch_size > 1:
        yield (f"batch 1 with {train.batch_size * train.gradient_accumulation_steps} accumulation steps (the same "
               "effective batch)", {"train.batch_size": 1,
                                    "train.gradient_accumulation_steps": train.batch_size
                                    * train.gradient_accumulation_steps})


def _smaller_bucket(cfg: TrainConfig, budget_bytes: int, current: int, cache_images: int) -> list[MemoryChange]:
    """The largest resolution (in 64 px steps, down to 256) that fits, as the last resort."""
    side = cfg.dataset.resolution - 64
    while current > budget_bytes and side >= 256:
        overrides = {"dataset.resolution": side}
        try:
            trial = apply_overrides(cfg, [f"dataset.resolution={side}"])
        except SdloraError:  # bucket sides that the smaller resolution breaks
            break
        peak = predict_memory(trial, cache_images, budget_bytes).peak_bytes
        if peak <= budget_bytes:
            return [MemoryChange(f"a largest bucket of {side} px", overrides, peak)]
        side -= 64 if side > 512 else 128
    return []


def _literal(value: object) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


__all__ = ["CACHE_BATCH", "CARD_SIZES_GB", "GIB", "MemoryChange", "MemoryPrediction", "cache_encode_batch",
           "changes_to_fit", "memory_budget", "predict_memory", "run_cache_batch",
           "text_states_cached"]

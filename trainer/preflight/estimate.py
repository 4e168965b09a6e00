"""GPU memory and time per step, traced from the run's own training step (trainer/memory, docs/PREFLIGHT.md),
the changes that fit a memory budget, and what the run costs on this machine."""

from __future__ import annotations

from functools import lru_cache

import torch

from networks.errors import SdloraError
from networks.network import count_adapter_parameters
from trainer.config import TrainConfig
from trainer.memory import (
    CACHE_BATCH,
    GIB,
    MemoryPrediction,
    cache_encode_batch,
    changes_to_fit,
    memory_budget,
    predict_memory,
)
from trainer.memory.meta_model import meta_components
from trainer.model.facts import SHIPPED_CONFIGS
from trainer.model.family import FAMILIES, get_family
from trainer.preflight.context import CheckContext

# FLOP/s a 24 GB consumer GPU sustains on this work (assumed; bench.memory --gpu measures nothing of time yet).
ASSUMED_THROUGHPUT = {"half": 20e12, "fp32": 6e12}


@lru_cache(maxsize=4)
def _meta_models(config_name: str):
    """The real model of a shipped config, built on the meta device: shapes without memory."""
    folder = SHIPPED_CONFIGS / config_name
    family = next(f for f in FAMILIES.values() if config_name in (f.shipped_config_name("epsilon"),
                                                                  f.shipped_config_name("v_prediction")))
    return meta_components(folder, family)


def model_parameters(family: str, prediction_type: str = "epsilon") -> dict[str, int]:
    """Parameter counts of the family's real UNet, text encoders and VAE (from the shipped configs)."""
    unet, encoders, vae = _meta_models(get_family(family).shipped_config_name(prediction_type))
    return {"unet": _count(unet), "text_encoders": sum(_count(e) for e in encoders), "vae": _count(vae)}


def adapter_parameters(family: str, network) -> int:
    """Trainable parameters of the adapter the config's network section describes, on the real model: the
    network code builds it on the meta device, so every adapter type counts its own parameters."""
    unet, encoders, _ = _meta_models(get_family(family).shipped_config_name("epsilon"))
    return count_adapter_parameters(family, unet, encoders, network.spec())


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def seconds_per_step(cfg: TrainConfig, prediction: MemoryPrediction) -> float:
    """The traced FLOPs of a micro-batch times the accumulation, at the assumed throughput."""
    half = cfg.train.mixed_precision in ("fp16", "bf16")
    flops = prediction.flops_per_step * cfg.train.gradient_accumulation_steps
    if cfg.train.gradient_checkpointing:  # the trace counts one forward; checkpointing runs it again
        flops *= 4 / 3
    return flops / ASSUMED_THROUGHPUT["half" if half else "fp32"]


def explain_estimate(ctx: CheckContext) -> None:
    """The traced memory peak in words, the changes that fit the budget, the run's duration on a GPU, and
    what a machine without one means."""
    if ctx.family is None:
        return
    cfg, report = ctx.cfg, ctx.report
    budget, source = memory_budget(cfg)
    try:
        prediction = predict_memory(cfg, _largest_bucket_images(ctx), budget)
    except SdloraError as error:  # a network the trainer would refuse too (e.g. every block at weight 0)
        report.errors.append(str(error))
        return
    seconds = seconds_per_step(cfg, prediction)
    changes = changes_to_fit(cfg, budget, _largest_bucket_images(ctx)) \
        if budget and prediction.peak_bytes > budget else []
    report.data["estimate"] = {
        "family": ctx.family, "resolution": cfg.dataset.resolution, "batch_size": cfg.train.batch_size,
        "precision": cfg.train.mixed_precision, "gradient_checkpointing": cfg.train.gradient_checkpointing,
        "peak_bytes": prediction.peak_bytes, "parts": prediction.parts, "cache_fill_bytes": prediction.cache_fill_bytes,
        "sampling_bytes": prediction.sampling_bytes, "flops_per_step": prediction.flops_per_step,
        "cache_encode_batch": cache_encode_batch(cfg, budget, _largest_bucket_images(ctx)),
        "fits_gb": prediction.fits(), "seconds_per_step": seconds, "budget_bytes": budget,
        "changes_to_fit": [{"label": c.label, "overrides": c.overrides, "peak_bytes": c.peak_bytes} for c in changes]}
    report.info.append(prediction.words())
    if budget and prediction.peak_bytes > budget:
        report.warnings.append(_over_budget(prediction, budget, source, changes))
    steps = report.data.get("steps", {}).get("total_steps")
    if steps:
        report.info.append(f"At {seconds:.2f} s per step ({prediction.flops_per_step / 1e12:.2f} TFLOP traced, an "
                           f"assumed GPU throughput) the {steps} steps take {_duration(steps * seconds)} on a GPU.")
    if not torch.cuda.is_available():
        # No CPU formula: a CPU's speed on this work varies too much to guess; the run measures it instead.
        tiny = "the tiny demo model trains in minutes, " if ctx.is_demo else ""
        precision = (f" (in fp32: train.mixed_precision {cfg.train.mixed_precision} applies on a GPU only)"
                     if cfg.train.mixed_precision != "no" else "")
        report.info.append(f"No CUDA GPU here: training runs on the CPU{precision}, where {tiny}a full-size model "
                           "trains hundreds of times slower than on a GPU; the live view shows the measured rate and "
                           "ETA from the first steps.")


def _largest_bucket_images(ctx: CheckContext) -> int:
    """The images the latent cache encodes together at the largest bucket (it batches within a bucket, both
    mirror images when the dataset flips); the cache's batch when the dataset is not known."""
    buckets = ctx.report.data.get("buckets")
    if not buckets:
        return CACHE_BATCH
    largest = max(buckets, key=lambda b: b["width"] * b["height"])
    return largest["images"] * (2 if ctx.cfg.dataset.flip else 1)


def _over_budget(prediction: MemoryPrediction, budget: int, source: str, changes) -> str:
    listed = "; ".join(f"{c.label} ({', '.join(f'--set {k}={_text(v)}' for k, v in c.overrides.items())}: "
                       f"{c.peak_bytes / GIB:.1f} GiB)" for c in changes)
    fits = bool(changes) and changes[-1].peak_bytes <= budget
    tail = (f"these changes, each with the peak it brings, fit it: {listed}" if fits else
            f"even {listed} leave it above, so train on a larger card" if changes else
            "no change the check knows brings it under, so train on a larger card")
    return (f"The predicted peak {prediction.peak_bytes / GIB:.1f} GiB is above {budget / GIB:.1f} GiB "
            f"({source}); {tail}.")


def _text(value: object) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _duration(seconds: float) -> str:
    if seconds < 1:
        return "under a second"
    if seconds < 90:
        return f"about {seconds:.0f} s"
    if seconds < 5400:
        return f"about {seconds / 60:.0f} min"
    return f"about {seconds / 3600:.1f} h"

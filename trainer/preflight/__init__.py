"""The pre-flight check: what a run will do and what will likely ruin it, before any GPU time is spent.

`preflight_report(cfg)` runs CHECKS in order: each reads the config and what earlier checks found (the model's
facts, the scanned dataset, the step plan) from one CheckContext and writes sentences into the Report. It
scans the dataset (images, captions, buckets), works out the step count exactly as the training loop will,
explains the adapter's scale alpha/r, predicts GPU memory and time per step (traced from the run's own step,
docs/PREFLIGHT.md), and warns about settings that commonly ruin a run. Only errors block a run; warnings
are advice. Every line is one sentence, for the CLI and the UI alike.
"""

from __future__ import annotations

from trainer.config import TrainConfig
from trainer.preflight.captions import check_caption_length, check_captions
from trainer.preflight.compiling import check_compile
from trainer.preflight.context import CheckContext
from trainer.preflight.dataset import check_dataset, check_dataset_size, check_masks, check_validation
from trainer.preflight.estimate import adapter_parameters, explain_estimate, model_parameters
from trainer.preflight.learning_rates import OPTIMIZER_FACTS, check_learning_rates
from trainer.preflight.model import check_model, check_resolution, check_vae
from trainer.preflight.network import (
    check_network_weights,
    explain_block_weights,
    explain_init,
    explain_load_targets,
    explain_scale,
)
from trainer.preflight.noise import check_noise_options, check_precision
from trainer.preflight.plan import StepPlan, plan_steps, step_plan
from trainer.preflight.preservation import check_preservation
from trainer.preflight.report import Report, bucket_histogram
from trainer.preflight.saving import check_sampling_and_saving
from trainer.preflight.timesteps import check_timesteps

# The order is the report's: a check may read what the ones before it found (the model's family and
# prediction type, the dataset, the training set, the step plan) and skips itself when that is missing.
CHECKS = (
    check_model,
    check_vae,
    check_network_weights,
    explain_block_weights,
    check_noise_options,
    check_timesteps,
    check_preservation,
    check_dataset,
    check_captions,
    check_caption_length,
    check_masks,
    check_validation,
    plan_steps,
    check_dataset_size,
    explain_scale,
    explain_load_targets,
    explain_init,
    explain_estimate,
    check_resolution,
    check_precision,
    check_learning_rates,
    check_sampling_and_saving,
    check_compile,
)

__all__ = [
    "CHECKS", "OPTIMIZER_FACTS", "CheckContext",
    "Report", "StepPlan", "adapter_parameters", "bucket_histogram", "check_compile",
    "model_parameters", "preflight_report", "step_plan",
]


def preflight_report(cfg: TrainConfig, preset: str | None = None) -> Report:
    """Check `cfg` before training; `preset` (its name) is what learning rates are compared against."""
    ctx = CheckContext(cfg, preset)
    for check in CHECKS:
        check(ctx)
    return ctx.report

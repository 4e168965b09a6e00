"""Noise and precision options that do nothing, or harm, for this model's prediction type or family."""

from __future__ import annotations

from trainer.preflight.context import CheckContext


def check_noise_options(ctx: CheckContext) -> None:
    """kohya's options that do nothing without another, or for this prediction type (kohya refuses them)."""
    train, prediction, report = ctx.cfg.train, ctx.prediction, ctx.report
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


def check_precision(ctx: CheckContext) -> None:
    if ctx.family == "sdxl" and ctx.cfg.train.mixed_precision == "fp16":
        ctx.report.warnings.append(
            "train.mixed_precision is fp16 on SDXL, whose VAE overflows in fp16 (NaN latents): sdlora keeps the "
            "VAE in fp32, but the SDXL UNet can overflow too; use bf16 if the GPU supports it.")

"""Samples that are scheduled but cannot be drawn, and a run that keeps no checkpoint until its end."""

from __future__ import annotations

from trainer.preflight.context import CheckContext


def check_sampling_and_saving(ctx: CheckContext) -> None:
    cfg, report = ctx.cfg, ctx.report
    if (cfg.sample.every_steps or cfg.sample.every_epochs) and not cfg.sample.prompts:
        report.warnings.append("Samples are scheduled but sample.prompts is empty, so none are drawn; add a prompt.")
    if not (cfg.save.every_steps or cfg.save.every_epochs):
        report.info.append("No intermediate checkpoints (save.every_steps and save.every_epochs are 0): a crash "
                           "loses the run; Stop still saves.")

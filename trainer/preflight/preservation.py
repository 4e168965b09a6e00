"""Output preservation (train.preservation_caption): what each step also runs, and the one setting it cannot
work with."""

from __future__ import annotations

from trainer.objective.preservation import preservation_problem
from trainer.preflight.context import CheckContext


def check_preservation(ctx: CheckContext) -> None:
    train, report = ctx.cfg.train, ctx.report
    if not train.preservation_caption:
        return
    if problem := preservation_problem(ctx.cfg):
        report.errors.append(problem)
        return
    report.info.append(f"Output preservation: each step the base model (adapters off) and the LoRA also predict "
                       f"the step's noisy latents for {train.preservation_caption!r}, and their difference is added "
                       f"to the loss at weight {train.preservation_weight:g} (two more UNet passes per step).")

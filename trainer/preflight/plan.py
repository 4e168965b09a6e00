"""The step plan: optimizer steps as the training loop counts them (trainer.data.steps), in words."""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from networks.errors import SdloraError
from trainer.data.steps import count_batches, count_steps

if TYPE_CHECKING:  # the context holds a plan; a type only, not a cycle at run time
    from trainer.preflight.context import CheckContext


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
    batches = count_batches(per_bucket, batch_size, world_size)
    count = count_steps(batches.per_process, accumulation, epochs, max_steps)
    return StepPlan(sum(per_bucket), batches.per_epoch, batches.per_process, count.steps_per_epoch,
                    count.total_steps, count.epochs, batch_size, accumulation, world_size, count.limited_by)


def world_size() -> int:
    """Processes of a distributed launch (accelerate/torchrun set WORLD_SIZE); 1 otherwise."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def plan_steps(ctx: CheckContext) -> None:
    """The steps and buckets of the training images, as the loop will run them."""
    if ctx.train_set is None:
        return
    train = ctx.cfg.train
    per_bucket = ctx.train_set.samples_per_bucket()
    plan = step_plan(per_bucket, train.batch_size, train.gradient_accumulation_steps, train.epochs,
                     train.max_steps, world_size())
    ctx.plan = plan
    ctx.report.data["steps"] = {**asdict(plan), "rounding": plan.rounding, "images_per_step": plan.images_per_step}
    images = Counter(item.bucket for item in ctx.train_set.items)
    ctx.report.data["buckets"] = [{"width": w, "height": h, "images": images[(w, h)], "samples": per_bucket[(w, h)]}
                                  for (w, h) in sorted(per_bucket)]
    ctx.report.info.append("Steps: " + plan.words())

"""How many batches and optimizer steps a run takes: the one count the training loop runs, the pre-flight
report states and the UI shows (through the report), so the three never disagree."""
from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class BatchCount:
    per_epoch: int  # all processes together, each bucket's last batch partial
    per_process: int  # after padding the last round so every process steps alike


def count_batches(samples_per_bucket: Iterable[int], batch_size: int, world_size: int = 1) -> BatchCount:
    """Batches per epoch as the dataset plans them: each bucket batched on its own (its last batch rounded
    up), then dealt round-robin to `world_size` processes, the last round padded (DistributedSampler-like)."""
    batches = sum(math.ceil(n / batch_size) for n in samples_per_bucket if n > 0)
    return BatchCount(batches, math.ceil(batches / world_size))


@dataclass(frozen=True)
class StepCount:
    steps_per_epoch: int  # optimizer steps per process
    total_steps: int
    epochs: int  # epochs the run touches (the last may be cut short by max_steps)
    limited_by: str  # "epochs" or "max_steps"


def count_steps(batches_per_process: int, accumulation: int, epochs: int, max_steps: int | None) -> StepCount:
    """Each epoch's batches on one process, `accumulation` to a step (a partial last group still steps);
    train.max_steps, when set, wins over train.epochs."""
    steps_per_epoch = math.ceil(batches_per_process / accumulation)
    total = max_steps if max_steps else epochs * steps_per_epoch
    return StepCount(steps_per_epoch, total, math.ceil(total / max(1, steps_per_epoch)),
                     "max_steps" if max_steps else "epochs")

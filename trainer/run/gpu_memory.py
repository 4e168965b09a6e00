"""GPU memory while a run trains: the card's measured peak beside the pre-flight's prediction, the two warnings
(a card about to spill into system memory; steps suddenly slower while it is full) and the out-of-memory
sentence. The decisions are pure functions of bytes and seconds, so they are tested without a GPU; the
prediction and the changes that fit come from the trace of the run's own step (trainer/memory)."""

from __future__ import annotations

import statistics
import sys
from dataclasses import dataclass, field

import torch

from networks.errors import SdloraError
from trainer.config import TrainConfig
from trainer.run.disk_space import resume_advice
from trainer.run.run_dir import RunDir

GB = 2 ** 30  # cards are sold in binary gigabytes: an "8 GB" card reports 8 * 2**30 bytes
MARGIN = 20  # reserved within 1/20 (5%) of the card: Windows' driver starts spilling into system memory there
SLOWER = 3.0  # kohya_ss #1524 / #1730: a spilling card is 30-100x slower; 3x is already unmistakable
FIRST_STEPS = 5  # the run's own pace: steps 2-6 (step 1 pays cuDNN's autotuning and the allocator's growth)
RECENT_STEPS = 3  # the pace now: the median of the last few, so one slow step (a sample drawn) does not warn
SPILL_FIX = "lower train.batch_size or dataset.resolution, or turn on train.gradient_checkpointing"


def gb(count: int) -> str:
    """'7.4 GB'; a tiny model's few MB in MB rather than '0.0 GB'."""
    return f"{count / GB:.1f} GB" if count >= GB / 10 else f"{max(1, round(count / 2 ** 20))} MB"


def near_full(reserved: int, card: int) -> bool:
    """Whether the allocator holds within 5% of the card's memory."""
    return card > 0 and MARGIN * reserved >= (MARGIN - 1) * card  # in integers: exact at the 95% line


def slowdown(step_seconds: list[float], reserved: int, card: int) -> float | None:
    """How many times slower the last steps are than the run's first ones, when that is SLOWER or more while the
    card is full (the driver spilling into system memory); None otherwise."""
    if len(step_seconds) < 1 + FIRST_STEPS + RECENT_STEPS or not near_full(reserved, card):
        return None
    first = statistics.median(step_seconds[1:1 + FIRST_STEPS])
    recent = statistics.median(step_seconds[-RECENT_STEPS:])
    return recent / first if first > 0 and recent >= SLOWER * first else None


def predicted_peak(cfg: TrainConfig) -> int | None:
    """The pre-flight's traced peak of this run, or None when it cannot be traced (never fails a run)."""
    try:
        from trainer.memory import predict_memory
        return int(predict_memory(cfg).peak_bytes)
    except Exception:  # noqa: BLE001 - a prediction is advice: a model the tracer cannot run still trains
        return None


def changes_that_fit(cfg: TrainConfig, budget: int) -> list:
    try:
        from trainer.memory import changes_to_fit
        return list(changes_to_fit(cfg, budget))
    except Exception:  # noqa: BLE001 - as predicted_peak
        return []


def change_words(changes: list) -> str:
    """'cache the text-encoder states (--set a=true, 9.1 GB), then an 8-bit optimizer (--set b=c, 7.4 GB)'."""
    def one(change) -> str:
        sets = " ".join(f"--set {key}={_value(value)}" for key, value in change.overrides.items())
        return f"{change.label} ({sets}, {gb(change.peak_bytes)})"
    return ", then ".join(one(change) for change in changes)


def _value(value) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)  # as --set reads it back


def budget_bytes(cfg: TrainConfig, card: int | None) -> int | None:
    """train.memory_budget_gb when set, else the card's memory; None on a machine with neither."""
    budget = getattr(cfg.train, "memory_budget_gb", 0) or 0
    return int(budget * GB) if budget > 0 else card


def card_bytes() -> int | None:
    return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory \
        if torch.cuda.is_available() else None


def out_of_memory_error(cfg: TrainConfig, run: RunDir, step: int | None, card: int | None) -> SdloraError:
    """The sentence a CUDA out-of-memory error ends the run with: the predicted and the available memory, the
    changes that fit, and what is intact (nothing is saved on the way out: the last checkpoint stays as it was)."""
    where = f"at step {step}" if step is not None else "outside the training step (caching, samples or validation)"
    budget = budget_bytes(cfg, card)
    peak = predicted_peak(cfg)
    changes = changes_that_fit(cfg, budget) if budget is not None else []
    if changes and changes[-1].peak_bytes <= budget:
        advice = f"changes that fit: {change_words(changes)}"
    elif changes:  # changes_to_fit lists every saver when even all of them are not enough
        advice = f"even {change_words(changes)} leave it above {gb(budget)}, so this run needs a larger card"
    elif budget is not None and peak is not None and peak <= budget:
        advice = f"other programs may hold part of the card: close them, or {SPILL_FIX}"
    else:
        advice = SPILL_FIX
    return SdloraError(f"CUDA ran out of memory {where}: {_needed(peak, budget, card)}; {advice}; then "
                       f"{resume_advice(run)}.")


def _needed(peak: int | None, budget: int | None, card: int | None) -> str:
    """'the run was predicted to need 9.8 GB and the card has 8.0 GB', or the same against the budget."""
    needs = f"the run was predicted to need {gb(peak)}" if peak is not None else "the run needed more memory"
    if budget is None:
        return f"{needs}, more than this machine had free" if peak is not None else f"{needs} than this machine had free"
    has = f"the card has {gb(card)}" if budget == card else f"the budget (train.memory_budget_gb) is {gb(budget)}"
    return f"{needs} and {has}"


@dataclass
class MemoryWatch:
    """What one run segment measured on its card: the step events' memory fields and, once each, the warnings."""

    cfg: TrainConfig
    card: int
    predicted: int | None = None
    step_seconds: list[float] = field(default_factory=list)
    warned: set[str] = field(default_factory=set)

    @classmethod
    def on_this_machine(cls, cfg: TrainConfig) -> MemoryWatch | None:
        card = card_bytes()
        return cls(cfg, card, predicted_peak(cfg)) if card else None

    def started_fields(self) -> dict:
        return {"gpu_card_bytes": self.card, "gpu_predicted_bytes": self.predicted}

    def after_step(self, seconds: float, reserved: int | None = None, allocated: int | None = None) -> dict:
        """The step event's memory fields, with a `warning` the first time one applies (also on stderr)."""
        if reserved is None:
            reserved, allocated = torch.cuda.max_memory_reserved(), torch.cuda.max_memory_allocated()
        self.step_seconds.append(seconds)
        fields = {"gpu_reserved_bytes": int(reserved), "gpu_allocated_bytes": int(allocated)}
        warning = self.warning(reserved)
        if warning:
            print(f"warning: {warning}", file=sys.stderr)
            fields["warning"] = warning
        return fields

    def warning(self, reserved: int) -> str | None:
        ratio = slowdown(self.step_seconds, reserved, self.card)
        if ratio is not None and "slow" not in self.warned:
            self.warned.add("slow")
            return (f"Steps became {ratio:.0f}x slower than this run's first ones while GPU memory is at the card's "
                    f"limit ({gb(reserved)} of {gb(self.card)}), so the driver is likely using system memory; stop "
                    f"the run and {self._fix()}, then continue from its last checkpoint.")
        if near_full(reserved, self.card) and "full" not in self.warned:
            self.warned.add("full")
            return (f"GPU memory is within 5% of the card ({gb(reserved)} of {gb(self.card)}), where Windows may "
                    f"spill into system memory and steps crawl; if they slow down, {self._fix()}.")
        return None

    def _fix(self) -> str:
        """The cheapest changes that bring the prediction under 90% of the card, else the general advice."""
        target = int(0.9 * self.card)
        changes = changes_that_fit(self.cfg, target)
        return f"apply the changes that fit {gb(target)}: {change_words(changes)}" if changes else SPILL_FIX

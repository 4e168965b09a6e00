"""One training step (forward, backward, clipping, the optimizer step, EMA) traced for its live bytes and FLOPs.

Generic over what the step computes, so a test can hand-count a tiny model's tensors and the pre-flight can
trace the real BatchLoss (trainer/memory/run_trace.py) with the same accounting."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from trainer.memory.live_bytes import LiveBytes, flash_attention, storage_bytes


@dataclass(frozen=True)
class StepTrace:
    """The bytes of one steady-state training step (the optimizer's states already exist, as from step 2 on)."""

    frozen_weights: int  # everything resident that nothing trains: base weights and buffers
    trainable: int  # the adapters' weights, their gradients, the optimizer's states and the EMA's copies
    activations: int  # what the forward keeps for the backward pass
    peak: int  # the highest total during the step
    flops: float  # forward + backward
    trainable_parameters: int = 0

    @property
    def largest_temporary(self) -> int:
        """What the peak holds beyond the other parts: the step's largest transient working set."""
        return max(0, self.peak - self.frozen_weights - self.trainable - self.activations)


def trace_step(frozen: list[torch.Tensor], trainable: list[torch.nn.Parameter], loss_of: Callable[[], torch.Tensor],
               make_optimizer: Callable[[], object], extra_state_bytes: int = 0, max_grad_norm: float = 0.0,
               make_ema: Callable[[], object] | None = None) -> StepTrace:
    """Run `loss_of()`, backward, clipping, `make_optimizer()`'s step and the EMA update under LiveBytes.
    `extra_state_bytes`: optimizer states counted by hand where the optimizer cannot run on meta."""
    weights = storage_bytes(frozen) + storage_bytes(trainable)
    live = LiveBytes()
    with flash_attention(), live:
        ema = make_ema() if make_ema else None  # its copies of the adapters live for the whole run
        optimizer = make_optimizer()
        before = live.live
        live.reset_peak()
        loss = loss_of()
        activations = live.live - before
        loss.backward()
        del loss
        total_flops = live.flops
        grads = storage_bytes([p.grad for p in trainable if p.grad is not None])
        forward_backward_peak = live.peak - before
        live.reset_peak()
        if max_grad_norm:
            torch.nn.utils.clip_grad_norm_(trainable, max_grad_norm)
        optimizer.step()
        if ema is not None:
            ema.update()
        optimizer.zero_grad(set_to_none=True)
        states = live.live - before + extra_state_bytes
        optimizer_peak = live.peak - before + extra_state_bytes
    # From the second step on the states exist while the next forward and backward run.
    peak = weights + before + max(forward_backward_peak + states, optimizer_peak)
    trainable_bytes = storage_bytes(trainable) + grads + states + before
    return StepTrace(weights - storage_bytes(trainable), trainable_bytes, activations, peak, float(total_flops),
                     sum(p.numel() for p in trainable))

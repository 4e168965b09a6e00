"""A full fine-tune of the UNet (every UNet weight trained, no adapter) through sdlora's own run machinery: the
ceiling the adapter types are measured against (bench/compare_types.py, tests/test_quality.py).

It lives in the bench, not in trainer/: the product trains adapters only, and a full fine-tune is here only
as the yardstick. So it reuses the trainer's parts rather than a second training loop: `build_run` (dataset,
caches, BatchLoss, objective, schedule) as for a LoRA run, the LoRA detached, and `Trainer.optimizer_step`
(backward, clipping, optimizer and schedule step) over a stand-in "network" whose parameters are the UNet's.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import save_file

from bench.ours import SdloraContender
from networks.lora_file import DTYPES

# docs/QUALITY.md's 400-step full fine-tune: AdamW at 1e-4 (full fine-tunes take rates far below a LoRA's).
FULL_LEARNING_RATE = 1e-4


class WholeUNet(torch.nn.Module):
    """What `Trainer.optimizer_step` steps and clips: the UNet's own parameters, in place of a LoraNetwork."""

    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.unet = unet


class FullFineTune(SdloraContender):
    """The run's parts as sdlora builds them for `cfg` (a LoRA config), with the UNet trained instead of the
    LoRA: AdamW with the config's rate, weight decay and schedule over all UNet weights."""

    adapter = "full fine-tune"

    def setup(self) -> None:
        from trainer.objective.optimizers import build_lr_scheduler
        from trainer.run.loop import Trainer

        super().setup()
        parts, train = self.parts, self.cfg.train
        parts.network.detach()
        unet = parts.model.unet.requires_grad_(True)
        optimizer = torch.optim.AdamW(unet.parameters(), lr=train.learning_rate, weight_decay=train.weight_decay)
        schedule = build_lr_scheduler(optimizer, train, parts.steps.total_steps)
        self.parts = replace(parts, network=WholeUNet(unet), optimizer=optimizer, lr_scheduler=schedule, ema=None)
        self.trainer = Trainer(self.parts)

    def adapted_modules(self) -> int:
        return 0

    def trainable_params(self) -> int:
        return sum(p.numel() for p in self.parts.model.unet.parameters() if p.requires_grad)

    def export(self, path: Path) -> Path:
        """The UNet's weights in the run's save precision: what a full fine-tune ships instead of a LoRA file."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        dtype = DTYPES[self.cfg.save.precision]
        save_file({name: value.detach().to(dtype).contiguous()
                   for name, value in self.parts.model.unet.state_dict().items()}, str(path))
        return path

"""sdlora as a contender: the real `trainer.run.loop.Trainer`, over parts built from a TrainConfig and stepped
with `Trainer.optimizer_step`, so the numbers measure sdlora's own loop, caches and adapters.

`build_run` runs unchanged (dataset scan, model load, LoraNetwork, optimizer, latent and text
caches). To adapt only the peers' modules it sets `network.target_modules`.
"""

from __future__ import annotations

from pathlib import Path


def bench_config(model_dir, data_dir, output_dir, resolution: int, batch_size: int, rank: int,
                 alpha: float | None = None, network: str = "lora", conv_rank: int = 8,
                 conv_alpha: float | None = None, learning_rate: float = 1e-4, seed: int = 42, epochs: int = 1,
                 mixed_precision: str = "no", extra: dict | None = None, target_modules=None):
    """The TrainConfig matching the peers' settings: same rank/alpha (alpha = r, the recipe's
    lora_alpha), AdamW with weight decay 1e-2, clip 1.0, constant LR, square crops (no buckets, as the
    recipe's centre crop), no flips, no samples, no intermediate checkpoints."""
    from trainer.config import config_from_dict, merge_dicts

    data = {
        "name": "bench",
        "model": {"path": str(model_dir)},
        "dataset": {"path": str(data_dir), "resolution": resolution, "enable_buckets": False,
                    "cache_latents": "memory", "cache_text_encoder_outputs": True, "flip": False},
        "network": {"type": network, "rank": rank, "alpha": float(alpha if alpha is not None else rank),
                    "conv_rank": conv_rank, "conv_alpha": float(conv_alpha if conv_alpha is not None else conv_rank),
                    "init": "gaussian"},
        "train": {"epochs": epochs, "batch_size": batch_size, "learning_rate": learning_rate, "optimizer": "adamw",
                  "weight_decay": 1e-2, "max_grad_norm": 1.0, "lr_scheduler": "constant", "seed": seed,
                  "mixed_precision": mixed_precision},
        "sample": {"every_steps": 0, "every_epochs": 0},
        "save": {"every_steps": 0, "every_epochs": 0},
        "output": {"dir": str(output_dir)},
    }
    if target_modules:
        data["network"]["target_modules"] = list(target_modules)
    return config_from_dict(merge_dicts(data, extra or {}))


class SdloraContender:
    adapter = "sdlora"

    def __init__(self, cfg):
        self.cfg = cfg
        self.breakdown: dict[str, float] = {}

    def setup(self) -> None:
        from trainer.run.build import build_run, make_accelerator
        from trainer.run.loop import Trainer
        from trainer.run.run_dir import RunDir

        self.parts = build_run(self.cfg, make_accelerator(self.cfg), RunDir(self.cfg.output.dir).create())
        self.trainer = Trainer(self.parts)
        self.steps_per_epoch = self.parts.steps.steps_per_epoch

    def batches(self):
        epoch = 0
        while True:
            yield from self.parts.epoch_batches(epoch)
            epoch += 1

    def step(self, batch) -> float:
        return self.trainer.optimizer_step([batch])

    def adapted_modules(self) -> int:
        return len(self.parts.network.adapters)

    def trainable_params(self) -> int:
        return sum(p.numel() for p in self.parts.network.parameters() if p.requires_grad)

    def export(self, path: Path) -> Path:
        from trainer.run.state import Position

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        return self.parts.outputs.export(path, Position(step=1, epoch=1))

    def export_bytes_per_param(self) -> int:
        return {"fp16": 2, "bf16": 2, "fp32": 4}[self.cfg.save.precision]

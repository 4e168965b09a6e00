"""Learning rates far from what works for the optimizer (or the preset), and a text encoder taught too fast."""

from __future__ import annotations

from networks.errors import SdloraError
from trainer.config.presets import load_preset
from trainer.preflight.context import CheckContext

# What the report needs to know of each train.optimizer: its state per adapter parameter beyond the fp32
# weight and gradient (4 + 4 bytes), and its typical learning rate when no preset tells (Lion wants ~3-10x
# less than AdamW, Prodigy finds its own). tests/test_preflight.py holds the keys to the config's choices.
OPTIMIZER_FACTS = {"adamw": (8, 1e-4), "adamw8bit": (2, 1e-4), "lion": (4, 3e-5), "prodigy": (16, 1.0),
                   "adafactor": (1, 1e-4)}


def check_learning_rates(ctx: CheckContext) -> None:
    train, net, report = ctx.cfg.train, ctx.cfg.network, ctx.report
    reference, where = _reference_lr(train.optimizer, ctx.preset)
    unet_lr = train.unet_lr or train.learning_rate
    ratio = unet_lr / reference
    if net.train_unet and not 0.1 <= ratio <= 10:
        key = "train.unet_lr" if train.unet_lr else "train.learning_rate"
        report.warnings.append(f"{key} {unet_lr:g} is {ratio:.3g}x {where} ({reference:g} for {train.optimizer}); "
                               f"a learning rate that far off usually {'burns the image' if ratio > 1 else 'learns nothing'}.")
    if net.train_text_encoder and train.optimizer != "prodigy":
        text_lr = train.text_encoder_lr or train.learning_rate
        if text_lr > unet_lr or text_lr > reference:
            report.warnings.append(f"The text-encoder learning rate {text_lr:g} is high (UNet {unet_lr:g}); the text "
                                   "encoder overfits fast and prompts stop working: set train.text_encoder_lr to "
                                   f"about {unet_lr / 2:g}.")


def _reference_lr(optimizer: str, preset: str | None) -> tuple[float, str]:
    if preset:
        try:
            train = load_preset(preset).get("train", {})
        except SdloraError:
            train = {}
        if "learning_rate" in train and train.get("optimizer", "adamw") == optimizer:
            return float(train["learning_rate"]), f"the {preset} preset's"
    return OPTIMIZER_FACTS[optimizer][1], "the typical rate"

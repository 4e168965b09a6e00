"""The base model, its VAE and the resolution: what the model's own files say, asked of trainer/model/facts.py
(the loader asks the same), never its weights."""

from __future__ import annotations

from pathlib import Path

from networks.errors import SdloraError
from trainer.model.facts import ModelFacts, model_facts
from trainer.model.family import get_family
from trainer.preflight.context import CheckContext

# How the facts were found, in the report's words.
_HOW = {"configs": "read from the model folder's configs", "weights": "read from the checkpoint's weight names",
        "name": "not opened (a .ckpt is slow to read); set model.family for exact estimates",
        "nothing": "a hub id (downloaded on first use; set model.family for exact estimates)"}
DEMO_HOW = "the built-in tiny demo model"


def check_model(ctx: CheckContext) -> None:
    """The family and prediction type the run will train with, as the loader will find them."""
    model, report = ctx.cfg.model, ctx.report
    family = None if model.family == "auto" else model.family
    ctx.family, ctx.prediction = family, "epsilon"
    try:
        facts = model_facts(model.path, model.family, model.prediction_type)
    except SdloraError as error:
        report.errors.append(str(error))
        return
    if family and facts.found_family and family != facts.found_family:
        report.warnings.append(f"model.family is {family} but {facts.location.spec} looks like {facts.found_family}; "
                               "set model.family to auto unless you are sure.")
    ctx.family, ctx.prediction = facts.family, facts.prediction_type
    how = DEMO_HOW if facts.location.kind == "demo" else _HOW[facts.read_from]
    if facts.family:
        report.info.append(f"Model: {get_family(facts.family).name}, {facts.prediction_type} prediction; {how}.")
    else:
        report.info.append(f"Model: {facts.location.spec}, family unknown until it loads ({how}).")
    report.data["model"] = _model_data(facts)


def _model_data(facts: ModelFacts) -> dict:
    return {"family": facts.family, "prediction_type": facts.prediction_type, "path": facts.location.spec,
            "native_resolution": facts.native_resolution, "zero_terminal_snr": facts.zero_terminal_snr}


def check_vae(ctx: CheckContext) -> None:
    vae = ctx.cfg.model.vae
    if vae and not Path(vae).expanduser().exists():
        ctx.report.errors.append(f"model.vae {vae} was not found; give a VAE .safetensors file or a diffusers "
                                 "VAE folder, or leave it empty.")


def check_resolution(ctx: CheckContext) -> None:
    native, side = ctx.report.data.get("model", {}).get("native_resolution"), ctx.cfg.dataset.resolution
    if ctx.family is None or ctx.is_demo or not native:
        return  # the tiny demo models try things out at any size
    if side > 1.5 * native:
        ctx.report.warnings.append(f"dataset.resolution {side} is far above this {ctx.family} model's native "
                                   f"{native} px: it repeats subjects and memory grows with the pixel count; train "
                                   f"at {native}.")
    elif side < 0.6 * native:
        ctx.report.warnings.append(f"dataset.resolution {side} is far below this {ctx.family} model's native "
                                   f"{native} px: images come out soft and the LoRA fights the base model; train at "
                                   f"{native}.")

"""The adapter the run trains: a continued file, block weights, its scale in words, where its file loads."""

from __future__ import annotations

import math
from pathlib import Path

from networks.errors import SdloraError
from networks.inspect import lora_family
from networks.lora import LORA_DOWN
from networks.lora_file import read_lora
from networks.lycoris_keys import NOT_IN_DIFFUSERS
from networks.network import check_parts_trained
from trainer.preflight.context import CheckContext

# Where the exported file loads (docs/LORA_FORMAT.md); the UI shows the pre-flight text before Train.
LOAD_TARGETS = {"lora": ("A1111/Forge", "ComfyUI", "diffusers", "LyCORIS"),
                "loha": ("A1111/Forge", "ComfyUI", "LyCORIS"), "lokr": ("A1111/Forge", "ComfyUI", "LyCORIS"),
                "oft": ("A1111/Forge", "ComfyUI", "LyCORIS"), "dora": ("A1111/Forge", "ComfyUI", "LyCORIS")}
# DoRA's magnitude is per input column (networks/dora.py): LyCORIS reads it so only with that network arg.
DORA_LOADS = ("Not in diffusers: network.type dora writes dora_scale, which diffusers' load_lora_weights drops "
              "with a warning; LyCORIS reads it with network_args wd_on_output=False, as the file's ss_network_args "
              "say (its create_network_from_weights assumes the output axis).")


def check_network_weights(ctx: CheckContext) -> None:
    """The LoRA file a run continues: readable, made for this model family, its ranks named."""
    cfg, report, family = ctx.cfg, ctx.report, ctx.family
    if not cfg.network.weights:
        return
    path = Path(cfg.network.weights).expanduser()
    try:
        state, metadata = read_lora(path)
    except SdloraError as error:
        report.errors.append(f"network.weights: {error}")
        return
    made_for = lora_family(state, metadata)
    if family and made_for and made_for != family:
        report.errors.append(f"network.weights {path.name} was made for {made_for} but the base model is {family}; "
                             f"continue it on an {made_for} model.")
        return
    try:
        check_parts_trained(state, cfg.network.spec(), path.name)
    except SdloraError as error:
        report.errors.append(str(error))
        return
    ranks = sorted({int(t.shape[0]) for k, t in state.items() if k.endswith("." + LORA_DOWN)})
    modules = sum(1 for k in state if k.endswith("." + LORA_DOWN))
    shown = ", ".join(map(str, ranks[:6])) + (" ..." if len(ranks) > 6 else "")
    report.info.append(f"Continues {path.name}: {modules} modules at rank {shown}, kept at their own rank and "
                       "alpha; modules it lacks start fresh.")


def explain_block_weights(ctx: CheckContext) -> None:
    family = ctx.family
    weights = ctx.cfg.network.spec().block_weights(family) if family else None
    if weights is None:
        return
    sdxl = family == "sdxl"
    inner = weights[1:-1] if sdxl else weights
    blocks = 9 if sdxl else 12
    down, mid, up = inner[:blocks], inner[blocks:-blocks], inner[-blocks:]
    shown = "; ".join(f"{part} {', '.join(f'{w:g}' for w in values)}"
                      for part, values in (("IN", down), ("MID", mid), ("OUT", up)))
    ctx.report.info.append(f"Block learning-rate weights: {shown}. Blocks at 0 get no adapter; the text encoder "
                           "keeps weight 1.")


def explain_scale(ctx: CheckContext) -> None:
    """The adapter's scale (the spec's own rule: alpha / r, or alpha / sqrt(r) with rsLoRA) in words."""
    spec, report = ctx.cfg.network.spec(), ctx.report
    if spec.type == "oft":
        _explain_rotation(spec, report)
        return
    rslora = spec.rslora
    scales = {"linear": (spec.rank, spec.resolved_alpha, spec.alpha is not None, spec.scale())}
    if spec.adapts_convs:
        scales["conv"] = (spec.conv_rank, spec.resolved_conv_alpha, spec.conv_alpha is not None, spec.scale(conv=True))
    report.data["scale"] = {kind: {"rank": r, "alpha": a, "scale": s, "rslora": rslora}
                            for kind, (r, a, _, s) in scales.items()}
    for kind, (rank, alpha, absolute, scale) in scales.items():
        label = "" if kind == "linear" else "conv "
        divisor = f"sqrt({label}r {rank})" if rslora else f"{label}r {rank}"
        report.info.append(f"Scale: {label}alpha {alpha:g} / {divisor} = {scale:g}; {_scale_words(scale, absolute, rslora)}")
        if scale <= 1 / 16:
            report.warnings.append(
                f"{label}alpha {alpha:g} with {label}r {rank} scales every update by {scale:.3g}, so the adapter "
                f"barely moves at the usual learning rate; use network.{'conv_' if label else ''}alpha_ratio = 0.5 "
                f"(or raise the learning rate about {0.5 / scale:.0f}x).")


def _explain_rotation(spec, report) -> None:
    """OFT rotates the weight's rows: no alpha / r scale; network.alpha, when set, is COFT's bound."""
    report.data["scale"] = {"linear": {"rank": spec.rank, "alpha": spec.alpha or 0.0, "scale": 1.0, "rslora": False}}
    bound = (f"network.alpha {spec.alpha:g} bounds ||Q|| to {spec.alpha:g} x each layer's width (COFT)"
             if spec.alpha is not None else "no COFT bound (network.alpha sets one; alpha_ratio does not apply)")
    report.info.append(f"OFT: each weight's output rows turn in blocks of {spec.rank} (LyCORIS's diag-oft split of "
                       f"each layer's width), with no alpha / r scale; {bound}.")


def _scale_words(scale: float, absolute: bool, rslora: bool = False) -> str:
    if math.isclose(scale, 1.0):
        strength = "alpha = r, the update is applied at full strength (the original LoRA setting)"
    elif scale < 1:
        strength = (f"the update is multiplied by {scale:g}, so at the same learning rate it grows "
                    f"{1 / scale:g}x slower than with alpha = r")
    else:
        strength = f"the update is amplified {scale:g}x: lower the learning rate to match"
    if rslora:
        follow = ("rsLoRA: a larger r lowers this scale only as 1/sqrt(r)" if absolute else
                  "rsLoRA with alpha following r: this scale grows as sqrt(r)")
    else:
        follow = ("alpha is absolute, so changing r changes this scale" if absolute else
                  "alpha follows r (alpha_ratio), so changing r keeps this scale")
    return f"{strength}; {follow}."


def explain_load_targets(ctx: CheckContext) -> None:
    cfg, report = ctx.cfg, ctx.report
    kind = cfg.network.type
    targets = LOAD_TARGETS.get(kind, LOAD_TARGETS["lora"])
    report.data["load_targets"] = {"loads_in": list(targets),
                                   "not_loaded_by": [] if "diffusers" in targets else ["diffusers load_lora_weights"]}
    if "diffusers" in targets:
        return
    if kind == "dora":
        report.info.append(f"Loads in: {', '.join(targets)}. {DORA_LOADS}")
        return  # a LoRA underneath: LoRA+ raises its lora_up rate
    report.info.append(f"Loads in: {', '.join(targets)}. Not in diffusers: network.type {kind} writes LyCORIS "
                       f"keys, and {NOT_IN_DIFFUSERS}")
    if cfg.train.loraplus_ratio != 1:
        report.warnings.append(f"train.loraplus_ratio {cfg.train.loraplus_ratio:g} raises only lora_up weights' "
                               f"learning rate, and {kind} has none, so it changes nothing (as in LyCORIS); "
                               "set it to 1.")


def explain_init(ctx: CheckContext) -> None:
    net = ctx.cfg.network
    if getattr(net, "init", "kaiming") in ("pissa", "loraga") and getattr(net, "export", "") == "exact":
        ctx.report.info.append(f"network.init {net.init} moves the base weights, so the exact export stores the "
                               f"change at rank {2 * net.rank}: the file is twice the size of a rank {net.rank} LoRA "
                               "(network.export = \"svd\" re-ranks it to r).")

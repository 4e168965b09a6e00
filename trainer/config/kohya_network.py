"""The network part of a kohya_ss preset: its LoRA_type (LoCon, LyCORIS LoHa/LoKr/Diag-OFT, the DoRA switch),
ranks, alphas as alpha / r, LoKr's shape and LyCORIS's network_args."""

from __future__ import annotations

from networks.errors import SdloraError
from networks.spec import NetworkSpec
from trainer.config.kohya_values import (
    CONFIG_FIELDS,
    Builder,
    read_flag,
    read_integer,
    read_number,
    reader_for,
)

NETWORK_TYPES = {"Standard": "lora", "LoCon": "locon", "Kohya LoCon": "locon", "LyCORIS/LoCon": "locon",
                 "LyCORIS/LoHa": "loha", "LyCORIS/LoKr": "lokr", "LyCORIS/Diag-OFT": "oft"}
LOKR_KEYS = {"factor": "network.factor", "decompose_both": "network.decompose_both"}  # kohya_ss GUI's LoKr fields


def import_network(b: Builder) -> None:
    kind = str(b.data.get("LoRA_type") or "Standard")
    if kind not in NETWORK_TYPES:
        raise SdloraError(f"LoRA_type {kind!r} in {b.source} is not supported; sdlora imports "
                          f"{', '.join(repr(k) for k in NETWORK_TYPES)} presets.")
    network = NETWORK_TYPES[kind]
    dim = read_integer("network_dim", b.data["network_dim"], b.source) if b.given("network_dim") else None
    if dim is not None:
        b.set("network.rank", dim)
    full = network == "lokr" and full_lokr(b, "network_dim", dim, "network.rank", "network.alpha_ratio")
    if b.given("network_alpha") and not full:
        alpha = read_number("network_alpha", b.data["network_alpha"], b.source)
        if dim:
            b.set("network.alpha_ratio", alpha / dim)
        else:
            b.unmapped["network_alpha"] = b.data["network_alpha"]
            b.notes.append("network_alpha was not imported: without network_dim there is no alpha/r to keep.")
    conv_dim = read_integer("conv_dim", b.data["conv_dim"], b.source) if b.given("conv_dim") else None
    if network == "locon" and conv_dim == 0:
        network = "lora"
        b.notes.append(f"LoRA_type {kind!r} with conv_dim 0 adapts no convolution: imported as a plain LoRA.")
    b.set("network.type", network)
    _lokr_shape(b, network)
    dora_convs = _dora(b, network) and network == "locon"
    if b.config["network"]["type"] == "dora":  # LyCORIS's DoRA switch on a LoRA / LoCon
        network = "dora"
        b.set("network.include_convs", dora_convs)
    if network == "oft" and b.given("constrain") and (bound := read_number("constrain", b.data["constrain"], b.source)) > 0:
        b.set("network.alpha", bound)  # LyCORIS's diag-oft bound (x each layer's width); it ignores network_alpha
    elif "constrain" in b.data and network != "oft":
        b.unmapped["constrain"] = b.data["constrain"]
    # LyCORIS adapts the convolutions of a LoHa / LoKr / OFT when conv_dim is set, as LoCon always does.
    include_convs = network in ("loha", "lokr", "oft") and bool(conv_dim)
    if network in ("loha", "lokr", "oft"):
        b.set("network.include_convs", include_convs)
    if not NetworkSpec(type=network, include_convs=include_convs or dora_convs).adapts_convs:  # the spec's rule
        for key in ("conv_dim", "conv_alpha"):
            if key in b.data:
                b.unmapped[key] = b.data[key]  # kohya_ss itself ignores them for a Standard LoRA
        return
    if conv_dim:
        b.set("network.conv_rank", conv_dim)
        if network == "lokr" and full_lokr(b, "conv_dim", conv_dim, "network.conv_rank", "network.conv_alpha_ratio"):
            return
        if b.given("conv_alpha"):
            b.set("network.conv_alpha_ratio", read_number("conv_alpha", b.data["conv_alpha"], b.source) / conv_dim)


def _dora(b: Builder, network: str) -> bool:
    """LyCORIS's DoRA (kohya_ss GUI's dora_wd, or dora_wd=True in sd-scripts' network_args) on a LoRA / LoCon:
    sets network.type dora and says so; True when it did. Other network_args are listed as unmapped."""
    args = _network_args(b)
    rest = {key: value for key, value in args.items() if key not in ("dora_wd", "wd_on_output")}
    if rest:
        b.unmapped["network_args"] = " ".join(f"{key}={value}" for key, value in rest.items())
    wanted = read_flag("dora_wd", b.data["dora_wd"], b.source) if b.given("dora_wd") else False
    wanted = wanted or read_flag("network_args dora_wd", args.get("dora_wd", False), b.source)
    if not wanted or network not in ("lora", "locon"):
        if wanted:
            b.notes.append(f"dora_wd was not imported: sdlora's DoRA is a LoRA/LoCon, so this {network} preset "
                           "imports without it.")
        if "dora_wd" in b.data or wanted:
            b.unmapped["dora_wd"] = b.data.get("dora_wd", True)
        return False
    b.set("network.type", "dora")
    if read_flag("network_args wd_on_output", args.get("wd_on_output", True), b.source):
        b.notes.append("dora_wd became network.type dora, whose magnitude sdlora learns per input column "
                       "(LyCORIS's wd_on_output=False, the axis A1111 and ComfyUI read alike), not per output row "
                       "as LyCORIS's default wd_on_output=True does.")
    return True


def _network_args(b: Builder) -> dict[str, str]:
    """sd-scripts' network_args ("key=value" strings, as a list or one space-separated string) as a dict."""
    raw = b.data.get("network_args") or []
    items = raw.split() if isinstance(raw, str) else [str(item) for item in raw]
    return dict(item.split("=", 1) if "=" in item else (item, "True") for item in items)


def full_lokr(b: Builder, key: str, dim: int | None, rank_key: str, ratio_key: str) -> bool:
    """LyCORIS's LoKr idiom: a dim past any weight's size (10000, 100000) asks for full, undecomposed halves,
    whose scale is 1. sdlora's LoKr makes a half full from r >= half its longer side, so its top rank gives
    the same wherever a side is at most twice that (every SD layer split with the default factor)."""
    top = int(CONFIG_FIELDS[rank_key].bounds["le"])
    if not dim or dim <= top:
        return False
    b.set(rank_key, top)
    b.set(ratio_key, 1.0)
    b.notes.append(f"{key} {dim} asks LyCORIS's LoKr for full Kronecker halves (scale 1): imported as "
                   f"{rank_key} {top} with alpha/r 1, which makes sdlora's LoKr halves full as well.")
    return True


def _lokr_shape(b: Builder, network: str) -> None:
    """LoKr's factor and decompose_both; the GUI saves them with every preset, so other types list them."""
    for key, dotted in LOKR_KEYS.items():
        if key not in b.data:
            continue
        if network != "lokr":
            b.unmapped[key] = b.data[key]
        elif b.given(key):
            b.set(dotted, reader_for(dotted)(key, b.data[key], b.source))

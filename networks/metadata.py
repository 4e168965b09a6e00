"""The safetensors header every LoRA browser and generator UI reads: kohya's ss_* keys and modelspec.

All values are strings. `minimal=True` keeps only what loaders need to interpret the weights, so no
caption (ss_tag_frequency), dataset or date leaks out with a shared file.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone

from .lora_file import module_summary
from .lycoris_keys import NETWORK_MODULES
from .network import LoraNetwork
from .targets import uses_conv_rank

BASE_MODEL_VERSION = {("sd1", False): "sd_v1", ("sd1", True): "sd_v1", ("sd2", False): "sd_v2", ("sd2", True): "sd_v2_v",
                      ("sdxl", False): "sdxl_base_v1-0", ("sdxl", True): "sdxl_base_v1-0"}
ARCHITECTURE = {("sd1", False): "stable-diffusion-v1/lora", ("sd1", True): "stable-diffusion-v1/lora",
                ("sd2", False): "stable-diffusion-v2-512/lora", ("sd2", True): "stable-diffusion-v2-768-v/lora",
                ("sdxl", False): "stable-diffusion-xl-v1-base/lora", ("sdxl", True): "stable-diffusion-xl-v1-base/lora"}
MINIMAL_KEYS = ("ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_network_args",
                "ss_base_model_version", "ss_v2", "modelspec.sai_model_spec", "modelspec.architecture",
                "modelspec.implementation", "modelspec.title")


def network_metadata(network: LoraNetwork, network_type: str, v_prediction: bool = False,
                     title: str = "sdlora", training: dict | None = None, minimal: bool = False,
                     state: dict | None = None) -> dict[str, str]:
    """Header for `network` (dims and alphas read from the exported `state` when given, since PiSSA /
    LoRA-GA files hold rank 2r); `training` adds ss_* training facts (resolution, steps, lr, tags...)."""
    family = network.family
    modules = module_summary(state if state is not None else network.kohya_state_dict())
    # 3x3 convs take the conv rank; told by the module itself (a LoHa file stores convs flattened to 2-D)
    conv_names = {name for name, adapter in network.items() if uses_conv_rank(adapter.base)}
    linear = [m for name, m in modules.items() if name not in conv_names]
    conv = [m for name, m in modules.items() if name in conv_names]
    first = linear[0] if linear else conv[0]
    algo = first["algo"]
    args = next(a for _, a in network.items() if a.kind == algo).network_args()
    if conv:
        args |= {"conv_dim": str(conv[0]["rank"] or 1), "conv_alpha": _number(conv[0]["alpha"])}
        if args.get("algo") == "lora":
            args["algo"] = "locon"  # a DoRA with conv modules: LyCORIS's LoCon with dora_wd, as kohya_ss names it
    now = datetime.now(timezone.utc)
    meta = {
        "ss_network_module": NETWORK_MODULES[algo],  # kohya's networks.lora reads LoCon too (conv_dim)
        "ss_network_dim": str(first["rank"] or 1),
        "ss_network_alpha": _number(first["alpha"]),
        "ss_network_args": json.dumps(args),
        "ss_base_model_version": BASE_MODEL_VERSION[(family, v_prediction)],
        "ss_v2": str(family == "sd2"),
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": ARCHITECTURE[(family, v_prediction)],
        "modelspec.implementation": "https://github.com/kohya-ss/sd-scripts",  # the layout this file follows
        "modelspec.title": title,
        "modelspec.date": now.strftime("%Y-%m-%dT%H:%M:%S"),
        "sshs_tool": "sdlora",
    }
    for key, value in (training or {}).items():
        meta[key] = value if isinstance(value, str) else json.dumps(value) if isinstance(value, dict) else str(value)
    if minimal:
        meta = {k: v for k, v in meta.items() if k in MINIMAL_KEYS}
    return meta


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))

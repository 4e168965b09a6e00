"""The LyCORIS key layout sdlora reads and writes beside kohya's LoRA one (docs/LORA_FORMAT.md).

A LoHa module is `<name>.hada_w1_a`, `.hada_w1_b`, `.hada_w2_a`, `.hada_w2_b` and `<name>.alpha`; a LoKr
module `<name>.lokr_w1` (or `.lokr_w1_a` + `.lokr_w1_b`), `.lokr_w2` (or `.lokr_w2_a` + `.lokr_w2_b`) and
`<name>.alpha`, an OFT (diag-oft) module `<name>.oft_blocks` [blocks, b, b] and `<name>.alpha` (0: no
bound), under the same kohya module names as LoRA. A1111/Forge, ComfyUI and LyCORIS read them;
diffusers' `load_lora_weights` does not. A DoRA module is a LoRA one plus `<name>.dora_scale` (networks/dora.py).
"""

from __future__ import annotations

from .adapter import ALPHA
from .adapter_types import ADAPTER_TYPES, type_owning

# Views of the adapter table (adapter_types.py), keyed by each type's `kind` ("lora", "loha", "lokr").
ALGO_KEYS = {cls.kind: cls.file_keys for cls in ADAPTER_TYPES}
ALL_SUFFIXES = (*(key for cls in ADAPTER_TYPES for key in cls.file_keys), ALPHA)
ALGO_NAMES = {cls.kind: cls.label for cls in ADAPTER_TYPES}
# what ss_network_module says (kohya's sd-scripts write lycoris.kohya for LyCORIS networks)
NETWORK_MODULES = {cls.kind: cls.network_module for cls in ADAPTER_TYPES}
NOT_IN_DIFFUSERS = ("diffusers' load_lora_weights does not load LoHa/LoKr/OFT files (it reads LoRA/LoCon only); "
                    "A1111/Forge, ComfyUI and LyCORIS do.")


def split_key(key: str) -> tuple[str, str]:
    """('lora_unet_..._to_q', 'hada_w1_a') of 'lora_unet_..._to_q.hada_w1_a'; ('', key) without a dot."""
    name, _, suffix = key.partition(".")
    return (name, suffix) if suffix else ("", key)


def module_algo(suffixes: set[str] | list[str]) -> str | None:
    """"lora", "loha" or "lokr" from the suffixes one module holds; None when it holds none of them."""
    owner = type_owning(suffixes)
    return owner.kind if owner is not None else None


def group_modules(state) -> dict[str, dict[str, object]]:
    """{module name: {suffix: value}} of a state dict or a header's tensors."""
    modules: dict[str, dict[str, object]] = {}
    for key, value in state.items():
        name, suffix = split_key(key)
        modules.setdefault(name, {})[suffix] = value
    return modules


def file_algos(state) -> set[str]:
    """The algorithms a file's modules use, e.g. {"loha"}."""
    return {algo for parts in group_modules(state).values() if (algo := module_algo(parts)) is not None}

"""The one table of adapter types. Each class says how it is built from a spec, which file keys are its own
and how it reads itself from them, how its parameters split for learning rates and how it is written
(networks/adapter.py); everything that builds, reads or names a type asks here, so a new type (DoRA, OFT)
is one class and one entry.
"""

from __future__ import annotations

from .adapter import Adapter
from .dora import DoraModule
from .loha import LohaModule
from .lokr import LokrModule
from .lora import LoraModule
from .oft import OftModule

# In the order a file module's keys are tried: DoRA before LoRA (a DoRA module holds LoRA's keys too, plus
# dora_scale); the others' keys do not overlap.
ADAPTER_TYPES: tuple[type[Adapter], ...] = (LohaModule, LokrModule, OftModule, DoraModule, LoraModule)
BY_KIND: dict[str, type[Adapter]] = {cls.kind: cls for cls in ADAPTER_TYPES}


def type_for_spec(network_type: str) -> type[Adapter]:
    """The class a `network.type` builds ("locon" is LoRA with its conv modules)."""
    return next(cls for cls in ADAPTER_TYPES if network_type in cls.spec_types)


def type_owning(suffixes) -> type[Adapter] | None:
    """The class whose keys a file module holds; None when it holds none of any type's."""
    return next((cls for cls in ADAPTER_TYPES if cls.owns(suffixes)), None)


def type_reading(suffixes) -> type[Adapter]:
    """The class that reads a file module: its owner, or LoRA's for a module holding only an alpha (its
    `read` says what is missing, in the sentence LoRA files have always had)."""
    return type_owning(suffixes) or LoraModule

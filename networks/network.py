"""A set of LoRA/LoCon or LyCORIS LoHa/LoKr adapters attached to a UNet and its text encoder(s).

Everything is validated and built before the first module is touched, so a bad spec leaves the model as
it was. The adapters live in `LoraNetwork.adapters`, keyed by their kohya file name.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from .adapter import ALPHA, Adapter
from .adapter_types import type_for_spec, type_reading
from .block_lr import block_index, parse_block_values
from .errors import SdloraError
from .lycoris_keys import ALL_SUFFIXES, group_modules
from .naming import TEXT_ENCODER_PREFIXES, UNET_PREFIX, Component, alias_names, components_for, kohya_name
from .spec import NetworkSpec
from .targets import TargetRules, find_targets, uses_conv_rank


def make_adapter(spec: NetworkSpec, module: nn.Module, rank: int, alpha: float) -> Adapter:
    """One adapter of the spec's type around `module`."""
    return type_for_spec(spec.type).from_spec(spec, module, rank, alpha)


def target_rules(spec: NetworkSpec) -> TargetRules:
    return TargetRules(locon=spec.adapts_convs, conv_in_out=spec.include_conv_in_out,
                       time_embedding=spec.include_time_embedding)


@dataclass
class AdaptedModule:
    name: str  # kohya file name
    role: str  # "unet", "text_encoder", "text_encoder_2"
    path: str  # diffusers module path inside its component
    module: nn.Module
    aliases: list[str] = field(default_factory=list)


class LoraNetwork(nn.Module):
    def __init__(self, family: str, adapters: dict[str, Adapter], roles: dict[str, str],
                 paths: dict[str, str] | None = None, lr_weights: dict[str, float] | None = None):
        super().__init__()
        self.family = family
        self.adapters = nn.ModuleDict(adapters)
        self.roles = roles
        self.paths = paths or {}
        self.lr_weights = lr_weights or {}  # adapter name -> learning-rate multiplier (block weights); 1 if absent
        self.attached = False
        self.export_errors: dict[str, float] = {}

    # -- building ----------------------------------------------------------------------------
    @classmethod
    def create(cls, family: str, unet: nn.Module | None, text_encoders: list[nn.Module],
               spec: NetworkSpec, device: torch.device | str | None = None) -> LoraNetwork:
        """Build (not yet attached) adapters for every target module the spec selects, each on its module's
        device (or on `device`)."""
        spec.validate()
        parts = components_for(family, unet if spec.train_unet else None,
                               text_encoders if spec.train_text_encoder else [])
        targets = _select_targets(parts, spec)
        weights = _block_lr_weights(family, spec, [target.name for target in targets])
        rank_and_alpha = _block_ranks(family, spec)
        adapters, roles, paths = {}, {}, {}
        for target in targets:
            if weights.get(target.name) == 0:
                continue  # kohya: a block at learning-rate weight 0 gets no adapter
            rank, alpha = rank_and_alpha(target.name, uses_conv_rank(target.module))
            if rank == 0:
                continue  # kohya: a block at rank 0 gets no adapter
            adapter = make_adapter(spec, target.module, rank, alpha)
            adapters[target.name] = adapter.to(device=device or target.module.weight.device)
            roles[target.name], paths[target.name] = target.role, target.path
        if not adapters:
            raise SdloraError("Every block's learning-rate weight or rank is 0, so nothing would train; raise "
                              "network.down_lr_weight / mid_lr_weight / up_lr_weight or network.block_dims.")
        return cls(family, adapters, roles, paths, {n: w for n, w in weights.items() if n in adapters})

    @classmethod
    def from_state_dict(cls, family: str, unet: nn.Module | None, text_encoders: list[nn.Module],
                        state: dict[str, torch.Tensor], source: str = "the file") -> LoraNetwork:
        """Build adapters shaped like a kohya-layout state dict (ours or another trainer's) and load it."""
        modules = _all_modules_by_alias(components_for(family, unet, text_encoders))
        names = sorted({key.split(".", 1)[0] for key in state})
        unknown = [n for n in names if n not in modules]
        if unknown:
            shown = ", ".join(unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
            raise SdloraError(f"{len(unknown)} module name(s) in {source} match no module of this "
                              f"{family} model: {shown}; check that the file was made for {family}.")
        extra = [k for k in state if k.split(".", 1)[-1] not in ALL_SUFFIXES]
        if extra:
            raise SdloraError(f"{source} holds keys sdlora cannot load: {', '.join(extra[:5])}; only LoRA/LoCon "
                              "(lora_down, lora_up) and LyCORIS LoHa/LoKr (hada_*, lokr_*) modules with alpha load.")
        adapters, roles, paths = {}, {}, {}
        for name, parts in sorted(group_modules(state).items()):
            target = modules[name]
            alpha = float(parts[ALPHA]) if ALPHA in parts else None
            adapter = type_reading(parts).read(target.module, parts, alpha, target.name, source)
            adapter = adapter.to(device=target.module.weight.device)
            adapters[target.name], roles[target.name], paths[target.name] = adapter, target.role, target.path
        return cls(family, adapters, roles, paths)

    @classmethod
    def continue_from(cls, family: str, unet: nn.Module | None, text_encoders: list[nn.Module],
                      spec: NetworkSpec, state: dict[str, torch.Tensor], source: str = "the file") -> LoraNetwork:
        """kohya's network_weights: the spec's network, with every module the file holds taken from it at
        the file's own rank, alpha and weights (a LoCon file's conv modules included); modules the file
        lacks start fresh from the spec. The file's parts must all be trained by this spec."""
        check_parts_trained(state, spec, source)
        network = cls.create(family, unet, text_encoders, spec)
        parts = (unet if spec.train_unet else None, text_encoders if spec.train_text_encoder else [])
        loaded = cls.from_state_dict(family, *parts, state, source=source)
        for name, adapter in loaded.adapters.items():
            adapter.dropout, adapter.rank_dropout = spec.dropout, spec.rank_dropout
            adapter.module_dropout = spec.module_dropout
            network.adapters[name] = adapter
            network.roles[name], network.paths[name] = loaded.roles[name], loaded.paths[name]
        # The file's modules follow the block weights too (one in a weight-0 block stays, unchanged by training).
        network.lr_weights = _block_lr_weights(family, spec, list(network.adapters))
        return network

    # -- attaching ---------------------------------------------------------------------------
    def attach(self) -> LoraNetwork:
        for adapter in self.adapters.values():
            adapter.hook()
        self.attached = True
        return self

    def detach(self) -> None:
        self.unmerge()
        for adapter in self.adapters.values():
            adapter.unhook()
            adapter.restore_base()
        self.attached = False

    def sync_base(self) -> None:
        """Re-derive base weights moved by PiSSA/LoRA-GA from the (resumed) initial adapters."""
        for adapter in self.adapters.values():
            adapter.sync_base()

    # -- state -------------------------------------------------------------------------------
    def set_multiplier(self, multiplier: float) -> None:
        if any(a.merged for a in self.adapters.values()):
            raise SdloraError("Unmerge the network before changing its multiplier.")
        for adapter in self.adapters.values():
            adapter.multiplier = float(multiplier)

    def set_enabled(self, enabled: bool) -> None:
        for adapter in self.adapters.values():
            adapter.enabled = bool(enabled)

    def merge(self) -> None:
        for adapter in self.adapters.values():
            adapter.merge()

    def unmerge(self) -> None:
        for adapter in self.adapters.values():
            adapter.unmerge()

    def items(self) -> Iterator[tuple[str, Adapter]]:
        return iter(self.adapters.items())

    def trained_adapters(self) -> dict[str, Adapter]:
        """The adapters training changes: all but a continued file's modules in blocks at weight 0."""
        return {name: a for name, a in self.adapters.items() if self.lr_weights.get(name, 1.0) != 0}

    def parameter_groups(self) -> dict[str, dict[str, list[nn.Parameter]]]:
        """{role: {"down": [...], "up": [...]}}: for separate UNet/TE learning rates and LoRA+. LoHa/LoKr
        weights all count as "down": LoRA+ raises only lora_up's rate, as in LyCORIS."""
        groups: dict[str, dict[str, list[nn.Parameter]]] = {}
        for name, adapter in self.adapters.items():
            group = groups.setdefault(self.roles[name], {"down": [], "up": []})
            for side, parameters in adapter.learning_rate_groups().items():
                group[side].extend(parameters)
        return groups

    def kohya_state_dict(self, dtype: torch.dtype = torch.float32, exact: bool = True) -> dict[str, torch.Tensor]:
        """lora_down / lora_up in `dtype`, alpha always a 0-dim float32 (every loader expects that).

        The weights are the change to the original base model (see LoraModule.export_weights); with
        exact=False, adapters whose init moved the base are re-ranked to r and `export_errors` says how
        far each is from the true change. Linear (and 1x1) modules are written with one common alpha, their
        own scale folded into the weights: diffusers reads a differing alpha of an attention or text-encoder
        module as the file's most common one (its alpha_pattern keys match nothing), which block ranks or a
        continued file would otherwise trip; 3x3 convs keep theirs (diffusers reads those right).
        LoHa/LoKr modules are written in LyCORIS's layout with their scale folded into the factors and
        alpha = r: LyCORIS 4.1.3's merge_to applies alpha / r twice where its forward, ComfyUI and A1111 apply
        it once, and at scale 1 every loader agrees (tests/test_lycoris_types.py)."""
        exported = {name: adapter.export(exact) for name, adapter in self.adapters.items()}
        self.export_errors = {name: m.error for name, m in exported.items() if m.error is not None}
        common = _common_alpha([m.alpha for m in exported.values() if m.alpha_rule == "common"])
        state = {}
        # alpha = r modules first, then the others, each in network order: the order files have always had
        for name, module in sorted(exported.items(), key=lambda item: item[1].alpha_rule != "rank"):
            if module.alpha_rule == "common" and common is not None and module.alpha != common:
                module = module.at_alpha(common)
            for suffix, tensor in module.tensors.items():
                state[f"{name}.{suffix}"] = tensor.to("cpu", dtype).contiguous()
            state[f"{name}.{ALPHA}"] = torch.tensor(module.alpha, dtype=torch.float32)
        return state


def count_adapter_parameters(family: str, unet: nn.Module | None, text_encoders: list[nn.Module],
                             spec: NetworkSpec) -> int:
    """Trainable parameters of the network `spec` builds on this model (real or on the meta device), for
    every adapter type: its adapters are built on the meta device (no memory, no init), so the adapter
    classes stay the only owners of their sizes. A spec `create` refuses raises its SdloraError."""
    with torch.device("meta"):
        network = LoraNetwork.create(family, unet, text_encoders, spec, device="meta")
    return sum(parameter.numel() for parameter in network.parameters())


def _common_alpha(alphas: list[float]) -> float | None:
    """The most common alpha (ties: the larger), as resize.py picks it."""
    if not alphas:
        return None
    counts = Counter(alphas)
    return max(counts, key=lambda alpha: (counts[alpha], alpha))


def _block_ranks(family: str, spec: NetworkSpec):
    """(adapter name, is a 3x3 conv) -> (rank, alpha): the spec's, or its block's from block_dims."""
    sdxl = family == "sdxl"
    dims = parse_block_values(spec.block_dims, "network.block_dims", sdxl, whole=True)
    alphas = parse_block_values(spec.block_alphas, "network.block_alphas", sdxl)
    conv_dims = parse_block_values(spec.conv_block_dims, "network.conv_block_dims", sdxl, whole=True)
    conv_alphas = parse_block_values(spec.conv_block_alphas, "network.conv_block_alphas", sdxl)

    def rank_and_alpha(name: str, conv: bool) -> tuple[int, float]:
        index = block_index(name, sdxl)
        block_dims, block_alphas = (conv_dims, conv_alphas) if conv else (dims, alphas)
        if index is None or block_dims is None:
            return (spec.conv_rank, spec.resolved_conv_alpha) if conv else (spec.rank, spec.resolved_alpha)
        rank = block_dims[index]
        if block_alphas is not None:
            return rank, block_alphas[index]
        return rank, spec.alpha_at(rank, conv)

    return rank_and_alpha


def _block_lr_weights(family: str, spec: NetworkSpec, names: list[str]) -> dict[str, float]:
    """{adapter name: its block's learning-rate weight} for UNet adapters, when block weights are set."""
    weights = spec.block_weights(family)
    if weights is None:
        return {}
    found = {name: block_index(name, family == "sdxl") for name in names}
    return {name: weights[index] for name, index in found.items() if index is not None}


def check_parts_trained(state: dict[str, torch.Tensor], spec: NetworkSpec, source: str = "the file") -> None:
    """A continued file's UNet / text-encoder modules need that part trained (kohya would silently drop them)."""
    for role, prefixes, trained in (("UNet", (UNET_PREFIX,), spec.train_unet),
                                    ("text encoder", TEXT_ENCODER_PREFIXES, spec.train_text_encoder)):
        if not trained and any(key.startswith(prefixes) for key in state):
            flag = "train_unet" if role == "UNet" else "train_text_encoder"
            raise SdloraError(f"{source} adapts the {role}, but network.{flag} is false; set it to true to "
                              "continue those modules.")


def _select_targets(parts: list[Component], spec: NetworkSpec) -> list[AdaptedModule]:
    rules = target_rules(spec)
    targets = []
    for part in parts:
        for path, module in find_targets(part.model, part.is_unet, rules):
            targets.append(AdaptedModule(kohya_name(part, path), part.role, path, module))
    if spec.target_modules is not None:
        wanted = tuple(spec.target_modules)
        unmatched = [t for t in wanted if not any(a.path == t or a.path.endswith("." + t) for a in targets)]
        if unmatched:
            raise SdloraError(f"Target module '{unmatched[0]}' matches no adaptable module of this "
                              f"{spec.type} network; use names such as to_q, to_k, to_v, to_out.0, ff.net.2.")
        targets = [a for a in targets if any(a.path == t or a.path.endswith("." + t) for t in wanted)]
    if not targets:
        raise SdloraError("The network selects no module of this model; check network.type and the targets.")
    return targets


def _all_modules_by_alias(parts: list[Component]) -> dict[str, AdaptedModule]:
    """Every adaptable module of the model under each name a kohya-layout file may give it."""
    rules = TargetRules(locon=True, conv_in_out=True, time_embedding=True)
    found: dict[str, AdaptedModule] = {}
    for part in parts:
        for path, module in part.model.named_modules():
            if not (isinstance(module, nn.Linear | nn.Conv2d)):
                continue
            if not part.is_unet and not rules.matches_text_encoder(path) and "text_projection" not in path:
                continue
            target = AdaptedModule(kohya_name(part, path), part.role, path, module)
            for alias in alias_names(part, path):
                found.setdefault(alias, target)
    return found

"""An exponential moving average of the adapter weights, exported as its own `<name>-ema.safetensors`.

Averaging the last few hundred steps smooths out the noise of small-batch training; the EMA file often
generalises better than the last weights, and having both lets the user pick. The averaging itself is
diffusers' `EMAModel` (its decay schedule and state dict); this wrapper ties it to one `LoraNetwork`:
a fixed parameter order, resume through accelerate's `register_for_checkpointing`, and swapping the
averaged weights in for an export or a validation pass.

Decay at optimizer step n (diffusers' schedule; s = n - update_after_step - 1, decay 0 while s <= 0,
i.e. the first update copies the weights):
- warmup=True:  min(decay, 1 - (1 + s) ** -power)   (power 2/3: 0.999 is reached after ~31.6k steps)
- warmup=False: min(decay, (1 + s) / (10 + s))
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from diffusers.training_utils import EMAModel

from networks.errors import SdloraError
from networks.max_norm import apply_max_norm
from networks.network import LoraNetwork


class AdapterEMA:
    def __init__(self, network: LoraNetwork, decay: float = 0.999, warmup: bool = True, power: float = 2 / 3,
                 update_after_step: int = 0):
        if not 0 < decay < 1:
            raise SdloraError(f"The EMA decay must be between 0 and 1 (got {decay}); 0.999 is typical.")
        self.network = network
        self.params = list(network.parameters())  # the order the shadow copies follow
        self._ema = EMAModel(self.params, decay=decay, use_ema_warmup=warmup, power=power,
                             update_after_step=update_after_step)

    @property
    def step(self) -> int:
        return self._ema.optimization_step

    @property
    def current_decay(self) -> float | None:
        """The decay the last update used (None before the first)."""
        return self._ema.cur_decay_value

    def update(self) -> None:
        """Call once after each optimizer step."""
        self._ema.step(self.params)

    def shadow(self) -> list[torch.Tensor]:
        return list(self._ema.shadow_params)

    # -- resume: accelerate saves any object with state_dict/load_state_dict ---------------------
    def state_dict(self) -> dict:
        return self._ema.state_dict()

    def load_state_dict(self, state: dict) -> None:
        shadow = state.get("shadow_params")
        if shadow is not None and [tuple(t.shape) for t in shadow] != [tuple(p.shape) for p in self.params]:
            raise SdloraError("The saved EMA weights do not fit this network (different rank or modules); "
                              "resume with the run's own config.")
        self._ema.load_state_dict(state)
        device = self.params[0].device if self.params else None
        self._ema.to(device=device)  # accelerate loads onto the CPU

    # -- using the averaged weights ------------------------------------------------------------
    def copy_to(self, network: LoraNetwork | None = None) -> None:
        """Overwrite `network`'s weights (default: the tracked one) with the averages, for good."""
        target = self.params if network is None else list(network.parameters())
        if [p.shape for p in target] != [p.shape for p in self.params]:
            raise SdloraError("That network does not match the one the EMA tracks; build it with the same spec.")
        self._ema.copy_to(target)

    @contextmanager
    def swapped_in(self) -> Iterator[LoraNetwork]:
        """Inside the block the tracked network holds the averaged weights; the live ones come back after."""
        self._ema.store(self.params)
        try:
            self._ema.copy_to(self.params)
            yield self.network
        finally:
            self._ema.restore(self.params)

    def kohya_state_dict(self, dtype: torch.dtype = torch.float32, exact: bool = True,
                         max_norm: float = 0.0) -> dict[str, torch.Tensor]:
        """The averaged weights in the file layout (`exact` as LoraNetwork.kohya_state_dict), live weights
        left as they are; `max_norm` caps each module as train.scale_weight_norms capped the live ones (an
        average of capped B and A is not capped itself)."""
        with self.swapped_in() as network:
            if max_norm:
                apply_max_norm(network.trained_adapters(), max_norm)  # on the swapped-in copy; the average is kept
            # Cloned: on the CPU in fp32, kohya_state_dict's tensors are the live parameters themselves.
            return {key: value.clone() for key, value in network.kohya_state_dict(dtype, exact=exact).items()}


def ema_file(path: str | Path) -> Path:
    """`runs/x/my-lora.safetensors` -> `runs/x/my-lora-ema.safetensors` (same for checkpoints)."""
    path = Path(path)
    return path.with_name(f"{path.stem}-ema{path.suffix}")

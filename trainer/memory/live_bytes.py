"""Counting the bytes of live tensors while real code runs on the meta device.

`LiveBytes` is a TorchDispatchMode: every tensor an op creates is charged its storage's bytes once (views
share a storage), and a weak reference to that storage takes them back when the last tensor using it
dies, so `live` is what a caching allocator would hold in use and `peak` its high-water mark. Meta tensors
have storages with sizes and no data, so the whole SDXL step costs seconds and no memory.

`flash_attention()` sends `F.scaled_dot_product_attention` to PyTorch's flash
kernel (its CPU variant, which has meta and backward implementations): on the meta device the dispatcher
picks the math path, which materialises the full attention matrix and keeps it for backward, where a GPU
(flash / memory-efficient kernels) and a CPU (the same flash kernel) keep only the output and its
log-sum-exp. Without it SD1.5 at 512 px would be predicted gigabytes too high.
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager

import torch
from torch.nn import functional
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry, sdpa_backward_flop_count, sdpa_flop_count, shape_wrapper

from trainer.memory import meta_outputs


class LiveBytes(TorchDispatchMode):
    """The bytes of the tensors created under this mode that are still alive, their peak, and the FLOPs of
    the ops run (FlopCounterMode's formulas, read here: its own mode and module hooks would triple the time)."""

    def __init__(self):
        super().__init__()
        self._charged: dict[int, weakref.ref] = {}  # id(storage) -> a weak reference that releases it
        self.live = 0
        self.peak = 0
        self.flops = 0

    def reset_peak(self) -> None:
        self.peak = self.live

    def _release(self, key: int, nbytes: int) -> None:
        del self._charged[key]  # before the id can be reused: the callback runs as the storage dies
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out, flops, fresh = meta_outputs.run(func, args, kwargs, _flops)
        self.flops += flops
        # Views and in-place results share an input's storage: already charged, or made before the mode
        # (weights), which is not this mode's to count.
        inputs = set() if fresh else {id(t.untyped_storage()) for t in meta_outputs.tensors((args, kwargs))}
        for tensor in meta_outputs.tensors(out):
            if id(tensor.untyped_storage()) not in inputs:
                self._charge(tensor.untyped_storage())
        self.peak = max(self.peak, self.live)
        return out

    def _charge(self, storage) -> None:
        key = id(storage)
        if key in self._charged:
            return
        nbytes = storage.nbytes()
        self._charged[key] = weakref.ref(storage, lambda _, key=key, nbytes=nbytes: self._release(key, nbytes))
        self.live += nbytes


def _flash_forward(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _flash_backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def _flops(func, args, kwargs, out) -> int:
    formula = _FLOP_FORMULAS.get(func._overloadpacket)
    return 0 if formula is None else formula(*args, **kwargs, out_val=out)


# FlopCounterMode's formulas, plus the CPU flash kernel flash_attention() routes to (it knows the GPU ones).
_FLOP_FORMULAS = {**flop_registry,
                  torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: shape_wrapper(_flash_forward),
                  torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: shape_wrapper(_flash_backward)}


def storage_bytes(tensors) -> int:
    """The bytes of the distinct storages under `tensors` (tied or viewed weights counted once)."""
    seen = {}  # id -> storage, holding each storage so that its id is not reused meanwhile
    for tensor in tensors:
        storage = tensor.untyped_storage()
        seen[id(storage)] = storage
    return sum(storage.nbytes() for storage in seen.values())


@contextmanager
def flash_attention():
    """scaled_dot_product_attention through the flash kernel, as a GPU or CPU runs it (module docstring).
    The function itself is swapped, not intercepted by a TorchFunctionMode: gradient checkpointing
    recomputes inside the autograd engine, where such a mode is not active and the recomputed tensors
    would then differ from the saved ones."""
    original = functional.scaled_dot_product_attention
    functional.scaled_dot_product_attention = _flash
    try:
        yield
    finally:
        functional.scaled_dot_product_attention = original


def _flash(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        query, key, value, dropout_p, is_causal, attn_mask=attn_mask, scale=scale)[0]

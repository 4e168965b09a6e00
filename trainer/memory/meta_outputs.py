"""Meta kernels' results remembered by their inputs' metadata, so a trace runs each distinct op once.

On the meta device an op's outputs are a pure function of its inputs' shapes, strides, dtypes and its
non-tensor arguments: there are no values to depend on. Many of PyTorch's meta kernels are Python
(torch._meta_registrations, torch._decomp), and they were most of a trace's time; a UNet repeats the same
blocks at the same shapes (SDXL's 70 transformer blocks), and the budget's trial configs repeat whole
steps, so most ops of a trace have been run before with the same metadata. `run` makes fresh meta tensors
with the remembered metadata for those (storages of the same sizes, views of one storage where the kernel
made them so) and runs the kernel otherwise; the op's FLOPs are remembered with them.

Only ops that create new tensors qualify: no mutated argument and no output aliasing an input, by the op's
schema and, as a check, by what the kernel returned the first time. Not a library's: FakeTensorMode has a
similar cache, but its tensors are subclasses whose per-op cost in Python is higher than the meta kernels'.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

_CACHE: dict[tuple, tuple | None] = {}  # the op and its inputs' metadata -> (its outputs' layout, FLOPs) or None
_FRESH: dict[object, bool] = {}  # op -> whether its schema says it only creates new tensors
CACHE_LIMIT = 100_000  # entries; an SDXL step at one size makes a few thousand


def run(func, args: tuple, kwargs: dict, flops_of: Callable) -> tuple[object, int, bool]:
    """(func(*args, **kwargs) or fresh tensors shaped as its remembered outputs, its FLOPs, whether the
    outputs are known to be new storages)."""
    key = _cache_key(func, args, kwargs)
    entry = _CACHE.get(key) if key is not None else None
    if entry is not None:
        layout, flops = entry
        return _rebuild(layout), flops, True
    out = func(*args, **kwargs)
    flops = flops_of(func, args, kwargs, out)
    if key is not None and key not in _CACHE and len(_CACHE) < CACHE_LIMIT:
        layout = _layout(out, args, kwargs)
        _CACHE[key] = None if layout is None else (layout, flops)
    return out, flops, False


def tensors(value) -> Iterator[torch.Tensor]:
    """The tensors in an op's arguments or outputs (tuples, lists and dicts of them); faster than pytree."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from tensors(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from tensors(item)


def _cache_key(func, args, kwargs) -> tuple | None:
    if not _creates_fresh_tensors(func):
        return None
    try:
        return func, _key(args), _key(kwargs)
    except TypeError:  # an unhashable argument, or a tensor off the meta device: just run it
        return None


def _creates_fresh_tensors(func) -> bool:
    fresh = _FRESH.get(func)
    if fresh is None:
        schema = func._schema
        fresh = (not schema.is_mutable and bool(schema.returns)
                 and all(r.alias_info is None for r in schema.returns)
                 and all(a.alias_info is None for a in schema.arguments))
        _FRESH[func] = fresh
    return fresh


def _key(value):
    if isinstance(value, torch.Tensor):
        if value.device.type != "meta":
            raise TypeError("only a meta tensor's outputs cannot depend on its values")
        return value.shape, value.stride(), value.dtype, value.storage_offset()
    if isinstance(value, (list, tuple)):
        return (type(value), *map(_key, value))
    if isinstance(value, dict):
        return tuple((name, _key(item)) for name, item in value.items())
    hash(value)
    return value


def _layout(out, args, kwargs) -> tuple | None:
    """The outputs' metadata and storage sizes (None for absent outputs), or None when an output is not a
    new meta tensor."""
    items = [out] if isinstance(out, torch.Tensor) else out
    if not isinstance(items, (list, tuple)) or not all(t is None or isinstance(t, torch.Tensor) for t in items):
        return None
    inputs = {id(t.untyped_storage()) for t in tensors((args, kwargs))}
    storages: list = []
    described = []
    for tensor in items:
        if tensor is None:
            described.append(None)
            continue
        storage = tensor.untyped_storage()
        if tensor.device.type != "meta" or id(storage) in inputs:
            return None
        index = next((i for i, seen in enumerate(storages) if seen is storage), None)
        if index is None:
            index = len(storages)
            storages.append(storage)
        described.append((index, tuple(tensor.shape), tensor.stride(), tensor.storage_offset(), tensor.dtype))
    kind = None if isinstance(out, torch.Tensor) else type(out)
    return kind, tuple(described), tuple(s.nbytes() for s in storages)


def _rebuild(layout: tuple):
    kind, described, sizes = layout
    storages = [torch.UntypedStorage(size, device="meta") for size in sizes]
    made = [None if item is None else
            torch.empty(0, dtype=item[4], device="meta").set_(storages[item[0]], item[3], item[1], item[2])
            for item in described]
    return made[0] if kind is None else kind(made)

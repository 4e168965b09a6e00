"""Text-encoder outputs cached per caption, for runs that train neither the text encoder nor vary captions.

Then every caption always encodes to the same tensors, and running CLIP once per unique caption instead
of once per step saves both time and (once the encoder is moved off the GPU) memory.

`TextEmbeddingCache(encode_fn)` is a drop-in for `encode_fn`: called with a list of captions, it returns
the same structure encode_fn returns (a tensor, or tuples/lists/dicts of tensors, batch first). Dict
subclasses such as transformers' ModelOutput come back as plain dicts, so index them by key, which
works on both (`output["last_hidden_state"]`).
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from trainer.caches.latent_cache import atomic_save
from trainer.data.captions import CaptionOptions


def text_cache_allowed(captions: CaptionOptions, train_text_encoder: bool) -> bool:
    return not train_text_encoder and not captions.varies


class TextEmbeddingCache:
    def __init__(
        self,
        encode_fn: Callable[[list[str]], Any],
        encoder_id: str = "",
        folder: Path | None = None,
        device: torch.device | str = "cpu",
    ):
        # Entries are kept on the CPU (GPU memory is for training) and returned on `device`.
        self.encode_fn, self.encoder_id, self.device = encode_fn, encoder_id, torch.device(device)
        self.folder = Path(folder) if folder is not None else None
        self.encoded_captions = 0  # captions actually sent through encode_fn by this object
        self._memory: dict[str, Any] = {}  # caption -> its output with the batch dimension removed
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)

    def __call__(self, captions: list[str]) -> Any:
        missing = list(dict.fromkeys(c for c in captions if self._lookup(c) is None))
        if missing:
            self._encode(missing)
        return _stack([self._memory[c] for c in captions], self.device)

    def build(self, captions: list[str], batch_size: int = 16) -> int:
        """Encode every caption not cached yet, `batch_size` per encoder call; returns how many.

        Filling the cache up front in one fixed order makes each caption's states independent of which
        batch first needed it (matmul results vary in the last bits with the batch shape), so a resumed
        run sees the same states as an uninterrupted one."""
        missing = [c for c in dict.fromkeys(captions) if self._lookup(c) is None]
        for start in range(0, len(missing), batch_size):
            self._encode(missing[start:start + batch_size])
        return len(missing)

    def entries(self, captions: list[str]) -> dict[str, Any]:
        """{caption: states} as stored (what `add` takes in another process)."""
        return {c: out for c in dict.fromkeys(captions) if (out := self._lookup(c)) is not None}

    def add(self, entries: dict[str, Any]) -> None:
        for caption, output in entries.items():
            self._memory.setdefault(caption, output)

    def key(self, caption: str) -> str:
        return hashlib.sha256(f"{self.encoder_id}\0{caption}".encode()).hexdigest()

    @torch.no_grad()
    def _encode(self, captions: list[str]) -> None:
        outputs = _unstack(self.encode_fn(captions), len(captions))
        self.encoded_captions += len(captions)
        for caption, output in zip(captions, outputs):
            self._memory[caption] = output
            if self.folder is not None:
                self._save(caption, output)

    def _lookup(self, caption: str) -> Any:
        if caption in self._memory or self.folder is None:
            return self._memory.get(caption)
        try:
            with safe_open(self.folder / f"{self.key(caption)}.safetensors", framework="pt") as file:
                spec = json.loads(file.metadata()["structure"])
                tensors = {name: file.get_tensor(name) for name in file.keys()}
        except (FileNotFoundError, SafetensorError, KeyError, TypeError, ValueError):
            return None  # absent or damaged: encode again
        self._memory[caption] = _rebuild(spec, tensors)
        return self._memory[caption]

    def _save(self, caption: str, output: Any) -> None:
        tensors: dict[str, torch.Tensor] = {}
        structure = json.dumps(_describe(output, tensors))
        atomic_save(tensors, self.folder / f"{self.key(caption)}.safetensors", {"structure": structure})


# Batched outputs are split into per-caption pieces and stacked back; the structure is walked by hand
# because encoder outputs mix tensors, tuples, dicts (transformers' ModelOutput) and None.


def _unstack(output: Any, count: int) -> list[Any]:
    if isinstance(output, torch.Tensor):
        return [row.detach().to("cpu", copy=True) for row in output]
    if isinstance(output, dict):
        columns = {key: _unstack(value, count) for key, value in output.items()}
        return [{key: column[i] for key, column in columns.items()} for i in range(count)]
    if isinstance(output, (tuple, list)):
        columns = [_unstack(value, count) for value in output]
        return [type(output)(column[i] for column in columns) for i in range(count)]
    return [output] * count  # None and other constants are shared by the whole batch


def _stack(pieces: list[Any], device: torch.device) -> Any:
    first = pieces[0]
    if isinstance(first, torch.Tensor):
        return torch.stack(pieces).to(device)
    if isinstance(first, dict):
        return {key: _stack([piece[key] for piece in pieces], device) for key in first}
    if isinstance(first, (tuple, list)):
        return type(first)(_stack([piece[i] for piece in pieces], device) for i in range(len(first)))
    return first


def _describe(output: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """A JSON description of `output`'s structure; its tensors are put in `tensors` under "t<n>"."""
    if isinstance(output, torch.Tensor):
        name = f"t{len(tensors)}"
        tensors[name] = output.contiguous().cpu()
        return {"tensor": name}
    if isinstance(output, dict):
        return {"dict": [[key, _describe(value, tensors)] for key, value in output.items()]}
    if isinstance(output, (tuple, list)):
        return {"list" if isinstance(output, list) else "tuple": [_describe(v, tensors) for v in output]}
    return {"value": output}


def _rebuild(spec: dict, tensors: dict[str, torch.Tensor]) -> Any:
    kind, body = next(iter(spec.items()))
    if kind == "tensor":
        return tensors[body]
    if kind == "dict":
        return {key: _rebuild(value, tensors) for key, value in body}
    if kind in ("list", "tuple"):
        values = [_rebuild(value, tensors) for value in body]
        return values if kind == "list" else tuple(values)
    return body

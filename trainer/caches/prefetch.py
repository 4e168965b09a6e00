"""Pixels of the coming batches, decoded by `dataset.num_workers` worker processes ahead of the step.

Only runs that encode images every step need it (`dataset.cache_latents = "none"`, or random crops, which
are never cached): decoding, resizing and cropping large photos then costs as much as a GPU step. The
epoch's batch plan is fixed in advance (a pure function of seed and epoch), so torch's DataLoader can walk
it in order; the loop asks for the batches in that same order, and anything else (LoRA-GA's first
gradients, a batch out of turn) loads in the training process as before, with the same pixels.
"""

from __future__ import annotations

import os
import signal

import torch
from torch.utils.data import DataLoader, Dataset

from networks.errors import SdloraError
from trainer.data.dataset import Batch, ImageDataset


def batch_pixels(dataset: ImageDataset, batch: Batch) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1]: each sample with its own crop and flip."""
    return torch.stack([dataset.sample_pixels(s) for s in batch.samples])


class _PlanPixels(Dataset):
    def __init__(self, dataset: ImageDataset, batches: list[Batch]):
        self.dataset, self.batches = dataset, batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int) -> tuple[torch.Tensor | SdloraError, int]:
        try:
            return batch_pixels(self.dataset, self.batches[index]), os.getpid()
        except SdloraError as error:  # returned, not raised: torch would wrap it in a worker traceback
            return error, os.getpid()


def _ignore_interrupts(worker_id: int) -> None:
    # Ctrl+C reaches the whole process group: the training process answers it by saving a checkpoint after
    # the step, so its workers must keep serving that step instead of dying under it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class PixelPrefetch:
    def __init__(self, dataset: ImageDataset, workers: int, ahead: int = 2):
        self.dataset, self.workers, self.ahead = dataset, workers, ahead
        self.loader_pids: set[int] = set()  # processes that loaded prefetched batches (tests, diagnostics)
        self._plan: list[Batch] = []
        self._next = 0
        self._iterator = None

    def start(self, plan: list[Batch], first: int = 0) -> None:
        """Begin loading plan[first:] in the background (the loop resumes mid-epoch at `first`)."""
        self.close()
        self._plan, self._next = plan, first
        if first < len(plan):
            loader = DataLoader(_PlanPixels(self.dataset, plan[first:]), batch_size=None, shuffle=False,
                                num_workers=self.workers, prefetch_factor=self.ahead,
                                # its own generator: starting workers draws a seed, and from the global RNG
                                # that would shift the run's noise (the plan already fixed every random choice)
                                generator=torch.Generator().manual_seed(0), worker_init_fn=_ignore_interrupts)
            self._iterator = iter(loader)

    def pixels(self, batch: Batch) -> torch.Tensor:
        if self._iterator is not None and self._next < len(self._plan) and batch is self._plan[self._next]:
            self._next += 1
            pixels, pid = next(self._iterator)
            self.loader_pids.add(pid)
            if isinstance(pixels, SdloraError):
                raise pixels
            return pixels
        return batch_pixels(self.dataset, batch)

    def close(self) -> None:
        """Stop the workers: the last reference to the iterator goes, and its finaliser joins them."""
        self._iterator = None

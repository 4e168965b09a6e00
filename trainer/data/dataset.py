"""The image folder as a training dataset: scanning, the pre-flight report, items, and the batch plan.

Layout (kohya's): images straight in the folder train with `default_repeats`; a sub-folder named
"<repeats>_<class words>" (e.g. "10_mystyle") trains its images that many times per epoch, and its class
words stand in for a missing caption. Captions live next to the image: "cat.png" + "cat.txt".
Regularization ("class") images from a second folder, laid out the same way, join the epoch as kohya
mixes them: as many reg samples per epoch as training samples (see `balance_reg_repeats`).

Everything random about an epoch (order, flips, random crops, caption augmentation) is a pure function
of (seed, epoch), so a resumed run replays the same batches and N processes can split them.
"""
from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps

from networks.errors import SdloraError
from trainer.data.buckets import BucketSpec, Placement, Size, bucket_for, bucket_sizes, place, render
from trainer.data.captions import (
    CaptionOptions,
    Kept,
    add_trigger,
    augment_caption,
    mark_kept,
    parse_kohya_folder,
)
from trainer.data.images import is_image_file, load_image, probe_image
from trainer.data.steps import BatchCount, count_batches

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class DatasetOptions:
    folder: Path
    buckets: BucketSpec = field(default_factory=BucketSpec)
    captions: CaptionOptions = field(default_factory=CaptionOptions)
    caption_extension: str = ".txt"
    default_repeats: int = 1
    random_crop: bool = False  # a fresh crop per sample per epoch instead of the centre (never cached)
    flip: bool = False
    prepend_class_word: bool = False  # put the folder's class word first in every caption
    reg_folder: Path | None = None  # regularization images (kohya's reg_data_dir)

    @property
    def caption_suffix(self) -> str:
        extension = self.caption_extension.strip()
        return extension if extension.startswith(".") else f".{extension}"


@dataclass(frozen=True)
class Item:
    index: int
    path: Path
    caption: str  # before per-epoch augmentation
    repeats: int
    placement: Placement  # the centred crop: what is cached, and what every epoch uses without random_crop
    has_alpha: bool
    kept: Kept | None = None  # the caption's own fixed tags (keep_tokens_separator); None = keep_tokens
    is_reg: bool = False  # a regularization image: weighted by train.prior_loss_weight, never held out

    @property
    def bucket(self) -> Size:
        return self.placement.bucket

    @property
    def size(self) -> Size:
        return self.placement.original_size


@dataclass(frozen=True)
class Skipped:
    name: str  # relative to the dataset folder
    reason: str


@dataclass
class DatasetReport:
    """What the scan found, for a pre-flight check shown before training starts."""

    folder: Path
    caption_extension: str
    images_found: int = 0
    skipped: list[Skipped] = field(default_factory=list)
    ignored_folders: list[Skipped] = field(default_factory=list)
    captions_missing: list[str] = field(default_factory=list)
    bucket_counts: dict[Size, int] = field(default_factory=dict)  # usable images per bucket
    samples_per_epoch: int = 0  # usable images times their repeats (regularization samples included)
    reg_folder: Path | None = None
    reg_images: int = 0  # usable regularization images
    reg_used: int = 0  # of those, how many take part (the first ones, when there are more than needed)
    reg_samples_per_epoch: int = 0
    reg_problems: list[Skipped] = field(default_factory=list)  # unreadable reg images and ignored sub-folders

    @property
    def usable(self) -> int:
        return self.images_found - len(self.skipped)

    def to_dict(self) -> dict:
        return {
            "folder": str(self.folder),
            "caption_extension": self.caption_extension,
            "images_found": self.images_found,
            "usable": self.usable,
            "skipped": [{"name": s.name, "reason": s.reason} for s in self.skipped],
            "ignored_folders": [{"name": s.name, "reason": s.reason} for s in self.ignored_folders],
            "captions_missing": list(self.captions_missing),
            "buckets": [{"width": w, "height": h, "images": n} for (w, h), n in sorted(self.bucket_counts.items())],
            "samples_per_epoch": self.samples_per_epoch,
            "reg_folder": str(self.reg_folder) if self.reg_folder else None,
            "reg_images": self.reg_images,
            "reg_used": self.reg_used,
            "reg_samples_per_epoch": self.reg_samples_per_epoch,
            "reg_problems": [{"name": s.name, "reason": s.reason} for s in self.reg_problems],
        }

    def summary(self) -> str:
        lines = [
            f"{self.usable} of {self.images_found} images usable in '{self.folder}', "
            f"{self.samples_per_epoch} samples per epoch."
        ]
        lines += [f"skipped {s.name}: {s.reason}" for s in self.skipped]
        lines += [f"ignored folder {s.name}: {s.reason}" for s in self.ignored_folders]
        if self.captions_missing:
            lines.append(f"{len(self.captions_missing)} images have no {self.caption_extension} caption.")
        if self.reg_folder is not None:
            lines.append(self.reg_summary())
        lines += [f"bucket {w}x{h}: {n} images" for (w, h), n in sorted(self.bucket_counts.items())]
        return "\n".join(lines)

    def reg_summary(self) -> str:
        unused = self.reg_images - self.reg_used
        rest = f"; the other {unused} are not used (kohya's balance)" if unused else ""
        return (f"Regularization: {self.reg_used} of {self.reg_images} images in '{self.reg_folder}', "
                f"{self.reg_samples_per_epoch} samples per epoch (as many as the training folder's){rest}.")


@dataclass(frozen=True)
class Sample:
    """One slot of an epoch: which item, its crop, mirrored or not, and the caption it trains with."""

    item: int  # index into ImageDataset.items
    flip: bool
    caption: str
    placement: Placement  # this epoch's crop, in the unmirrored image

    @property
    def as_seen(self) -> Placement:
        """The crop as the model sees it, mirrored for flipped samples: SDXL's size/crop conditioning."""
        return self.placement.flipped() if self.flip else self.placement


@dataclass(frozen=True)
class Batch:
    bucket: Size
    samples: tuple[Sample, ...]


class ImageDataset:
    def __init__(self, options: DatasetOptions, items: list[Item], report: DatasetReport, seed: int = 0):
        self.options, self.items, self.report, self.seed = options, items, report, seed

    @classmethod
    def scan(cls, options: DatasetOptions, seed: int = 0) -> ImageDataset:
        return cls(options, *scan_folder(options), seed=seed)

    def __len__(self) -> int:
        return len(self.items)

    def batches(self, epoch: int, batch_size: int, rank: int = 0, world_size: int = 1) -> list[Batch]:
        """This process's batches for `epoch`, in training order; resume by slicing from a batch index."""
        if not 0 <= rank < world_size:
            raise SdloraError(f"Process rank {rank} is outside 0..{world_size - 1}; check the launcher's settings.")
        plan = _epoch_plan(self.items, batch_size, random.Random(self.seed + epoch))
        if world_size > 1:
            # Every process must take the same number of steps or collective ops hang, so wrap around
            # to fill the last round (as torch's DistributedSampler pads).
            shortfall = -len(plan) % world_size
            plan = plan + [plan[i % len(plan)] for i in range(shortfall)]
        return [self._batch(epoch, slots) for slots in plan[rank::world_size]]

    def samples_per_bucket(self) -> dict[Size, int]:
        """Samples per epoch (images x repeats) in each bucket: what the batch plan batches bucket by bucket."""
        counts: Counter[Size] = Counter()
        for item in self.items:
            counts[item.bucket] += item.repeats
        return dict(counts)

    def batch_count(self, batch_size: int, world_size: int = 1) -> BatchCount:
        """How many batches `batches` plans per epoch, in all and per process (the same every epoch)."""
        _check_batch_size(batch_size)
        return count_batches(self.samples_per_bucket().values(), batch_size, world_size)

    def pixels(self, item: Item, flip: bool = False, placement: Placement | None = None) -> torch.Tensor:
        """RGB in its bucket, CHW float32 in [-1, 1] (the VAE's input); the item's own crop by default."""
        # Imported here so that scanning (the UI's pre-flight check) does not pay torch/diffusers' import time.
        from diffusers.image_processor import VaeImageProcessor

        rgb = load_bucket_image(item, flip, placement)[0]
        array = VaeImageProcessor.pil_to_numpy(rgb)
        return VaeImageProcessor.normalize(VaeImageProcessor.numpy_to_pt(array))[0].float()

    def sample_pixels(self, sample: Sample) -> torch.Tensor:
        return self.pixels(self.items[sample.item], sample.flip, sample.placement)

    def alpha(self, item: Item, flip: bool = False, placement: Placement | None = None) -> torch.Tensor | None:
        """Alpha in its bucket as HW float32 in [0, 1], or None for opaque images (for loss masks)."""
        import torch

        alpha = load_bucket_image(item, flip, placement)[1]
        if alpha is None:
            return None
        return torch.from_numpy(np.asarray(alpha, dtype=np.float32) / 255.0)

    def _batch(self, epoch: int, slots: list[tuple[int, int, bool]]) -> Batch:
        samples = tuple(
            Sample(
                item=index,
                flip=flip and self.options.flip,
                caption=self._caption(epoch, index, repeat),
                placement=self._crop(epoch, index, repeat),
            )
            for index, repeat, flip in slots
        )
        return Batch(self.items[slots[0][0]].bucket, samples)

    # Per-sample randomness gets its own rng keyed by (seed, epoch, item, repeat): a string seed is hashed
    # with SHA-512 by `random`, so it is the same in every process and run, whatever else draws numbers.

    def _caption(self, epoch: int, index: int, repeat: int) -> str:
        rng = random.Random(f"caption:{self.seed}:{epoch}:{index}:{repeat}")
        item = self.items[index]
        return augment_caption(item.caption, self.options.captions, rng, item.kept, epoch)

    def _crop(self, epoch: int, index: int, repeat: int) -> Placement:
        item = self.items[index]
        if not self.options.random_crop:
            return item.placement
        return place(item.size, item.bucket, True, random.Random(f"crop:{self.seed}:{epoch}:{index}:{repeat}"))


def load_bucket_image(
    item: Item, flip: bool = False, placement: Placement | None = None
) -> tuple[Image.Image, Image.Image | None]:
    """(RGB, alpha or None), resized and cropped to the bucket (the item's crop unless another is given),
    mirrored when `flip`."""
    placement = placement or item.placement
    image = load_image(item.path)
    rgb, alpha = render(image.rgb, placement), image.alpha
    alpha = render(alpha, placement) if alpha is not None else None
    if flip:
        rgb, alpha = ImageOps.mirror(rgb), ImageOps.mirror(alpha) if alpha is not None else None
    return rgb, alpha


def scan_folder(options: DatasetOptions) -> tuple[list[Item], DatasetReport]:
    folder = Path(options.folder)
    if options.default_repeats < 1:
        raise SdloraError(f"dataset.default_repeats is {options.default_repeats}; use 1 or more.")
    if folder.is_file():
        raise SdloraError(f"Dataset folder '{folder}' is a file, not a folder; point dataset.path at a folder of images.")
    if not folder.is_dir():
        raise SdloraError(f"Dataset folder '{folder}' does not exist; point dataset.path at a folder of images.")
    report = DatasetReport(folder, options.caption_suffix)
    items = _scan_images(folder, options, report)
    if not items:
        raise SdloraError(f"No usable images in '{folder}': {_why_empty(report)}")
    if options.reg_folder is not None:
        items += _scan_reg(Path(options.reg_folder), options, report, first_index=len(items),
                           train_samples=sum(item.repeats for item in items))
    report.bucket_counts = dict(Counter(item.bucket for item in items))
    report.samples_per_epoch = sum(item.repeats for item in items)
    return items, report


def _scan_images(folder: Path, options: DatasetOptions, report: DatasetReport, first_index: int = 0) -> list[Item]:
    buckets = bucket_sizes(options.buckets)
    items: list[Item] = []
    for path, repeats, class_word in _image_files(folder, options, report):
        report.images_found += 1
        info, reason = probe_image(path)
        name = path.relative_to(folder).as_posix()
        if info is None:
            report.skipped.append(Skipped(name, reason))
            continue
        caption = _read_caption(path, options.caption_suffix)
        if caption is None:
            report.captions_missing.append(name)
        caption, kept = _final_caption(caption, class_word, options)
        placement = place(info.size, bucket_for(info.size, options.buckets, buckets))
        items.append(Item(first_index + len(items), path, caption, repeats, placement, info.has_alpha, kept))
    return items


def _scan_reg(folder: Path, options: DatasetOptions, report: DatasetReport, first_index: int,
              train_samples: int) -> list[Item]:
    if not folder.is_dir():
        raise SdloraError(f"Regularization folder '{folder}' does not exist; point dataset.reg_path at a folder "
                          "of class images or leave it empty.")
    # Found in a report of their own: reg images usually have no captions (their class word stands in), and
    # their problems are named with the reg folder.
    found = DatasetReport(folder, options.caption_suffix)
    items = _scan_images(folder, options, found, first_index)
    if not items:
        raise SdloraError(f"No usable images in the regularization folder '{folder}': {_why_empty(found)}")
    report.reg_problems = found.skipped + found.ignored_folders
    repeats = balance_reg_repeats([item.repeats for item in items], train_samples)
    used = [replace(item, repeats=r, is_reg=True) for item, r in zip(items, repeats) if r > 0]
    used = [replace(item, index=first_index + i) for i, item in enumerate(used)]
    report.reg_folder, report.reg_images, report.reg_used = folder, len(items), len(used)
    report.reg_samples_per_epoch = sum(item.repeats for item in used)
    return used


def balance_reg_repeats(repeats: list[int], train_samples: int) -> list[int]:
    """kohya's balance: reg images (in order, each with its folder's repeats) until the epoch holds as many
    reg samples as training samples; if one pass is short, one more repeat each, in order, until it is
    not; images past the point where the count is reached are left out."""
    balanced, total = [0] * len(repeats), 0
    for i, r in enumerate(repeats):
        if total >= train_samples:
            break
        balanced[i], total = r, total + r
    while total < train_samples:
        for i in range(len(repeats)):
            if total >= train_samples:
                break
            balanced[i], total = balanced[i] + 1, total + 1
    return balanced


def _image_files(folder: Path, options: DatasetOptions, report: DatasetReport):
    """(path, repeats, class word) for the root's images and the kohya sub-folders' images, sorted."""
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue  # .ipynb_checkpoints, .DS_Store, caches
        if entry.is_file() and is_image_file(entry):
            yield entry, options.default_repeats, ""
        elif entry.is_dir():
            parsed = parse_kohya_folder(entry.name)
            if parsed is None or parsed[0] < 1:
                reason = "repeats is 0" if parsed else "name is not '<repeats>_<class word>' like '10_mystyle'"
                report.ignored_folders.append(Skipped(entry.name, reason))
                continue
            for path in sorted(entry.iterdir()):
                if path.is_file() and is_image_file(path) and not path.name.startswith("."):
                    yield path, parsed[0], parsed[1]


def _read_caption(image_path: Path, suffix: str) -> str | None:
    """The sidecar caption, lines joined as tags; None when absent or blank."""
    caption_path = image_path.with_suffix(suffix)
    if not caption_path.is_file():
        return None
    lines = caption_path.read_text(encoding="utf-8-sig", errors="replace").splitlines()
    caption = ", ".join(line.strip() for line in lines if line.strip())
    return caption or None


def _final_caption(caption: str | None, class_word: str, options: DatasetOptions) -> tuple[str, Kept | None]:
    """The caption every consumer sees (separator taken out, class word first if asked) and its kept tags."""
    if caption is None:
        return class_word, None
    caption, kept = mark_kept(caption, options.captions.keep_tokens_separator)
    if not options.prepend_class_word:
        return caption, kept
    with_class = add_trigger(caption, class_word)
    if kept is not None and with_class != caption:
        kept = Kept(kept.head + 1, kept.tail)  # the class word joins the fixed head
    return with_class, kept


def _why_empty(report: DatasetReport) -> str:
    if report.skipped:
        return f"all {report.images_found} images failed to open (first: {report.skipped[0].name}, {report.skipped[0].reason})."
    if report.ignored_folders:
        return "no .png/.jpg/.jpeg/.webp/.bmp files at the top level, and sub-folders must be named like '10_mystyle'."
    return "add .png/.jpg/.jpeg/.webp/.bmp files (or kohya '10_mystyle' sub-folders)."


def _check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise SdloraError(f"train.batch_size is {batch_size}; use 1 or more.")


def _epoch_plan(items: list[Item], batch_size: int, rng: random.Random) -> list[list[tuple[int, int, bool]]]:
    """Batches of (item index, repeat, flip): single-bucket, shuffled within and across buckets."""
    _check_batch_size(batch_size)
    by_bucket: dict[Size, list[tuple[int, int]]] = {}
    for item in items:
        by_bucket.setdefault(item.bucket, []).extend((item.index, r) for r in range(item.repeats))
    batches: list[list[tuple[int, int]]] = []
    for bucket in sorted(by_bucket):
        slots = by_bucket[bucket]
        rng.shuffle(slots)
        batches += [slots[i : i + batch_size] for i in range(0, len(slots), batch_size)]
    rng.shuffle(batches)
    # Flips are drawn last, so turning flip on or off leaves the order itself unchanged.
    return [[(index, repeat, rng.random() < 0.5) for index, repeat in batch] for batch in batches]

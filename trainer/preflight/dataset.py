"""The image folder: what can be read, regularization, masks, held-out validation images, and whether the
run sees each image so often that the LoRA copies it."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from networks.errors import SdloraError
from trainer.data.dataset import ImageDataset
from trainer.data.loss_mask import LossMasks, missing_masks
from trainer.objective.validation import split_dataset
from trainer.preflight.context import CheckContext


def check_dataset(ctx: CheckContext) -> None:
    cfg, report = ctx.cfg, ctx.report
    if not cfg.dataset.path:
        report.errors.append("dataset.path is empty; give the image folder with --data DIR.")
        return
    try:
        dataset = ImageDataset.scan(cfg.dataset.options(), seed=cfg.train.seed)
    except SdloraError as error:
        report.errors.append(str(error))
        return
    ctx.dataset = dataset
    found = dataset.report
    report.data["dataset"] = found.to_dict()
    repeats = Counter(item.repeats for item in dataset.items if not item.is_reg)
    parts = [f"{n} image{'s' if n > 1 else ''} x {r} repeat{'s' if r > 1 else ''}" for r, n in sorted(repeats.items())]
    report.info.append(f"Dataset: {found.usable} usable images in {found.folder} ({', '.join(parts)}).")
    if found.reg_folder is not None:
        report.info.append(found.reg_summary() + f" Their loss weight is {cfg.train.prior_loss_weight:g} "
                                                 "(train.prior_loss_weight).")
    for problem in found.reg_problems:
        report.warnings.append(f"Regularization: {problem.name} is left out: {problem.reason}.")
    if found.skipped:
        names = ", ".join(f"{s.name} ({s.reason})" for s in found.skipped[:10])
        more = f" and {len(found.skipped) - 10} more" if len(found.skipped) > 10 else ""
        report.warnings.append(f"{len(found.skipped)} image(s) cannot be read and will be skipped: {names}{more}.")
    for folder in found.ignored_folders:
        report.warnings.append(f"The folder {folder.name} is ignored: its {folder.reason}.")


def check_masks(ctx: CheckContext) -> None:
    if ctx.dataset is None:
        return
    # The config keys come with the masked-loss wiring; until then getattr keeps the check a no-op.
    source = getattr(ctx.cfg.dataset, "loss_mask", "none")
    if source == "alpha" and not any(item.has_alpha for item in ctx.dataset.items):
        ctx.report.warnings.append("dataset.loss_mask is alpha but no image has transparency, so every pixel "
                                   "trains; use RGBA PNGs or a mask folder.")
    elif source == "folder":
        try:
            missing = missing_masks(LossMasks(ctx.dataset, "folder", getattr(ctx.cfg.dataset, "mask_folder", None)))
        except SdloraError as error:
            ctx.report.errors.append(str(error))
            return
        if missing:
            ctx.report.warnings.append(f"{len(missing)} image(s) have no mask and train on every pixel: "
                                       f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}.")


def check_validation(ctx: CheckContext) -> None:
    """Validation settings, and the training part of the dataset (held-out validation images removed)."""
    if ctx.dataset is None:
        return
    val, report = ctx.cfg.validation, ctx.report
    if (val.images or val.folder) and not val.every_steps:
        report.warnings.append("Validation images are set but validation.every_steps is 0, so no validation loss "
                               "is measured; set it (e.g. 50).")
    if val.every_steps and not (val.images or val.folder):
        report.warnings.append("validation.every_steps is set but there are no validation images; set "
                               "validation.images or validation.folder.")
    if val.folder and not Path(val.folder).is_dir():
        report.errors.append(f"validation.folder {val.folder} does not exist; point it at a folder of images.")
    if not val.images:
        ctx.train_set = ctx.dataset
        return
    try:
        train_set, held = split_dataset(ctx.dataset, val.images, val.seed)
    except SdloraError as error:
        report.errors.append(str(error))
        return
    report.info.append(f"Validation: {len(held)} images held out of training ({', '.join(i.path.name for i in held[:5])}).")
    ctx.train_set = train_set


def check_dataset_size(ctx: CheckContext) -> None:
    dataset, plan, report, batch_size = ctx.train_set, ctx.plan, ctx.report, ctx.cfg.train.batch_size
    if dataset is None or plan is None:
        return
    images = sum(1 for item in dataset.items if not item.is_reg)
    train_share = 1 - dataset.report.reg_samples_per_epoch / max(1, plan.samples_per_epoch)  # reg takes the rest
    views = plan.total_steps * plan.images_per_step * train_share / max(1, images)
    report.data["views_per_image"] = round(views, 1)
    if images < 10 and views > 300:
        report.warnings.append(f"Each of the {images} images is seen about {views:.0f} times ({plan.epochs} epochs); "
                               "with so few images the LoRA will copy them: lower train.epochs or the repeats, or "
                               "add images.")
    smallest = min(b["samples"] for b in report.data["buckets"])
    if batch_size > plan.samples_per_epoch:
        report.warnings.append(f"train.batch_size {batch_size} is larger than the {plan.samples_per_epoch} "
                               "samples of an epoch, so every batch is partial; lower it.")
    elif plan.rounding and smallest < batch_size:
        report.info.append(f"Some buckets hold fewer samples ({smallest}) than a batch, so their batches are "
                           "partial; that is expected with buckets.")

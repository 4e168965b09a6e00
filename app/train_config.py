"""The TrainConfig a `sdlora train` invocation means: shared by `train` (app.cli) and `check` (app.check_command)."""

from __future__ import annotations

import shutil
from pathlib import Path

from networks.errors import SdloraError

# What a run's saved state fixes: the network's shapes, and the optimizer with its rates, schedule and RNGs.
# A --set of one of these on --resume would fail to load, or be overwritten by the state without a word.
FIXED_ON_RESUME = ("network.", "train.learning_rate", "train.unet_lr", "train.text_encoder_lr", "train.loraplus_ratio",
                   "train.optimizer", "train.weight_decay", "train.lr_scheduler", "train.lr_warmup_steps", "train.seed")


FLAG_MEANS = {"model": "a diffusers folder, a .safetensors/.ckpt file or demo:shapes", "data": "the folder of images",
              "output": "the run folder", "name": "the exported file's name"}


def train_config(args):
    """The TrainConfig a `train` invocation means, and whether it resumes."""
    from trainer.config import apply_overrides, load_config
    from trainer.config.presets import resolve_config
    from trainer.run.run_dir import RunDir

    overrides = list(args.set)
    if args.resume:
        if args.config or args.preset:
            raise SdloraError(f"--resume takes the run's own {RunDir.CONFIG_NAME}; drop --config/--preset "
                              "(use --set).")
        config_file = RunDir(args.resume).config
        if not config_file.is_file():
            raise SdloraError(f"'{args.resume}' is not a run folder (no {RunDir.CONFIG_NAME}); give the folder "
                              "that `sdlora train --output` wrote.")
        _refuse_fixed_keys(args.set, RunDir(args.resume))
        overrides.append(f"output.dir={Path(args.resume).resolve()}")
        return apply_overrides(load_config(config_file), overrides), True
    for flag, key in (("model", "model.path"), ("data", "dataset.path"), ("output", "output.dir"), ("name", "name")):
        value = getattr(args, flag)
        if value is not None and not value.strip():
            # Path("  ").resolve() and an empty --set value would both mean the current folder.
            raise SdloraError(f"--{flag} is empty; give {FLAG_MEANS[flag]}.")
        if value:
            overrides.append(f"{key}={Path(value).resolve() if flag in ('data', 'output') else value}")
    if args.config:
        return apply_overrides(load_config(args.config), overrides), False
    if not args.data and not args.preset:
        raise SdloraError("Give --config FILE.toml, or --data DIR --output DIR (with --preset NAME and --model).")
    return resolve_config(args.preset, overrides), False


def _refuse_fixed_keys(overrides: list[str], run) -> None:
    for item in overrides:
        key = item.partition("=")[0].strip()
        if key.startswith(FIXED_ON_RESUME):
            files = run.list_checkpoints() or sorted(run.root.glob("*.safetensors"))  # else its finished file
            start_from = f"--set network.weights={files[-1]}" if files else "--set network.weights=FILE"
            raise SdloraError(f"--set {item} cannot change a resumed run: its saved state fixes the network and the "
                              f"optimizer's rates and schedule; drop it, or start a new run from its last file with "
                              f"{start_from}.")


def make_run_folder(folder: str) -> Path | None:
    """Make the run folder (or find it made) before the trainer writes in it, so a file in its place or a place
    where no folder can be made (/proc, a read-only disk) is one sentence, not an OSError from deep inside.
    Returns the outermost folder this call created (None if it existed), for `remove_if_empty`."""
    path = Path(folder)
    if path.exists() and not path.is_dir():
        raise SdloraError(f"The run folder {path} is a file, not a folder; give --output (output.dir) a new "
                          "folder's name or an earlier run's folder.")
    created = next((p for p in reversed([path, *path.parents]) if not p.exists()), None)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        reason = (error.strerror or type(error).__name__).lower()
        raise SdloraError(f"The run folder {path} cannot be made ({reason}); give --output (output.dir) a "
                          "folder in a place you can write to.") from None
    return created


def remove_if_empty(created: Path | None) -> None:
    """Take back a run folder made for a run that failed before writing anything (a typo leaves nothing behind)."""
    if created is None or not created.is_dir() or any(p.is_file() for p in created.rglob("*")):
        return
    shutil.rmtree(created, ignore_errors=True)

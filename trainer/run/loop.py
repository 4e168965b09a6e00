"""The training loop: a folder of images and a base model in, a trained LoRA/LoCon in the run folder out.

`train` opens the run folder and builds the run's parts in one step (trainer/run/build.py); the `Trainer`
only steps and loops over them and decides *when* (previews, validation, checkpoints, stops).

Everything random is either drawn from the global RNGs (saved and restored by accelerate) or derived
from (seed, epoch), so a run stopped at step k and resumed ends with the same weights, bit for bit on
CPU, as one that never stopped.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import NamedTuple

import torch

from networks.atomic import atomic_write, is_disk_full
from networks.errors import SdloraError
from networks.max_norm import apply_max_norm
from trainer.config import TrainConfig, save_config
from trainer.model.model_loading import check_model_spec
from trainer.objective.validation import unet_predictor
from trainer.run.build import RunParts, build_run, make_accelerator
from trainer.run.disk_space import disk_full_outside_saving
from trainer.run.gpu_memory import card_bytes, out_of_memory_error
from trainer.run.run_dir import RunDir
from trainer.run.state import Position
from trainer.run.stop import StopSignal

# Called on every process after each optimizer step and its previews, validation and checkpoint; returning
# True asks the run to stop there (saved, as Stop / Ctrl+C does).
StepHook = Callable[[Position], bool | None]


class Trainer:
    def __init__(self, parts: RunParts, on_step: StepHook | None = None):
        self.parts, self.on_step = parts, on_step
        self.stop = StopSignal()
        self.max_norm_stats = None  # of the last step, when train.scale_weight_norms is on

    # -- one step ----------------------------------------------------------------------------
    def micro_step_loss(self, batch) -> torch.Tensor:
        return self.parts.loss(batch)

    def optimizer_step(self, batches) -> float:
        """Accumulate gradients over `batches`, then one optimizer step; returns the mean loss. Nothing is
        stepped until every batch's backward has run, so an exception in here leaves the weights as they were."""
        parts = self.parts
        parts.network.train()
        total = 0.0
        for batch in batches:
            loss = self.micro_step_loss(batch)
            if not torch.isfinite(loss):
                raise NonFiniteLoss(float(loss.detach()))
            parts.accelerator.backward(loss / len(batches))
            total += float(loss.detach()) / len(batches)
        self._sync_gradients()
        if parts.cfg.train.max_grad_norm:
            parts.accelerator.clip_grad_norm_(parts.network.parameters(), parts.cfg.train.max_grad_norm)
        parts.optimizer.step()
        if parts.cfg.train.scale_weight_norms:  # on the weights just stepped, before EMA averages them
            self.max_norm_stats = apply_max_norm(parts.network.trained_adapters(), parts.cfg.train.scale_weight_norms)
        parts.lr_scheduler.step()
        if parts.ema is not None:
            parts.ema.update()
        parts.optimizer.zero_grad(set_to_none=True)
        return self._mean_across_processes(total)

    def _sync_gradients(self) -> None:
        """Average adapter gradients across processes (the network is not wrapped in DDP, since its
        forward runs inside the UNet's, not through a wrapper DDP could hook)."""
        accelerator = self.parts.accelerator
        if accelerator.num_processes == 1:
            return
        grads = [p.grad for p in self.parts.network.parameters() if p.grad is not None]
        flat = torch.cat([g.flatten() for g in grads])
        torch.distributed.all_reduce(flat)
        flat /= accelerator.num_processes
        offset = 0
        for grad in grads:
            grad.copy_(flat[offset: offset + grad.numel()].view_as(grad))
            offset += grad.numel()

    def _mean_across_processes(self, value: float) -> float:
        accelerator = self.parts.accelerator
        if accelerator.num_processes == 1:
            return value
        tensor = torch.tensor([value], device=accelerator.device)
        return float(accelerator.reduce(tensor, reduction="mean"))

    # -- the loop ----------------------------------------------------------------------------
    def train(self, show_progress: bool = False) -> Path | None:
        """Step from the parts' start to the last step; the final file, or None when stopped early."""
        parts, outputs, position = self.parts, self.parts.outputs, self.parts.start
        total, accum = parts.steps.total_steps, parts.cfg.train.gradient_accumulation_steps
        outputs.start(position, total, parts.steps.epochs, show_progress, **parts.batches.encoded_counts())
        stop = self.stop.install()
        try:
            if parts.cfg.sample.at_start and position.step == 0:
                outputs.sample(0)
            plan_epoch, plan = None, []
            while position.step < total:
                if plan_epoch != position.epoch:  # a pure function of (seed, epoch): built once per epoch, not per
                    plan_epoch, plan = position.epoch, parts.epoch_batches(position.epoch)  # step (O(images) each)
                    parts.batches.start_epoch(plan, position.batch)
                if position.batch >= len(plan):
                    position.epoch, position.batch = position.epoch + 1, 0
                    self._after_epoch(position)
                    continue
                group = plan[position.batch: position.batch + accum]
                began = time.perf_counter()
                try:
                    loss = self.optimizer_step(group)
                except NonFiniteLoss as error:
                    outputs.non_finite(position, error.value)
                except torch.cuda.OutOfMemoryError:
                    outputs.out_of_memory(position)
                seconds = time.perf_counter() - began  # the loss's float() waited for the GPU: a real step time
                position.step += 1
                position.batch += len(group)
                if parts.main:
                    outputs.step(position, loss, self._reported_lr(), self.max_norm_stats, seconds)
                self._after_step(position)
                if self._stop_requested(stop):
                    outputs.stopped(position)
                    return None
            parts.batches.close()  # no more batches: free the workers before samples and export
            return outputs.finish(position)
        finally:
            stop.uninstall()
            parts.batches.close()

    def _after_step(self, position: Position) -> None:
        cfg, total = self.parts.cfg, self.parts.steps.total_steps
        if self.parts.validation is not None and cfg.validation.every_steps \
                and position.step % cfg.validation.every_steps == 0:
            self._validate(position.step)
        if cfg.sample.every_steps and position.step % cfg.sample.every_steps == 0:
            self.parts.outputs.sample(position.step)
        if cfg.save.every_steps and position.step % cfg.save.every_steps == 0 and position.step < total:
            self.parts.outputs.checkpoint(position)
        if self.on_step is not None and self.on_step(position):
            self.stop.requested = True

    def _after_epoch(self, position: Position) -> None:
        cfg, epoch = self.parts.cfg, position.epoch
        if position.step >= self.parts.steps.total_steps:
            return
        if cfg.sample.every_epochs and epoch % cfg.sample.every_epochs == 0:
            self.parts.outputs.sample(position.step)
        if cfg.save.every_epochs and epoch % cfg.save.every_epochs == 0:
            self.parts.outputs.checkpoint(position)

    def _validate(self, step: int) -> None:
        parts = self.parts
        device, dtype = parts.accelerator.device, parts.weight_dtype
        predict = unet_predictor(parts.model, parts.batches.encode_text, device, dtype, parts.accelerator.autocast)
        parts.outputs.validation(step, parts.validation.evaluate(predict, parts.network, device=device, dtype=dtype))

    def _stop_requested(self, stop: StopSignal) -> bool:
        accelerator = self.parts.accelerator
        if accelerator.num_processes == 1:
            return stop.requested
        flag = torch.tensor([1.0 if stop.requested else 0.0], device=accelerator.device)
        return bool(accelerator.reduce(flag, reduction="sum") > 0)

    def _reported_lr(self) -> float:
        """The learning rate now, as set (the first group's, without its block weight)."""
        for group, lr in zip(self.parts.optimizer.param_groups, self.parts.lr_scheduler.get_last_lr()):
            weight = group.get("block_weight", 1.0)
            if weight:
                return lr / weight
        return 0.0


class NonFiniteLoss(Exception):
    def __init__(self, value: float):
        super().__init__(value)
        self.value = value


class TrainedRun(NamedTuple):
    file: Path | None  # the final LoRA file; None when the run was stopped early
    parts: RunParts  # what it trained with (for tests and tools that look inside)


def train(cfg: TrainConfig, resume: bool = False, progress: bool = True, preset: str | None = None,
          on_step: StepHook | None = None) -> Path | None:
    """Run training; the final file, or None when stopped early. Errors are written as an `error` event, then
    re-raised for the front door. `preset` is the name of the preset the config came from, noted in the run
    folder for the Runs table."""
    return run_training(cfg, resume, progress, preset, on_step).file


def run_training(cfg: TrainConfig, resume: bool = False, progress: bool = True, preset: str | None = None,
                 on_step: StepHook | None = None) -> TrainedRun:
    """`train`, returning the parts the run trained with too."""
    _check_inputs(cfg)  # before the run folder exists: a typo leaves nothing behind
    run, accelerator = RunDir(cfg.output.dir), make_accelerator(cfg)
    main = accelerator.is_main_process
    _quiet_library_progress_bars()
    try:
        if main:
            _open_run_folder(cfg, run, resume, preset)
        accelerator.wait_for_everyone()
        parts = None
        try:
            parts = build_run(cfg, accelerator, run, resume)
            return TrainedRun(Trainer(parts, on_step).train(show_progress=progress and main), parts)
        finally:
            if main:
                run.clear_pid()
            if parts is not None:
                parts.outputs.close()
    except Exception as error:
        sentence = _user_sentence(error, cfg, run)
        if sentence is None:
            raise
        if main:
            with suppress(OSError):  # a full disk may refuse even this line; the sentence still reaches stderr
                run.record_error(str(sentence))
        if sentence is error:
            raise
        raise sentence from None


def _user_sentence(error: Exception, cfg: TrainConfig, run: RunDir) -> SdloraError | None:
    """The one sentence an error a user can act on ends the run with; None for a bug (its traceback)."""
    if isinstance(error, SdloraError):
        return error
    if is_disk_full(error):
        return disk_full_outside_saving(run)
    if isinstance(error, torch.cuda.OutOfMemoryError):  # outside the step: filling caches, samples, validation
        return out_of_memory_error(cfg, run, None, card_bytes())
    return None


def _check_inputs(cfg: TrainConfig) -> None:
    if not cfg.output.dir:
        raise SdloraError("output.dir is empty; give the run folder with --output DIR.")
    if not cfg.dataset.path:
        raise SdloraError("dataset.path is empty; give the image folder with --data DIR.")
    check_model_spec(cfg.model.path)


def _open_run_folder(cfg: TrainConfig, run: RunDir, resume: bool, preset: str | None) -> None:
    run.create()
    if not resume:
        save_config(cfg, run.config)
        run.write_preset(preset)
        _copy_continued_file(cfg, run)
    run.write_pid()


def _copy_continued_file(cfg: TrainConfig, run: RunDir) -> None:
    """Keep the LoRA file this run continues inside the run folder (a missing one is reported at setup)."""
    source = Path(cfg.network.weights or "").expanduser()
    if not cfg.network.weights or not source.is_file():
        return
    run.weights_copy.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(run.weights_copy, lambda tmp: shutil.copyfile(source, tmp))


def _quiet_library_progress_bars() -> None:
    """The step bar is the run's only bar: loading and saving bars are noise on stderr and in train.log."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()

"""What a run leaves in its folder and tells its watchers (docs/RUN_DIRECTORY.md): step events, the progress
bar and TensorBoard scalars, preview samples, checkpoints (a LoRA file, then the resume state), and the final
file(s), each verified the way generators load it. The training loop decides when; this says what and where."""
from __future__ import annotations

import math
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn

import torch

from networks.atomic import DiskFull
from networks.errors import SdloraError
from networks.load_check import check_lora_file
from networks.lora_file import DTYPES, save_lora
from networks.metadata import network_metadata
from networks.network import LoraNetwork
from trainer.config import TrainConfig
from trainer.data.dataset import ImageDataset
from trainer.model.model_loading import LoadedModel
from trainer.objective.ema import AdapterEMA, ema_file
from trainer.run.disk_space import disk_full_error
from trainer.run.events import (
    CheckpointEvent,
    FinishedEvent,
    LoadCheckEvent,
    SampleEvent,
    SkippedEvent,
    StartedEvent,
    StepEvent,
    StoppedEvent,
    ValidationEvent,
)
from trainer.run.gpu_memory import MemoryWatch, card_bytes, out_of_memory_error
from trainer.run.run_dir import RunDir
from trainer.run.sampling import build_pipeline, render_samples
from trainer.run.state import Position, save_state


def report_skipped(run: RunDir, report) -> None:
    """Name every image the run leaves out, on stderr and as a `skipped` event, as the pre-flight does."""
    left_out = [(p, "image") for p in report.skipped] + [(p, "folder") for p in report.ignored_folders]
    left_out += [(p, "regularization image or folder") for p in report.reg_problems]
    for problem, what in left_out:
        print(f"Skipped {what} {problem.name}: {problem.reason}.", file=sys.stderr)
        run.emit(SkippedEvent(name=problem.name, reason=problem.reason, kind=what))


class RunOutputs:
    """Everything the main process writes; the other processes only join the barriers around checkpoints."""

    def __init__(self, cfg: TrainConfig, run: RunDir, accelerator, model: LoadedModel, network: LoraNetwork,
                 dataset: ImageDataset, ema: AdapterEMA | None, steps_per_epoch: int):
        self.cfg, self.run, self.accelerator = cfg, run, accelerator
        self.main = accelerator.is_main_process
        self.model, self.network, self.dataset, self.ema = model, network, dataset, ema
        self.steps_per_epoch = steps_per_epoch
        self.tensorboard = open_tensorboard(run.root / "tensorboard") if cfg.output.tensorboard and self.main \
            else None
        self.progress = None
        self.last_sample_step = -1
        self.started, self.start_step = time.perf_counter(), 0
        self.memory: MemoryWatch | None = None  # on CUDA, from start(): the measured peak beside the prediction

    def start(self, position: Position, total_steps: int, epochs: int, show_progress: bool, **counts) -> None:
        self.total_steps, self.started, self.start_step = total_steps, time.perf_counter(), position.step
        if self.main:
            self.memory = MemoryWatch.on_this_machine(self.cfg)
            memory = self.memory.started_fields() if self.memory else {}
            self.run.emit(StartedEvent(total_steps=total_steps, epochs=epochs, start_step=position.step,
                                       name=self.cfg.name, num_images=len(self.dataset), **counts, **memory))
        if show_progress:  # made here, not before setup: an error there leaves no empty bar behind
            from tqdm import tqdm

            self.progress = tqdm(total=total_steps, initial=position.step, unit="step", dynamic_ncols=True)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.progress is not None:
            self.progress.close()

    # -- events ------------------------------------------------------------------------------
    def step(self, position: Position, loss: float, lr: float, max_norm_stats=None, seconds: float = 0.0) -> None:
        done = position.step - self.start_step
        rate = done / max(time.perf_counter() - self.started, 1e-9)
        eta = (self.total_steps - position.step) / rate if rate > 0 else None
        norms = max_norm_stats
        extra = {} if norms is None else {"keys_scaled": norms.keys_scaled, "max_key_norm": round(norms.max_norm, 6),
                                          "mean_key_norm": round(norms.mean_norm, 6)}
        memory = self.memory.after_step(seconds) if self.memory else {}
        self.run.emit(StepEvent(step=position.step, epoch=position.epoch + 1, loss=round(loss, 6), lr=lr,
                                it_per_s=round(rate, 4), eta_s=round(eta, 1) if eta is not None else None,
                                total_steps=self.total_steps, **extra, **memory))
        if self.tensorboard is not None:
            self.tensorboard.add_scalar("loss", loss, position.step)
            self.tensorboard.add_scalar("lr", lr, position.step)
            for key, value in extra.items():
                self.tensorboard.add_scalar(key, value, position.step)
        if self.progress is not None:
            self.progress.update(1)
            self.progress.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")

    def validation(self, step: int, result) -> None:
        self.run.emit(ValidationEvent(**result.event_fields(step)))
        if self.tensorboard is not None:
            self.tensorboard.add_scalar("validation_loss", result.loss, step)

    # -- files -------------------------------------------------------------------------------
    def sample(self, step: int) -> None:
        cfg = self.cfg
        if not (self.main and cfg.sample.prompts):
            return
        self.last_sample_step = step
        self.network.eval()
        pipeline = build_pipeline(self.model, cfg.sample.sampler)
        size = (cfg.dataset.resolution, cfg.dataset.resolution)
        with self.saving(step):
            paths = render_samples(pipeline, cfg.sample.prompts, size, self.run.samples, step, self.model.family,
                                   cfg.model.clip_skip, cfg.model.prompt_chunks)
        self.run.emit(SampleEvent(step=step, paths=tuple(self.run.relative(p) for p in paths),
                                  prompts=tuple(p.prompt for p in cfg.sample.prompts)))

    def export(self, path: Path, position: Position, state: dict | None = None, title: str | None = None) -> Path:
        """Write a LoRA file, then verify it loads the way generators read it (a `load_check` event)."""
        cfg, model = self.cfg, self.model
        training = {"ss_resolution": f"({cfg.dataset.resolution}, {cfg.dataset.resolution})",
                    "ss_steps": position.step,
                    "ss_epoch": math.ceil(position.step / max(1, self.steps_per_epoch)),
                    "ss_learning_rate": cfg.train.learning_rate,
                    "ss_num_train_images": sum(1 for i in self.dataset.items if not i.is_reg),
                    "ss_num_reg_images": sum(1 for i in self.dataset.items if i.is_reg),
                    "ss_seed": cfg.train.seed, "ss_tag_frequency": self._tag_frequency(),
                    "ss_clip_skip": cfg.model.clip_skip, "ss_max_token_length": cfg.model.max_token_length,
                    "ss_scale_weight_norms": cfg.train.scale_weight_norms or None,
                    "modelspec.resolution": f"{cfg.dataset.resolution}x{cfg.dataset.resolution}"}
        if state is None:
            state = self.network.kohya_state_dict(DTYPES[cfg.save.precision], exact=cfg.network.export == "exact")
        metadata = network_metadata(self.network, cfg.network.type, model.prediction_type == "v_prediction",
                                    title=title or cfg.name, training=training,
                                    minimal=cfg.save.metadata == "minimal", state=state)
        if self.network.export_errors:  # PiSSA / LoRA-GA re-ranked to r: how far from the true change
            metadata["sdlora_rerank_max_relative_error"] = f"{max(self.network.export_errors.values()):.6g}"
        save_lora(path, state, metadata)
        check = check_lora_file(path, model.family.name, model.unet, model.text_encoders)
        self.run.emit(LoadCheckEvent(**check.event_fields(self.run.relative(path))))
        if not check.ok:
            raise SdloraError(f"{path.name} failed the load check ({check.problems[0]}); it is kept for "
                              "inspection but is not a usable LoRA.")
        return path

    def _tag_frequency(self) -> dict:
        counts: dict[str, int] = {}
        for item in (i for i in self.dataset.items if not i.is_reg):  # what the LoRA learned, not its anchors
            for tag in (t.strip() for t in item.caption.split(",")):
                if tag:
                    counts[tag] = counts.get(tag, 0) + 1
        return {Path(self.cfg.dataset.path).name: counts}

    def checkpoint(self, position: Position) -> None:
        cfg, run = self.cfg, self.run
        self.accelerator.wait_for_everyone()
        if self.main:
            path = run.checkpoint_path(cfg.name, position.step)
            with self.saving(position.step):
                self.export(path, position)  # the LoRA first: a state is never newer than its checkpoint
                save_state(self.accelerator, run.state, position)
            run.prune_checkpoints(cfg.save.keep_last)
            run.emit(CheckpointEvent(step=position.step, path=run.relative(path)))
        self.accelerator.wait_for_everyone()

    @contextmanager
    def saving(self, step: int):
        """A full disk while writing: one sentence with what the next save needs and how to resume."""
        try:
            yield
        except DiskFull as full:
            parameters = sum(p.numel() for p in self.network.parameters())
            raise disk_full_error(self.run, full, step, parameters, DTYPES[self.cfg.save.precision].itemsize,
                                  self.ema is not None) from None

    def stopped(self, position: Position) -> None:
        self.checkpoint(position)
        if self.main:
            self.run.emit(StoppedEvent(step=position.step, checkpoint=self.run.relative(
                self.run.checkpoint_path(self.cfg.name, position.step))))

    def finish(self, position: Position) -> Path:
        cfg, run = self.cfg, self.run
        self.accelerator.wait_for_everyone()
        final = run.final_file(cfg.name)
        if self.main:
            if (cfg.sample.every_steps or cfg.sample.every_epochs) and self.last_sample_step != position.step:
                self.sample(position.step)  # always show where the run ended
            extra = {}
            with self.saving(position.step):
                self.export(final, position)
                if self.ema is not None:
                    ema_state = self.ema.kohya_state_dict(DTYPES[cfg.save.precision],
                                                          exact=cfg.network.export == "exact",
                                                          max_norm=cfg.train.scale_weight_norms)
                    extra["ema_path"] = run.relative(self.export(ema_file(final), position, ema_state,
                                                                 cfg.name + "-ema"))
                save_state(self.accelerator, run.state, position)
            run.emit(FinishedEvent(step=position.step, path=run.relative(final), **extra))
        return final

    def non_finite(self, position: Position, value: float) -> NoReturn:
        """A loss of inf/nan: one sentence saying which checkpoint is intact and what to change."""
        checkpoints = self.run.list_checkpoints()
        fix = "lower train.learning_rate"
        if torch.cuda.is_available() and self.cfg.train.mixed_precision == "fp16":
            fix += ' or set train.mixed_precision = "bf16" (fp16 overflows more easily)'
        if checkpoints:  # a resume restores the old rate with the optimizer, so a new run continues the file
            where = (f"the last checkpoint ({checkpoints[-1].name}) is intact; {fix} and continue from it in a new "
                     f"run with --set network.weights={checkpoints[-1]}")
        else:
            where = f"no checkpoint was saved yet, so {fix} and start the run again"
        raise SdloraError(f"The loss became {value} at step {position.step + 1}; {where}.")

    def out_of_memory(self, position: Position) -> NoReturn:
        """CUDA ran out of memory in the step: one sentence, and nothing saved on the way out (the last
        checkpoint and state stay as they were; the failed step changed no weight)."""
        raise out_of_memory_error(self.cfg, self.run, position.step + 1, card_bytes()) from None


def open_tensorboard(folder: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise SdloraError("output.tensorboard = true needs the tensorboard package; run 'pip install "
                          "tensorboard' or set it to false.") from None
    return SummaryWriter(str(folder))

"""The training loop: a folder of images and a base model in, a trained LoRA/LoCon in the run folder out.

Everything random is either drawn from the global RNGs (saved and restored by accelerate) or derived
from (seed, epoch), so a run stopped at step k and resumed ends with the same weights, bit for bit on
CPU, as one that never stopped.
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from networks.atomic import atomic_write, write_text_atomic
from networks.errors import SdloraError
from networks.inspect import lora_family
from networks.lora_file import read_lora
from networks.max_norm import apply_max_norm
from networks.network import LoraNetwork
from trainer.caches.latent_cache import LatentCache, vae_identity
from trainer.caches.supply import BatchSupply
from trainer.config import TrainConfig, save_config
from trainer.data.dataset import ImageDataset
from trainer.data.loss_mask import LossMasks
from trainer.data.steps import StepCount, count_steps
from trainer.model.family import unet_conditioning
from trainer.model.model_loading import check_model_spec, load_model
from trainer.objective.diffusion import Objective, with_zero_terminal_snr
from trainer.objective.ema import AdapterEMA
from trainer.objective.lora_init import initialise
from trainer.objective.optimizers import build_lr_scheduler, build_optimizer
from trainer.objective.validation import ValidationSample, ValidationSet, unet_predictor, validation_items
from trainer.run.outputs import RunOutputs, report_skipped
from trainer.run.run_dir import RunDir
from trainer.run.state import Position, load_state
from trainer.run.stop import StopSignal

COMPILE_BACKEND = "inductor"  # torch.compile's default; tests trace with "eager" (no C++ build)


def build_network(cfg: TrainConfig, model, continued_copy: Path | None = None) -> LoraNetwork:
    """The spec's adapters, or the spec's continued from network.weights (not attached yet). A resumed run
    reads the copy it made of that file at its start (`continued_copy`): the original may have changed or
    gone since; the resumed state then sets every weight."""
    parts = (model.family.name, model.unet, model.text_encoders, cfg.network.spec())
    if not cfg.network.weights:
        return LoraNetwork.create(*parts)
    path = continued_copy or Path(cfg.network.weights).expanduser()
    state, metadata = read_lora(path)
    made_for = lora_family(state, metadata)
    if made_for and made_for != model.family.name:
        raise SdloraError(f"network.weights {path.name} was made for {made_for} but the base model is "
                          f"{model.family.name}; continue it on an {made_for} model.")
    return LoraNetwork.continue_from(*parts, state, source=path.name)


class Trainer:
    def __init__(self, cfg: TrainConfig, resume: bool = False, preset: str | None = None):
        if not cfg.output.dir:
            raise SdloraError("output.dir is empty; give the run folder with --output DIR.")
        if not cfg.dataset.path:
            raise SdloraError("dataset.path is empty; give the image folder with --data DIR.")
        check_model_spec(cfg.model.path)  # before the run folder exists: a typo leaves nothing behind
        self.cfg, self.resume, self.preset = cfg, resume, preset
        self.run = RunDir(cfg.output.dir)
        mixed = cfg.train.mixed_precision if torch.cuda.is_available() else "no"
        self.accelerator = Accelerator(mixed_precision=mixed, cpu=not torch.cuda.is_available())
        self.main = self.accelerator.is_main_process
        self.weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed, torch.float32)
        self.stop = StopSignal()

    # -- setup -------------------------------------------------------------------------------
    def setup(self) -> None:
        cfg = self.cfg
        set_seed(cfg.train.seed)
        scanned = ImageDataset.scan(cfg.dataset.options(), seed=cfg.train.seed)
        if self.main and not self.resume:  # once per run: a resume scans the same folder again
            report_skipped(self.run, scanned.report)
        # Held-out images leave the dataset before anything indexes it (caches, masks, the batch plan).
        self.dataset, held_out = validation_items(scanned, cfg.validation.images, cfg.validation.folder,
                                                  cfg.validation.seed)
        self.loss_masks = LossMasks(self.dataset, cfg.dataset.loss_mask, cfg.dataset.mask_folder) \
            if cfg.dataset.loss_mask != "none" else None
        # The main process first: it builds a missing demo model once (transformers saves weights only on
        # rank 0 once torch.distributed is up), the others then load the finished folder.
        with self.accelerator.main_process_first():
            self.model = load_model(cfg.model.path, family=cfg.model.family,
                                    prediction_type=cfg.model.prediction_type, config_dir=cfg.model.config_dir,
                                    vae=cfg.model.vae)
        if cfg.train.zero_terminal_snr:  # training noise and validation only; previews keep the model's sampler
            self.model = replace(self.model, noise_scheduler=with_zero_terminal_snr(self.model.noise_scheduler))
        self.objective = Objective(cfg.train, self.model.noise_scheduler, self.model.prediction_type)
        self._place_models()
        self.batches = BatchSupply(cfg, self.model, self.dataset, self.accelerator)
        self.batches.build()
        copy = self.run.weights_copy if self.resume and self.run.weights_copy.is_file() else None
        self.network = build_network(cfg, self.model, copy).attach()
        self.network.to(self.accelerator.device)
        self.training_unet = self.model.unet
        initialise(self)
        # Only the training forward is compiled, after the adapters' hooks are in (so they are traced) and
        # after LoRA-GA's gradient pass (base weights requiring grad would be a second compile); samples and
        # validation call the plain UNet and cost no compile of their own shapes.
        if cfg.train.compile:
            self.training_unet = torch.compile(self.model.unet, backend=COMPILE_BACKEND)
        # After the init (PiSSA/LoRA-GA change the starting weights), before checkpoint registration.
        self.ema = AdapterEMA(self.network, cfg.ema.decay, cfg.ema.warmup) if cfg.ema.enabled else None
        optimizer = build_optimizer(self.network, cfg.train)
        self.total_steps = self._step_count().total_steps
        self.lr_scheduler = build_lr_scheduler(optimizer, cfg.train, self.total_steps)
        # The network and schedule are not `prepare`d: gradients are averaged by hand (see _sync_gradients)
        # and the schedule steps once per optimizer step, as it was built.
        self.optimizer = self.accelerator.prepare(optimizer)
        self.accelerator.register_for_checkpointing(self.network, self.lr_scheduler)
        if self.ema is not None:
            self.accelerator.register_for_checkpointing(self.ema)
        self.validation = self._validation_set(held_out) if held_out and self.main else None
        sampling = cfg.sample.every_steps or cfg.sample.every_epochs or cfg.sample.at_start
        self.batches.release_encoders(previews=self.main and bool(cfg.sample.prompts) and bool(sampling))
        self.outputs = RunOutputs(cfg, self.run, self.accelerator, self.model, self.network, self.dataset, self.ema,
                                  self.steps_per_epoch())

    def _place_models(self) -> None:
        model, device = self.model, self.accelerator.device
        for part in [model.unet, *model.text_encoders]:
            _move(part.requires_grad_(False).eval(), device, self.weight_dtype)
        # The VAE only encodes (once, into the cache) and decodes previews: fp32 avoids SDXL's fp16 overflow.
        _move(model.vae.requires_grad_(False).eval(), device, torch.float32)
        if self.cfg.train.gradient_checkpointing:
            model.unet.enable_gradient_checkpointing()
            if self.cfg.network.train_text_encoder:
                for encoder in model.text_encoders:
                    encoder.gradient_checkpointing_enable()

    def _validation_set(self, items) -> ValidationSet:
        cfg, model = self.cfg, self.model
        self.batches.cache_captions(item.caption for item in items)
        # get() encodes by item path, so the training dataset's pixel pipeline serves held-out items too.
        cache = LatentCache(model.vae, self.dataset, vae_identity(model.vae, model.vae_identity))
        samples = []
        for item in items:
            latents = cache.get(item)
            mask = self.loss_masks.latent(item, False, item.placement, tuple(latents.shape[-2:])) \
                if self.loss_masks else None
            samples.append(ValidationSample(latents.cpu(), item.caption, item.placement, mask))
        return ValidationSet(samples, model.noise_scheduler, model.prediction_type, cfg.validation.timesteps,
                             cfg.validation.seed, batch_size=cfg.train.batch_size)

    def _validate(self, step: int) -> None:
        device = self.accelerator.device
        predict = unet_predictor(self.model, self.batches.encode_text, device, self.weight_dtype, self.accelerator.autocast)
        self.outputs.validation(step, self.validation.evaluate(predict, self.network, device=device,
                                                               dtype=self.weight_dtype))

    def _step_count(self) -> StepCount:
        train = self.cfg.train
        batches = self.dataset.batch_count(train.batch_size, self.accelerator.num_processes)
        return count_steps(batches.per_process, train.gradient_accumulation_steps, train.epochs, train.max_steps)

    def steps_per_epoch(self) -> int:
        return self._step_count().steps_per_epoch

    def _epoch_batches(self, epoch: int):
        acc = self.accelerator
        return self.dataset.batches(epoch, self.cfg.train.batch_size, acc.process_index, acc.num_processes)

    # -- one step ----------------------------------------------------------------------------
    def micro_step_loss(self, batch) -> torch.Tensor:
        model, device = self.model, self.accelerator.device
        latents = self.batches.batch_latents(batch).to(self.weight_dtype)
        encoded = self.batches.encode_text([s.caption for s in batch.samples])
        hidden, added = unet_conditioning(model.family, encoded, [s.as_seen for s in batch.samples], device,
                                          self.weight_dtype)
        mask = self.loss_masks.batch(batch, tuple(latents.shape[-2:])) if self.loss_masks else None
        noisy, noise, timesteps = self.objective.noised(latents)
        with self.accelerator.autocast():
            prediction = self.training_unet(noisy, timesteps, hidden, added_cond_kwargs=added).sample
        return self.objective.loss(prediction, latents, noise, timesteps, None if mask is None else mask.to(device),
                                   self._prior_weights(batch))

    def _prior_weights(self, batch) -> torch.Tensor | None:
        """train.prior_loss_weight for regularization samples, 1 for the rest; None when all are 1."""
        weights = [self.cfg.train.prior_loss_weight if self.dataset.items[s.item].is_reg else 1.0
                   for s in batch.samples]
        return None if all(w == 1.0 for w in weights) else torch.tensor(weights)

    def optimizer_step(self, batches) -> float:
        """Accumulate gradients over `batches`, then one optimizer step; returns the mean loss."""
        self.network.train()
        total = 0.0
        for batch in batches:
            loss = self.micro_step_loss(batch)
            if not torch.isfinite(loss):
                raise NonFiniteLoss(float(loss.detach()))
            self.accelerator.backward(loss / len(batches))
            total += float(loss.detach()) / len(batches)
        self._sync_gradients()
        if self.cfg.train.max_grad_norm:
            self.accelerator.clip_grad_norm_(self.network.parameters(), self.cfg.train.max_grad_norm)
        self.optimizer.step()
        if self.cfg.train.scale_weight_norms:  # on the weights just stepped, before EMA averages them
            self.max_norm_stats = apply_max_norm(self.network.trained_adapters(), self.cfg.train.scale_weight_norms)
        self.lr_scheduler.step()
        if self.ema is not None:
            self.ema.update()
        self.optimizer.zero_grad(set_to_none=True)
        return self._mean_across_processes(total)

    def _sync_gradients(self) -> None:
        """Average adapter gradients across processes (the network is not wrapped in DDP, since its
        forward runs inside the UNet's, not through a wrapper DDP could hook)."""
        if self.accelerator.num_processes == 1:
            return
        grads = [p.grad for p in self.network.parameters() if p.grad is not None]
        flat = torch.cat([g.flatten() for g in grads])
        torch.distributed.all_reduce(flat)
        flat /= self.accelerator.num_processes
        offset = 0
        for grad in grads:
            grad.copy_(flat[offset: offset + grad.numel()].view_as(grad))
            offset += grad.numel()

    def _mean_across_processes(self, value: float) -> float:
        if self.accelerator.num_processes == 1:
            return value
        tensor = torch.tensor([value], device=self.accelerator.device)
        return float(self.accelerator.reduce(tensor, reduction="mean"))

    # -- the run -----------------------------------------------------------------------------
    def train(self) -> Path | None:
        cfg, run = self.cfg, self.run
        if self.main:
            run.create()
            if not self.resume:
                save_config(cfg, run.config)
                if self.preset:  # config.toml holds the resolved settings; the preset's name only this
                    write_text_atomic(run.preset, self.preset + "\n")
                self._copy_continued_file()
            run.write_pid()
        self.accelerator.wait_for_everyone()
        try:
            self.setup()
            position = Position()
            if self.resume:
                position = load_state(self.accelerator, run.state)
                self.network.sync_base()  # PiSSA / LoRA-GA: base = original - scale * (resumed) B0 A0
            return self._loop(position)
        finally:
            if self.main:
                run.clear_pid()
            if self.outputs is not None:
                self.outputs.close()

    def _loop(self, position: Position) -> Path | None:
        cfg, outputs = self.cfg, self.outputs
        accum = cfg.train.gradient_accumulation_steps
        outputs.start(position, self.total_steps, self._step_count().epochs, self.show_progress,
                      **self.batches.encoded_counts())
        stop = self.stop.install()
        try:
            if cfg.sample.at_start and position.step == 0:
                outputs.sample(0)
            plan_epoch, plan = None, []
            while position.step < self.total_steps:
                if plan_epoch != position.epoch:  # a pure function of (seed, epoch): built once per epoch, not per
                    plan_epoch, plan = position.epoch, self._epoch_batches(position.epoch)  # step (O(images) each)
                    self.batches.start_epoch(plan, position.batch)
                if position.batch >= len(plan):
                    position.epoch, position.batch = position.epoch + 1, 0
                    self._after_epoch(position)
                    continue
                group = plan[position.batch: position.batch + accum]
                try:
                    loss = self.optimizer_step(group)
                except NonFiniteLoss as error:
                    return outputs.non_finite(position, error.value)
                position.step += 1
                position.batch += len(group)
                if self.main:
                    outputs.step(position, loss, self._reported_lr(), self.max_norm_stats)
                self._after_step(position)
                if self._stop_requested(stop):
                    outputs.stopped(position)
                    return None
            self.batches.close()  # no more batches: free the workers before samples and export
            return outputs.finish(position)
        finally:
            stop.uninstall()
            if self.batches is not None:
                self.batches.close()

    def _copy_continued_file(self) -> None:
        """Keep the LoRA file this run continues inside the run folder (a missing one is reported at setup)."""
        source = Path(self.cfg.network.weights or "").expanduser()
        if not self.cfg.network.weights or not source.is_file():
            return
        target = self.run.weights_copy
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(target, lambda tmp: shutil.copyfile(source, tmp))

    def _stop_requested(self, stop: StopSignal) -> bool:
        flag = torch.tensor([1.0 if stop.requested else 0.0], device=self.accelerator.device)
        return bool(self.accelerator.reduce(flag, reduction="sum") > 0) if self.accelerator.num_processes > 1 \
            else stop.requested

    def _reported_lr(self) -> float:
        """The learning rate now, as set (the first group's, without its block weight)."""
        for group, lr in zip(self.optimizer.param_groups, self.lr_scheduler.get_last_lr()):
            weight = group.get("block_weight", 1.0)
            if weight:
                return lr / weight
        return 0.0

    show_progress = False
    outputs = None
    batches = None
    max_norm_stats = None  # of the last step, when train.scale_weight_norms is on

    def _after_step(self, position: Position) -> None:
        cfg = self.cfg
        if self.validation is not None and cfg.validation.every_steps \
                and position.step % cfg.validation.every_steps == 0:
            self._validate(position.step)
        if cfg.sample.every_steps and position.step % cfg.sample.every_steps == 0:
            self.outputs.sample(position.step)
        if cfg.save.every_steps and position.step % cfg.save.every_steps == 0 \
                and position.step < self.total_steps:
            self.outputs.checkpoint(position)

    def _after_epoch(self, position: Position) -> None:
        cfg, epoch = self.cfg, position.epoch
        if position.step >= self.total_steps:
            return
        if cfg.sample.every_epochs and epoch % cfg.sample.every_epochs == 0:
            self.outputs.sample(position.step)
        if cfg.save.every_epochs and epoch % cfg.save.every_epochs == 0:
            self.outputs.checkpoint(position)

def _move(module: torch.nn.Module, device, dtype: torch.dtype) -> None:
    """Cast only when needed: diffusers warns on any dtype `.to()`, even a no-op one."""
    module.to(device)
    if next(module.parameters()).dtype != dtype:
        module.to(dtype=dtype)


class NonFiniteLoss(Exception):
    def __init__(self, value: float):
        super().__init__(value)
        self.value = value


def train(cfg: TrainConfig, resume: bool = False, progress: bool = True, preset: str | None = None) -> Path | None:
    """Run training; errors are written as an `error` event, then re-raised for the front door. `preset` is
    the name of the preset the config came from, noted in the run folder for the Runs table."""
    trainer = Trainer(cfg, resume=resume, preset=preset)
    try:
        trainer.show_progress = progress and trainer.main
        # The step bar is the run's only bar: loading and saving bars are noise on stderr and in train.log.
        import diffusers
        import transformers

        diffusers.utils.logging.disable_progress_bar()
        transformers.utils.logging.disable_progress_bar()
        return trainer.train()
    except SdloraError as error:
        if trainer.main and trainer.run.root.is_dir():
            trainer.run.emit("error", message=str(error), step=_last_step(trainer.run))
        raise


def _last_step(run: RunDir) -> int:
    steps = [e["step"] for e in run.events() if e.get("event") == "step"]
    return steps[-1] if steps else 0

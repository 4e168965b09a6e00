"""A run's parts, built in one step from its config: the dataset, the model, the adapters and their init, the
optimizer and schedule, the caches, validation, the outputs and, for a resumed run, the saved state (last,
so that it sets every weight and RNG). The Trainer (trainer/run/loop.py) only steps and loops over them."""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from networks.errors import SdloraError
from networks.inspect import lora_family
from networks.lora_file import DTYPES, read_lora
from networks.network import LoraNetwork
from trainer.caches.latent_cache import LatentCache, vae_identity
from trainer.caches.supply import BatchSupply, fills_latents_at_setup
from trainer.config import TrainConfig
from trainer.data.dataset import Batch, ImageDataset
from trainer.data.loss_mask import LossMasks
from trainer.data.steps import StepCount, count_steps
from trainer.model.fp8 import store_fp8
from trainer.model.model_loading import LoadedModel, load_model
from trainer.objective.diffusion import Objective, with_zero_terminal_snr
from trainer.objective.ema import AdapterEMA
from trainer.objective.lora_init import first_gradients, initialise
from trainer.objective.optimizers import build_lr_scheduler, build_optimizer
from trainer.objective.preservation import preservation_problem
from trainer.objective.validation import ValidationSample, ValidationSet, validation_items
from trainer.run.batch_loss import BatchLoss
from trainer.run.outputs import RunOutputs, report_skipped
from trainer.run.run_dir import RunDir
from trainer.run.state import Position, load_state

COMPILE_BACKEND = "inductor"  # torch.compile's default; tests trace with "eager" (no C++ build)


@dataclass(frozen=True)
class RunParts:
    cfg: TrainConfig
    run: RunDir
    accelerator: Accelerator
    weight_dtype: torch.dtype  # the UNet's and text encoders' (the VAE stays fp32)
    dataset: ImageDataset  # held-out validation images already taken out
    model: LoadedModel
    batches: BatchSupply
    loss: BatchLoss
    network: LoraNetwork
    ema: AdapterEMA | None
    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    validation: ValidationSet | None  # main process only
    steps: StepCount
    outputs: RunOutputs
    start: Position  # where the loop starts: step 0, or the resumed state's position

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    def epoch_batches(self, epoch: int) -> list[Batch]:
        return epoch_batches(self.cfg, self.dataset, self.accelerator, epoch)


def epoch_batches(cfg: TrainConfig, dataset: ImageDataset, accelerator: Accelerator, epoch: int) -> list[Batch]:
    """This process's batches of `epoch`, in training order (a pure function of seed and epoch)."""
    return dataset.batches(epoch, cfg.train.batch_size, accelerator.process_index, accelerator.num_processes)


def make_accelerator(cfg: TrainConfig) -> Accelerator:
    """train.mixed_precision on a GPU; fp32 on the CPU."""
    cuda = torch.cuda.is_available()
    return Accelerator(mixed_precision=cfg.train.mixed_precision if cuda else "no", cpu=not cuda)


def step_count(cfg: TrainConfig, dataset: ImageDataset, world_size: int) -> StepCount:
    """The steps the loop runs: the dataset's batch count per process, accumulated, over epochs or max_steps."""
    train = cfg.train
    batches = dataset.batch_count(train.batch_size, world_size)
    return count_steps(batches.per_process, train.gradient_accumulation_steps, train.epochs, train.max_steps)


def build_run(cfg: TrainConfig, accelerator: Accelerator, run: RunDir, resume: bool = False) -> RunParts:
    main = accelerator.is_main_process
    if problem := preservation_problem(cfg):
        raise SdloraError(problem)
    dtype = DTYPES.get(accelerator.mixed_precision, torch.float32)  # "no": fp32
    set_seed(cfg.train.seed)
    scanned = ImageDataset.scan(cfg.dataset.options(), seed=cfg.train.seed)
    if main and not resume:  # once per run: a resume scans the same folder again
        report_skipped(run, scanned.report)
    # Held-out images leave the dataset before anything indexes it (caches, masks, the batch plan).
    dataset, held_out = validation_items(scanned, cfg.validation.images, cfg.validation.folder, cfg.validation.seed)
    masks = LossMasks(dataset, cfg.dataset.loss_mask, cfg.dataset.mask_folder) \
        if cfg.dataset.loss_mask != "none" else None
    model = _load_model(cfg, accelerator, dtype)
    objective = Objective(cfg.train, model.noise_scheduler, model.prediction_type)
    supply = BatchSupply(cfg, model, dataset, accelerator)
    supply.build()
    if cfg.train.preservation_caption:  # encoded once with the training captions, before the encoders go
        supply.cache_captions([cfg.train.preservation_caption])
    model.unet.to(accelerator.device)  # after the latent cache is filled (_place says why)
    copy = run.weights_copy if resume and run.weights_copy.is_file() else None
    network = build_network(cfg, model, copy).attach()
    network.to(accelerator.device)
    loss = BatchLoss(model, model.unet, supply, objective, dataset, masks, cfg.train.prior_loss_weight, accelerator,
                     dtype, network)
    steps = step_count(cfg, dataset, accelerator.num_processes)
    initialise(network, cfg.network.init, lambda: first_gradients(
        network, loss, epoch_batches(cfg, dataset, accelerator, 0)[:cfg.network.loraga_batches]))
    # Only the training forward is compiled, after the adapters' hooks are in (so they are traced) and after
    # LoRA-GA's gradient pass (base weights requiring grad would be a second compile); samples and
    # validation call the plain UNet and cost no compile of their own shapes.
    if cfg.train.compile:
        loss = replace(loss, unet=torch.compile(model.unet, backend=COMPILE_BACKEND))
    # After the init (PiSSA/LoRA-GA change the starting weights), before checkpoint registration.
    ema = AdapterEMA(network, cfg.ema.decay, cfg.ema.warmup) if cfg.ema.enabled else None
    optimizer = build_optimizer(network, cfg.train)
    lr_scheduler = build_lr_scheduler(optimizer, cfg.train, steps.total_steps)
    # The network and schedule are not `prepare`d: gradients are averaged by hand (Trainer._sync_gradients)
    # and the schedule steps once per optimizer step, as it was built.
    optimizer = accelerator.prepare(optimizer)
    accelerator.register_for_checkpointing(network, lr_scheduler)
    if ema is not None:
        accelerator.register_for_checkpointing(ema)
    validation = _validation_set(cfg, model, dataset, supply, masks, held_out) if held_out and main else None
    sampling = cfg.sample.every_steps or cfg.sample.every_epochs or cfg.sample.at_start
    supply.release_encoders(previews=main and bool(cfg.sample.prompts) and bool(sampling))
    start = Position()
    if resume:
        start = load_state(accelerator, run.state)
        network.sync_base()  # PiSSA / LoRA-GA: base = original - scale * (resumed) B0 A0
    outputs = RunOutputs(cfg, run, accelerator, model, network, dataset, ema, steps.steps_per_epoch)
    return RunParts(cfg, run, accelerator, dtype, dataset, model, supply, loss, network, ema, optimizer, lr_scheduler,
                    validation, steps, outputs, start)


def build_network(cfg: TrainConfig, model: LoadedModel, continued_copy: Path | None = None) -> LoraNetwork:
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


def _load_model(cfg: TrainConfig, accelerator: Accelerator, dtype: torch.dtype) -> LoadedModel:
    # Each part is read in its run dtype and placed (fp8 when asked, then on the device) before the next one is
    # read, so host memory never holds an fp32 copy of the model on a half-precision run.
    place = partial(_place, cfg, accelerator.device, dtype)
    # The main process first: it builds a missing demo model once (transformers saves weights only on rank 0
    # once torch.distributed is up), the others then load the finished folder.
    with accelerator.main_process_first():
        # The VAE only encodes (once, into the cache) and decodes previews: fp32 avoids SDXL's fp16 overflow.
        model = load_model(cfg.model.path, family=cfg.model.family, prediction_type=cfg.model.prediction_type,
                           dtype=dtype, config_dir=cfg.model.config_dir, vae=cfg.model.vae, vae_dtype=torch.float32,
                           place=place)
    if cfg.train.zero_terminal_snr:  # training noise and validation only; previews keep the model's sampler
        model = replace(model, noise_scheduler=with_zero_terminal_snr(model.noise_scheduler))
    if cfg.train.gradient_checkpointing:
        model.unet.enable_gradient_checkpointing()
        if cfg.network.train_text_encoder:
            for encoder in model.text_encoders:
                encoder.gradient_checkpointing_enable()
    return model


def _place(cfg: TrainConfig, device, dtype: torch.dtype, name: str, module: torch.nn.Module) -> None:
    """One frozen part as the run uses it: in its dtype, in fp8 with model.fp8_base (the UNet, and the text
    encoders when they are not trained), on the device."""
    fp8 = cfg.model.fp8_base and (name == "unet" or (name == "text_encoder" and not cfg.network.train_text_encoder))
    # Filling the latent cache needs only the VAE (and the text encoders): the UNet waits on the CPU, in its
    # run dtype, until build_run has filled it, so the VAE's full-size encode never shares the card with the
    # UNet's weights (SDXL at 1024 px: the cache fill, not the step, was the run's peak).
    if name == "unet" and fills_latents_at_setup(cfg):
        device = torch.device("cpu")
    _move(module.requires_grad_(False).eval(), device, torch.float32 if name == "vae" else dtype, fp8)


def _move(module: torch.nn.Module, device, dtype: torch.dtype, fp8: bool = False) -> None:
    """Cast only when needed (diffusers warns on any dtype `.to()`, even a no-op one), and before the move, so
    a part read in another dtype is never on the device twice; fp8 storage after the cast, which would undo it."""
    if next(module.parameters()).dtype != dtype:
        module.to(dtype=dtype)
    if fp8:
        store_fp8(module, dtype)
    module.to(device)


def _validation_set(cfg: TrainConfig, model: LoadedModel, dataset: ImageDataset, supply: BatchSupply,
                    masks: LossMasks | None, items) -> ValidationSet:
    supply.cache_captions(item.caption for item in items)
    # get() encodes by item path, so the training dataset's pixel pipeline serves held-out items too.
    cache = LatentCache(model.vae, dataset, vae_identity(model.vae, model.vae_identity))
    samples = []
    for item in items:
        latents = cache.get(item)
        mask = masks.latent(item, False, item.placement, tuple(latents.shape[-2:])) if masks else None
        samples.append(ValidationSample(latents.cpu(), item.caption, item.placement, mask))
    return ValidationSet(samples, model.noise_scheduler, model.prediction_type, cfg.validation.timesteps,
                         cfg.validation.seed, batch_size=cfg.train.batch_size)

"""Images from a base model without and with a LoRA, for the Try tab.

Loading a model is the slow part, so the pipeline is kept (one at a time: an SDXL model is several GB)
and reused while the model path stays the same; the LoRA is attached once per file and switched off and
on between the two images (set_enabled / set_multiplier), never by reloading or merging weights.
With a GPU the model renders there in fp16 (an SDXL image takes minutes on a CPU), after a check that the
GPU has room beside a training run, which would otherwise be the one to run out of memory.
"""
from __future__ import annotations

import gc
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
from PIL import Image

from networks.errors import SdloraError
from networks.inspect import lora_family
from networks.lora_file import read_lora
from networks.network import LoraNetwork
from trainer.model.model_loading import LoadedModel, load_model
from trainer.run.sampling import build_pipeline, prompt_kwargs

GPU_HEADROOM = 2.5e9  # bytes beyond the weights: a 1024 px SDXL denoising step in fp16 and the CUDA context


def preview_placement() -> tuple[str, torch.dtype]:
    """(device, dtype) the Try tab renders with: the GPU in fp16 when there is one, else the CPU in fp32."""
    return ("cuda", torch.float16) if torch.cuda.is_available() else ("cpu", torch.float32)


def gpu_room_problem(free: int, weights: int, training: bool) -> str | None:
    """The sentence to show when a model of `weights` bytes does not fit the GPU's `free` bytes, else None."""
    need = weights + GPU_HEADROOM
    if free >= need:
        return None
    fix = ("a training run is using this GPU: try again when it has finished, or stop it" if training
           else "close what else uses the GPU, or try a smaller model")
    return f"The GPU has {free / 1e9:.1f} GB free and this model needs about {need / 1e9:.1f} GB; {fix}."


def clip_skip_of(metadata: dict) -> int:
    """The file's ss_clip_skip (kohya writes "None" when unset), 1 when absent or unreadable."""
    return max(1, _int_field(metadata, "ss_clip_skip", 1))


def prompt_chunks_of(metadata: dict) -> int:
    """75-token windows the LoRA was trained with (ss_max_token_length 75/150/225), 1 when absent."""
    return min(3, max(1, _int_field(metadata, "ss_max_token_length", 75) // 75))


def _int_field(metadata: dict, key: str, default: int) -> int:
    try:
        return int(metadata.get(key) or default)
    except ValueError:
        return default


@dataclass
class Comparison:
    without: Image.Image
    with_lora: Image.Image | None
    load_seconds: float  # model + LoRA loading; 0 when both came from the cache
    render_seconds: float


class LoraPreview:
    def __init__(self):
        self._lock = threading.Lock()  # one generation at a time: the modules are shared state
        self._model_key: str | None = None
        self._model: LoadedModel | None = None
        self._pipelines: dict[str, object] = {}
        self._lora_key: tuple | None = None
        self._network: LoraNetwork | None = None
        self._clip_skip, self._chunks = 1, 1

    def compare(self, model: str, lora: Path | None, prompt: str, negative: str = "", seed: int = 0, steps: int = 20,
                weight: float = 1.0, guidance: float = 7.0, size: int = 0, sampler: str = "euler_a",
                training: bool = False) -> Comparison:
        """`training`: a run is active, so the GPU is shared (the room check names it). Without a LoRA file
        only the base model's image is drawn (`with_lora` is None)."""
        with self._lock:
            try:
                return self._compare(model, lora, prompt, negative, seed, steps, weight, guidance, size, sampler,
                                     training)
            except torch.cuda.OutOfMemoryError:
                self._drop()  # give the memory back before saying so
                raise SdloraError("The GPU ran out of memory for these images; lower the size, or try again when "
                                  "no run is training.") from None

    def release(self) -> None:
        """Free the cached model (a run is about to start and needs the GPU)."""
        with self._lock:
            self._drop()

    def _compare(self, model, lora, prompt, negative, seed, steps, weight, guidance, size, sampler,
                 training) -> Comparison:
        """compare's work, under its lock."""
        started = time.perf_counter()
        loaded = self._load_model(model, training)
        network = self._load_lora(lora, loaded) if lora is not None else self._without_lora()
        pipeline = self._pipeline(loaded, sampler)
        loaded_at = time.perf_counter()
        side = int(size) or loaded.unet.config.sample_size * pipeline.vae_scale_factor
        images = []
        for enabled in (False, True) if network is not None else (False,):
            if network is not None:
                network.set_enabled(enabled)
                network.set_multiplier(weight)
            generator = torch.Generator("cpu").manual_seed(int(seed))
            text = SimpleNamespace(prompt=prompt, negative_prompt=negative)
            # Both images read the prompt as the LoRA was trained (ss_clip_skip, ss_max_token_length).
            reading = prompt_kwargs(pipeline, text, loaded.family, self._clip_skip, self._chunks)
            with torch.no_grad():
                images.append(pipeline(**reading,
                                       num_inference_steps=int(steps), guidance_scale=float(guidance),
                                       width=side, height=side, generator=generator).images[0])
        if network is not None:
            network.set_enabled(True)
        done = time.perf_counter()
        return Comparison(images[0], images[1] if len(images) > 1 else None, loaded_at - started, done - loaded_at)

    def _without_lora(self) -> LoraNetwork | None:
        """The base model alone: any attached LoRA is detached, so the image is the base model's."""
        if self._network is not None:
            self._network.detach()
        self._network, self._lora_key, self._clip_skip, self._chunks = None, None, 1, 1
        return None

    def _load_model(self, spec: str, training: bool = False) -> LoadedModel:
        spec = spec.strip() or "demo:shapes"
        if spec != self._model_key:
            self._drop()
            device, dtype = preview_placement()
            model = load_model(spec, dtype=dtype)
            modules = (model.unet, model.vae, *model.text_encoders)
            if device == "cuda":
                weights = sum(p.numel() * p.element_size() for m in modules for p in m.parameters())
                problem = gpu_room_problem(torch.cuda.mem_get_info()[0], weights, training)
                if problem:
                    raise SdloraError(problem)
            for module in modules:
                module.to(device).eval().requires_grad_(False)
            self._model, self._model_key = model, spec
        return self._model

    def _load_lora(self, path: Path, model: LoadedModel) -> LoraNetwork:
        stat = path.stat()
        key = (str(path), stat.st_size, stat.st_mtime_ns)
        if key != self._lora_key:
            if self._network is not None:
                self._network.detach()
                self._network, self._lora_key = None, None
            state, metadata = read_lora(path)
            made_for = lora_family(state, metadata)
            if made_for and made_for != model.family.name:
                raise SdloraError(f"{path.name} was made for {made_for} but the base model is {model.family.name}; "
                                  f"choose a {made_for} base model.")
            self._network = LoraNetwork.from_state_dict(model.family.name, model.unet, model.text_encoders,
                                                        state, source=path.name).attach().eval()
            self._lora_key, self._clip_skip, self._chunks = key, clip_skip_of(metadata), prompt_chunks_of(metadata)
        return self._network

    def _pipeline(self, model: LoadedModel, sampler: str):
        if sampler not in self._pipelines:
            self._pipelines[sampler] = build_pipeline(model, sampler)
        return self._pipelines[sampler]

    def _drop(self) -> None:
        if self._network is not None:
            self._network.detach()
        self._model = self._network = None
        self._model_key = self._lora_key = None
        self._pipelines.clear()
        gc.collect()  # the modules' last references: their GPU memory returns to torch's cache ...
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # ... and from there to the device, for a run or the next model

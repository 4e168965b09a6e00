"""What the training tests share: a tiny run's config, its events, resuming and stopping it, loading its file."""

import json
from pathlib import Path

import tomllib

from trainer.config.presets import resolve_config
from trainer.model.tiny_models import build_tiny_pipeline
from trainer.run.build import build_run, make_accelerator
from trainer.run.loop import train
from trainer.run.run_dir import RunDir

ROOT = Path(__file__).resolve().parents[1]


def tiny_config(data, out, *overrides, preset="demo"):
    # The random tiny SD1 (fast) rather than the demo preset's demo:shapes, unless a test asks for it.
    base = [f"dataset.path={data}", f"output.dir={out}", "model.path=demo:sd1", "sample.every_steps=0",
            "sample.at_start=false", "save.every_steps=0", "save.precision=fp32", "network.rank=4",
            "dataset.resolution=64"]
    return resolve_config(preset, base + list(overrides))


def captions(folder):
    return {path.read_text() for path in Path(folder).glob("*.txt")}


def events(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "events.jsonl").read_text().splitlines()]


def load_in_diffusers(family, lora_path):
    pipe = build_tiny_pipeline(family)
    pipe.load_lora_weights(str(lora_path), adapter_name="x")
    parts = [pipe.unet, pipe.text_encoder, getattr(pipe, "text_encoder_2", None)]
    return sum(1 for part in parts if part is not None for _, m in part.named_modules()
               if hasattr(m, "lora_A") and "x" in m.lora_A)


def stop_at(step: int):
    """An on_step hook that stops the run (as Stop / Ctrl+C would) once `step` is done."""
    return lambda position: position.step == step


def built(cfg):
    """The parts a run of `cfg` trains with, built as the run builds them, without training."""
    return build_run(cfg, make_accelerator(cfg), RunDir(cfg.output.dir))


def resume_run(run_dir):
    return train(resolve_config(None, [f"output.dir={run_dir}"], base=_toml(run_dir / "config.toml")),
                 resume=True, progress=False)


def _toml(path):
    return tomllib.loads(Path(path).read_text())

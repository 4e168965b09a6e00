"""A stand-in for `sdlora train` that follows docs/RUN_DIRECTORY.md without loading any model.

The run manager's tests use it to exercise start / stop / resume / crash in a fraction of a second.
Usage mirrors the real command: `fake_trainer.py --config RUN_DIR/config.toml` or `--resume RUN_DIR`.
Knobs (config keys it reads): train.max_steps, save.every_steps, sample.every_steps, validation.every_steps,
ema.enabled, and the run name:
"fail-early" exits with a one-sentence error before any event, "fail-late" writes an error event.
FAKE_STEP_SECONDS sets the time per step (default 0.05); FAKE_LOAD_SECONDS and FAKE_EXIT_SECONDS add time
before the `started` event (model loading) and after the last event (saving, cleanup).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

STOP = {"requested": False}


def emit(run: Path, event: str, **fields) -> None:
    record = {"event": event, "time": datetime.now(timezone.utc).isoformat(timespec="seconds"), **fields}
    with open(run / "events.jsonl", "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")


def save(run: Path, name: str, step: int) -> str:
    (run / "checkpoints").mkdir(exist_ok=True)
    (run / "state").mkdir(exist_ok=True)
    path = run / "checkpoints" / f"{name}-step-{step:06d}.safetensors"
    path.write_bytes(b"fake")
    (run / "state" / "trainer.json").write_text(json.dumps({"step": step}))
    return path.relative_to(run).as_posix()


def sample(run: Path, step: int) -> str:
    from PIL import Image

    (run / "samples").mkdir(exist_ok=True)
    path = run / "samples" / f"step-{step:06d}-p0.png"
    Image.new("RGB", (64, 64), (step * 10 % 255, 100, 150)).save(path)
    return path.relative_to(run).as_posix()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config")
    parser.add_argument("--resume")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args()
    run = Path(args.resume) if args.resume else Path(args.config).parent
    cfg = tomllib.loads((run / "config.toml").read_text())
    name, total = cfg.get("name", "fake"), int(cfg.get("train", {}).get("max_steps") or 10)
    if name == "fail-early":
        print("error: Dataset folder '/nowhere' does not exist; point dataset.path at a folder of images.",
              file=sys.stderr)
        return 1
    start = json.loads((run / "state" / "trainer.json").read_text())["step"] if args.resume else 0
    signal.signal(signal.SIGINT, lambda *_: STOP.update(requested=True))
    (run / "trainer.pid").write_text(str(os.getpid()))
    delay = float(os.environ.get("FAKE_STEP_SECONDS", "0.05"))
    time.sleep(float(os.environ.get("FAKE_LOAD_SECONDS", "0")))
    emit(run, "started", total_steps=total, epochs=1, start_step=start, name=name, num_images=4)
    save_every = int(cfg.get("save", {}).get("every_steps") or 0)
    sample_every = int(cfg.get("sample", {}).get("every_steps") or 0)
    validation_every = int(cfg.get("validation", {}).get("every_steps") or 0)
    ema = bool(cfg.get("ema", {}).get("enabled"))
    try:
        for step in range(start + 1, total + 1):
            time.sleep(delay)
            if name == "fail-late" and step == 3:
                emit(run, "error", message="The loss became nan at step 3; lower train.learning_rate.", step=2)
                return 1
            emit(run, "step", step=step, epoch=1, loss=1.0 / step, lr=1e-3, it_per_s=1 / delay,
                 eta_s=(total - step) * delay, total_steps=total)
            if validation_every and step % validation_every == 0:
                emit(run, "validation", step=step, loss=2.0 / step, per_timestep={"500": 2.0 / step})
            if sample_every and step % sample_every == 0:
                emit(run, "sample", step=step, paths=[sample(run, step)], prompts=["a fake prompt"])
            if save_every and step % save_every == 0 and step < total:
                emit(run, "checkpoint", step=step, path=save(run, name, step))
            if STOP["requested"]:
                emit(run, "stopped", step=step, checkpoint=save(run, name, step))
                return 0
        (run / f"{name}.safetensors").write_bytes(b"fake")
        extra = {}
        if ema:
            (run / f"{name}-ema.safetensors").write_bytes(b"fake")
            extra["ema_path"] = f"{name}-ema.safetensors"
        emit(run, "finished", step=total, path=f"{name}.safetensors", **extra)
        return 0
    finally:
        time.sleep(float(os.environ.get("FAKE_EXIT_SECONDS", "0")))
        (run / "trainer.pid").unlink(missing_ok=True)


if __name__ == "__main__":
    sys.exit(main())

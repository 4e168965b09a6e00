"""A full disk while a run saves (its LoRA checkpoint, its training state, its final file): one sentence naming
the folder, what the next save needs and how to go on; exit 1; an `error` event; every earlier checkpoint
intact, no temporary file left, and `--resume` finishes the run once there is room."""

import errno
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

import networks.lora_file as lora_file
import trainer.run.outputs as outputs_module
from app.cli import main
from networks.atomic import DiskFull, atomic_write, is_disk_full
from networks.errors import SdloraError
from tests.test_training import events
from trainer.run.disk_space import human_size
from trainer.run.state import read_position

ENFORCE_FAIL = "[enforce fail at inline_container.cc:672] . unexpected pos 280256 vs 280144"  # a real one's words
SAFETENSORS_FULL = 'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'


@pytest.fixture(scope="module")
def data(data4):
    return data4


def train_args(data, out):
    flags = ["model.path=demo:sd1", "train.max_steps=3", "train.batch_size=2", "save.every_steps=1",
             "sample.every_steps=0", "sample.at_start=false", "network.rank=4", "dataset.resolution=64",
             "save.precision=fp32"]
    return ["train", "--data", str(data), "--preset", "demo", "--output", str(out), "--no-progress",
            *[arg for flag in flags for arg in ("--set", flag)]]


def assert_full_disk_stop(run: Path, stderr: str, folder: Path, what: str, step: int, state_step: int):
    """The one sentence, the error event, earlier checkpoints intact and nothing half-written left behind."""
    lines = [line for line in stderr.splitlines() if line.startswith("error") or "Traceback" in line]
    assert len(lines) == 1, stderr
    checkpoints = sorted((run / "checkpoints").glob("*.safetensors"))
    state_bytes = sum(p.stat().st_size for p in (run / "state").rglob("*") if p.is_file())
    lora, state = human_size(checkpoints[-1].stat().st_size), human_size(state_bytes)
    pattern = (rf"error: No space left on device in {re.escape(str(folder))} while saving {re.escape(what)} at step "
               rf"{step}: the next save needs about [\d.]+ (KB|MB) \({re.escape(lora)} for the LoRA file, "
               rf"{re.escape(state)} for the training state\) and [\d.]+ (KB|MB|GB) is free; free at least that much "
               rf"there and resume with: sdlora train --resume {re.escape(str(run))} \(every earlier checkpoint and "
               rf"the training state of step {state_step} are intact\)\.")
    assert re.fullmatch(pattern, lines[0]), lines[0]
    last = events(run)[-1]
    assert last["event"] == "error" and "error: " + last["message"] == lines[0]
    assert [p.name for p in checkpoints][:state_step] == [f"demo-lora-step-{s:06d}.safetensors"
                                                          for s in range(1, state_step + 1)]
    assert all(load_file(p) for p in checkpoints)
    assert read_position(run / "state").step == state_step
    assert not [p for p in run.rglob("*") if p.name.endswith(".tmp") or p.name in ("state.tmp", "state.old")]


def assert_resume_finishes(run: Path, capsys):
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0, capsys.readouterr().err
    log = events(run)
    assert log[-1]["event"] == "finished" and log[-1]["step"] == 3
    assert load_file(run / "demo-lora.safetensors")


def fail_lora_save(run: Path, name: str, error: Exception):
    real_save = lora_file.save_file

    def save(tensors, path, metadata=None):
        if Path(path).name.startswith(f".{name}."):
            raise error
        return real_save(tensors, path, metadata=metadata)
    return save


def fail_second_state(run: Path):
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if (run / "state").is_dir() and "state.tmp" in str(f):  # the second state, written beside the first
            raise RuntimeError(ENFORCE_FAIL)
        return real_save(obj, f, *args, **kwargs)
    return save


@pytest.mark.parametrize("fault", ["checkpoint", "state", "final"])
def test_a_full_disk_while_saving_stops_with_one_sentence_and_resumes(tmp_path, data, monkeypatch, capsys, fault):
    run = tmp_path / "run"
    if fault == "checkpoint":  # safetensors' own error for ENOSPC, on the step-2 checkpoint
        monkeypatch.setattr(lora_file, "save_file", fail_lora_save(
            run, "demo-lora-step-000002.safetensors", SafetensorError(SAFETENSORS_FULL)))
        where = (run / "checkpoints", "demo-lora-step-000002.safetensors", 2, 1)
    elif fault == "state":  # torch.save's, on the step-2 state (its LoRA checkpoint was written)
        monkeypatch.setattr(torch, "save", fail_second_state(run))
        where = (run, "the training state", 2, 1)
    else:  # a plain ENOSPC, on the final file
        monkeypatch.setattr(lora_file, "save_file", fail_lora_save(
            run, "demo-lora.safetensors", OSError(errno.ENOSPC, "No space left on device")))
        where = (run, "demo-lora.safetensors", 3, 2)
    assert main(train_args(data, run)) == 1
    assert_full_disk_stop(run, capsys.readouterr().err, *where)
    monkeypatch.undo()
    assert_resume_finishes(run, capsys)


@pytest.fixture
def small_disk(tmp_path):
    """A 16 MB tmpfs (skipped where this machine does not let the tests mount one)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)], capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({result.stderr.decode().strip() or result.returncode})")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.parametrize("room", ["half_a_checkpoint", "a_checkpoint_and_half_a_state"])
def test_a_real_full_disk_stops_with_one_sentence_and_resumes(small_disk, data, monkeypatch, capsys, room):
    """A real ENOSPC: after the step-1 save a filler file leaves room for half the next LoRA file, or for it
    and half the next training state."""
    run, filler = small_disk / "run", small_disk / "filler"
    real_save_state = outputs_module.save_state

    def save_then_fill(accelerator, folder, position):
        real_save_state(accelerator, folder, position)
        if position.step == 1:
            lora = (run / "checkpoints" / "demo-lora-step-000001.safetensors").stat().st_size
            state = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
            leave = lora // 2 if room == "half_a_checkpoint" else lora + state // 2
            filler.write_bytes(b"\0" * (shutil.disk_usage(small_disk).free - leave))
    monkeypatch.setattr(outputs_module, "save_state", save_then_fill)
    assert main(train_args(data, run)) == 1
    if room == "half_a_checkpoint":
        assert_full_disk_stop(run, capsys.readouterr().err, run / "checkpoints", "demo-lora-step-000002.safetensors",
                              2, 1)
    else:
        assert_full_disk_stop(run, capsys.readouterr().err, run, "the training state", 2, 1)
    filler.unlink()
    monkeypatch.undo()
    assert_resume_finishes(run, capsys)


@pytest.mark.parametrize("error", [
    OSError(errno.ENOSPC, "No space left on device"),
    RuntimeError(ENFORCE_FAIL),
    RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file data/0: "
                 "file write failed"),
    SafetensorError(SAFETENSORS_FULL),
])
def test_the_writer_turns_every_library_s_disk_full_into_disk_full(tmp_path, error):
    def write(temporary):
        Path(temporary).write_bytes(b"half")
        raise error
    with pytest.raises(DiskFull) as raised:
        atomic_write(tmp_path / "out" / "file.bin", write)
    assert str(raised.value) == f"No space left on device for file.bin in {tmp_path / 'out'}; free space there and try again."
    assert list((tmp_path / "out").iterdir()) == []  # the temporary is gone


def test_disk_full_is_found_anywhere_in_the_chain_and_nowhere_else(tmp_path):
    try:
        try:
            raise OSError(errno.ENOSPC, "x")
        except OSError as inner:
            raise RuntimeError("wrapped") from inner
    except RuntimeError as outer:
        assert is_disk_full(outer)
    assert not is_disk_full(RuntimeError("[enforce fail at inline_container.cc:588] . Parent directory x does not exist."))
    assert not is_disk_full(OSError(errno.EACCES, "Permission denied"))
    with pytest.raises(SdloraError, match=r"^Cannot write .* \(Permission denied\); check that the folder is writable"):
        atomic_write(tmp_path / "f", refuse)


def refuse(temporary):
    raise OSError(errno.EACCES, "Permission denied")


def test_a_disk_that_fills_between_saves_is_the_same_kind_of_sentence(tmp_path, data, monkeypatch, capsys):
    from trainer.run.events import StepEvent
    from trainer.run.run_dir import RunDir

    run, real_emit = tmp_path / "run", RunDir.emit

    def emit(self, event):
        if isinstance(event, StepEvent) and event.step == 2:  # the event line of step 2 finds the disk full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_emit(self, event)
    monkeypatch.setattr(RunDir, "emit", emit)
    assert main(train_args(data, run)) == 1
    sentence = (f"error: No space left on device in {run}; free space there and resume with: sdlora train --resume "
                f"{run} (every earlier checkpoint and the training state of step 1 are intact).")
    assert [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")] == [sentence]
    assert events(run)[-1]["event"] == "error" and "error: " + events(run)[-1]["message"] == sentence
    monkeypatch.undo()
    assert_resume_finishes(run, capsys)

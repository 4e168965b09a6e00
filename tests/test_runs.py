"""The run manager against a fake trainer that follows the run-directory contract."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from app.run_list import EventLog
from app.runs import RunManager
from app.security import run_folder
from networks.errors import SdloraError
from trainer.config import TrainConfig, apply_overrides
from trainer.run.events import FinishedEvent, StartedEvent

FAKE = [sys.executable, str(Path(__file__).with_name("fake_trainer.py"))]
DATA = Path("/nonexistent")  # set by the `manager` fixture to a folder with one image


def config(name="fake", steps=10, **extra) -> TrainConfig:
    overrides = [f"name={name}", f"train.max_steps={steps}", f"dataset.path={DATA}"]
    return apply_overrides(TrainConfig(), overrides + [f"{k}={v}" for k, v in extra.items()])


def wait_for(predicate, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError("condition not met in time")


@pytest.fixture
def manager(tmp_path, monkeypatch):
    from PIL import Image

    data = tmp_path / "data"
    data.mkdir()
    Image.new("RGB", (64, 64)).save(data / "a.png")
    monkeypatch.setattr(sys.modules[__name__], "DATA", data)
    monkeypatch.setenv("FAKE_STEP_SECONDS", "0.05")
    return RunManager(tmp_path / "runs", trainer_command=FAKE)


def test_a_run_is_written_started_and_finishes(manager):
    run = manager.start(config(steps=6, **{"sample.every_steps": 3}))
    assert run.parent == manager.runs_dir and run.name.startswith("fake-")
    written = (run / "config.toml").read_text()
    assert f'dir = "{run}"' in written  # output.dir points at the run itself
    assert manager.info(run).status in ("starting", "running")
    assert manager.wait(run, timeout=20) == 0
    info = manager.info(run)
    assert (info.status, info.step, info.total_steps) == ("finished", 6, 6)
    assert info.final_file == run / "fake.safetensors"
    progress = manager.progress(run)
    assert [s for s, _ in progress.losses] == [1, 2, 3, 4, 5, 6]
    assert [p.name for p, _ in progress.samples] == ["step-000003-p0.png", "step-000006-p0.png"]
    assert progress.samples[0][1] == "step 3: a fake prompt"
    assert "train --config" in manager.log_tail(run)


def test_validation_loss_and_the_ema_file_are_read(manager):
    run = manager.start(config(steps=4, **{"validation.every_steps": 2, "ema.enabled": "true"}))
    manager.wait(run, timeout=20)
    progress = manager.progress(run)
    assert progress.validation == [(2, 1.0), (4, 0.5)]
    assert progress.ema_file == run / "fake-ema.safetensors"

    from app.ui.live_view import loss_frame

    frame = loss_frame(progress.losses, progress.validation)
    assert frame.groupby("series").size().to_dict() == {"loss": 4, "smoothed": 4, "validation": 2}
    assert loss_frame([]) is None


def test_stop_saves_and_resume_continues_from_the_stop(manager, monkeypatch):
    monkeypatch.setenv("FAKE_STEP_SECONDS", "0.1")
    run = manager.start(config(steps=30))
    wait_for(lambda: manager.info(run).status == "running" and manager.info(run).step >= 2)
    manager.stop(run)
    assert manager.wait(run, timeout=20) == 0
    info = manager.info(run)
    assert info.status == "stopped" and 2 <= info.step < 30
    assert manager.checkpoints(run)[-1].name == f"fake-step-{info.step:06d}.safetensors"
    with pytest.raises(SdloraError, match="not training"):
        manager.stop(run)

    monkeypatch.setenv("FAKE_STEP_SECONDS", "0.01")
    manager.resume(run)
    assert manager.wait(run, timeout=20) == 0
    starts = [e for e in manager.events(run) if isinstance(e, StartedEvent)]
    assert [e.start_step for e in starts] == [0, info.step]
    assert manager.info(run).status == "finished"
    with pytest.raises(SdloraError, match="has finished"):
        manager.resume(run)


def test_status_while_loading_and_while_exiting(manager, monkeypatch):
    monkeypatch.setenv("FAKE_STEP_SECONDS", "0.1")
    run = manager.start(config(steps=40))
    wait_for(lambda: manager.info(run).step >= 2)
    manager.stop(run)
    manager.wait(run, timeout=20)
    monkeypatch.setenv("FAKE_LOAD_SECONDS", "1.0")
    monkeypatch.setenv("FAKE_EXIT_SECONDS", "1.5")
    monkeypatch.setenv("FAKE_STEP_SECONDS", "0.01")
    manager.resume(run)
    # Alive, and the last lifecycle event is still the old `stopped`: the new process is loading.
    assert manager.info(run).status == "starting"
    wait_for(lambda: isinstance(manager.events(run)[-1], FinishedEvent))
    # `finished` is written but the process is still saving and exiting: it runs until it is gone.
    assert manager.live_pid(run) is not None
    assert manager.info(run).status == "running"
    with pytest.raises(SdloraError, match="already training"):
        manager.resume(run)
    manager.wait(run, timeout=20)
    assert manager.info(run).status == "finished"


def test_one_trainer_at_a_time(manager, monkeypatch):
    monkeypatch.setenv("FAKE_STEP_SECONDS", "0.2")
    first = manager.start(config(name="first", steps=50))
    with pytest.raises(SdloraError, match=f"{first.name} is still training"):
        manager.start(config(name="second"))
    with pytest.raises(SdloraError, match="stop it before deleting"):
        manager.delete(first)
    manager.stop(first)
    manager.wait(first, timeout=20)
    manager.delete(first)
    assert not first.exists() and manager.list_runs() == []


def test_a_killed_trainer_is_interrupted_and_its_stale_pid_is_never_signalled(manager, monkeypatch):
    monkeypatch.setenv("FAKE_STEP_SECONDS", "0.1")
    run = manager.start(config(steps=100, **{"save.every_steps": 2}))
    wait_for(lambda: manager.info(run).step >= 3)
    os.kill(manager.live_pid(run), signal.SIGKILL)
    manager.wait(run, timeout=20)
    assert (run / "trainer.pid").exists()  # a -9 leaves the pid file behind
    # The pid now belongs to an unrelated process; it must not count as the trainer.
    bystander = subprocess.Popen(["sleep", "30"])
    try:
        (run / "trainer.pid").write_text(str(bystander.pid))
        fresh = RunManager(manager.runs_dir, trainer_command=FAKE)  # as after a UI restart
        assert fresh.info(run).status == "interrupted"
        with pytest.raises(SdloraError, match="not training"):
            fresh.stop(run)
        assert bystander.poll() is None
        fresh.resume(run)  # interrupted runs continue from their last checkpoint
        assert fresh.wait(run, timeout=30) == 0
        assert fresh.info(run).status == "finished"
        # The steps after the last checkpoint ran twice; the loss curve keeps only the resumed ones.
        steps = [step for step, _ in fresh.progress(run).losses]
        assert steps == list(range(1, 101))
    finally:
        bystander.kill()
        bystander.wait()


def test_a_trainer_that_fails_before_any_event_shows_its_sentence(manager):
    run = manager.start(config(name="fail-early"))
    assert manager.wait(run, timeout=20) == 1
    info = manager.info(run)
    assert info.status == "error"
    assert info.message == "Dataset folder '/nowhere' does not exist; point dataset.path at a folder of images."


def test_an_error_event_is_the_status_and_the_message(manager):
    run = manager.start(config(name="fail-late"))
    manager.wait(run, timeout=20)
    info = manager.info(run)
    assert (info.status, info.message) == ("error", "The loss became nan at step 3; lower train.learning_rate.")
    with pytest.raises(SdloraError, match="no saved state"):
        manager.resume(run)


def test_runs_are_listed_newest_first_with_their_state(manager):
    old = manager.runs_dir / "old-run"
    old.mkdir()
    (old / "config.toml").write_text('name = "old"\n')
    (old / "events.jsonl").write_text(json.dumps({"event": "started", "time": "2020-01-01T00:00:00+00:00",
                                                  "total_steps": 9, "start_step": 0, "name": "old"}) + "\n")
    (manager.runs_dir / "not-a-run").mkdir()
    (manager.runs_dir / ".hidden").mkdir()
    new = manager.start(config(name="new", steps=2))
    manager.wait(new, timeout=20)
    runs = manager.list_runs()
    assert [(r.folder, r.name, r.status) for r in runs] == [(new.name, "new", "finished"),
                                                           ("old-run", "old", "interrupted")]
    assert runs[1].total_steps == 9 and runs[1].step == 0


def test_a_replayed_stretch_after_a_crash_is_plotted_once(manager):
    run = manager.runs_dir / "crashed"
    run.mkdir()
    events = [{"event": "started", "start_step": 0, "total_steps": 6}]
    events += [{"event": "step", "step": s, "loss": 1.0} for s in range(1, 6)]  # killed after step 5
    events += [{"event": "started", "start_step": 3, "total_steps": 6}]  # resumed from the step-3 checkpoint
    events += [{"event": "step", "step": s, "loss": 0.5} for s in range(4, 7)]
    (run / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    assert manager.progress(run).losses == [(1, 1.0), (2, 1.0), (3, 1.0), (4, 0.5), (5, 0.5), (6, 0.5)]


def test_event_log_reads_only_complete_lines_and_notices_a_replaced_file(tmp_path):
    path = tmp_path / "events.jsonl"
    log = EventLog(path)
    assert log.read() == []
    path.write_text('{"event": "started"}\n{"event": "st')
    assert [e.event for e in log.read()] == ["started"]
    with open(path, "a") as handle:
        handle.write('ep", "step": 1}\nnot json\n')
    assert [e.event for e in log.read()] == ["started", "step"]
    path.unlink()
    path.write_text('{"event": "finished"}\n')
    assert [e.event for e in log.read()] == ["finished"]


def test_log_tail_keeps_the_last_state_of_a_redrawn_line(manager):
    run = manager.runs_dir / "r"
    run.mkdir()
    (run / "train.log").write_text("loading\n 10%|#\r 50%|####\r100%|########\nerror: Disk full; free space.\n")
    assert manager.log_tail(run) == "loading\n100%|########\nerror: Disk full; free space."


def test_run_folders_from_the_browser_must_be_runs(manager, tmp_path):
    run = manager.runs_dir / "a-run"
    run.mkdir()
    assert run_folder(manager.runs_dir, "a-run") == run
    assert run_folder(manager.runs_dir, str(run)) == run
    for bad in ("../", "../../etc", str(tmp_path), "a-run/checkpoints", "/etc"):
        with pytest.raises(SdloraError):
            run_folder(manager.runs_dir, bad)
    with pytest.raises(SdloraError, match="Choose a run"):
        run_folder(manager.runs_dir, "")


def test_start_refuses_bad_inputs_before_creating_a_run(manager, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    cases = {
        f"dataset.path={empty}": "has no images",
        f"dataset.path={tmp_path / 'missing'}": "does not exist",
        "dataset.path=": "Enter the dataset folder.",
        f"model.path={tmp_path / 'model.safetensors'}": "The model .* was not found",
    }
    for override, message in cases.items():
        with pytest.raises(SdloraError, match=message):
            manager.start(apply_overrides(config(), [override]))
    # The trainer's pre-flight check runs too: more held-out validation images than the folder has.
    with pytest.raises(SdloraError, match="validation"):
        manager.start(apply_overrides(config(), ["validation.images=5", "validation.every_steps=2"]))
    assert manager.list_runs() == []


def test_start_writes_absolute_paths_and_the_preset(manager, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    run = manager.start(apply_overrides(config(steps=1), ["dataset.path=data"]), "style-lora")
    manager.wait(run, timeout=20)
    assert f'path = "{tmp_path / "data"}"' in (run / "config.toml").read_text()
    assert manager.info(run).preset == "style-lora"


def test_a_stopped_and_resumed_run_shows_its_history_final_loss_time_and_file(manager):
    from app.ui.live_view import history_text, run_row

    run = manager.runs_dir / "resumed"
    run.mkdir()

    def at(second: int) -> str:
        return f"2026-01-01T00:00:{second:02d}+00:00"

    events = [{"event": "started", "time": at(0), "start_step": 0, "total_steps": 3, "name": "resumed"},
              {"event": "step", "time": at(2), "step": 1, "loss": 0.9},
              {"event": "step", "time": at(4), "step": 2, "loss": 0.8},
              {"event": "stopped", "time": at(5), "step": 2, "checkpoint": "checkpoints/c.safetensors"},
              {"event": "started", "time": at(20), "start_step": 2, "total_steps": 3, "name": "resumed"},
              {"event": "step", "time": at(23), "step": 3, "loss": 0.7},
              {"event": "finished", "time": at(24), "step": 3, "path": "resumed.safetensors"}]
    (run / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    (run / "resumed.safetensors").write_bytes(b"x" * 2000)
    (run / "preset.txt").write_text("demo\n")
    info = manager.info(run)
    assert info.history == (("started", 0), ("stopped", 2), ("started", 2), ("finished", 3))
    assert (info.status, info.resumed, info.final_loss, info.train_seconds) == ("finished", 1, 0.7, 5 + 4)
    assert history_text(info) == "started → stopped at step 2 → resumed from step 2 → finished at step 3"
    assert run_row(info)[:8] == ["resumed", "resumed", "finished · resumed 1x", "3 / 3", "0.7000", "0:09",
                                 "2 KB", "demo"]

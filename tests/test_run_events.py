"""The typed run events (trainer/run/events.py) against the on-disk contract of docs/RUN_DIRECTORY.md, and
run status and progress as pure functions of them (trainer/run/status.py)."""
import json

from trainer.run import events as ev
from trainer.run import status
from trainer.run.run_dir import RunDir

# Every kind as the trainer writes it, and the keys docs/RUN_DIRECTORY.md's table gives it (plus event, time).
WRITTEN = [
    (ev.SkippedEvent(name="a.png", reason="cannot be read", kind="image"), {"name", "reason", "kind"}),
    (ev.StartedEvent(total_steps=8, epochs=2, start_step=0, name="demo", num_images=4, encoded_images=4,
                  encoded_captions=4),
     {"total_steps", "epochs", "start_step", "name", "num_images", "encoded_images", "encoded_captions"}),
    (ev.StepEvent(step=1, epoch=1, loss=0.5, lr=1e-4, it_per_s=2.0, eta_s=None, total_steps=8),
     {"step", "epoch", "loss", "lr", "it_per_s", "eta_s", "total_steps"}),
    (ev.StepEvent(step=2, epoch=1, loss=0.4, lr=1e-4, it_per_s=2.0, eta_s=3.0, total_steps=8, keys_scaled=1,
               max_key_norm=1.0, mean_key_norm=0.5),
     {"step", "epoch", "loss", "lr", "it_per_s", "eta_s", "total_steps", "keys_scaled", "max_key_norm",
      "mean_key_norm"}),
    (ev.SampleEvent(step=2, paths=("samples/step-000002-p0.png",), prompts=("a ball",)), {"step", "paths", "prompts"}),
    (ev.CheckpointEvent(step=2, path="checkpoints/demo-step-000002.safetensors"), {"step", "path"}),
    (ev.ValidationEvent(step=2, loss=0.3, per_timestep={"500": 0.3}), {"step", "loss", "per_timestep"}),
    (ev.LoadCheckEvent(ok=True, problems=(), path="demo.safetensors", modules=64), {"path", "ok", "problems", "modules"}),
    (ev.StoppedEvent(step=2, checkpoint="checkpoints/demo-step-000002.safetensors"), {"step", "checkpoint"}),
    (ev.FinishedEvent(step=8, path="demo.safetensors"), {"step", "path"}),
    (ev.FinishedEvent(step=8, path="demo.safetensors", ema_path="demo-ema.safetensors"), {"step", "path", "ema_path"}),
    (ev.ErrorEvent(message="The loss became nan at step 3; lower train.learning_rate.", step=2), {"message", "step"}),
]


def test_every_kind_is_written_with_the_documented_keys_and_reads_back_equal(tmp_path):
    run = RunDir(tmp_path / "run")
    run.root.mkdir()
    stamped = [run.emit(event) for event, _ in WRITTEN]
    lines = [json.loads(line) for line in run.events_path.read_text().splitlines()]
    assert [line["event"] for line in lines] == [event.event for event, _ in WRITTEN]
    for line, (_, keys) in zip(lines, WRITTEN):
        assert set(line) == {"event", "time"} | keys
        assert line["time"].endswith("+00:00")  # ISO 8601, UTC
    assert lines[2]["eta_s"] is None and lines[4]["paths"] == ["samples/step-000002-p0.png"]
    assert run.events() == stamped  # each line parses back to the event that wrote it
    assert set(ev.EVENT_KINDS) == {line["event"] for line in lines}


OLD_RUN = [  # as older versions and hand-written test folders left them: raw JSON lines
    '{"event": "started", "total_steps": 6, "start_step": 0, "name": "old"}',  # no time, no encoded_* counts
    '{"event": "step", "time": "2025-03-01T10:00:02Z", "step": 1, "loss": 0.9, "lr": 0.0001, "future": 1}',
    '{"event": "step", "time": "2025-03-01T10:00:04+00:00", "step": 2, "loss": "nan?", "eta_s": null}',
    '{"event": "telemetry", "gpu": 0.5}',  # a kind a newer trainer may add
    '{"event": "sample", "step": 2, "paths": ["samples/a.png", 7], "prompts": ["a ball"]}',
    '{"event": "load_check", "path": "old.safetensors", "ok": true, "modules": 12}',  # no problems list
    '{"event": "finished", "time": "2025-03-01T10:00:06+00:00", "step": 2, "path": "old.safetensors"}',
    '{"event": "st',  # a line still being written
]


def test_an_old_events_file_still_reads(tmp_path):
    run = RunDir(tmp_path / "old")
    run.root.mkdir()
    run.events_path.write_text("\n".join(OLD_RUN))
    events = run.events()
    assert [e.event for e in events] == ["started", "step", "step", "sample", "load_check", "finished"]
    started, first, second, sample, check, finished = events
    assert (started.total_steps, started.start_step, started.encoded_images, started.time) == (6, 0, None, "")
    assert (first.step, first.loss, first.lr) == (1, 0.9, 0.0001)
    assert second.loss is None and second.eta_s is None  # a damaged value reads as absent, not as an error
    assert sample.paths == ("samples/a.png", 7) and check.problems == () and check.ok
    assert finished.ema_path is None
    assert ev.parse({"no": "event"}) is None and ev.parse(["not", "a", "dict"]) is None

    state = status.run_state(events, status.Process())
    assert (state.status, state.step, state.total_steps, state.name) == ("finished", 2, 6, "old")
    assert (state.final_path, state.final_check, state.final_loss) == ("old.safetensors", check, 0.9)
    assert state.history == (("started", 0), ("finished", 2))
    assert state.train_seconds is None or state.train_seconds >= 0
    seen = status.progress(events)
    assert seen.losses == [(1, 0.9)] and seen.sample_sets == {2: [("samples/a.png", "a ball"), (None, "")]}
    assert seen.samples == [("samples/a.png", "step 2: a ball")] and seen.last_check == check


def test_status_is_the_last_lifecycle_event_or_the_live_process():
    started = ev.StartedEvent(total_steps=4, name="r")
    step = ev.StepEvent(step=1, loss=0.5)
    assert status.status([], status.Process()) == ("created", "")
    assert status.status([], status.Process(failure="Dataset folder '/x' does not exist.")) == \
        ("error", "Dataset folder '/x' does not exist.")
    assert status.status([started, step], status.Process()) == ("interrupted", "")
    assert status.status([started, step], status.Process(alive=True, started=True)) == ("running", "")
    stopped = ev.StoppedEvent(step=1, checkpoint="c.safetensors")
    assert status.status([started, step, stopped], status.Process(alive=True)) == ("starting", "")
    assert status.status([started, step, stopped], status.Process()) == ("stopped", "")
    assert status.status([started, ev.ErrorEvent()], status.Process()) == ("error", "The trainer reported an error.")
    assert not status.exit_failure_matters([started, stopped]) and status.exit_failure_matters([started])
    failed = [started, ev.FinishedEvent(step=1, path="r.safetensors"),
              ev.LoadCheckEvent(ok=False, problems=("lora_unet_x has no module",), path="r.safetensors")]
    state = status.run_state(failed, status.Process())
    assert (state.status, state.final_path) == ("error", None)
    assert state.message == ("r.safetensors failed the load check (lora_unet_x has no module); it is kept for "
                             "inspection but is not a usable LoRA.")


def test_a_process_counts_as_started_once_it_wrote_its_own_started_event():
    first = ev.StartedEvent(time="2026-01-01T00:00:10+00:00")
    again = ev.StartedEvent(time="2026-01-01T00:00:30+00:00", start_step=4)
    assert not status.process_started([first], started_before_launch=1, pid_written=None)
    assert status.process_started([first, again], started_before_launch=1, pid_written=None)
    pid_written = 1767225620.0  # 2026-01-01T00:00:20Z: between the two starts
    assert not status.process_started([first], None, pid_written)
    assert status.process_started([first, again], None, pid_written)


def test_train_time_sums_the_segments_and_the_rate_ends_with_its_segment():
    def at(second):
        return f"2026-01-01T00:00:{second:02d}+00:00"

    events = [ev.StartedEvent(time=at(0)), ev.StepEvent(time=at(3), step=1, loss=1.0, it_per_s=2.0, eta_s=9.0),
              ev.StoppedEvent(time=at(4), step=1), ev.StartedEvent(time=at(10), start_step=1),
              ev.StepEvent(time=at(12), step=2, loss=0.5, it_per_s=3.0)]
    assert status.train_seconds(events) == 4 + 2
    assert status.resumed(status.history(events)) == 1
    assert status.progress(events).it_per_s == 3.0
    assert status.progress(events[:3]).it_per_s is None

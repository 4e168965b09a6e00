"""The live view's pieces (load-check badge, sample grid, loss curves, pre-flight panel) from a run folder
written by hand: the events follow docs/RUN_DIRECTORY.md, no trainer runs."""
import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
from PIL import Image

from app.runs import RunManager
from app.ui.live_view import files_html, loss_frame, progress_html, sample_grid_html
from app.ui.preflight_view import report_html
from trainer.preflight import Report
from trainer.run.events import LoadCheckEvent
from trainer.run.status import Process

PROMPTS = ["sdlorastyle, a red ball", "sdlorastyle, a blue cube"]


def write_run(folder: Path, events: list[dict], validation: bool = True) -> Path:
    folder.mkdir(parents=True)
    section = "[validation]\nimages = 2\nevery_steps = 2\n" if validation else ""
    (folder / "config.toml").write_text(f'name = "demo-lora"\n{section}')
    (folder / "samples").mkdir()
    (folder / "checkpoints").mkdir()
    for event in events:
        for rel in event.get("paths", []):
            Image.new("RGB", (8, 8), "red").save(folder / rel)
        if event["event"] in ("checkpoint", "finished") or event["event"] == "load_check":
            (folder / event["path"]).write_bytes(b"x")
    lines = [json.dumps({"time": "2026-01-01T00:00:00+00:00", **e}) for e in events]
    (folder / "events.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def sample(step: int) -> dict:
    return {"event": "sample", "step": step, "prompts": PROMPTS,
            "paths": [f"samples/step-{step:06d}-p{i}.png" for i in range(len(PROMPTS))]}


def check(path: str, ok: bool = True) -> dict:
    return {"event": "load_check", "path": path, "ok": ok, "modules": 64 if ok else 0,
            "problems": [] if ok else ["lora_unet_x.lora_down.weight has no matching module", "second problem"]}


def steps(first: int, last: int) -> list[dict]:
    return [{"event": "step", "step": s, "loss": 1.0 / s, "total_steps": 4, "epoch": 1} for s in range(first, last + 1)]


@pytest.fixture
def manager(tmp_path):
    return RunManager(tmp_path / "runs", trainer_command=["false"])


def test_a_finished_run_shows_its_load_check_the_grid_and_both_curves(manager):
    ckpt = "checkpoints/demo-lora-step-000002.safetensors"
    run = write_run(manager.runs_dir / "demo-lora-1", [
        {"event": "started", "total_steps": 4, "start_step": 0, "name": "demo-lora"}, *steps(1, 2), sample(2),
        {"event": "checkpoint", "step": 2, "path": ckpt}, check(ckpt),
        {"event": "validation", "step": 2, "loss": 0.4, "per_timestep": {"500": 0.4}}, *steps(3, 4), sample(4),
        {"event": "validation", "step": 4, "loss": 0.3, "per_timestep": {"500": 0.3}},
        {"event": "finished", "step": 4, "path": "demo-lora.safetensors"}, check("demo-lora.safetensors")])
    progress = manager.progress(run)
    assert progress.info.status == "finished" and progress.info.final_file == run / "demo-lora.safetensors"
    bar = progress_html(progress)
    assert 'data-ok="true"' in bar and "demo-lora.safetensors</b> loads in A1111 / ComfyUI / diffusers · 64 modules" in bar

    grid = sample_grid_html(progress)
    assert 'data-steps="2" data-prompts="2"' in grid
    assert grid.count("<img ") == 4 and "step 4" in grid and "a blue cube" in grid
    assert f"gradio_api/file={run}/samples/step-000004-p1.png" in grid  # served from the run folder

    frame = loss_frame(progress.losses, progress.validation, progress.validating)
    assert frame.groupby("series").size().to_dict() == {"loss": 4, "smoothed": 4, "validation": 2}
    assert "✓ loads" in files_html(progress.checkpoints, checks=progress.load_checks, run_dir=run)


def test_the_grid_says_it_shows_the_newest_steps_and_pages_back_to_the_rest(manager):
    sampled = list(range(0, 125, 5))  # 25 sampled steps: the newest 10 shown, then pages of 10 and of 5
    run = write_run(manager.runs_dir / "long", [{"event": "started", "total_steps": 120, "start_step": 0},
                                                *(sample(step) for step in sampled)], validation=False)
    grid = sample_grid_html(manager.progress(run))
    assert 'data-steps="10" data-prompts="2" data-all-steps="25"' in grid
    assert "Showing the newest 10 of 25 sampled steps (steps 75 to 120)" in grid
    assert grid.count("<summary>") == 2 and "<summary>Steps 25 to 70</summary>" in grid
    assert "<summary>Steps 0 to 20</summary>" in grid
    assert grid.count("<img ") == 2 * 25  # every sampled image is reachable


def test_the_validation_series_is_reserved_before_the_first_measurement(manager):
    run = write_run(manager.runs_dir / "early", [{"event": "started", "total_steps": 4}, *steps(1, 1)])
    progress = manager.progress(run)
    assert progress.validating
    frame = loss_frame(progress.losses, progress.validation, progress.validating)
    reserved = frame[frame.series == "validation"]
    assert len(reserved) == 1 and math.isnan(reserved.loss.iloc[0])
    plain = write_run(manager.runs_dir / "plain", [{"event": "started", "total_steps": 4}, *steps(1, 1)],
                      validation=False)
    assert set(loss_frame(*(lambda p: (p.losses, p.validation, p.validating))(manager.progress(plain))).series) \
        == {"loss", "smoothed"}
    assert "appear here" in sample_grid_html(progress)


def test_a_file_that_fails_its_load_check_is_never_presented_as_done(manager):
    ckpt = "checkpoints/demo-lora-step-000002.safetensors"
    run = write_run(manager.runs_dir / "broken", [
        {"event": "started", "total_steps": 2}, *steps(1, 2), {"event": "checkpoint", "step": 2, "path": ckpt},
        check(ckpt, ok=False), {"event": "finished", "step": 2, "path": "demo-lora.safetensors"},
        check("demo-lora.safetensors", ok=False)])
    progress = manager.progress(run)
    info = progress.info
    assert info.status == "error" and info.final_file is None
    assert "failed the load check" in info.message
    bar = progress_html(progress)
    assert 'data-ok="false"' in bar and "has no matching module" in bar and "sd-finished" not in bar
    files = files_html(progress.checkpoints, checks=progress.load_checks, run_dir=run)
    assert "fails the load check" in files and "download=" not in files


def test_the_preflight_panel_lists_errors_warnings_plan_and_buckets():
    report = Report(errors=["network.rank must be an integer >= 1 (got 0)."], warnings=["Few images."],
                    info=["Steps: 40 steps.", "Estimated GPU memory 3.1 GB (...; uncalibrated, expect +-30%)."])
    report.data["buckets"] = [{"width": 64, "height": 64, "images": 10, "samples": 10},
                              {"width": 64, "height": 128, "images": 1, "samples": 2}]
    text = report_html(report)
    for part in ("Cannot train yet", "network.rank must be", "Few images.", "Steps: 40 steps.", "uncalibrated",
                 "Buckets (2): 64x64: 10 images, 64x128: 1 image (2 with repeats)."):
        assert part in text


def test_the_load_check_badge_names_where_a_lycoris_file_loads():
    from app.ui.live_view import load_check_html

    lora = LoadCheckEvent(path="a.safetensors", ok=True, modules=12)
    loha = replace(lora, path="b.safetensors", not_loaded_by=("diffusers load_lora_weights",))
    assert "loads in A1111 / ComfyUI / diffusers · 12 modules" in load_check_html(lora)
    assert "loads in A1111 / ComfyUI / LyCORIS (not diffusers) · 12 modules" in load_check_html(loha)
    assert "does not load in A1111 / ComfyUI / LyCORIS (not diffusers): bad shape" in load_check_html(
        replace(loha, ok=False, problems=("bad shape",)))


def test_a_training_run_redraws_its_loss_plot_at_most_every_few_seconds(manager, monkeypatch):
    """Each output a poll sends costs the browser CPU that a GPU-less machine takes from the training:
    while a run trains, the bar follows every step, the loss plot every LOSS_REDRAW_SECONDS, the buttons
    only when the status changes; once it ends, the plot shows every step at once."""
    from app.ui.context import UIContext
    from app.ui.train_tab import LIVE_OUTPUTS, LOSS_REDRAW_SECONDS, live_update

    events = [{"event": "started", "total_steps": 4, "start_step": 0, "name": "demo-lora"}, *steps(1, 1)]
    run = write_run(manager.runs_dir / "live", events, validation=False)
    # A trainer process is running it, past its own `started` event.
    monkeypatch.setattr(manager, "process", lambda run_dir, events: Process(alive=True, started=True))
    ctx = UIContext(manager, manager.runs_dir.parent / "datasets")

    def add_steps(first, last):
        with (run / "events.jsonl").open("a") as log:
            for event in steps(first, last):
                log.write(json.dumps({"time": "2026-01-01T00:00:01+00:00", **event}) + "\n")

    def sent(outputs):  # output name -> whether this poll sends it
        names = ["header", "bar", "run_notice", "loss", "samples", "log", "start", "stop", "resume", "timer",
                 "fingerprint", "notice"]
        assert len(outputs) == len(names) == LIVE_OUTPUTS
        return {name: not isinstance(value, dict) or value.get("__type__") != "update" or len(value) > 1
                for name, value in zip(names, outputs)}

    first = live_update(ctx, "live", None, now=100.0)
    assert sent(first)["loss"] and sent(first)["stop"] and len(first[3]) == 2  # loss and smoothed, step 1
    add_steps(2, 2)
    soon = live_update(ctx, "live", first[10], now=100.0 + LOSS_REDRAW_SECONDS / 2)
    assert sent(soon)["bar"] and 'data-step="2"' in soon[1]
    assert not any(sent(soon)[name] for name in ("header", "loss", "start", "stop", "resume", "timer", "samples"))
    nothing_new = live_update(ctx, "live", soon[10], now=100.0 + LOSS_REDRAW_SECONDS - 0.1)
    assert not any(sent(nothing_new)[name] for name in ("header", "bar", "loss"))
    assert not isinstance(nothing_new[10], list)  # all skipped, so the page keeps the fingerprint it had
    due = live_update(ctx, "live", soon[10], now=100.0 + LOSS_REDRAW_SECONDS)
    assert sent(due)["loss"] and len(due[3]) == 4  # the step that came meanwhile, without a new event
    add_steps(3, 4)
    with (run / "events.jsonl").open("a") as log:
        log.write(json.dumps({"time": "2026-01-01T00:00:02+00:00", "event": "finished", "step": 4,
                              "path": "demo-lora.safetensors"}) + "\n")
    (run / "demo-lora.safetensors").write_bytes(b"x")
    monkeypatch.setattr(manager, "process", lambda run_dir, events: Process())  # the trainer has exited
    ended = live_update(ctx, "live", due[10], now=100.0 + LOSS_REDRAW_SECONDS + 0.5)
    assert sent(ended)["loss"] and len(ended[3]) == 8  # at once, though the last draw was half a second ago
    assert sent(ended)["start"] and sent(ended)["timer"]

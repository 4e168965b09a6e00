"""The Try tab's LoRA list: made again on page load, on opening the tab and on Refresh. A run that just
finished is what a user opens the tab to try, so its file is chosen; a file the user picked stays picked."""
from app.runs import RunManager
from app.ui.context import UIContext
from app.ui.try_tab import refreshed_choice
from tests.test_ui_live_view import check, steps, write_run


def finished_run(manager: RunManager, folder: str) -> str:
    """A finished run; write_run gives every run the same start time, so the folder name orders them."""
    run = write_run(manager.runs_dir / folder, [
        {"event": "started", "total_steps": 2, "start_step": 0, "name": "demo-lora"}, *steps(1, 2),
        {"event": "finished", "step": 2, "path": "demo-lora.safetensors"}, check("demo-lora.safetensors")],
        validation=False)
    return str(run / "demo-lora.safetensors")


def test_a_newly_finished_run_is_chosen_and_a_users_pick_is_kept(tmp_path):
    manager = RunManager(tmp_path / "runs", trainer_command=["false"])
    ctx = UIContext(manager, tmp_path / "datasets")
    assert refreshed_choice(ctx, None, None) == ([], None, None)  # no runs yet: nothing to choose

    older = finished_run(manager, "demo-lora-20260101-100000")
    choices, value, newest = refreshed_choice(ctx, None, None)
    assert value == newest == older and [path for _, path in choices] == [older]

    newer = finished_run(manager, "demo-lora-20260101-110000")
    choices, value, newest = refreshed_choice(ctx, older, older)  # the page still shows the older file
    assert [path for _, path in choices] == [newer, older]
    assert value == newest == newer  # the run that finished since is chosen

    # The user picks the older file again; opening the tab once more keeps that pick.
    assert refreshed_choice(ctx, older, newer)[1:] == (older, newer)
    # A picked file that is gone (its run deleted) gives way to the newest.
    assert refreshed_choice(ctx, str(tmp_path / "gone.safetensors"), newer)[1] == newer

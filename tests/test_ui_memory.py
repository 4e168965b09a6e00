"""GPU memory in the UI: the live view's memory line and warnings from a run folder a CUDA trainer wrote (by hand
here, as docs/RUN_DIRECTORY.md spells the fields), and the Train tab's "Apply memory changes" handler."""

from app.ui.live_view import memory_line, progress_html
from tests.test_ui_live_view import manager, steps, write_run  # noqa: F401 - `manager` is a fixture

GIB = 2 ** 30
FULL = "GPU memory is within 5% of the card (7.8 GB of 8.0 GB), where Windows may spill into system memory ..."


def test_the_live_view_shows_the_measured_peak_beside_the_prediction_and_the_warnings(manager):  # noqa: F811
    cuda = {"gpu_reserved_bytes": int(7.1 * GIB), "gpu_allocated_bytes": int(6.2 * GIB)}
    run = write_run(manager.runs_dir / "cuda", [
        {"event": "started", "total_steps": 4, "start_step": 0, "name": "demo-lora", "gpu_card_bytes": 8 * GIB,
         "gpu_predicted_bytes": int(7.4 * GIB)},
        {**steps(1, 1)[0], **cuda}, {**steps(2, 2)[0], **cuda, "gpu_reserved_bytes": int(7.8 * GIB), "warning": FULL}],
        validation=False)
    progress = manager.progress(run)
    assert memory_line(progress) == "GPU memory: 7.8 GB used of 8.0 GB (predicted 7.4 GB)"
    bar = progress_html(progress)
    assert "GPU memory: 7.8 GB used of 8.0 GB (predicted 7.4 GB)" in bar and f"⚠ {FULL}" in bar


def test_a_cpu_run_and_a_resumed_one_show_only_their_own_memory(manager):  # noqa: F811
    cpu = write_run(manager.runs_dir / "cpu", [{"event": "started", "total_steps": 4, "start_step": 0},
                                               *steps(1, 2)], validation=False)
    assert memory_line(manager.progress(cpu)) == "" and "GPU memory" not in progress_html(manager.progress(cpu))
    resumed = write_run(manager.runs_dir / "resumed", [
        {"event": "started", "total_steps": 4, "start_step": 0, "gpu_card_bytes": 8 * GIB},
        {**steps(1, 1)[0], "gpu_reserved_bytes": 8 * GIB, "gpu_allocated_bytes": 7 * GIB, "warning": FULL},
        {"event": "stopped", "step": 1, "checkpoint": "checkpoints/a.safetensors"},
        {"event": "started", "total_steps": 4, "start_step": 1, "gpu_card_bytes": 12 * GIB}, *steps(2, 2)],
        validation=False)
    progress = manager.progress(resumed)
    assert (progress.gpu_card, progress.gpu_reserved, progress.warnings) == (12 * GIB, None, [])

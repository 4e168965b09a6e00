"""GPU memory in the UI: the live view's memory line and warnings from a run folder a CUDA trainer wrote (by hand
here, as docs/RUN_DIRECTORY.md spells the fields), and the Train tab's "Apply memory changes" handler."""

import types

import gradio as gr
import pytest

from app.ui import build_ui
from app.ui.config_form import ConfigForm
from app.ui.live_view import memory_line, progress_html
from app.ui.memory_changes import apply_memory_changes, listed_changes
from app.ui.notices import ok
from app.ui.train_tab import start_config
from tests.test_ui_live_view import manager, steps, write_run  # noqa: F401 - `manager` is a fixture
from trainer.preflight import Report

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


CHANGES = [{"label": "gradient checkpointing", "overrides": {"train.gradient_checkpointing": True},
            "peak_bytes": int(9.1 * GIB)},
           {"label": "the 8-bit AdamW optimizer", "overrides": {"train.optimizer": "adamw8bit"},
            "peak_bytes": int(7.4 * GIB)}]


@pytest.fixture(scope="module")
def apply_handler(tmp_path_factory):
    """The Train tab's "Apply memory changes" handler as the page wires it, and its form fields' keys."""
    demo = build_ui(tmp_path_factory.mktemp("memory") / "runs", trainer_command=["false"])
    wired = next(f for f in demo.fns.values() if f.name == "on_apply_memory")
    widgets = wired.inputs[1:]  # after the State holding the checked changes
    return wired.fn, [w.elem_id[len("cfg-"):].replace("-", ".") for w in widgets], [w.value for w in widgets]


def test_apply_memory_changes_sets_the_fields_and_says_what_it_changed(apply_handler):
    handler, keys, opening = apply_handler
    shown = dict(zip(keys, opening))
    assert (shown["train.gradient_checkpointing"], shown["train.optimizer"]) == (False, "adamw")  # demo preset
    outputs = handler(CHANGES, *opening)
    assert outputs[0] == ok("Set train.gradient_checkpointing = true, train.optimizer = adamw8bit; predicted peak "
                            "now 7.4 GB.")
    changed = {key: value for key, value in zip(keys, outputs[1:-1]) if value != gr.skip()}
    assert changed == {"train.gradient_checkpointing": True, "train.optimizer": "adamw8bit"}
    assert outputs[-1].visible is False  # applied: the button goes until the next Check lists changes


def test_the_changes_come_from_the_report_and_a_key_the_form_lacks_is_named():
    listed = Report(data={"memory": {"changes": [types.SimpleNamespace(**CHANGES[0])]}})
    assert listed_changes(listed) == CHANGES[:1]
    assert listed_changes(Report(data={"estimate": {"peak_bytes": 1, "changes_to_fit": CHANGES}})) == CHANGES
    assert listed_changes(Report()) == [] and listed_changes(None) == []
    with gr.Blocks():
        form = ConfigForm(start_config())
        form.add_remaining()
    unknown = [{"label": "x", "overrides": {"model.not_a_key": True}, "peak_bytes": GIB}]
    fill = apply_memory_changes(form, CHANGES + unknown, form.values(start_config()))
    assert fill.updates == {"train.gradient_checkpointing": True, "train.optimizer": "adamw8bit"}
    assert fill.sentence == ("Set train.gradient_checkpointing = true, train.optimizer = adamw8bit; predicted peak "
                             "now 1.0 GB. Not in this form: model.not_a_key; set them with --set on the command line.")


def test_set_lines_in_the_report_stay_command_lines_while_the_rest_names_fields():
    with gr.Blocks():
        form = ConfigForm(start_config())
        form.add_remaining()
    words = form.in_words("fp8 base weights (--set model.fp8_base=true: 15.3 GiB); model.fp8_base is off.")
    assert words == f"fp8 base weights (--set model.fp8_base=true: 15.3 GiB); {form.label('model.fp8_base')} is off."

"""The page keeps what the user typed and shows what is true now (issue 13), in Chromium.

A failed Check leaves the form as typed; a preset changes only the keys it sets and says which; the base
model field changes nothing else; the caption editor follows a bulk edit; a newer message replaces the
older ones; each user error shows once, naming the field and the value.
"""
import json
import re
from pathlib import Path

import pytest

from tests.ui_support import (
    choose_preset,
    field,
    open_page,
    playwright_or_skip,
    served_ui,
    shot,
    train_notice,
    wait_for,
)
from trainer.demo.demo_data import make_demo_dataset

sync_api = playwright_or_skip()

SHOTS = Path("/tmp/shots")  # the screenshots issue 13 asks for, looked at by a person
SETTLE_MS = 2000  # long enough for any event a click or a blur queued to reach the page


@pytest.fixture(scope="module")
def ui(tmp_path_factory):
    root = tmp_path_factory.mktemp("ui-page-state")
    make_demo_dataset(root / "data", count=4)
    with served_ui(root) as demo:
        yield demo, root


@pytest.fixture
def page(browser, ui):
    page = open_page(browser, ui[0].local_url)
    yield page
    page.context.close()


def values(page, *elem_ids: str) -> dict[str, str]:
    return {elem_id: field(page, elem_id).input_value() for elem_id in elem_ids}


def test_a_failed_check_keeps_every_typed_field_and_train_starts_nothing(page, ui):
    demo, root = ui
    page.get_by_role("tab", name="Train").click()
    typed = {"cfg-dataset-path": str(root / "data"), "cfg-name": "keep2", "cfg-train-max_steps": "55",
             "cfg-train-learning_rate": "5e-4", "cfg-model-path": "/nope/q.safetensors"}
    for elem_id, value in typed.items():
        field(page, elem_id).fill(value)
    # A look at the preset list on the way to Check: the dropdown's blur sends an input event.
    page.locator("#preset input").click()
    page.locator("#train-check").click()
    wait_for(lambda: "/nope/q.safetensors was not found" in train_notice(page), timeout=90, what="the missing-model error")
    page.wait_for_timeout(SETTLE_MS)
    assert values(page, *typed) == typed
    shot(page, "train-after-failed-check.png", SHOTS)
    page.locator("#train-start").click()
    page.wait_for_timeout(SETTLE_MS)
    assert "/nope/q.safetensors was not found" in train_notice(page)
    assert demo.sdlora.runs.list_runs() == []
    assert values(page, *typed) == typed


def test_a_preset_changes_only_the_keys_it_sets_and_says_which(page):
    page.get_by_role("tab", name="Train").click()
    # The demo model is a placeholder: the SDXL preset brings its own.
    choose_preset(page, "sdxl-style-lora")
    wait_for(lambda: field(page, "cfg-dataset-resolution").input_value() == "1024", what="the SDXL resolution")
    assert field(page, "cfg-model-path").input_value() == "demo:sdxl"
    typed = {"cfg-model-path": "/my/models/base.safetensors", "cfg-name": "mine", "cfg-train-max_steps": "55",
             "cfg-train-learning_rate": "0.0005"}
    for elem_id, value in typed.items():
        field(page, elem_id).fill(value)

    choose_preset(page, "style-lora")
    wait_for(lambda: "Preset style-lora " in train_notice(page), timeout=90, what="the preset notice")
    note = train_notice(page)
    assert "Learning rate 0.0001 (was 0.0005)" in note and "Max steps" not in note and "Base model" not in note
    assert values(page, "cfg-model-path", "cfg-name", "cfg-train-max_steps") == {
        "cfg-model-path": "/my/models/base.safetensors", "cfg-name": "mine", "cfg-train-max_steps": "55"}
    assert field(page, "cfg-train-learning_rate").input_value() == "0.0001"
    assert field(page, "cfg-dataset-resolution").input_value() == "1024"  # style-lora does not set it

    choose_preset(page, "sdxl-style-lora")  # a typed model path is the user's: kept, and said so
    wait_for(lambda: "Preset sdxl-style-lora " in train_notice(page), what="the second preset notice")
    assert field(page, "cfg-model-path").input_value() == "/my/models/base.safetensors"
    assert "kept your Base model" in train_notice(page)

    # The base model field changes nothing else.
    before = values(page, "cfg-name", "cfg-train-max_steps", "cfg-train-learning_rate", "cfg-network-rank",
                    "cfg-dataset-resolution")
    field(page, "cfg-model-path").fill("demo:sd1")
    field(page, "cfg-model-path").blur()
    page.wait_for_timeout(SETTLE_MS)
    assert values(page, *before) == before


def test_the_caption_editor_follows_a_bulk_edit(page, ui, tmp_path):
    make_demo_dataset(tmp_path / "captions", count=3)
    field(page, "dataset-folder").fill(str(tmp_path / "captions"))
    page.locator("#dataset-open").click()
    wait_for(lambda: page.locator("#dataset-gallery img").count() == 3, what="3 thumbnails")
    page.locator("#dataset-gallery img").nth(0).click()
    caption = field(page, "caption-text")
    wait_for(lambda: caption.input_value().startswith("sdlorastyle"), what="the first caption")
    page.get_by_text("Edit all captions").click()
    page.get_by_label("Find", exact=True).fill("sdlorastyle")
    page.get_by_label("Replace with", exact=True).fill("inkstyle")
    page.get_by_role("button", name="Replace all").click()
    wait_for(lambda: caption.input_value().startswith("inkstyle"), timeout=90, what="the editor showing the replaced caption")
    page.locator("#caption-save").click()
    wait_for(lambda: "Saved the caption" in page.locator("#dataset-notice").inner_text(), what="the save")
    assert (tmp_path / "captions" / "demo_000.txt").read_text().startswith("inkstyle")


def test_a_newer_result_replaces_the_older_one(page, ui, tmp_path):
    _, root = ui
    page.get_by_role("tab", name="Train").click()
    field(page, "cfg-dataset-path").fill(str(root / "data"))
    page.locator("#train-check").click()
    wait_for(lambda: "Ready to train" in page.locator("#preflight").inner_text(), what="the report")
    report = page.locator("#preflight").inner_text()
    # a full-size model at 64 px: whole seconds or "under a second", never "0 s"
    assert re.search(r"steps take (under a second|about [1-9]\d* s|about [1-9]\d* min) on a GPU", report) and " 0 s" not in report
    assert "training runs on the CPU, where the tiny demo model trains in minutes" in report
    # A later failure: the earlier "Ready to train" goes with it.
    field(page, "cfg-dataset-path").fill(str(tmp_path / "missing"))
    page.locator("#train-check").click()
    wait_for(lambda: "does not exist" in train_notice(page), timeout=90, what="the missing-folder error")
    assert page.locator("#preflight").inner_text().strip() == ""
    # A warning answers the value it checked: changing that value takes the report away.
    field(page, "cfg-dataset-path").fill(str(root / "data"))
    field(page, "cfg-train-learning_rate").fill("1000000000")
    page.locator("#train-check").click()
    wait_for(lambda: "Learning rate 1e+09" in page.locator("#preflight").inner_text(), timeout=90,
             what="the learning-rate warning, in the field's words")
    assert train_notice(page).strip() == ""  # the earlier error is gone too
    field(page, "cfg-train-learning_rate").fill("0.0001")
    wait_for(lambda: page.locator("#preflight").inner_text().strip() == "", timeout=60, what="the stale report to go")


def test_each_user_error_shows_once_naming_the_field_and_the_value(page, ui):
    _, root = ui
    page.get_by_role("tab", name="Train").click()
    field(page, "cfg-dataset-path").fill(str(root / "data"))
    field(page, "cfg-network-rank").fill("0")
    page.locator("#train-check").click()
    wait_for(lambda: "Rank r must be an integer >= 1; you typed 0." in train_notice(page), timeout=90,
             what="the rank error")
    field(page, "cfg-network-rank").fill("8")
    field(page, "cfg-train-learning_rate").fill("")
    page.locator("#train-check").click()
    wait_for(lambda: "Learning rate is empty or not a number; type a number, e.g. 0.0001." in train_notice(page),
             timeout=90, what="the learning-rate error")
    field(page, "cfg-train-learning_rate").fill("0.001")
    field(page, "cfg-train-max_steps").fill("many")
    page.locator("#train-start").click()
    wait_for(lambda: "Max steps must be a number or empty; you typed 'many'." in train_notice(page), timeout=90,
             what="the max-steps error")
    page.wait_for_timeout(SETTLE_MS)
    assert page.locator(".toast-body").count() == 0  # said once, in the notice: no toast repeating it
    assert "train.max_steps" not in train_notice(page)


def test_deleting_the_watched_run_points_at_the_others(page, ui):
    demo, root = ui
    runs = demo.sdlora.runs.runs_dir
    for name in ("first", "second"):
        finished_run(runs / f"{name}-20260101-000000", name, root / "data")
    page.get_by_role("tab", name="Runs").click()
    page.locator("#runs-refresh").click()
    row = page.locator("#runs-table [data-testid^='cell-'][data-testid$='-0']", has_text="second-20260101-000000")
    row.click()
    page.locator("#run-watch").click()
    wait_for(lambda: "second" in page.locator("#run-header").inner_text(), what="the watched run")
    assert "0.2500" in page.locator("#runs-table").inner_text() and "demo" in page.locator("#runs-table").inner_text()
    page.get_by_role("tab", name="Runs").click()
    page.locator("#run-delete").click()
    page.locator("#run-delete-confirm").click()
    page.get_by_role("tab", name="Train").click()
    wait_for(lambda: "1 run is in the Runs tab" in page.locator("#progress").inner_text(), timeout=90,
             what="the idle bar pointing at the other run")
    assert "no longer exists" not in page.content()


def finished_run(run, name: str, data) -> None:
    """A run folder as the trainer leaves it after 4 steps, without training (what the page reads)."""
    from trainer.config import save_config
    from trainer.config.presets import resolve_config

    run.mkdir(parents=True)
    save_config(resolve_config("demo", [f"name={name}", f"dataset.path={data}", f"output.dir={run}"]),
                run / "config.toml")
    (run / "preset.txt").write_text("demo\n")
    lines = [{"event": "started", "time": "2026-01-01T00:00:00+00:00", "start_step": 0, "total_steps": 4,
              "name": name}]
    lines += [{"event": "step", "time": f"2026-01-01T00:00:0{s}+00:00", "step": s, "loss": 1 / s} for s in (1, 2, 4)]
    lines += [{"event": "finished", "time": "2026-01-01T00:00:05+00:00", "step": 4, "path": f"{name}.safetensors"}]
    (run / "events.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))


def test_the_dataset_tab_makes_the_buckets_the_train_check_makes(page, ui):
    _, root = ui
    field(page, "dataset-folder").fill(str(root / "data"))
    page.locator("#dataset-open").click()
    stats = page.locator("#dataset-stats")
    wait_for(lambda: "Buckets with the Train tab's settings: resolution 64 px, sides 64 to 128 px" in stats.inner_text(),
             what="the demo preset's bucket settings")
    page.locator("#bucket-plot svg").first.wait_for()
    shot(page, "dataset-histogram.png", SHOTS)
    page.get_by_role("tab", name="Train").click()
    page.locator("#train-check").click()
    wait_for(lambda: "Buckets (1): 64x64: 4 images" in page.locator("#preflight").inner_text(), what="the Check")
    field(page, "cfg-dataset-resolution").fill("128")
    page.get_by_role("tab", name="Dataset").click()
    wait_for(lambda: "resolution 128 px" in stats.inner_text(), what="the Train tab's new resolution")
    assert field(page, "dataset-resolution").input_value() == "128"


def test_inspect_says_what_to_do_before_a_file_is_chosen(page):
    page.get_by_role("tab", name="Inspect").click()
    assert "Nothing inspected yet: choose a LoRA" in page.locator("#inspect-empty").inner_text()
    assert not page.locator("#inspect-results").is_visible()
    assert not page.get_by_text("Lines for the blocks of").is_visible()
    page.wait_for_timeout(SETTLE_MS)  # the pickers' lists arrive
    shot(page, "inspect-empty.png", SHOTS)

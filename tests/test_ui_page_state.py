"""The page keeps what the user typed and shows what is true now (issue 13), in Chromium.

A failed Check leaves the form as typed; a preset changes only the keys it sets and says which; the base
model field changes nothing else; the caption editor follows a bulk edit; a newer message replaces the
older ones; each user error shows once, naming the field and the value.
"""
import pytest

from tests.ui_support import (
    CHROMIUM,
    choose_preset,
    field,
    launch_chromium,
    open_page,
    served_ui,
    train_notice,
    wait_for,
)
from trainer.demo_data import make_demo_dataset

if not CHROMIUM.exists():
    pytest.skip("Debian's Chromium (/usr/bin/chromium) is not installed; apt-get install chromium",
                allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright Python package is not installed")

SETTLE_MS = 2000  # long enough for any event a click or a blur queued to reach the page


@pytest.fixture(scope="module")
def ui(tmp_path_factory):
    root = tmp_path_factory.mktemp("ui-page-state")
    make_demo_dataset(root / "data", count=4)
    with served_ui(root) as demo:
        yield demo, root


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        browser = launch_chromium(playwright)
        yield browser
        browser.close()


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
    wait_for(lambda: "/nope/q.safetensors was not found" in train_notice(page), timeout=30, what="the missing-model error")
    page.wait_for_timeout(SETTLE_MS)
    assert values(page, *typed) == typed
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
    wait_for(lambda: "Preset style-lora " in train_notice(page), timeout=30, what="the preset notice")
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
    wait_for(lambda: caption.input_value().startswith("inkstyle"), timeout=30, what="the editor showing the replaced caption")
    page.locator("#caption-save").click()
    wait_for(lambda: "Saved the caption" in page.locator("#dataset-notice").inner_text(), what="the save")
    assert (tmp_path / "captions" / "demo_000.txt").read_text().startswith("inkstyle")

"""The UI in a real browser (Debian's Chromium through Playwright), against the real `sdlora train`.

A person's first session: create the demo dataset, edit a caption, pick the demo model and preset, make
two mistakes (r = 0, an empty folder) and read the sentence, train, watch the bar, the loss and the
samples, reload the page mid-run, download the file and load it in diffusers; then a second run that
is stopped. Screenshots go to test-artifacts/.
"""
import json
import shutil
from pathlib import Path

import pytest
import torch

from app.ui.heatmap_axes import MARGIN_BOTTOM, MARGIN_TOP
from tests.ui_support import (
    choose_preset,
    field,
    open_page,
    open_section,
    playwright_or_skip,
    served_ui,
    set_field,
    shot,
    train_notice,
    wait_for,
)
from trainer.demo.demo_data import make_demo_dataset

sync_api = playwright_or_skip()

STEPS = 40


@pytest.fixture(scope="module")
def ui(tmp_path_factory):
    root = tmp_path_factory.mktemp("ui-browser")
    with served_ui(root) as demo:
        yield demo, root


@pytest.fixture
def page(browser, ui):
    demo, _ = ui
    page = open_page(browser, demo.local_url)
    yield page
    page.context.close()


def progress(page) -> tuple[str, int]:
    bar = page.locator("#progress .sd-progress")
    return bar.get_attribute("data-status"), int(bar.get_attribute("data-step") or 0)


def test_a_first_session_from_demo_data_to_a_downloaded_lora(page, ui, tmp_path):
    demo, root = ui
    # -- Dataset tab: the demo dataset, a caption edit ------------------------------------------------
    page.get_by_text("No images yet? Create the demo dataset").click()
    page.locator("#demo-create").click()
    wait_for(lambda: page.locator("#dataset-gallery img").count() == 12, what="12 thumbnails")
    assert "12 usable images" in page.locator("#dataset-stats").inner_text()
    page.locator("#dataset-gallery img").nth(0).click()
    caption = field(page, "caption-text")
    wait_for(lambda: caption.input_value().startswith("sdlorastyle"), what="the caption of the first image")
    caption.fill(caption.input_value() + ", edited in the browser")
    page.locator("#caption-save").click()
    dataset = root / "datasets" / "demo"
    wait_for(lambda: "edited in the browser" in (dataset / "demo_000.txt").read_text(), what="the saved caption")
    shot(page, "dataset.png")

    # -- Train tab: model, preset, two mistakes ------------------------------------------------------
    page.get_by_role("tab", name="Train").click()
    assert field(page, "cfg-dataset-path").input_value() == str(dataset)
    assert field(page, "cfg-model-path").input_value() == "demo:shapes"  # the demo preset's model that draws
    choose_preset(page, "style-lora")
    wait_for(lambda: field(page, "cfg-network-rank").input_value() == "16", what="the style-lora rank")
    choose_preset(page, "demo")
    wait_for(lambda: field(page, "cfg-network-rank").input_value() == "8", what="the demo rank")
    assert "alpha 8" in page.locator("#alpha-display").inner_text()
    field(page, "cfg-network-rank").fill("4")  # the preset's alpha/r (1) is kept
    wait_for(lambda: "alpha 4" in page.locator("#alpha-display").inner_text(), what="alpha following r")

    field(page, "cfg-network-rank").fill("0")
    page.locator("#train-start").click()
    wait_for(lambda: "Rank r must be an integer >= 1; you typed 0." in train_notice(page), what="the r = 0 error")
    empty = tmp_path / "empty"
    empty.mkdir()
    field(page, "cfg-network-rank").fill("8")
    field(page, "cfg-dataset-path").fill(str(empty))
    page.locator("#train-start").click()
    wait_for(lambda: "has no images" in train_notice(page), what="the empty folder error")
    assert "Traceback" not in page.content()
    assert demo.sdlora.runs.list_runs() == []  # a mistake never creates a run
    field(page, "cfg-dataset-path").fill(str(dataset))
    page.locator("#train-check").click()
    wait_for(lambda: "Ready to train" in page.locator("#preflight").inner_text(), what="the pre-flight report")
    report = page.locator("#preflight").inner_text()
    # The whole report before Start: the plan with steps, buckets and the traced memory peak with its cards.
    for line in ("Dataset: 12 usable images", "Steps: ", "Buckets (", "Predicted GPU memory peak", "GB cards"):
        assert line in report, line

    field(page, "cfg-train-max_steps").fill(str(STEPS))
    wanted = {"cfg-sample-every_steps": "10", "cfg-save-every_steps": "10",
              "cfg-validation-images": "2", "cfg-validation-every_steps": "10"}  # validation: the second curve
    for section in ("sample", "save", "validation"):
        open_section(page, section)
    for elem_id, value in wanted.items():
        set_field(page, elem_id, value)
    page.wait_for_timeout(1000)
    for elem_id, value in wanted.items():  # still there once everything has settled
        set_field(page, elem_id, value)
    page.get_by_text("Advanced: every setting").click()  # closed again, for a compact screenshot

    # -- Train: the bar moves; a reload mid-run reattaches to the run, which never stopped ----------
    page.locator("#train-start").click()
    wait_for(lambda: progress(page)[0] == "running" and progress(page)[1] >= 1, what="the first step")
    first_step = progress(page)[1]
    wait_for(lambda: progress(page)[1] > first_step, what="the bar moving")
    before_reload = progress(page)[1]
    page.reload()
    page.wait_for_selector("#progress .sd-progress[data-status='running']")
    assert progress(page)[1] >= before_reload
    assert page.get_by_role("tab", name="Train").get_attribute("aria-selected") == "true"
    # The form shows the run being watched, not the defaults. (Wait on the dataset folder: the default
    # preset's max_steps equals STEPS, so that field alone cannot tell the run's config from the defaults.)
    wait_for(lambda: field(page, "cfg-dataset-path").input_value() == str(dataset), what="the run's config")
    assert field(page, "cfg-train-max_steps").input_value() == str(STEPS)

    # -- The loss curves, the sample grid and the load checks appear, the run finishes ----------------
    wait_for(lambda: page.locator("#samples .sd-grid img").count() >= 1, what="a sample")
    wait_for(lambda: page.locator("#loss-plot svg .mark-line path").count() >= 1, what="the loss curve")
    wait_for(lambda: page.locator("#progress .sd-loadcheck[data-ok='true']").count() == 1,
             what="a checkpoint's load check")
    shot(page, "train-running.png")
    wait_for(lambda: progress(page)[0] in ("finished", "error"), timeout=300, what="the end of the run")
    assert progress(page) == ("finished", STEPS)
    wait_for(lambda: "Started" not in train_notice(page), what="the start notice to go with the run")
    badge = page.locator("#progress .sd-loadcheck")
    wait_for(lambda: "demo-lora.safetensors loads in A1111 / ComfyUI / diffusers" in badge.inner_text(),
             what="the final file's load check")
    assert badge.get_attribute("data-ok") == "true" and " modules" in badge.inner_text()
    # Both loss curves, each with its legend entry.
    wait_for(lambda: page.locator("#loss-plot svg .mark-line path").count() >= 3, what="three lines")
    legend = page.locator("#loss-plot svg .role-legend").text_content()
    assert all(name in legend for name in ("loss", "smoothed", "validation")), legend
    # The grid: one row per prompt, one column per sampled step; an image opens full size from the run folder.
    grid = page.locator("#samples .sd-grid")
    sets = demo.sdlora.runs.progress(demo.sdlora.runs.list_runs()[0].path).sample_sets
    assert {0, 10, 20, 30, 40} <= set(sets)  # step 0: the base model's images, before any training
    prompts, columns = len(sets[STEPS]), len(sets)
    assert grid.get_attribute("data-steps") == str(columns) and grid.get_attribute("data-prompts") == str(prompts)
    assert page.locator("#samples .sd-grid img").count() == prompts * columns
    link = page.locator("#samples .sd-grid a").last
    assert link.get_attribute("target") == "_blank"
    full = page.request.get(demo.local_url.rstrip("/") + "/" + link.get_attribute("href"))
    assert full.ok and full.headers["content-type"].startswith("image/")
    page.locator("#samples").scroll_into_view_if_needed()
    shot(page, "train-finished.png")
    shot(page, "train-issue7.png")

    # -- Runs tab: download the file, load it in diffusers --------------------------------------------
    page.get_by_role("tab", name="Runs").click()
    page.locator('#runs-table [data-testid="cell-0-1"]').click()
    download_button = page.locator("#run-download")
    wait_for(lambda: "demo-lora.safetensors" in download_button.inner_text(), what="the download button")
    with page.expect_download() as download:
        download_button.click()
    saved = tmp_path / "downloaded.safetensors"
    download.value.save_as(saved)
    assert "loads in A1111" in page.locator(".sd-loadcheck[data-ok='true']").last.inner_text()
    assert "✓ loads" in page.locator("#run-checkpoints").inner_text()
    assert page.locator("#run-samples .sd-grid img").count() == prompts * columns
    shot(page, "runs.png")
    assert_loads_in_diffusers(saved)


def test_stop_saves_a_checkpoint_and_shows_stopped(page, ui):
    demo, root = ui
    dataset = root / "datasets" / "demo"
    if not dataset.is_dir():  # the first test made it, unless this one runs alone
        make_demo_dataset(dataset, count=8)
    # A run left active by an earlier failure would be shown on load and refill the form under our typing.
    assert demo.sdlora.runs.newest_active() is None, "a run from an earlier test is still active"
    page.get_by_role("tab", name="Train").click()
    field(page, "cfg-dataset-path").fill(str(dataset))
    field(page, "cfg-name").fill("stopped-run")
    field(page, "cfg-train-max_steps").fill("2000")
    page.get_by_text("Save these settings as a preset").click()
    field(page, "preset-name").fill("long-demo")
    page.locator("#preset-save").click()
    wait_for(lambda: "Saved preset long-demo" in train_notice(page), what="the saved preset")
    assert "max_steps = 2000" in (root / "home" / "presets" / "long-demo.toml").read_text()

    page.locator("#train-start").click()
    wait_for(lambda: progress(page)[0] == "running" and progress(page)[1] >= 3, what="a few steps")
    page.locator("#train-stop").click()
    wait_for(lambda: progress(page)[0] == "stopped", timeout=120, what="the stopped state")
    first_stop = progress(page)[1]
    # Resume continues from the checkpoint; stop it again.
    page.locator("#train-resume").click()
    wait_for(lambda: progress(page)[0] == "running" and progress(page)[1] > first_stop, what="the resumed run")
    page.locator("#train-stop").click()
    wait_for(lambda: progress(page)[0] == "stopped", timeout=120, what="the second stop")
    shot(page, "train-stopped.png")
    step = progress(page)[1]
    assert first_stop < step < 2000
    assert page.locator("#train-resume").is_enabled()
    run = next(r for r in demo.sdlora.runs.list_runs() if r.name == "stopped-run")
    events = [json.loads(line) for line in (run.path / "events.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events if e["event"] in ("started", "stopped")] == ["started", "stopped"] * 2
    assert events[-1]["event"] == "stopped" and events[-1]["step"] == step
    assert (run.path / events[-1]["checkpoint"]).is_file()
    assert (run.path / "state").is_dir()

    # -- Runs tab: its checkpoint is listed; deleting asks first --------------------------------------
    page.get_by_role("tab", name="Runs").click()
    row = page.locator("#runs-table [data-testid^='cell-'][data-testid$='-0']", has_text=run.folder)
    row.click()
    wait_for(lambda: Path(events[-1]["checkpoint"]).name in page.locator("#run-checkpoints").inner_text(),
             what="the checkpoint link")
    page.locator("#run-delete").click()
    page.get_by_text("This cannot be undone.").wait_for()
    assert run.path.is_dir()  # nothing is deleted before the confirmation
    page.locator("#run-delete-confirm").click()
    wait_for(lambda: not run.path.exists(), what="the deleted run folder")
    wait_for(lambda: run.folder not in page.locator("#runs-table").inner_text(), what="the row to go")


def assert_loads_in_diffusers(lora: Path) -> None:
    from diffusers import StableDiffusionPipeline

    from trainer.model.tiny_models import demo_model_path

    folder = lora.parent / "lora"
    folder.mkdir()
    shutil.copy(lora, folder / "demo-lora.safetensors")
    pipe = StableDiffusionPipeline.from_pretrained(demo_model_path("shapes"), safety_checker=None)
    sample = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    context = torch.randn(1, 77, pipe.unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = pipe.unet(sample, 500, context).sample
        pipe.load_lora_weights(str(folder), weight_name="demo-lora.safetensors")
        after = pipe.unet(sample, 500, context).sample
    assert (after - before).abs().max() > 1e-4


def test_inspect_shows_the_spectrum_and_the_similarity_heatmap(page, tmp_path):
    from tests.test_ui_inspect import tiny_sd1_pair

    first, second = tiny_sd1_pair(tmp_path)  # rank 8, the second sharing each module's top 2 directions
    page.get_by_role("tab", name="Inspect").click()
    field(page, "inspect-path").fill(str(first))
    page.locator("#inspect-go").click()
    wait_for(lambda: page.locator("#inspect-ranks svg .mark-line path").count() == 4, what="4 effective-rank lines")
    spectrum = page.locator("#inspect-spectrum svg")
    wait_for(lambda: spectrum.locator(".mark-line path").count() == 3, what="a line per UNet block")
    assert "unet mid_block" in spectrum.locator(".role-legend").text_content()
    field(page, "inspect-path-b").fill(str(second))
    page.locator("#inspect-compare").click()
    wait_for(lambda: "90 common modules" in page.locator("#inspect-compare-notice").inner_text(), what="the comparison")
    heatmap = page.locator("#inspect-heatmap img")
    heatmap.wait_for()
    # 8 x 8 cells of 40 px inside numbered axes, a colour bar on the right
    assert heatmap.evaluate("img => img.naturalHeight") == MARGIN_TOP + 320 + MARGIN_BOTTOM
    assert "mean phi(1,1) 1.000" in page.get_by_text("common modules; mean phi(1,1)").inner_text()
    page.mouse.move(0, 0)
    shot(page, "inspect.png")
    # The text encoder's lines replace the UNet's, with their own legend; one module's heatmap replaces the mean.
    page.locator("#inspect-component label", has_text="te").click()
    wait_for(lambda: "te layers.2" in spectrum.locator(".role-legend").text_content(), what="the text encoder's lines")
    assert spectrum.locator(".mark-line path").count() == 3 and "unet" not in spectrum.locator(".role-legend").text_content()
    mean = heatmap.get_attribute("src")
    page.locator("#inspect-module input").click()
    page.locator("ul[role=listbox] li", has_text="lora_unet_mid_block_attentions_0_proj_in").first.click()
    wait_for(lambda: heatmap.get_attribute("src") != mean, what="the module's heatmap")
    assert "Traceback" not in page.content()


def test_a_folder_without_captions_is_captioned_from_the_dataset_tab(page, tmp_path):
    import re

    from tests.tiny_captioners import tiny_blip, tiny_wd14

    dataset = tmp_path / "uncaptioned"
    make_demo_dataset(dataset, count=8)
    for caption_file in sorted(dataset.glob("*.txt"))[1:]:
        caption_file.unlink()
    own = (dataset / "demo_000.txt").read_text()
    blip, tagger = tiny_blip(tmp_path / "blip"), tiny_wd14(tmp_path / "wd14")
    field(page, "dataset-folder").fill(str(dataset))
    page.locator("#dataset-open").click()
    stats, status = page.locator("#dataset-stats"), page.locator("#autocaption-status")
    wait_for(lambda: "Captions: 1 of 8" in stats.inner_text(), what="the opened folder")
    page.get_by_text("Caption automatically").click()

    # Offline the default BLIP cannot be had: one sentence that says how to get it; nothing is written.
    page.locator("#autocaption-run").click()
    notice = page.locator("#dataset-notice")
    wait_for(lambda: "Cannot get the BLIP captioner" in notice.inner_text(), what="the offline sentence")
    assert "`hf download Salesforce/blip-image-captioning-large --local-dir" in notice.inner_text()
    assert [p.name for p in dataset.glob("*.txt")] == ["demo_000.txt"]
    shot(page, "caption-offline.png")

    # A local BLIP folder: the bar counts the images, then the gallery and the stats show the captions.
    set_field(page, "autocaption-model", str(blip))
    set_field(page, "autocaption-prefix", "mystyle")
    page.locator("#autocaption-run").click()
    bar = "() => document.querySelector('#autocaption-status [role=progressbar]')?.getAttribute('aria-valuetext')"
    seen = wait_for(lambda: (text := page.evaluate(bar)) and text.startswith("Captioned") and text, interval=0.05,
                    what="the progress bar past the model loading")
    assert re.fullmatch(r"Captioned demo_00[1-7]\.png: [1-7] / 7 images", seen), seen
    shot(page, "caption-progress.png")
    wait_for(lambda: "Wrote 7 caption file(s); kept the 1 existing caption(s)" in status.inner_text(),
             what="the summary")
    assert (dataset / "demo_000.txt").read_text() == own
    assert all(p.read_text().startswith("mystyle, ") for p in dataset.glob("demo_00[1-7].txt"))
    wait_for(lambda: "Captions: 8 of 8" in stats.inner_text(), what="the stats")
    assert page.locator("#dataset-gallery").inner_text().count("mystyle, ") == 7
    shot(page, "caption-blip.png")

    # The tagger brings its threshold; "All images" replaces every caption, the one written by hand too.
    page.locator("#autocaption-kind input").click()
    page.locator("ul[role=listbox] li", has_text="WD14 tagger").first.click()
    threshold = page.locator("#autocaption-threshold input[type=number]")
    threshold.wait_for()
    threshold.fill("0.6")
    threshold.press("Enter")
    set_field(page, "autocaption-model", str(tagger))
    page.locator("#autocaption-which label", has_text="All images").click()
    page.locator("#autocaption-run").click()
    wait_for(lambda: "Wrote 8 caption file(s)." in status.inner_text(), what="the tagger's summary")
    for caption_file in dataset.glob("*.txt"):
        tags = caption_file.read_text().strip().split(", ")
        assert tags[:2] == ["mystyle", "some character (series)"] and "^_^" in tags
        assert "simple background" not in tags  # p = 0.5, under the 0.6 set in the page
    assert "Traceback" not in page.content()
    shot(page, "caption-wd14.png")

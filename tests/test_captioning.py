"""Auto-captioning (`sdlora caption`, the Dataset tab's button): which files are written, which are kept, the
prefix, the tagger's thresholds, the progress events and the sentences when a model cannot be had.

The captioners are tiny random-weight models built from configs (tests/tiny_captioners.py), saved as the
folders `hf download` writes; what they say is noise, so only the tagger's words are asserted.
"""
import html

import pytest
from PIL import Image

from app.cli import main
from networks.errors import SdloraError
from tests.tiny_captioners import tiny_blip, tiny_florence2, tiny_wd14
from trainer.captioning.folder import CaptionEvent, FolderRequest, caption_folder, with_prefix
from trainer.captioning.settings import CaptionerSettings
from trainer.demo.demo_data import make_demo_dataset

KEPT = "sdlorastyle, my own caption"
BLUE = "some character (series), blue background, ^_^, simple background"  # the tiny tagger on pure blue
RED = "some character (series), red theme, ^_^, simple background"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("captioners")
    return {"blip": tiny_blip(root / "blip"), "florence2": tiny_florence2(root / "florence2"),
            "wd14": tiny_wd14(root / "wd14")}


@pytest.fixture
def demo(tmp_path):
    """Four demo images; the first keeps a caption of its own, the others have none."""
    folder = tmp_path / "data"
    make_demo_dataset(folder, count=4)
    (folder / "demo_000.txt").write_text(KEPT + "\n")
    for i in (1, 2, 3):
        (folder / f"demo_00{i}.txt").unlink()
    return folder


@pytest.fixture
def colours(tmp_path):
    folder = tmp_path / "colours"
    folder.mkdir()
    Image.new("RGB", (24, 24), (0, 0, 255)).save(folder / "blue.png")
    Image.new("RGB", (24, 24), (255, 0, 0)).save(folder / "red.png")
    Image.new("RGB", (12, 24), (255, 0, 0)).save(folder / "tall_red.png")  # padded with white to a square
    return folder


def settings_for(models, kind, **changes) -> CaptionerSettings:
    return CaptionerSettings(kind=kind, model_id=str(models[kind]), max_tokens=6, **changes)


def run(folder, settings, **request):
    events: list[CaptionEvent] = []
    summary = caption_folder(FolderRequest(folder, **request), settings, on_event=events.append)
    return summary, events


def caption(folder, name: str) -> str:
    return (folder / name).read_text()


def test_blip_captions_the_images_without_one_prefix_first_and_keeps_the_rest(models, demo):
    before = (demo / "demo_000.txt").stat().st_mtime_ns
    summary, events = run(demo, settings_for(models, "blip"), prefix="mystyle")
    names = ["demo_001.png", "demo_002.png", "demo_003.png"]
    assert (summary.written, summary.kept, summary.empty) == (names, ["demo_000.png"], [])
    assert caption(demo, "demo_000.txt") == KEPT + "\n"
    assert (demo / "demo_000.txt").stat().st_mtime_ns == before  # never rewritten
    for name in names:
        text = caption(demo, name.replace(".png", ".txt"))
        assert text.startswith("mystyle, ") and text.endswith("\n") and len(text) > len("mystyle, \n")
    assert [e.kind for e in events] == ["loading", "started", "captioned", "captioned", "captioned", "finished"]
    captioned = [e for e in events if e.kind == "captioned"]
    assert [(e.done, e.total, e.image) for e in captioned] == [(1, 3, names[0]), (2, 3, names[1]), (3, 3, names[2])]
    assert [e.caption + "\n" for e in captioned] == [caption(demo, n.replace(".png", ".txt")) for n in names]
    assert events[-1] == CaptionEvent("finished", 3, 3)
    assert summary.sentence() == "Wrote 3 caption file(s); kept the 1 existing caption(s)."
    assert not list(demo.glob(".*.tmp"))  # atomic writes leave no temp files


def test_florence2_in_batches_overwrites_every_caption_when_asked(models, demo):
    summary, events = run(demo, settings_for(models, "florence2", batch_size=3, florence_task="caption"),
                          overwrite=True)
    assert summary.written == [f"demo_00{i}.png" for i in range(4)] and summary.kept == []
    assert caption(demo, "demo_000.txt") != KEPT + "\n"
    assert [(e.done, e.total) for e in events if e.kind == "captioned"] == [(1, 4), (2, 4), (3, 4), (4, 4)]


def test_a_folder_with_every_caption_loads_no_model(demo):
    for i in (1, 2, 3):
        (demo / f"demo_00{i}.txt").write_text("done\n")
    # An id that is nowhere: loading it would fail offline, so nothing was loaded.
    summary, events = run(demo, CaptionerSettings(kind="blip", model_id="sdlora-tests/not-a-model"))
    assert (summary.written, len(summary.kept)) == ([], 4) and events == [CaptionEvent("finished")]


def test_wd14_tags_follow_the_image_and_the_thresholds(models, colours):
    summary, _ = run(colours, settings_for(models, "wd14"))
    assert summary.written == ["blue.png", "red.png", "tall_red.png"]
    # Ratings never; characters at 0.85, general tags at 0.35, most likely first; underscores become spaces
    # but a kaomoji keeps its own.
    assert caption(colours, "blue.txt") == BLUE + "\n"
    assert caption(colours, "red.txt") == RED + "\n"
    # The white padding makes half the square blue: p(blue background) = 0.5, above 0.35.
    assert "blue background" in caption(colours, "tall_red.txt")

    run(colours, settings_for(models, "wd14", threshold=0.6, character_threshold=0.5,
                              exclude_tags=("^_^",)), overwrite=True, prefix="mystyle, solo")
    assert caption(colours, "blue.txt") == "mystyle, solo, some character (series), other character, blue background\n"


def test_the_prefix_goes_first_once():
    assert with_prefix("1girl, solo, smile", "mystyle, solo") == "mystyle, solo, 1girl, smile"
    assert with_prefix(" a cat on a mat ", "") == "a cat on a mat"


@pytest.mark.parametrize("kind", ["blip", "florence2", "wd14"])
def test_a_model_that_cannot_be_had_is_one_sentence_naming_it_and_how_to_get_it(kind, demo):
    with pytest.raises(SdloraError) as caught:
        run(demo, CaptionerSettings(kind=kind, model_id="sdlora-tests/not-a-model"))
    message = str(caught.value)
    assert message.startswith("Cannot get the ") and "'sdlora-tests/not-a-model'" in message
    assert "run `hf download sdlora-tests/not-a-model --local-dir not-a-model`" in message
    assert "--model-id FOLDER" in message and "\n" not in message and message.endswith(".")
    assert sorted(p.name for p in demo.glob("*.txt")) == ["demo_000.txt"]  # nothing written


def test_wrong_folders_and_values_are_one_sentence(models, demo, tmp_path):
    def error(**settings) -> str:
        with pytest.raises(SdloraError) as caught:
            run(demo, CaptionerSettings(**settings))
        return str(caught.value)

    assert error(kind="blip", model_id=str(tmp_path / "nope")) == (
        f"The BLIP captioner folder '{tmp_path / 'nope'}' does not exist; give a folder holding config.json, the "
        "weights and the processor files, or a Hugging Face id like Salesforce/blip-image-captioning-large.")
    assert error(kind="blip", model_id=str(models["florence2"])) == (
        f"'{models['florence2']}' holds a florence2 model, not a BLIP captioner; choose the matching captioner "
        "kind, or give a BLIP captioner such as Salesforce/blip-image-captioning-large.")
    assert error(kind="wd14", model_id=str(models["blip"])).startswith(
        f"'{models['blip']}' is not a WD14 tagger folder (no model.onnx or selected_tags.csv); it needs model.onnx")
    assert error(kind="florence2", model_id=str(models["wd14"])).startswith(
        f"'{models['wd14']}' is not a Florence-2 captioner folder (")
    with pytest.raises(SdloraError, match=r"^The tag threshold must be between 0 and 1 \(got 1.5\)\.$"):
        CaptionerSettings(kind="wd14", threshold=1.5)
    with pytest.raises(SdloraError, match=r"^Unknown captioner 'git'; choose one of blip, florence2, wd14\.$"):
        CaptionerSettings(kind="git")


def test_the_caption_command(models, demo, capsys):
    code = main(["caption", str(demo), "--model", "wd14", "--model-id", str(models["wd14"]), "--prefix", "mystyle",
                 "--threshold", "0.6"])
    out = capsys.readouterr().out.splitlines()
    assert code == 0
    assert [line.split(": ")[0] for line in out[:3]] == [f"[{i}/3] demo_00{i}.png" for i in (1, 2, 3)]
    assert out[3] == "Wrote 3 caption file(s); kept the 1 existing caption(s) (--overwrite replaces them)."
    assert caption(demo, "demo_001.txt") == out[0].split(": ", 1)[1] + "\n"
    assert caption(demo, "demo_001.txt").startswith("mystyle, some character (series)")

    code = main(["caption", str(demo), "--model", "wd14", "--model-id", "sdlora-tests/not-a-model", "--overwrite"])
    err = capsys.readouterr().err.splitlines()
    assert code == 1 and err[-1].startswith("error: Cannot get the WD14 tagger 'sdlora-tests/not-a-model'")
    assert all(not line.startswith("Traceback") for line in err)


def test_the_dataset_tab_button_through_gradio_client(models, demo, tmp_path):
    from gradio_client import Client
    from gradio_client.utils import StatusUpdate

    from tests.ui_support import served_ui

    with served_ui(tmp_path / "ui") as app:
        client = Client(app.local_url, verbose=False)  # one session: the opened folder is its state
        opened = client.predict(str(demo), 512, api_name="/dataset_open")
        assert "Captions: 1 of 4 have a `.txt` file" in opened[2]
        job = client.submit(512, "wd14", str(models["wd14"]), "Images without a caption", "mystyle", 0.6,
                            api_name="/captions_auto")
        notice, _, stats, *_ = job.result(timeout=300)
        updates = []
        while not job.communicator.updates.empty():
            updates.append(job.communicator.updates.get_nowait())
        # The wrong kind's folder: the sentence in the tab's notice, nothing written.
        failed = client.predict(512, "blip", str(models["wd14"]), "All images (replaces their captions)", "", 0.35,
                                api_name="/captions_auto")
    assert "Wrote 3 caption file(s); kept the 1 existing caption(s) (choose 'All images (replaces their " \
           "captions)' to replace them)." in html.unescape(notice)
    assert "Captions: 4 of 4 have a `.txt` file" in stats
    assert caption(demo, "demo_000.txt") == KEPT + "\n"
    assert caption(demo, "demo_003.txt").startswith("mystyle, some character (series), ")
    # The progress bar's updates: the model loading, then one per image.
    progress = [(u.progress_data[0].index, u.progress_data[0].length, u.progress_data[0].desc)
                for u in updates if isinstance(u, StatusUpdate) and u.progress_data]
    # gradio_client polls the job's status, so on a busy machine it may miss an update in between: the ones
    # it sees count up, one per image, each naming its image, from the loading to the last image.
    images = progress[1:] if progress[0] == (None, None, "Loading the WD14 tagger") else progress
    assert images and images[-1] == (3, 3, "Captioned demo_003.png")
    counted = [index for index, _, _ in images]
    assert counted == sorted(set(counted))
    assert all((length, desc) == (3, f"Captioned demo_00{index}.png") for index, length, desc in images)
    assert "is not a BLIP captioner folder" in failed[0] and 'class="sd-notice sd-error"' in failed[0]
    assert caption(demo, "demo_001.txt").startswith("mystyle, ")

"""The UI driven through its named API endpoints with gradio_client, against the real `sdlora train`.

One demo training is shared by the module (the flow is the acceptance test): create the demo dataset,
start the `demo` preset on demo:shapes with few steps, stop it, resume it, let it finish; then the file
is loaded in diffusers, inspected, and tried side by side.
"""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from gradio_client import Client
from gradio_client.exceptions import AppError
from PIL import Image

from tests.ui_support import served_ui, wait_for

STEPS = 12
OVERRIDES = [f"train.max_steps={STEPS}", "save.every_steps=3", "sample.every_steps=6"]


@pytest.fixture(scope="module")
def ui(tmp_path_factory):
    root = tmp_path_factory.mktemp("ui-api")
    with served_ui(root) as demo:
        yield demo, Client(demo.local_url, verbose=False), root


@pytest.fixture(scope="module")
def trained(ui):
    """Start, stop, resume and finish one demo run; what was seen on the way, for the tests below."""
    _, client, _ = ui
    demo = client.predict(folder="", count=6, api_name="/create_demo_dataset")
    started = client.predict(dataset=demo["folder"], preset="demo", overrides=OVERRIDES, api_name="/start_training")
    run = started["run"]

    def status():
        return client.predict(run=run, api_name="/run_status")

    running = wait_for(lambda: (s := status())["status"] == "running" and s["step"] >= 1 and s, what="a first step")
    client.predict(run=run, api_name="/stop_training")
    stopped = wait_for(lambda: (s := status())["status"] == "stopped" and s, what="the stopped state")
    resumed = client.predict(run=run, api_name="/resume_training")
    finished = wait_for(lambda: (s := status())["status"] in ("finished", "error") and s, what="the end")
    return {"dataset": demo, "started": started, "running": running, "stopped": stopped, "resumed": resumed,
            "finished": finished}


def test_the_demo_dataset_is_written_beside_the_runs(ui, trained):
    _, _, root = ui
    assert trained["dataset"] == {"folder": str(root / "datasets" / "demo"), "images": 6}


def test_the_check_reports_what_a_start_would_run(ui, trained):
    _, client, _ = ui
    report = client.predict(dataset=trained["dataset"]["folder"], preset="demo",
                            overrides=["network.rank=64", "network.alpha=1"], api_name="/check_training")
    assert report["ok"] and report["errors"] == []
    assert any("alpha 1 with r 64" in warning for warning in report["warnings"])
    assert any(line.startswith("Dataset: 6 usable images") for line in report["info"])
    assert json.loads(report["report_json"])["warnings"] == report["warnings"]


def test_stop_saves_a_checkpoint_and_resume_finishes_from_there(trained):
    assert trained["started"]["status"] == "starting"
    stopped, finished = trained["stopped"], trained["finished"]
    assert 1 <= stopped["step"] < STEPS
    assert stopped["checkpoints"][-1].endswith(f"-step-{stopped['step']:06d}.safetensors")
    assert trained["resumed"]["status"] in ("starting", "running")
    assert (finished["status"], finished["step"], finished["message"]) == ("finished", STEPS, "")
    events = [json.loads(line) for line in open(f"{finished['run_dir']}/events.jsonl")]
    assert [e["start_step"] for e in events if e["event"] == "started"] == [0, stopped["step"]]
    assert any(path.endswith(f"step-{STEPS:06d}-p0.png") for path in finished["samples"])
    # The final file's load check, as the live view shows it.
    assert finished["load_check"]["ok"] and finished["load_check"]["file"] == finished["final_file"]
    assert finished["load_check"]["modules"] > 0


def test_the_final_file_loads_in_diffusers_and_changes_the_unet(trained):
    from diffusers import StableDiffusionPipeline

    from trainer.model.tiny_models import demo_model_path

    final = trained["finished"]["final_file"]
    assert final.endswith("demo-lora.safetensors")
    pipe = StableDiffusionPipeline.from_pretrained(demo_model_path("shapes"), safety_checker=None)
    sample = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    context = torch.randn(1, 77, pipe.unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = pipe.unet(sample, 500, context).sample
        pipe.load_lora_weights(final)
        after = pipe.unet(sample, 500, context).sample
    assert pipe.get_list_adapters()["unet"]
    assert (after - before).abs().max() > 1e-4


def test_runs_presets_and_inspect_are_listed(ui, trained):
    _, client, _ = ui
    runs = client.predict(api_name="/list_runs")
    assert [(r["run"], r["status"], r["step"]) for r in runs] == [(trained["finished"]["run"], "finished", STEPS)]
    presets = {p["name"]: p for p in client.predict(api_name="/list_presets")}
    assert (presets["demo"]["rank"], presets["demo"]["alpha_ratio"]) == (8, 1.0)
    report = client.predict(path=trained["finished"]["final_file"], api_name="/inspect_lora")
    assert report["family"] == "sd1" and report["module_count"] > 0
    assert {g["rank"] for g in report["rank_alpha"]} == {8}


def test_try_shows_the_same_seed_without_and_with_the_lora(ui, trained):
    _, client, _ = ui
    message, without, with_lora, timing = client.predict(
        "demo:shapes", None, trained["finished"]["final_file"], "sdlorastyle, a coral circle", "", 1, 6, 7.0, 0,
        "euler_a", 1.0, api_name="/try_lora")
    assert "demo-lora.safetensors at weight 1" in message
    first, second = np.asarray(Image.open(without)), np.asarray(Image.open(with_lora))
    assert first.shape == second.shape == (64, 64, 3)
    assert np.abs(first.astype(int) - second.astype(int)).max() > 0  # the LoRA changes the image
    # The model stays loaded: the second request skips loading and gives the same base image.
    again = client.predict("demo:shapes", None, trained["finished"]["final_file"], "sdlorastyle, a coral circle",
                           "", 1, 6, 7.0, 0, "euler_a", 0.0, api_name="/try_lora")
    assert "loaded" not in again[3]
    assert np.array_equal(np.asarray(Image.open(again[1])), first)
    assert np.array_equal(np.asarray(Image.open(again[2])), first)  # weight 0 = the base model
    # No LoRA chosen: the base model alone, the same image, and a word on what the second slot is for.
    alone = client.predict("demo:shapes", None, "", "sdlorastyle, a coral circle", "", 1, 6, 7.0, 0, "euler_a",
                           1.0, api_name="/try_lora")
    assert "The base model alone" in alone[0] and alone[2] is None and alone[3].startswith("1 image in")
    assert np.array_equal(np.asarray(Image.open(alone[1])), first)


@pytest.mark.parametrize("overrides, dataset, sentence", [
    (["network.rank=0"], "demo", "network.rank must be an integer >= 1 (got 0)."),
    ([], "empty", "has no images"),
    ([], "missing", "does not exist; check the path."),
    (["train.learning_rate=-1"], "demo", "train.learning_rate must be a number > 0 (got -1)."),
])
def test_user_errors_are_one_sentence(ui, trained, tmp_path, overrides, dataset, sentence):
    _, client, _ = ui
    folders = {"demo": trained["dataset"]["folder"], "empty": str(tmp_path), "missing": str(tmp_path / "nope")}
    with pytest.raises(AppError) as caught:
        client.predict(dataset=folders[dataset], preset="demo", overrides=overrides, api_name="/start_training")
    message = str(caught.value)
    assert sentence in message
    assert "\n" not in message and "Traceback" not in message and message.endswith(".")


def test_form_errors_show_in_the_page(ui, tmp_path):
    _, client, _ = ui
    outputs = client.predict(str(tmp_path / "nope"), 512, api_name="/dataset_open")
    assert "does not exist; check the path." in outputs[0] and 'class="sd-notice sd-error"' in outputs[0]
    (tmp_path / "notes.txt").write_text("no images")
    outputs = client.predict(str(tmp_path), 512, api_name="/dataset_open")
    assert "No usable images in" in outputs[0]


def test_the_browser_gets_files_from_the_runs_folder_only(ui, trained):
    import httpx

    demo, _, root = ui

    def status(path) -> int:
        return httpx.get(f"{demo.local_url}gradio_api/file={path}").status_code

    assert status(trained["finished"]["final_file"]) == 200
    assert status(root / "datasets" / "demo" / "demo_000.png") == 403  # shown as thumbnails only
    assert status("/etc/passwd") == 403
    assert status(Path(__file__).resolve()) == 403  # the working directory is not served either


def test_a_login_is_required_when_auth_is_set(tmp_path):
    with served_ui(tmp_path, auth="me:s3cret") as demo:
        with pytest.raises(Exception):  # noqa: B017 - gradio_client raises different types by version
            Client(demo.local_url, verbose=False).predict(api_name="/list_runs")
        assert Client(demo.local_url, auth=("me", "s3cret"), verbose=False).predict(api_name="/list_runs") == []


def test_deleting_a_run_removes_its_folder(ui, trained):
    _, client, _ = ui
    with pytest.raises(AppError, match="is not a run in"):
        client.predict(run="../datasets", api_name="/delete_run")
    run = trained["finished"]["run"]
    assert client.predict(run=run, api_name="/delete_run") == {"deleted": run}
    assert client.predict(api_name="/list_runs") == []

"""A run's mistakes and accidents, driven as a user would: a bad model or input, skipped and corrupt images,
a full disk, a --set a resumed state would undo; each one sentence, and nothing finished is lost."""

import json
import shutil
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from networks.errors import SdloraError
from tests.training_support import ROOT, events, tiny_config
from trainer.config import TrainConfig, save_config
from trainer.run.loop import train
from trainer.run.run_dir import RunDir


def test_cli_bad_model_is_one_line_and_leaves_no_run_folder(tmp_path, data8):
    out = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "app.cli", "train", "--data", str(data8), "--preset", "demo",
                             "--output", str(out), "--model", "/nope/q.safetensors"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "error: The model /nope/q.safetensors was not found; give a diffusers folder, a .safetensors/.ckpt file "
        "or demo:shapes."]
    assert not out.exists()


def test_cli_names_every_image_it_skips(tmp_path, data8):
    data = tmp_path / "data"
    shutil.copytree(data8, data)
    (data / "broken.png").write_bytes(b"\x89PNG not really")
    out = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "app.cli", "train", "--data", str(data), "--preset", "demo",
                             "--output", str(out), "--no-progress", "--set", "model.path=demo:sd1",
                             "--set", "train.max_steps=1", "--set", "sample.every_steps=0",
                             "--set", "sample.at_start=false"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "Skipped image broken.png: " in result.stderr
    skipped = [e for e in events(out) if e["event"] == "skipped"]
    assert [(e["name"], e["kind"]) for e in skipped] == [("broken.png", "image")]
    assert events(out)[len(skipped)]["event"] == "started" and events(out)[len(skipped)]["num_images"] == 8


def test_full_disk_while_saving_leaves_previous_checkpoint_loadable(tmp_path, data8, monkeypatch):
    import networks.lora_file as lora_file

    cfg = tiny_config(data8, tmp_path / "run", "train.max_steps=4", "save.every_steps=2")
    real_save = lora_file.save_file
    saves = {"n": 0}

    def save_until_full(tensors, path, metadata=None):
        saves["n"] += 1
        if saves["n"] >= 2:
            raise OSError(28, "No space left on device")
        return real_save(tensors, path, metadata=metadata)
    monkeypatch.setattr(lora_file, "save_file", save_until_full)
    with pytest.raises(SdloraError, match="No space left on device"):
        train(cfg, progress=False)
    run = tmp_path / "run"
    assert load_file(run / "checkpoints" / "demo-lora-step-000002.safetensors")
    assert not list((run / "checkpoints").glob("*.tmp")) and not list((run / "checkpoints").glob(".*"))
    assert json.loads((run / "state" / "trainer.json").read_text())["step"] == 2
    assert events(run)[-1]["event"] == "error"


@pytest.mark.parametrize("setup, message", [
    (lambda tmp, data: ([f"dataset.path={tmp / 'empty'}"], "empty"), "No usable images in"),
    (lambda tmp, data: ([f"model.path={tmp / 'nowhere'}"], None), "was not found"),
    (lambda tmp, data: (["network.rank=0"], None), "network.rank must be an integer >= 1 (got 0)"),
    (lambda tmp, data: (["dataset.resolution=500"], None), "multiple of 64"),
    (lambda tmp, data: (["network.rnak=4"], None), "did you mean 'network.rank'?"),
])
def test_bad_input_is_one_sentence(tmp_path, data8, setup, message):
    (tmp_path / "empty").mkdir()
    overrides, _ = setup(tmp_path, data8)
    with pytest.raises(SdloraError) as error:
        train(tiny_config(data8, tmp_path / "run", *overrides), progress=False)
    assert message in str(error.value)
    assert "\n" not in str(error.value)
    assert not (tmp_path / "run" / "my-lora.safetensors").exists()


def test_only_corrupt_images_and_not_a_model_file(tmp_path, data8):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.png").write_bytes(b"not a png")
    (bad / "b.jpg").write_bytes(b"\xff\xd8 broken")
    with pytest.raises(SdloraError, match=r"No usable images in .*bad"):
        train(tiny_config(bad, tmp_path / "run"), progress=False)
    fake = tmp_path / "model.safetensors"
    fake.write_text("hello")
    with pytest.raises(SdloraError) as error:
        train(tiny_config(data8, tmp_path / "run2", f"model.path={fake}"), progress=False)
    assert "model.safetensors" in str(error.value) and "\n" not in str(error.value)


def test_cli_error_is_one_line_on_stderr(tmp_path):
    result = subprocess.run([sys.executable, "-m", "app.cli", "train", "--data", str(tmp_path), "--preset",
                             "demo", "--output", str(tmp_path / "run"), "--set", "network.rank=0"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == "error: network.rank must be an integer >= 1 (got 0)."
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("override", ["train.learning_rate=1e-5", "network.rank=4", "train.optimizer_args.betas=[0.9, 0.9]"])
def test_resume_refuses_a_set_that_its_saved_state_would_undo(tmp_path, capsys, override):
    """The state fixes the network's shapes and the optimizer's rates: such a --set would fail to load (a
    rank) or be silently overwritten (a learning rate), so the CLI says so before loading anything."""
    from app.cli import main

    run = RunDir(tmp_path / "run")
    save_config(TrainConfig(), run.config)
    run.checkpoints.mkdir(parents=True)
    (run.checkpoints / "my-lora-step-00000100.safetensors").write_bytes(b"")
    assert main(["train", "--resume", str(run.root), "--set", override, "--no-progress"]) == 1
    assert capsys.readouterr().err.strip() == (
        f"error: --set {override} cannot change a resumed run: its saved state fixes the network and the "
        "optimizer's rates and schedule; drop it, or start a new run from its last file with "
        f"--set network.weights={run.checkpoints / 'my-lora-step-00000100.safetensors'}.")

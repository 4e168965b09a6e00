"""Training end to end on the tiny models: events, exports that load, overfitting, exact resume, stop."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from networks.errors import SdloraError
from tests.training_support import (
    ROOT,
    built,
    captions,
    events,
    load_in_diffusers,
    resume_run,
    stop_at,
    tiny_config,
)
from tests.ui_support import free_port
from trainer.caches.supply import BatchSupply
from trainer.demo.demo_data import make_demo_dataset
from trainer.model.tiny_models import build_tiny_pipeline, demo_model_path
from trainer.run.loop import Trainer, run_training, train
from trainer.run.run_dir import RunDir


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_cli_trains_locon_two_epochs_and_the_file_loads_in_diffusers(tmp_path, data8, family):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "app.cli", "train", "--model", f"demo:{family}", "--data", str(data8),
           "--preset", "style-locon", "--output", str(out), "--no-progress",
           "--set", "train.epochs=2", "--set", "train.batch_size=4", "--set", "dataset.resolution=128",
           "--set", "dataset.min_bucket_side=64", "--set", "dataset.max_bucket_side=256",
           "--set", "network.rank=4", "--set", "network.conv_rank=2", "--set", "save.every_steps=2",
           "--set", "save.every_epochs=0", "--set", "sample.every_steps=2",
           "--set", 'sample.prompts=[{prompt="sdlorastyle, a circle", steps=2, width=64, height=64}]']
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    log = events(out)
    kinds = [e["event"] for e in log]
    assert kinds[0] == "started" and kinds[-1] == "finished"
    assert {"step", "sample", "checkpoint"} <= set(kinds)
    steps = [e["step"] for e in log if e["event"] == "step"]
    assert steps == list(range(1, log[0]["total_steps"] + 1))
    assert all(set(e) >= {"loss", "lr", "it_per_s", "eta_s"} for e in log if e["event"] == "step")
    assert kinds.index("sample") > kinds.index("step") and kinds.index("checkpoint") > kinds.index("step")
    sample = next(e for e in log if e["event"] == "sample")
    assert all((out / p).is_file() for p in sample["paths"])
    final = out / "my-lora.safetensors"
    state = load_file(final)
    assert any(k.endswith("conv1.lora_down.weight") or "in_layers_2" in k for k in state)
    assert load_in_diffusers(family, final) == len([k for k in state if k.endswith(".alpha")])
    assert f"Saved {final}" in result.stdout
    assert RunDir(out).preset.read_text().strip() == "style-locon"  # the Runs table names the CLI's preset too


def test_overfitting_one_image_lowers_the_loss(tmp_path):
    make_demo_dataset(tmp_path / "one", count=1, seed=3)
    cfg = tiny_config(tmp_path / "one", tmp_path / "run", "train.max_steps=60", "train.batch_size=1",
                      "train.learning_rate=3e-3", "network.rank=8")
    # fixed noise and timestep would make this trivial; with random ones compare window means
    train(cfg, progress=False)
    losses = [e["loss"] for e in events(tmp_path / "run") if e["event"] == "step"]
    first, last = sum(losses[:15]) / 15, sum(losses[-15:]) / 15
    assert last < 0.8 * first, (first, last)


@pytest.mark.parametrize("loading", [[], ["dataset.cache_latents=none", "dataset.num_workers=2"]],
                         ids=["cached", "workers"])
def test_stop_then_resume_equals_an_uninterrupted_run_bit_for_bit(tmp_path, data8, loading):
    flags = ["train.max_steps=6", "train.batch_size=2", "dataset.shuffle_captions=true",
             "dataset.caption_dropout=0.3", "dataset.flip=true", "network.rank_dropout=0.2",
             "dataset.resolution=128", "dataset.min_bucket_side=64", "dataset.max_bucket_side=256",
             "train.lr_scheduler=cosine", "train.gradient_accumulation_steps=2", "train.multires_noise_iterations=4",
             "train.ip_noise_gamma=0.1", "train.debiased_estimation=true", "train.loss_type=huber",
             "train.noise_offset=0.05", "train.noise_offset_random_strength=true", "train.adaptive_noise_scale=0.01",
             "train.ip_noise_gamma_random_strength=true", "train.min_timestep=100", "train.max_timestep=900",
             "train.v_pred_like_loss=0.1", "dataset.caption_dropout_every_n_epochs=2", "train.zero_terminal_snr=true",
             *loading]
    train(tiny_config(data8, tmp_path / "straight", *flags), progress=False)

    assert train(tiny_config(data8, tmp_path / "stopped", *flags), progress=False, on_step=stop_at(3)) is None
    assert [e["event"] for e in events(tmp_path / "stopped")][-1] == "stopped"
    resume_run(tmp_path / "stopped")

    straight = load_file(tmp_path / "straight" / "demo-lora.safetensors")
    resumed = load_file(tmp_path / "stopped" / "demo-lora.safetensors")
    assert straight.keys() == resumed.keys()
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key
    losses = lambda run: [e["loss"] for e in events(run) if e["event"] == "step"]  # noqa: E731
    assert losses(tmp_path / "straight") == losses(tmp_path / "stopped")


def test_sigint_after_first_step_saves_checkpoint_and_exits_zero(tmp_path, data8):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "app.cli", "train", "--data", str(data8), "--preset", "demo", "--output",
           str(out), "--no-progress", "--set", "train.max_steps=500", "--set", "sample.every_steps=0"]
    process = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline:
        if (out / "events.jsonl").is_file() and any(e["event"] == "step" for e in events(out)):
            break
        time.sleep(0.2)
    first_seen = max(e["step"] for e in events(out) if e["event"] == "step")
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr[-2000:]
    stopped = events(out)[-1]
    assert stopped["event"] == "stopped"
    assert stopped["step"] <= first_seen + 2  # the step running when the signal came, at most one more
    assert (out / stopped["checkpoint"]).is_file()
    assert (out / "state" / "trainer.json").is_file()
    assert not (out / "trainer.pid").exists()
    assert "resume with: sdlora train --resume" in stdout


def test_nan_loss_stops_with_an_error_and_keeps_the_checkpoint(tmp_path, data8, monkeypatch):
    cfg = tiny_config(data8, tmp_path / "run", "train.max_steps=6", "save.every_steps=2")
    original = Trainer.micro_step_loss
    calls = {"n": 0}

    def poisoned(self, batch):
        calls["n"] += 1
        loss = original(self, batch)
        return loss * float("nan") if calls["n"] >= 3 else loss
    monkeypatch.setattr(Trainer, "micro_step_loss", poisoned)
    with pytest.raises(SdloraError, match=r"The loss became nan at step 3; the last checkpoint "
                                          r"\(demo-lora-step-000002.safetensors\) is intact; lower "
                                          r"train.learning_rate and continue from it in a new run with "
                                          r"--set network.weights=.*demo-lora-step-000002.safetensors\.$"):
        train(cfg, progress=False)
    assert events(tmp_path / "run")[-1]["event"] == "error"
    checkpoint = tmp_path / "run" / "checkpoints" / "demo-lora-step-000002.safetensors"
    assert checkpoint.is_file() and load_file(checkpoint)
    assert (tmp_path / "run" / "state" / "trainer.json").is_file()


def test_nan_loss_before_any_checkpoint_says_to_start_again(tmp_path, data8, monkeypatch):
    original = Trainer.micro_step_loss
    monkeypatch.setattr(Trainer, "micro_step_loss", lambda self, batch: original(self, batch) * float("nan"))
    with pytest.raises(SdloraError) as error:
        train(tiny_config(data8, tmp_path / "run", "train.max_steps=6", "save.every_epochs=0"), progress=False)
    assert str(error.value) == ("The loss became nan at step 1; no checkpoint was saved yet, so lower "
                                "train.learning_rate and start the run again.")  # no bf16 advice on a CPU
    assert not list((tmp_path / "run" / "checkpoints").glob("*.safetensors"))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="torchrun needs fork-capable platforms")
@pytest.mark.parametrize("cache", ["memory", "disk"])
def test_two_cpu_processes_train_sharded_and_write_one_set_of_files(tmp_path, data8, cache):
    out = tmp_path / "run"
    model = demo_model_path("sd1")  # built once here, before two processes could race for it
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(free_port()), "-m", "app.cli", "train", "--data", str(data8), "--preset", "demo",
           "--model", str(model), "--output", str(out), "--no-progress", "--set", "train.max_steps=4",
           "--set", "sample.every_steps=0", "--set", "save.every_steps=2",
           "--set", f'dataset.cache_latents="{cache}"']
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SDLORA_CACHE": str(tmp_path / "cache")}  # an empty disk cache
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    log = events(out)
    assert [e["step"] for e in log if e["event"] == "step"] == [1, 2, 3, 4]
    assert sum(e["event"] == "started" for e in log) == 1 and log[-1]["event"] == "finished"
    # each process encoded its half of the caches and received the other half (through the disk, or sent)
    assert (log[0]["encoded_images"], log[0]["encoded_captions"]) == (4, len(captions(data8)) // 2)
    assert len(list((tmp_path / "cache" / "latents").glob("*.safetensors"))) == (8 if cache == "disk" else 0)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["demo-lora-step-000002.safetensors"]
    assert load_in_diffusers("sd1", out / "demo-lora.safetensors") > 0
    assert result.stdout.count("Saved ") == 1


def test_kill_9_resumes_from_the_last_checkpoint(tmp_path, data8):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "app.cli", "train", "--data", str(data8), "--preset", "demo", "--output",
           str(out), "--no-progress", "--set", "train.max_steps=8", "--set", "sample.every_steps=0",
           "--set", "save.every_steps=2"]
    process = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        if (out / "events.jsonl").is_file() and any(e["event"] == "checkpoint" for e in events(out)):
            break
        time.sleep(0.1)
    process.kill()
    process.wait()
    saved = json.loads((out / "state" / "trainer.json").read_text())["step"]
    assert (out / "trainer.pid").exists()  # a killed trainer cannot clean up; the UI checks liveness
    result = subprocess.run([sys.executable, "-m", "app.cli", "train", "--resume", str(out), "--no-progress"],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    log = events(out)
    restarted = [e for e in log if e["event"] == "started"][-1]
    assert restarted["start_step"] == saved >= 2
    assert log[-1]["event"] == "finished" and log[-1]["step"] == 8
    assert not (out / "trainer.pid").exists()


def test_gradient_checkpointing_gives_the_same_gradients(tmp_path, data8):
    grads = []
    for checkpointing in ("false", "true"):
        parts = built(tiny_config(data8, tmp_path / checkpointing, f"train.gradient_checkpointing={checkpointing}"))
        torch.manual_seed(0)
        batch = parts.epoch_batches(0)[0]
        parts.network.train()
        Trainer(parts).micro_step_loss(batch).backward()
        grads.append([p.grad.clone() for p in parts.network.parameters()])
        assert parts.model.unet.is_gradient_checkpointing == (checkpointing == "true")
    assert all(g is not None for g in grads[0]) and len(grads[0]) == len(grads[1])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_tensorboard_without_the_package_is_one_sentence(tmp_path, data8, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name == "torch.utils.tensorboard":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    with pytest.raises(SdloraError, match=r"output.tensorboard = true needs the tensorboard package"):
        train(tiny_config(data8, tmp_path / "run", "output.tensorboard=true", "train.max_steps=1"), progress=False)


def test_validation_ema_masks_and_load_checks_in_one_run(tmp_path):
    from PIL import Image

    data = tmp_path / "data"
    make_demo_dataset(data, count=6, seed=2)
    first = sorted(data.glob("*.png"))[0]
    rgba = Image.open(first).convert("RGBA")
    alpha = Image.new("L", rgba.size, 255)
    alpha.paste(0, (0, 0, rgba.size[0] // 2, rgba.size[1]))  # left half leaves the loss
    rgba.putalpha(alpha)
    rgba.save(first)
    cfg = tiny_config(data, tmp_path / "run", "train.max_steps=4", "save.every_steps=2", "validation.images=2",
                      "validation.every_steps=2", "ema.enabled=true", "ema.decay=0.9", "dataset.loss_mask=alpha")
    final = train(cfg, progress=False)
    log = events(tmp_path / "run")
    validations = [e for e in log if e["event"] == "validation"]
    assert [e["step"] for e in validations] == [2, 4]
    assert all(e["loss"] > 0 and len(e["per_timestep"]) == 5 for e in validations)
    assert log[0]["num_images"] == 4  # two held out
    assert (log[0]["encoded_images"], log[0]["encoded_captions"]) == (4, 6)  # one process; 2 held-out captions too
    checks = [e for e in log if e["event"] == "load_check"]
    assert {c["path"] for c in checks} == {"checkpoints/demo-lora-step-000002.safetensors",
                                           "demo-lora.safetensors", "demo-lora-ema.safetensors"}
    assert all(c["ok"] and c["problems"] == [] for c in checks)
    assert log[-1]["ema_path"] == "demo-lora-ema.safetensors"
    ema, plain = load_file(tmp_path / "run" / "demo-lora-ema.safetensors"), load_file(final)
    assert ema.keys() == plain.keys()
    assert any(not torch.equal(ema[k], plain[k]) for k in plain if k.endswith("lora_up.weight"))
    assert load_in_diffusers("sd1", tmp_path / "run" / "demo-lora-ema.safetensors") == len(plain) // 3


def test_cached_runs_drop_the_text_encoder_and_vae_encoder_and_train_the_same(tmp_path, data8, monkeypatch):
    released_run = run_training(tiny_config(data8, tmp_path / "released", "train.max_steps=3"), progress=False)
    released, released_file = released_run.parts, released_run.file
    assert released.model.text_encoders == []  # every caption is in the text cache
    assert not hasattr(released.model.vae, "encoder") and not hasattr(released.model.vae, "decoder")  # no previews
    assert len(released.batches.encode_text._memory) == len({item.caption for item in released.dataset.items})

    monkeypatch.setattr(BatchSupply, "release_encoders", lambda self, previews: None)
    kept_run = run_training(tiny_config(data8, tmp_path / "kept", "train.max_steps=3"), progress=False)
    kept, kept_file = kept_run.parts, kept_run.file
    assert len(kept.model.text_encoders) == 1 and hasattr(kept.model.vae, "encoder")
    a, b = load_file(released_file), load_file(kept_file)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    losses = lambda run: [e["loss"] for e in events(run) if e["event"] == "step"]  # noqa: E731
    assert losses(tmp_path / "released") == losses(tmp_path / "kept")


@pytest.mark.parametrize("flags, keeps_text_encoder, keeps_vae_encoder, keeps_vae_decoder", [
    (["sample.every_steps=2"], True, False, True),  # previews encode their prompts and decode
    (["validation.images=2", "validation.every_steps=2"], False, False, False),  # its captions are cached too
    (["dataset.random_crop=true"], False, True, False),  # random crops are encoded when drawn
    (["dataset.shuffle_captions=true"], True, False, False),  # varying captions are never cached
    (["dataset.cache_latents=none", "dataset.cache_text_encoder_outputs=false"], True, True, False),
])
def test_encoders_stay_while_something_still_needs_them(tmp_path, data8, flags, keeps_text_encoder,
                                                          keeps_vae_encoder, keeps_vae_decoder):
    parts = built(tiny_config(data8, tmp_path / "run", "train.max_steps=1", *flags))
    assert bool(parts.model.text_encoders) == keeps_text_encoder
    assert hasattr(parts.model.vae, "encoder") == keeps_vae_encoder
    assert hasattr(parts.model.vae, "decoder") == keeps_vae_decoder


def test_compiled_training_step_matches_the_eager_one(tmp_path, data8, monkeypatch):
    import trainer.run.build

    monkeypatch.setattr(trainer.run.build, "COMPILE_BACKEND", "eager")  # dynamo traces the LoRA hooks, no C++ build
    compiled_run = run_training(tiny_config(data8, tmp_path / "compiled", "train.max_steps=3", "train.compile=true"),
                                progress=False)
    compiled, compiled_file = compiled_run.parts, compiled_run.file
    assert compiled.loss.unet is not compiled.model.unet
    assert compiled.loss.unet._orig_mod is compiled.model.unet  # one set of weights, adapters included
    eager_run = run_training(tiny_config(data8, tmp_path / "eager", "train.max_steps=3"), progress=False)
    eager, eager_file = eager_run.parts, eager_run.file
    assert eager.loss.unet is eager.model.unet
    losses = lambda run: [e["loss"] for e in events(run) if e["event"] == "step"]  # noqa: E731
    assert losses(tmp_path / "compiled") == pytest.approx(losses(tmp_path / "eager"), rel=1e-5)
    a, b = load_file(compiled_file), load_file(eager_file)
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


@pytest.mark.parametrize("flags", [["dataset.cache_latents=none"], ["dataset.random_crop=true"]])
def test_worker_processes_load_the_same_pixels_ahead_of_the_step(tmp_path, data8, flags):
    common = ["train.max_steps=5", "train.batch_size=2", "dataset.flip=true", *flags]  # 4 batches an epoch
    workers = run_training(tiny_config(data8, tmp_path / "workers", "dataset.num_workers=2", *common),
                           progress=False).parts
    assert workers.batches.prefetch.loader_pids and os.getpid() not in workers.batches.prefetch.loader_pids
    inline = run_training(tiny_config(data8, tmp_path / "inline", *common), progress=False).parts
    assert inline.batches.prefetch is None
    losses = lambda run: [e["loss"] for e in events(run) if e["event"] == "step"]  # noqa: E731
    assert len(losses(tmp_path / "workers")) == 5
    assert losses(tmp_path / "workers") == losses(tmp_path / "inline")


def test_cached_runs_start_no_workers(tmp_path, data8):
    parts = built(tiny_config(data8, tmp_path / "run", "dataset.num_workers=2"))
    assert parts.batches.prefetch is None  # every latent is in the cache: nothing to decode per step


def test_clip_skip_reaches_the_captions_and_the_file(tmp_path, data8):
    from networks.lora_file import read_lora

    final, trainer = run_training(tiny_config(data8, tmp_path / "run", "train.max_steps=1", "model.clip_skip=2"),
                                  progress=False)
    caption = trainer.dataset.items[0].caption
    model = build_tiny_pipeline("sd1")
    expected = trainer.model.family.encode_prompt([model.text_encoder], [model.tokenizer], [caption], clip_skip=2)
    torch.testing.assert_close(trainer.batches.encode_text([caption])["hidden"], expected.encoder_hidden_states)
    assert read_lora(final)[1]["ss_clip_skip"] == "2"


def test_scale_weight_norms_caps_every_module_of_the_exported_file(tmp_path, data8):
    from networks.lora_file import read_lora

    limit = 0.01  # far below what 4 steps at lr 1e-2 reach, so modules are scaled every step
    final = train(tiny_config(data8, tmp_path / "run", "train.max_steps=4", "train.learning_rate=1e-2",
                              f"train.scale_weight_norms={limit}"), progress=False)
    steps = [e for e in events(tmp_path / "run") if e["event"] == "step"]
    assert all(e["keys_scaled"] > 0 and e["max_key_norm"] <= limit * (1 + 1e-5) for e in steps[1:])
    state, metadata = read_lora(final)
    assert metadata["ss_scale_weight_norms"] == str(limit)
    for key in (k for k in state if k.endswith(".lora_down.weight")):
        prefix = key[: -len(".lora_down.weight")]
        up, down = state[f"{prefix}.lora_up.weight"].flatten(1), state[key].flatten(1)
        scale = float(state[f"{prefix}.alpha"]) / down.shape[0]
        assert float(torch.linalg.matrix_norm(up @ down)) * scale <= limit * (1 + 1e-4), prefix


def test_max_token_length_trains_on_every_window_and_is_written_to_the_file(tmp_path):
    from networks.lora_file import read_lora

    make_demo_dataset(tmp_path / "data", count=2, seed=1)
    long_caption = ", ".join(["sdlorastyle"] + ["red circle"] * 40)  # well over 75 tokens
    for caption in (tmp_path / "data").glob("*.txt"):
        caption.write_text(long_caption, encoding="utf-8")
    final, trainer = run_training(tiny_config(tmp_path / "data", tmp_path / "run", "train.max_steps=1",
                                              "model.max_token_length=225", "sample.every_steps=1"), progress=False)
    model = build_tiny_pipeline("sd1")
    expected = trainer.model.family.encode_prompt([model.text_encoder], [model.tokenizer], [long_caption], chunks=3)
    cached = trainer.batches.encode_text([long_caption])["hidden"]  # what the step was conditioned on
    assert cached.shape[1] == 3 * 77
    torch.testing.assert_close(cached, expected.encoder_hidden_states)
    assert read_lora(final)[1]["ss_max_token_length"] == "225"
    assert [e for e in events(tmp_path / "run") if e["event"] == "sample"]  # previews draw (test_family: windows)


def test_reg_images_double_the_epoch_and_prior_loss_weight_zero_makes_their_steps_free(tmp_path):
    from networks.lora_file import read_lora

    make_demo_dataset(tmp_path / "data", count=4, seed=1)
    make_demo_dataset(tmp_path / "reg" / "1_shape", count=6, seed=2)
    for caption in (tmp_path / "reg").rglob("*.txt"):
        caption.unlink()  # reg images go by their class word
    final, trainer = run_training(tiny_config(tmp_path / "data", tmp_path / "run", "train.max_steps=8",
                                              "train.batch_size=1", f"dataset.reg_path={tmp_path / 'reg'}",
                                              "train.prior_loss_weight=0"), progress=False)
    losses = [e["loss"] for e in events(tmp_path / "run") if e["event"] == "step"]
    assert trainer.steps.steps_per_epoch == len(losses) == 8  # 4 training samples + 4 of the 6 reg images
    assert losses.count(0.0) == 4  # a reg-only batch weighs nothing at prior_loss_weight 0
    metadata = read_lora(final)[1]
    assert (metadata["ss_num_train_images"], metadata["ss_num_reg_images"]) == ("4", "4")
    assert "shape" not in json.loads(metadata["ss_tag_frequency"])["data"]  # tags of the training images only


def test_network_weights_continues_a_finished_lora(tmp_path, data8):
    from networks.lora_file import read_lora

    first = train(tiny_config(data8, tmp_path / "first", "train.max_steps=3", "train.learning_rate=1e-2"),
                  progress=False)
    state = read_lora(first)[0]
    cfg = tiny_config(data8, tmp_path / "second", "train.max_steps=2", "network.rank=8", f"network.weights={first}")
    continued = built(cfg).network.kohya_state_dict()
    assert continued.keys() == state.keys()  # the same modules, at the file's rank 4 (not 8)
    for key in state:
        assert torch.equal(continued[key], state[key]), key
    final = train(cfg, progress=False)
    assert read_lora(final)[0]["lora_unet_mid_block_attentions_0_proj_in.lora_down.weight"].shape[0] == 4


def test_network_weights_for_another_model_family_is_one_sentence(tmp_path, data8):
    first = train(tiny_config(data8, tmp_path / "first", "train.max_steps=1"), progress=False)
    cfg = tiny_config(data8, tmp_path / "second", "train.max_steps=1", "model.path=demo:sdxl",
                      f"network.weights={first}")
    with pytest.raises(SdloraError) as error:
        train(cfg, progress=False)
    assert str(error.value) == (f"network.weights {first.name} was made for sd1 but the base model is sdxl; "
                                "continue it on an sd1 model.")


def test_a_continued_run_resumes_after_its_network_weights_file_is_gone(tmp_path, data8):
    # The file's UNet modules at alpha 2, the new text-encoder modules at alpha 4: the written checkpoints
    # fold that into one alpha, so only the run's own copy of the file gives the resume its alphas back.
    first = train(tiny_config(data8, tmp_path / "first", "train.max_steps=2", "network.alpha_ratio=0.5"),
                  progress=False)
    moved = first.rename(tmp_path / "old.safetensors")
    flags = ["train.max_steps=4", f"network.weights={moved}", "save.every_steps=2", "network.train_text_encoder=true"]
    train(tiny_config(data8, tmp_path / "straight", *flags), progress=False)
    assert train(tiny_config(data8, tmp_path / "second", *flags), progress=False, on_step=stop_at(2)) is None
    moved.unlink()  # the user cleaned up the file the run continued
    resumed = resume_run(tmp_path / "second")
    straight = load_file(tmp_path / "straight" / "demo-lora.safetensors")
    assert all(torch.equal(straight[key], tensor) for key, tensor in load_file(resumed).items())


def test_block_weights_leave_zero_blocks_out_of_the_file(tmp_path, data8):
    from networks.lora_file import read_lora
    from trainer.preflight import preflight_report

    cfg = tiny_config(data8, tmp_path / "run", "train.max_steps=2", "network.down_lr_weight=zeros",
                      "network.up_lr_weight=1,1,1,0.5,0.5,0.5", "network.mid_lr_weight=0.25")
    assert ("Block learning-rate weights: IN 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0; MID 0.25; OUT 1, 1, 1, 0.5, 0.5, 0.5, "
            "1, 1, 1, 1, 1, 1. Blocks at 0 get no adapter; the text encoder keeps weight 1.") in preflight_report(cfg).info
    final = train(cfg, progress=False)
    keys = read_lora(final)[0]
    assert not [k for k in keys if k.startswith("lora_unet_down_blocks")]
    assert [k for k in keys if k.startswith("lora_unet_up_blocks")] and [k for k in keys if "mid_block" in k]
    assert load_in_diffusers("sd1", final) == len({k.split(".")[0] for k in keys})
    # The first optimizer group is the middle block's, at 0.25 x; the reported rate is the one set.
    assert {e["lr"] for e in events(tmp_path / "run") if e["event"] == "step"} == {cfg.train.learning_rate}


def test_block_dims_write_mixed_ranks_that_load_everywhere(tmp_path, data8):
    from networks.lora_file import read_lora

    dims = ",".join(["4"] * 12 + ["8"] + ["2"] * 12)  # MID at rank 8, the rest lower
    final = train(tiny_config(data8, tmp_path / "run", "train.max_steps=1", f"network.block_dims={dims}"),
                  progress=False)
    state = read_lora(final)[0]
    ranks = {k.split(".")[0]: t.shape[0] for k, t in state.items() if k.endswith("lora_down.weight")}
    assert ranks["lora_unet_mid_block_attentions_0_proj_in"] == 8
    assert ranks["lora_unet_up_blocks_1_attentions_0_proj_in"] == 2
    assert load_in_diffusers("sd1", final) == len(ranks)

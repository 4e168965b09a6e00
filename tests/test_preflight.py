"""The pre-flight check: steps as the loop counts them, caption and image findings, risky settings, estimates."""

import argparse
import json
import math

import pytest

from app.check_command import add_check_subcommand, add_import_kohya_action
from trainer.config.presets import resolve_config
from trainer.data.dataset import ImageDataset
from trainer.demo.demo_data import make_demo_dataset
from trainer.model.tiny_models import demo_model_path
from trainer.preflight import (
    adapter_parameters,
    model_parameters,
    preflight_report,
    step_plan,
)
from trainer.run.build import step_count


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Demo images in several buckets, a kohya sub-folder with 3 repeats, one corrupt file."""
    folder = tmp_path_factory.mktemp("pf")
    make_demo_dataset(folder, count=5, seed=0)
    make_demo_dataset(folder / "3_extra", count=3, seed=1)
    (folder / "broken.png").write_bytes(b"not a png")
    return folder


def config(data, *overrides, preset="style-lora"):
    base = [f"dataset.path={data}", "dataset.resolution=128", "dataset.min_bucket_side=64",
            "dataset.max_bucket_side=256", "model.path=demo:sd1"]
    return resolve_config(preset, base + list(overrides))


def loop_total(cfg, dataset, world):
    """What the training loop runs (trainer.run.build.step_count, the count build_run gives the Trainer)."""
    count = step_count(cfg, dataset, world)
    return count.total_steps, count.epochs, count.steps_per_epoch


@pytest.mark.parametrize("max_steps", [None, 7])
def test_step_plan_agrees_with_the_training_loop(data, max_steps):
    checked = 0
    for batch in (1, 2, 3, 4):
        for accum in (1, 2, 3):
            for world in (1, 2, 3):
                cfg = config(data, f"train.batch_size={batch}", f"train.gradient_accumulation_steps={accum}",
                             "train.epochs=3", f"train.max_steps={max_steps or 'none'}", "dataset.resolution=256",
                             "dataset.max_bucket_side=512")
                dataset = ImageDataset.scan(cfg.dataset.options(), seed=1)
                per_bucket = {}
                for item in dataset.items:
                    per_bucket[item.bucket] = per_bucket.get(item.bucket, 0) + item.repeats
                plan = step_plan(per_bucket, batch, accum, 3, max_steps, world)
                assert (plan.total_steps, plan.epochs, plan.steps_per_epoch) == loop_total(cfg, dataset, world)
                assert plan.batches_per_process == len(dataset.batches(0, batch, world - 1, world))
                checked += 1
    assert checked == 36 and len(per_bucket) > 1  # several buckets, so per-bucket rounding was exercised


def test_per_bucket_rounding_counts():
    plan = step_plan([3, 3, 1], batch_size=2, accumulation=1, epochs=10)
    assert plan.batches_per_epoch == 5 and plan.rounding == 1 and plan.total_steps == 50  # not ceil(7/2)=4
    assert step_plan(7, 2, epochs=10).total_steps == 40
    two = step_plan([3, 3, 1], 2, accumulation=2, epochs=1, world_size=2)
    assert (two.batches_per_process, two.steps_per_epoch, two.images_per_step) == (3, 2, 8)
    assert "5 batches (1 more for partial batches per bucket)" in plan.words()


def test_report_names_unreadable_images_missing_captions_and_buckets(data, tmp_path):
    (data / "3_extra" / "demo_001.txt").unlink(missing_ok=True)
    report = preflight_report(config(data))
    assert report.ok
    assert any("1 image(s) cannot be read and will be skipped: broken.png" in w for w in report.warnings)
    assert any("1 of 8 images have no .txt caption" in w and "3_extra/demo_001.png" in w for w in report.warnings)
    assert report.data["captions"]["without_caption"] == ["3_extra/demo_001.png"]
    assert sum(b["images"] for b in report.data["buckets"]) == 8
    # style-lora repeats the top-level images 5 times; the 3_extra folder says 3
    assert sum(b["samples"] for b in report.data["buckets"]) == 5 * 5 + 3 * 3 == report.data["steps"]["samples_per_epoch"]
    assert "Buckets:" in report.render() and "#" in report.render()
    assert any("3 images x 3 repeats, 5 images x 5 repeats" in line for line in report.info)


def test_captions_with_another_extension_give_the_fix(tmp_path):
    make_demo_dataset(tmp_path, count=3, seed=2)
    for caption in tmp_path.glob("*.txt"):
        caption.rename(caption.with_suffix(".caption"))
    report = preflight_report(config(tmp_path))
    assert ("No image has a .txt caption, but 3 have .caption files next to them; use them with "
            "--set dataset.caption_extension=.caption.") in report.warnings
    fixed = preflight_report(config(tmp_path, "dataset.caption_extension=.caption"))
    assert not [w for w in fixed.warnings if "caption" in w]
    for caption in tmp_path.glob("*.caption"):
        caption.unlink()
    bare = preflight_report(config(tmp_path))
    assert any(w.startswith("None of the 3 images has a caption (.txt); they train with empty captions") for w in bare.warnings)


def test_kohya_separator_in_captions_is_flagged_until_it_is_configured(tmp_path):
    make_demo_dataset(tmp_path, count=3, seed=2)
    first = sorted(tmp_path.glob("*.txt"))[0]
    first.write_text("sdlorastyle ||| red, blue", encoding="utf-8")
    report = preflight_report(config(tmp_path))
    assert (f"1 caption(s) contain kohya's ||| (e.g. {first.with_suffix('.png').name}) but "
            "dataset.keep_tokens_separator is not '|||', so the text encoder reads it; add "
            "--set dataset.keep_tokens_separator='|||'.") in report.warnings
    fixed = preflight_report(config(tmp_path, "dataset.keep_tokens_separator=|||"))
    assert not [w for w in fixed.warnings if "|||" in w]


def test_captions_longer_than_the_token_window_name_the_setting_that_reads_them(tmp_path):
    make_demo_dataset(tmp_path, count=3, seed=2)
    first = sorted(tmp_path.glob("*.txt"))[0]
    first.write_text(", ".join(["red"] * 40), encoding="utf-8")  # 40 words and 39 commas, a CLIP token each
    image = first.with_suffix(".png").name
    report = preflight_report(config(tmp_path))
    assert (f"1 caption(s) are longer than the 75 tokens the text encoder reads (longest: {image}, 79 tokens), "
            "so their ends are cut off; set model.max_token_length to 150.") in report.warnings
    assert not [w for w in preflight_report(config(tmp_path, "model.max_token_length=150")).warnings
                if "tokens the text encoder reads" in w]
    first.write_text(", ".join(["red"] * 120), encoding="utf-8")  # 239 tokens
    assert any("set model.max_token_length to 225 and shorten the longest." in w
               for w in preflight_report(config(tmp_path)).warnings)


def test_reg_images_are_reported_apart_from_the_training_images(tmp_path):
    make_demo_dataset(tmp_path / "data", count=3, seed=2)
    make_demo_dataset(tmp_path / "reg" / "2_shape", count=5, seed=4)
    (tmp_path / "reg" / "notes").mkdir()
    report = preflight_report(config(tmp_path / "data", f"dataset.reg_path={tmp_path / 'reg'}",
                                     "train.prior_loss_weight=0.5", "dataset.default_repeats=1"))
    assert any(line.startswith("Dataset: 3 usable images") for line in report.info)
    assert (f"Regularization: 2 of 5 images in '{tmp_path / 'reg'}', 4 samples per epoch (as many as the training "
            "folder's); the other 3 are not used (kohya's balance). Their loss weight is 0.5 "
            "(train.prior_loss_weight).") in report.info
    assert any(w.startswith("Regularization: notes is left out: name is not") for w in report.warnings)
    assert not [w for w in report.warnings if "caption" in w]  # reg images have none, and need none


def test_a_continued_lora_file_is_checked_before_training(tmp_path):
    from networks.lora_file import save_lora
    from networks.network import LoraNetwork
    from networks.spec import NetworkSpec
    from trainer.model.tiny_models import build_tiny_pipeline_components

    make_demo_dataset(tmp_path / "data", count=3, seed=2)
    parts = build_tiny_pipeline_components("sd1")
    network = LoraNetwork.create("sd1", parts["unet"], [parts["text_encoder"]], NetworkSpec(rank=4))
    save_lora(tmp_path / "old.safetensors", network.kohya_state_dict(), {"ss_base_model_version": "sd_v1"})
    modules = len(network.adapters)
    report = preflight_report(config(tmp_path / "data", f"network.weights={tmp_path / 'old.safetensors'}"))
    assert (f"Continues old.safetensors: {modules} modules at rank 4, kept at their own rank and alpha; modules it "
            "lacks start fresh.") in report.info and not report.errors
    wrong = preflight_report(config(tmp_path / "data", f"network.weights={tmp_path / 'old.safetensors'}",
                                    "model.path=demo:sdxl"))
    assert ("network.weights old.safetensors was made for sd1 but the base model is sdxl; continue it on an sd1 "
            "model.") in wrong.errors
    with_te = LoraNetwork.create("sd1", parts["unet"], [parts["text_encoder"]],
                                 NetworkSpec(rank=4, train_text_encoder=True))
    save_lora(tmp_path / "te.safetensors", with_te.kohya_state_dict(), {"ss_base_model_version": "sd_v1"})
    untrained = preflight_report(config(tmp_path / "data", f"network.weights={tmp_path / 'te.safetensors'}",
                                        "network.train_text_encoder=false"))
    assert untrained.errors == ["te.safetensors adapts the text encoder, but network.train_text_encoder is false; "
                                "set it to true to continue those modules."]
    missing = preflight_report(config(tmp_path / "data", f"network.weights={tmp_path / 'gone.safetensors'}"))
    assert f"network.weights: LoRA file '{tmp_path / 'gone.safetensors'}' does not exist; check the path." \
        in missing.errors


def test_kohya_noise_options_that_do_nothing_say_so(tmp_path):
    make_demo_dataset(tmp_path, count=3, seed=3)
    report = preflight_report(config(tmp_path, "train.adaptive_noise_scale=0.01",
                                     "train.ip_noise_gamma_random_strength=true", "train.v_pred_like_loss=0.1",
                                     "model.path=demo:sd2"))  # the tiny SD2 predicts v
    assert ("train.adaptive_noise_scale works on train.noise_offset, which is off, so it does nothing; set "
            "train.noise_offset or turn it off.") in report.warnings
    assert any(w.startswith("train.ip_noise_gamma_random_strength works on train.ip_noise_gamma") for w in report.warnings)
    assert ("train.v_pred_like_loss is for epsilon models and this one predicts v, so it is not applied; turn it "
            "off.") in report.warnings


def test_each_risky_setting_gets_its_warning(tmp_path):
    make_demo_dataset(tmp_path, count=3, seed=3)
    sd1 = str(demo_model_path("sd1"))  # a diffusers folder: the family is read from its configs

    def warned(*overrides, preset="style-lora", model=sd1):
        cfg = config(tmp_path, f"model.path={model}", "dataset.resolution=64", *overrides, preset=preset)
        return preflight_report(cfg, preset=preset).warnings

    assert not warned()
    assert any("alpha 1 with r 64 scales every update by 0.0156" in w for w in warned("network.rank=64", "network.alpha=1"))
    assert any("fp16 on SDXL, whose VAE overflows in fp16" in w
               for w in warned("train.mixed_precision=fp16", "model.family=sdxl", model="demo:sdxl"))
    assert any("train.learning_rate 0.002 is 20x the style-lora preset's (0.0001" in w
               for w in warned("train.learning_rate=2e-3"))
    assert any("0.05x the style-lora preset's" in w and "learns nothing" in w for w in warned("train.learning_rate=5e-6"))
    assert any("text-encoder learning rate 0.0005 is high" in w
               for w in warned("network.train_text_encoder=true", "train.text_encoder_lr=5e-4"))
    # the tiny folder model's UNet says 8 latents = 64 px
    assert any("dataset.resolution 128 is far above this sd1 model's native 64 px" in w
               for w in warned("dataset.resolution=128"))
    # 3 images x 5 repeats x 100 epochs at batch 1 = 1500 steps: 500 views of each image
    assert any("Each of the 3 images is seen about 500 times (100 epochs)" in w for w in warned("train.epochs=100"))
    assert not any("seen about" in w for w in warned("train.epochs=40"))
    assert any("prodigy" in w and "0.0001" in w for w in warned("train.optimizer=prodigy"))


def test_blocking_errors(tmp_path):
    make_demo_dataset(tmp_path, count=2, seed=4)
    assert preflight_report(config(tmp_path, "model.path=/no/such/model.safetensors")).errors == [
        "The model /no/such/model.safetensors was not found; give a diffusers folder, a .safetensors/.ckpt file or "
        "demo:shapes."]
    held = preflight_report(config(tmp_path, "validation.images=2", "validation.every_steps=5"))
    assert not held.ok and "validation.images is 2 but the dataset has only 2 usable images" in held.errors[0]
    empty = preflight_report(config(tmp_path, "dataset.path="))
    assert empty.errors == ["dataset.path is empty; give the image folder with --data DIR."]
    nothing = preflight_report(config(tmp_path, "network.down_lr_weight=zeros", "network.mid_lr_weight=0",
                                      "network.up_lr_weight=zeros"))  # the network code's own sentence
    assert nothing.errors == ["Every block's learning-rate weight or rank is 0, so nothing would train; raise "
                              "network.down_lr_weight / mid_lr_weight / up_lr_weight or network.block_dims."]
    lora_as_model = tmp_path / "adapter.safetensors"
    import torch
    from safetensors.torch import save_file

    save_file({"lora_unet_x.lora_down.weight": torch.zeros(1, 1)}, str(lora_as_model))
    assert "is a LoRA/LyCORIS adapter, not a base model" in preflight_report(config(tmp_path, f"model.path={lora_as_model}")).errors[0]


def test_parameter_counts_come_from_the_shipped_configs(tmp_path):
    params = model_parameters("sdxl")
    assert params == {"unet": 2_567_463_684, "text_encoders": 123_060_480 + 694_659_840, "vae": 83_653_863}
    assert model_parameters("sd1")["unet"] == 859_520_964 and model_parameters("sd2", "v_prediction")["text_encoders"] == 340_387_840
    make_demo_dataset(tmp_path, count=1, seed=5)
    cfg = config(tmp_path, "dataset.resolution=512", "dataset.max_bucket_side=1024", "train.mixed_precision=bf16")
    # rank r on one SD1.5 transformer of width C: r(32C + 1536) (proj_in/out, attn1, attn2 with 768-wide
    # context, GEGLU feed-forward); 5 at 320, 5 at 640, 6 at 1280
    assert adapter_parameters("sd1", cfg.network) == 16 * (5 * (32 * 320 + 1536) + 5 * (32 * 640 + 1536)
                                                           + 6 * (32 * 1280 + 1536))


def test_the_report_states_the_traced_peak_and_the_changes_under_a_budget(tmp_path):
    make_demo_dataset(tmp_path, count=1, seed=5)
    report = preflight_report(config(tmp_path, "dataset.resolution=256", "train.memory_budget_gb=0.5"))
    estimate = report.data["estimate"]
    assert estimate["peak_bytes"] >= sum(estimate["parts"].values()) > estimate["parts"]["fixed"] > 0
    assert estimate["fits_gb"] == [6, 8, 12, 16, 24]  # the tiny demo model
    assert any(line.startswith("Predicted GPU memory peak") for line in report.info)
    # 0.5 GiB is below the CUDA context alone: nothing the check knows fits it, and it says so.
    assert estimate["budget_bytes"] == 2 ** 29
    assert any("train on a larger card" in w for w in report.warnings)


def test_scale_is_explained_in_words(tmp_path):
    make_demo_dataset(tmp_path, count=1, seed=6)
    info = preflight_report(config(tmp_path, preset="style-locon")).info
    assert ("Scale: alpha 8 / r 16 = 0.5; the update is multiplied by 0.5, so at the same learning rate it grows 2x "
            "slower than with alpha = r; alpha follows r (alpha_ratio), so changing r keeps this scale.") in info
    assert any(line.startswith("Scale: conv alpha 4 / conv r 8 = 0.5") for line in info)


@pytest.fixture(scope="module")
def model_folders(tmp_path_factory):
    """A diffusers folder of each family, as a user would point model.path at it."""
    from trainer.model.tiny_models import save_demo_model

    root = tmp_path_factory.mktemp("models")
    return {family: str(save_demo_model(root / family, family)) for family in ("sd1", "sd2", "sdxl")}


@pytest.mark.parametrize("model", ["demo:shapes", "demo:sd1", "demo:sd2", "demo:sdxl", "sd1", "sd2", "sdxl"])
def test_the_model_facts_are_what_the_loader_loads(data, model_folders, model):
    from trainer.model.model_loading import load_model

    path = model_folders.get(model, model)
    facts = preflight_report(config(data, f"model.path={path}")).data["model"]
    loaded = load_model(path)
    vae_factor = 2 ** (len(loaded.vae.config.block_out_channels) - 1)
    assert facts == {"family": loaded.family.name, "prediction_type": loaded.prediction_type, "path": path,
                     "zero_terminal_snr": loaded.noise_scheduler.config.rescale_betas_zero_snr,
                     "native_resolution": loaded.unet.config.sample_size * vae_factor}
    assert loaded.noise_scheduler.config.prediction_type == loaded.prediction_type


def test_demo_shapes_is_a_v_prediction_model_with_zero_terminal_snr(data):
    """Its shipped scheduler says so (trainer/assets/demo_shapes), and the noise checks reason from it."""
    report = preflight_report(config(data, "model.path=demo:shapes", "train.v_pred_like_loss=0.1",
                                     "train.zero_terminal_snr=true"))
    assert "Model: sd1, v_prediction prediction; the built-in tiny demo model." in report.info
    assert report.data["model"]["prediction_type"] == "v_prediction" and report.data["model"]["zero_terminal_snr"]
    assert ("train.v_pred_like_loss is for epsilon models and this one predicts v, so it is not applied; turn it "
            "off.") in report.warnings
    assert not [w for w in report.warnings if w.startswith("train.zero_terminal_snr")]


def test_a_machine_without_a_gpu_is_told_what_the_cpu_costs(data, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    info = preflight_report(config(data, "train.mixed_precision=bf16")).info
    assert ("No CUDA GPU here: training runs on the CPU (in fp32: train.mixed_precision bf16 applies on a GPU only), "
            "where the tiny demo model trains in minutes, a full-size model trains hundreds of times slower than on "
            "a GPU; the live view shows the measured rate and ETA from the first steps.") in info


def parser():
    top = argparse.ArgumentParser()
    commands = top.add_subparsers()
    add_check_subcommand(commands)
    presets = commands.add_parser("presets").add_subparsers()
    add_import_kohya_action(presets)
    return top


def test_check_command_exit_codes_and_json(tmp_path, capsys):
    make_demo_dataset(tmp_path / "d", count=2, seed=7)
    args = parser().parse_args(["check", "--data", str(tmp_path / "d"), "--preset", "demo", "--json"])
    assert args.handler(args) == 0
    printed = json.loads(capsys.readouterr().out)
    steps = resolve_config("demo").train.max_steps
    assert printed["ok"] and printed["steps"]["total_steps"] == steps and printed["estimate"]["family"] == "sd1"
    args = parser().parse_args(["check", "--data", str(tmp_path / "d"), "--preset", "demo",
                                "--set", "validation.images=5"])
    assert args.handler(args) == 1
    assert "cannot train" in capsys.readouterr().out


def test_import_kohya_command(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SDLORA_HOME", str(tmp_path / "home"))
    source = tmp_path / "k.json"
    source.write_text(json.dumps({"LoRA_type": "Standard", "network_dim": 16, "network_alpha": 4, "clip_skip": 2,
                                  "xformers": "xformers"}))
    args = parser().parse_args(["presets", "import-kohya", str(source), "from-kohya"])
    assert args.handler(args) == 0
    out = capsys.readouterr().out
    assert "network.alpha_ratio = 0.25" in out and "model.clip_skip = 2" in out and "xformers=" in out
    assert "Saved preset 'from-kohya'" in out
    assert math.isclose(resolve_config("from-kohya").network.resolved_alpha, 4.0)


def test_compile_needs_its_compiler(monkeypatch):
    import shutil

    from trainer.preflight import CheckContext, check_compile

    def checked(cfg):
        ctx = CheckContext(cfg)
        check_compile(ctx, cuda=False)
        return ctx.report

    cfg = resolve_config("demo", ["train.compile=true"])
    monkeypatch.setattr(shutil, "which", lambda name: None)
    report = checked(cfg)
    assert report.warnings == ["train.compile is on but no C++ compiler (c++, g++, clang++ or cl) is on the PATH, "
                               "so compiling will fail at the first step; install one or set train.compile = false."]
    assert any(line.startswith("train.compile: the first step") for line in report.info)
    monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/" + name)
    assert checked(cfg).warnings == []
    report = checked(resolve_config("demo"))
    assert report.warnings == [] and report.info == []


def test_every_fact_table_covers_exactly_the_configs_choices():
    """Tables keyed by a config enumeration (facts per optimizer, the sampler classes) list each of its choices,
    so adding a choice fails here until every table knows it."""
    from typing import get_args

    from trainer.config.choices import Optimizer, Sampler
    from trainer.preflight import OPTIMIZER_FACTS
    from trainer.run.sampling import SAMPLERS

    assert set(OPTIMIZER_FACTS) == set(get_args(Optimizer))
    assert set(SAMPLERS) == set(get_args(Sampler))

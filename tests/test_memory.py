"""The memory model (trainer/memory): a traced step equals a hand count of its tensors, and the savers lower
the predicted peak by the part they should."""

import argparse
import json
import os

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from app.check_command import add_check_subcommand
from trainer.config import TrainConfig
from trainer.config.overrides import apply_overrides
from trainer.demo.demo_data import make_demo_dataset
from trainer.memory import GIB, predict_memory
from trainer.memory.tracer import trace_step

F32 = 4


def test_trace_of_a_tiny_model_equals_a_hand_count_of_its_tensors():
    frozen, trained = nn.Linear(4, 8, device="meta"), nn.Linear(8, 2, device="meta")
    frozen.requires_grad_(False)
    x = torch.zeros(3, 4, device="meta")

    def loss():
        return trained(torch.relu(frozen(x))).square().mean()

    params = list(trained.parameters())
    step = trace_step(list(frozen.parameters()), params, loss,
                      lambda: torch.optim.AdamW(params, foreach=False), max_grad_norm=1.0)
    assert step.frozen_weights == (4 * 8 + 8) * F32  # 160
    weights = (8 * 2 + 2) * F32  # 72
    # weights, gradients and AdamW's two fp32 moments per parameter (the 8 bytes the pre-flight counts for
    # SDXL's adapters); its step counters stay on the host (capturable=False) and are not counted.
    assert step.trainable == weights + weights + 2 * weights
    # Kept for backward: relu's output (3 x 8, read by relu's and the second layer's backward), the second
    # layer's output (3 x 2, read by square's backward) and the loss scalar; the first layer's output and
    # the square die in the forward (nothing frozen needs them).
    assert step.activations == (3 * 8 + 3 * 2 + 1) * F32
    assert step.peak >= step.frozen_weights + step.trainable + step.activations
    # FLOPs: both forward matmuls, and the trained layer's weight gradient (nothing below it needs one).
    assert step.flops == 2 * 3 * 4 * 8 + 2 * 3 * 8 * 2 + 2 * 3 * 8 * 2


def _config(*overrides) -> TrainConfig:
    return apply_overrides(TrainConfig(), ["dataset.path=/nonexistent", *overrides])


def test_gradient_checkpointing_lowers_the_activations_part():
    plain = predict_memory(_config("model.path=demo:sd1", "dataset.resolution=256"))
    checkpointed = predict_memory(_config("model.path=demo:sd1", "dataset.resolution=256",
                                          "train.gradient_checkpointing=true"))
    assert checkpointed.parts["activations"] < plain.parts["activations"] / 2
    assert checkpointed.parts["frozen_weights"] == plain.parts["frozen_weights"]
    assert checkpointed.parts["trainable"] == plain.parts["trainable"]


def test_fp8_base_stores_the_frozen_linear_and_conv_weights_in_one_byte():
    from trainer.memory import _model_configs
    from trainer.memory.meta_model import build_meta_model

    base = ("model.path=demo:sd1", "dataset.resolution=256", "train.mixed_precision=bf16")
    half, fp8 = predict_memory(_config(*base)), predict_memory(_config(*base, "model.fp8_base=true"))
    cfg = _config(*base)
    model = build_meta_model(*_model_configs(cfg), cfg)
    stored = sum(m.weight.numel() for m in model.unet.modules() if type(m) in (nn.Linear, nn.Conv2d))
    # The text encoders are not resident (their states are cached), so the UNet's Linear/Conv weights go
    # from 2 bytes to 1: frozen_weights drops by one byte per such weight.
    assert half.parts["frozen_weights"] - fp8.parts["frozen_weights"] == stored


@pytest.mark.skipif(not os.environ.get("SDLORA_SLOW_TESTS"), reason="traces SDXL at 1024 px several times: "
                    "minutes on a shared 2-core CPU; set SDLORA_SLOW_TESTS=1")
def test_check_on_an_sdxl_single_file_prints_the_peak_and_the_changes_under_8_gb(tmp_path, capsys):
    # A two-tensor file whose keys say SDXL is enough: the pre-flight reads only a .safetensors header
    # (trainer/model/facts.py safetensors_keys -> detect_checkpoint_family), takes the shipped sdxl-base
    # configs for a single file, and the memory trace builds the model from those configs on the meta device;
    # no weight is ever read (a real SDXL-shaped file of zeros would be 6.9 GB).
    model = tmp_path / "sdxl.safetensors"
    save_file({"conditioner.embedders.1.model.ln_final.weight": torch.zeros(1, dtype=torch.float16),
               "model.diffusion_model.out.2.bias": torch.zeros(1, dtype=torch.float16)}, str(model))
    make_demo_dataset(tmp_path / "data", count=1, seed=3)
    top = argparse.ArgumentParser()
    add_check_subcommand(top.add_subparsers())
    base = ["check", "--model", str(model), "--data", str(tmp_path / "data"), "--set", "dataset.resolution=1024",
            "--set", "train.mixed_precision=bf16", "--json"]
    args = top.parse_args(base)
    args.handler(args)
    estimate = json.loads(capsys.readouterr().out)["estimate"]
    assert estimate["family"] == "sdxl" and estimate["parts"]["frozen_weights"] == 2_567_463_684 * 2  # the bf16 UNet alone
    assert estimate["peak_bytes"] > 8 * GIB and set(estimate["parts"]) == {
        "frozen_weights", "trainable", "activations", "largest_temporary", "fixed"}
    args = top.parse_args([*base, "--set", "train.memory_budget_gb=8"])
    args.handler(args)
    changes = json.loads(capsys.readouterr().out)["estimate"]["changes_to_fit"]
    peaks = [change["peak_bytes"] for change in changes]
    assert changes and peaks == sorted(peaks, reverse=True) and peaks[-1] <= 8 * GIB

"""The memory model (trainer/memory): a traced step equals a hand count of its tensors, and the savers lower
the predicted peak by the part they should."""

import torch
from torch import nn

from trainer.config import TrainConfig
from trainer.config.overrides import apply_overrides
from trainer.memory import predict_memory
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

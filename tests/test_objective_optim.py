"""The objective (targets, min-SNR, masks, noise offset) and the optimizer/param-group setup."""

import pytest
import torch
from diffusers import DDPMScheduler

from networks.errors import SdloraError
from networks.network import LoraNetwork, NetworkSpec
from trainer.config import config_from_dict
from trainer.objective import diffusion_loss, min_snr_weights, sample_noise, training_target
from trainer.optimizers import build_lr_scheduler, build_optimizer, parameter_groups
from trainer.tiny_models import build_tiny_pipeline_components

SCHEDULER = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def test_v_prediction_target_is_alpha_noise_minus_sigma_latents():
    latents, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = torch.tensor([0, 500, 999])
    abar = SCHEDULER.alphas_cumprod[t].view(-1, 1, 1, 1)
    expected = abar.sqrt() * noise - (1 - abar).sqrt() * latents
    torch.testing.assert_close(training_target(SCHEDULER, latents, noise, t, "v_prediction"), expected)
    assert training_target(SCHEDULER, latents, noise, t, "epsilon") is noise


def test_min_snr_weights_match_the_closed_form():
    t = torch.tensor([10, 300, 900])
    abar = SCHEDULER.alphas_cumprod[t]
    snr = abar / (1 - abar)
    gamma = 5.0
    eps = torch.minimum(snr, torch.tensor(gamma)) / snr
    torch.testing.assert_close(min_snr_weights(SCHEDULER, t, gamma, "epsilon"), eps)
    torch.testing.assert_close(min_snr_weights(SCHEDULER, t, gamma, "v_prediction"),
                               torch.minimum(snr, torch.tensor(gamma)) / (snr + 1))
    assert eps[0] < 1 and eps[2] == 1  # low-noise steps are down-weighted, high-noise kept


def test_masked_loss_ignores_masked_pixels():
    prediction, target = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    mask = torch.zeros(2, 1, 8, 8)
    mask[:, :, :4] = 1
    t = torch.tensor([100, 200])
    before = diffusion_loss(prediction, target, t, SCHEDULER, "epsilon", mask=mask)
    changed = prediction.clone()
    changed[:, :, 4:] += 100.0
    assert diffusion_loss(changed, target, t, SCHEDULER, "epsilon", mask=mask) == before
    assert diffusion_loss(changed, target, t, SCHEDULER, "epsilon") > before


def test_noise_offset_adds_a_per_channel_constant():
    torch.manual_seed(0)
    plain = sample_noise(torch.zeros(64, 4, 16, 16))
    torch.manual_seed(0)
    offset = sample_noise(torch.zeros(64, 4, 16, 16), noise_offset=0.5)
    shift = offset - plain
    assert torch.allclose(shift, shift[:, :, :1, :1].expand_as(shift), atol=1e-5)
    assert 0.3 < shift[:, :, 0, 0].std() < 0.7


def network_and_train(**train):
    components = build_tiny_pipeline_components("sd1")
    network = LoraNetwork.create("sd1", components["unet"], [components["text_encoder"]],
                                 NetworkSpec(rank=2, train_text_encoder=True))
    cfg = config_from_dict({"train": {"learning_rate": 1e-4, **train}})
    return network, cfg.train


def test_param_groups_give_unet_te_and_loraplus_their_learning_rates():
    network, train = network_and_train(unet_lr=2e-4, text_encoder_lr=5e-5, loraplus_ratio=16)
    lrs = {g["name"]: g["lr"] for g in parameter_groups(network, train)}
    assert lrs == pytest.approx({"unet.down": 2e-4, "unet.up": 32e-4, "text_encoder.down": 5e-5,
                                 "text_encoder.up": 8e-4})
    counted = sum(len(g["params"]) for g in parameter_groups(network, train))
    assert counted == len(list(network.parameters()))


@pytest.mark.parametrize("name", ["adamw", "lion", "prodigy", "adafactor"])
def test_each_optimizer_updates_the_adapter(name):
    pytest.importorskip("prodigyopt") if name == "prodigy" else None
    network, train = network_and_train(optimizer=name, learning_rate=1.0 if name == "prodigy" else 1e-3)
    optimizer = build_optimizer(network, train)
    scheduler = build_lr_scheduler(optimizer, train, total_steps=10)
    before = [p.detach().clone() for p in network.parameters()]
    for p in network.parameters():
        p.grad = torch.ones_like(p)
    optimizer.step()
    scheduler.step()
    moved = sum(not torch.equal(a, b) for a, b in zip(before, network.parameters()))
    assert moved == len(before)


def test_missing_optional_optimizer_is_one_sentence(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_bnb(name, *args, **kwargs):
        if name == "bitsandbytes":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", no_bnb)
    network, train = network_and_train(optimizer="adamw8bit")
    with pytest.raises(SdloraError, match=r"train.optimizer = 'adamw8bit' needs the bitsandbytes package; "
                                          r"run 'pip install bitsandbytes' or choose adamw."):
        build_optimizer(network, train)


@pytest.mark.parametrize("name, expected_mid", [("constant", 1.0), ("linear", 0.5), ("cosine", 0.5)])
def test_lr_schedule_comes_from_diffusers(name, expected_mid):
    network, train = network_and_train(lr_scheduler=name)
    optimizer = build_optimizer(network, train)
    scheduler = build_lr_scheduler(optimizer, train, total_steps=10)
    for _ in range(5):
        optimizer.step()
        scheduler.step()
    assert scheduler.get_last_lr()[0] == pytest.approx(1e-4 * expected_mid)

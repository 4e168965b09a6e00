"""The objective (targets, min-SNR, masks, noise offset) and the optimizer/param-group setup."""

import pytest
import torch
from diffusers import DDPMScheduler

from networks.errors import SdloraError
from networks.network import LoraNetwork
from networks.spec import NetworkSpec
from trainer.config import config_from_dict
from trainer.model.tiny_models import build_tiny_pipeline_components
from trainer.objective.diffusion import (
    debiased_weights,
    diffusion_loss,
    min_snr_weights,
    perturbed_input_noise,
    sample_noise,
    sample_timesteps,
    training_target,
)
from trainer.objective.optimizers import build_lr_scheduler, build_optimizer, parameter_groups

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


def test_prior_loss_weight_scales_each_samples_share_of_the_mean():
    prediction, target = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t = torch.tensor([100, 200])
    first, second = (((prediction[i] - target[i]) ** 2).mean() for i in range(2))
    weighted = diffusion_loss(prediction, target, t, SCHEDULER, "epsilon", sample_weights=torch.tensor([1.0, 0.25]))
    torch.testing.assert_close(weighted, (first + 0.25 * second) / 2)
    torch.testing.assert_close(diffusion_loss(prediction, target, t, SCHEDULER, "epsilon"), (first + second) / 2)


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


def test_multires_noise_adds_coarse_structure_at_unit_std():
    torch.manual_seed(0)
    plain = sample_noise(torch.zeros(8, 4, 64, 64))
    torch.manual_seed(0)
    pyramid = sample_noise(torch.zeros(8, 4, 64, 64), multires_iterations=6, multires_discount=0.4)
    assert pyramid.shape == plain.shape and pyramid.std().item() == pytest.approx(1.0, abs=1e-5)
    # per-channel means: ~1/64 for iid noise, much larger once low frequencies are added
    assert plain.mean((2, 3)).std() < 0.03 and pyramid.mean((2, 3)).std() > 3 * plain.mean((2, 3)).std()
    torch.manual_seed(0)
    assert torch.equal(sample_noise(torch.zeros(8, 4, 64, 64), multires_iterations=6, multires_discount=0.4),
                       pyramid)  # from torch's RNG only: reproducible, so resumes stay exact


def test_input_perturbation_noises_the_input_not_the_target():
    noise = torch.randn(64, 4, 32, 32)
    assert perturbed_input_noise(noise, None) is noise and perturbed_input_noise(noise, 0.0) is noise
    extra = perturbed_input_noise(noise, 0.1) - noise
    assert extra.std().item() == pytest.approx(0.1, rel=0.02)


def test_debiased_weights_match_the_closed_form():
    t = torch.tensor([0, 300, 900])
    abar = SCHEDULER.alphas_cumprod[t]
    snr = torch.clamp(abar / (1 - abar), max=1000)
    torch.testing.assert_close(debiased_weights(SCHEDULER, t, "epsilon"), 1 / snr.sqrt())
    torch.testing.assert_close(debiased_weights(SCHEDULER, t, "v_prediction"), 1 / (snr + 1))
    prediction, target = torch.ones(3, 4, 2, 2), torch.zeros(3, 4, 2, 2)
    loss = diffusion_loss(prediction, target, t, SCHEDULER, "epsilon", debiased=True)
    torch.testing.assert_close(loss, (1 / snr.sqrt()).mean())


def test_kohya_noise_settings_import():
    from trainer.config.kohya_import import import_kohya_preset

    result = import_kohya_preset({"multires_noise_iterations": "8", "multires_noise_discount": 0.3,
                                  "ip_noise_gamma": 0.1, "debiased_estimation_loss": True})
    assert result.config["train"] == {"multires_noise_iterations": 8, "multires_noise_discount": 0.3,
                                      "ip_noise_gamma": 0.1, "debiased_estimation": True}
    off = import_kohya_preset({"multires_noise_iterations": 0, "multires_noise_discount": 0})
    assert off.config["train"] == {"multires_noise_iterations": 0}  # kohya's 0 discount means unset


def test_pseudo_huber_is_quadratic_for_small_errors_and_linear_for_large_ones():
    from trainer.objective.diffusion import pixel_loss

    c = torch.tensor([0.1])
    small, large = torch.full((1, 4), 0.001), torch.full((1, 4), 10.0)
    zero = torch.zeros(1, 4)
    small64, zero64 = small.double(), zero.double()  # float64: sqrt(d^2 + c^2) - c cancels in float32
    torch.testing.assert_close(pixel_loss(small64, zero64, "huber", c), pixel_loss(small64, zero64, "l2"),
                               rtol=1e-4, atol=0)
    torch.testing.assert_close(pixel_loss(large, zero, "huber", c), 2 * 0.1 * (10.0 - 0.1) * torch.ones(1, 4),
                               rtol=1e-4, atol=0)  # ~2c|d|: an outlier pulls linearly
    torch.testing.assert_close(pixel_loss(large, zero, "smooth_l1", c),
                               2 * (torch.sqrt(torch.tensor(100.0 + 0.01)) - 0.1) * torch.ones(1, 4))
    assert torch.equal(pixel_loss(large, zero, "l2"), large ** 2)


def test_huber_c_schedules():
    from trainer.objective.diffusion import huber_c_per_sample

    t = torch.tensor([0, 999])
    torch.testing.assert_close(huber_c_per_sample(SCHEDULER, t, 0.1, "constant"), torch.tensor([0.1, 0.1]))
    exponential = huber_c_per_sample(SCHEDULER, t, 0.1, "exponential")
    assert exponential[0].item() == pytest.approx(1.0) and exponential[1].item() == pytest.approx(0.1, rel=0.01)
    snr = huber_c_per_sample(SCHEDULER, t, 0.1, "snr")
    abar = SCHEDULER.alphas_cumprod[t]
    torch.testing.assert_close(snr, 0.9 / (1 + ((1 - abar) / abar).sqrt()) ** 2 + 0.1)
    assert snr[0] > 0.9 and snr[1] < 0.11  # near L2 where the noise is small, robust where it dominates


def test_kohya_huber_settings_import():
    from trainer.config.kohya_import import import_kohya_preset

    result = import_kohya_preset({"loss_type": "huber", "huber_c": "0.2", "huber_schedule": "exponential"})
    assert result.config["train"] == {"loss_type": "huber", "huber_c": 0.2, "huber_schedule": "exponential"}


def test_timesteps_stay_in_kohyas_min_max_range():
    t = sample_timesteps(4000, 1000, "cpu", low=200, high=400)
    assert int(t.min()) == 200 and int(t.max()) == 399
    assert int(sample_timesteps(4000, 1000, "cpu").max()) == 999


def test_random_strength_scales_the_noise_offset_and_input_perturbation_by_one_draw():
    latents = torch.zeros(2, 4, 8, 8)
    torch.manual_seed(0)
    offset = sample_noise(latents, 0.1, offset_random_strength=True)
    torch.manual_seed(0)
    plain, strength, channel = torch.randn(latents.shape), torch.rand(()), torch.randn(2, 4, 1, 1)
    torch.testing.assert_close(offset, plain + 0.1 * strength * channel)
    torch.manual_seed(1)
    perturbed = perturbed_input_noise(plain, 0.1, random_strength=True)
    torch.manual_seed(1)
    gamma = 0.1 * float(torch.rand(()))
    torch.testing.assert_close(perturbed, plain + gamma * torch.randn(plain.shape))


def test_adaptive_noise_grows_the_offset_with_each_channels_brightness():
    latents = torch.zeros(1, 4, 8, 8)
    latents[0, 1] = 2.0  # a bright channel: |mean| 2
    latents[0, 2] = -1.0  # a dark one: |mean| 1
    torch.manual_seed(0)
    noise = sample_noise(latents, 0.05, adaptive_noise_scale=0.5)
    torch.manual_seed(0)
    plain, channel = torch.randn(latents.shape), torch.randn(1, 4, 1, 1)
    per_channel = torch.tensor([0.05, 0.05 + 0.5 * 2, 0.05 + 0.5 * 1, 0.05]).view(1, 4, 1, 1)
    torch.testing.assert_close(noise, plain + per_channel * channel)


def test_v_pred_loss_scales_follow_kohyas_snr_over_snr_plus_one():
    prediction, target = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t = torch.tensor([10, 900])
    per_sample = ((prediction - target) ** 2).flatten(1).mean(1)
    snr = SCHEDULER.alphas_cumprod[t] / (1 - SCHEDULER.alphas_cumprod[t])
    scale = snr / (snr + 1)
    scaled = diffusion_loss(prediction, target, t, SCHEDULER, "v_prediction", scale_v_like_noise=True)
    torch.testing.assert_close(scaled, (per_sample * scale).mean())
    added = diffusion_loss(prediction, target, t, SCHEDULER, "epsilon", v_pred_like_loss=0.1)
    torch.testing.assert_close(added, (per_sample + per_sample / scale * 0.1).mean())


def test_zero_terminal_snr_makes_the_last_step_noise_and_keeps_weights_finite():
    from trainer.objective.diffusion import with_zero_terminal_snr

    fixed = with_zero_terminal_snr(SCHEDULER)
    assert float(fixed.alphas_cumprod[-1]) == 2**-24  # pure noise, up to the 2**-24 that keeps SNR finite
    assert float(SCHEDULER.alphas_cumprod[-1]) > 1e-3  # the original schedule leaves signal at t = 999
    torch.testing.assert_close(fixed.alphas_cumprod[0], SCHEDULER.alphas_cumprod[0])  # the first step keeps it
    prediction, target = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t = torch.tensor([999, 500])
    loss = diffusion_loss(prediction, target, t, fixed, "epsilon", min_snr_gamma=5, debiased=True,
                          v_pred_like_loss=0.1)
    assert torch.isfinite(loss)

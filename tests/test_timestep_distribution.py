"""train.timestep_distribution: each shape drawn inside min/max_timestep, uniform the draw it always was, the
pre-flight's histogram, one-sentence errors, kohya's timestep_sampling imported, and exact resume."""

import math

import pytest
import torch
from safetensors.torch import load_file

from networks.errors import SdloraError
from tests.training_support import events, resume_run, stop_at, tiny_config
from trainer.config import TrainSection, config_from_dict
from trainer.config.choices import TimestepDistribution
from trainer.config.kohya_import import import_kohya_preset
from trainer.config.presets import resolve_config
from trainer.objective.diffusion import Objective
from trainer.objective.timesteps import sample_timesteps, timestep_shares
from trainer.preflight import CHECKS
from trainer.preflight.context import CheckContext
from trainer.preflight.timesteps import check_timesteps
from trainer.run.loop import train

KINDS = TimestepDistribution.__args__


def drawn(n, low, high, seed=0, **keys):
    torch.manual_seed(seed)
    return sample_timesteps(n, 1000, "cpu", low, high, TrainSection(**keys))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("low", "high"), [(100, 900), (0, 1000), (500, 503)])
def test_every_distribution_draws_inside_min_and_max(kind, low, high):
    steps = drawn(4000, low, high, timestep_distribution=kind, timestep_std=3, timestep_sigmoid_scale=10,
                  timestep_parabola_weight=100, timestep_parabola_bias=0.5)
    assert steps.dtype == torch.long and steps.shape == (4000,)
    assert int(steps.min()) >= low and int(steps.max()) <= high - 1
    if high - low == 3:  # a narrow range still reaches each of its integers
        assert set(steps.tolist()) == {500, 501, 502}


def test_uniform_is_bit_identical_to_the_draw_before_distributions():
    torch.manual_seed(7)
    old = torch.randint(100, 900, (64,)).long()
    after_old = torch.get_rng_state()
    assert torch.equal(drawn(64, 100, 900, seed=7), old)
    assert torch.equal(torch.get_rng_state(), after_old)  # and leaves the RNG where it did
    torch.manual_seed(7)
    assert torch.equal(sample_timesteps(64, 1000, "cpu", 100, 900), old)  # no config: uniform too
    # The training step's draw: noise first, then the timesteps, as before.
    scheduler = type("S", (), {"config": type("C", (), {"num_train_timesteps": 1000})(),
                               "add_noise": staticmethod(lambda latents, noise, t: latents)})()
    objective = Objective(TrainSection(min_timestep=100, max_timestep=900), scheduler, "epsilon")
    torch.manual_seed(3)
    _, _, timesteps = objective.noised(torch.zeros(4, 4, 8, 8))
    torch.manual_seed(3)
    torch.randn((4, 4, 8, 8))
    assert torch.equal(timesteps, torch.randint(100, 900, (4,)).long())


@pytest.mark.parametrize(("mean", "std"), [(0.0, 1.0), (1.0, 1.0), (-1.0, 0.5)])
def test_logit_normal_median_is_the_sigmoid_of_its_mean(mean, std):
    steps = drawn(20000, 0, 1000, timestep_distribution="logit_normal", timestep_mean=mean, timestep_std=std)
    expected = 1000 / (1 + math.exp(-mean))  # 500, 731, 269
    assert abs(float(steps.float().median()) - expected) < 12
    # std narrows it: the middle half of the draws lies within the normal's quartiles mapped the same way
    q = 0.6745 * std
    assert float(torch.quantile(steps.float(), 0.75)) == pytest.approx(1000 / (1 + math.exp(-(mean + q))), abs=12)


def test_each_shape_has_its_papers_statistics():
    beta = drawn(20000, 0, 1000, timestep_distribution="beta", timestep_beta_a=3, timestep_beta_b=1).float()
    assert float(beta.mean()) == pytest.approx(3 / 4 * 1000 - 0.5, abs=8)  # Beta(3, 1) mean 3/4
    cos = drawn(20000, 0, 1000, timestep_distribution="cos_map").float()
    assert float(cos.median()) == pytest.approx(500, abs=15)  # t(u = 1/2) = 1/2
    flat_tail = drawn(20000, 0, 1000, timestep_distribution="heavy_tail", timestep_heavy_tail_scale=0).float()
    assert float(flat_tail.mean()) == pytest.approx(499.5, abs=8) and float(flat_tail.std()) == pytest.approx(
        1000 / math.sqrt(12), abs=8)  # s = 0 is uniform
    middle = lambda steps: float(((steps >= 250) & (steps < 750)).float().mean())  # noqa: E731
    assert middle(drawn(20000, 0, 1000, timestep_distribution="heavy_tail")) > 0.6  # SD3's s 1.29: the middle
    assert middle(drawn(20000, 0, 1000, timestep_distribution="sigmoid", timestep_sigmoid_scale=4)) < 0.35
    parabola = drawn(20000, 0, 1000, timestep_distribution="inverted_parabola").float()
    assert float(parabola.mean()) == pytest.approx(500, abs=8) and float(parabola.std()) == pytest.approx(
        1000 / math.sqrt(20), abs=8)  # weight 8: 1 - (2x - 1)^2, Beta(2, 2)'s spread
    shifted = drawn(20000, 0, 1000, timestep_distribution="inverted_parabola", timestep_parabola_bias=0.3)
    assert float(shifted.float().mean()) > 650


@pytest.mark.parametrize(("train", "message"), [
    ({"timestep_distribution": "shift"}, "train.timestep_distribution must be 'uniform', 'logit_normal', 'sigmoid', "
                                         "'beta', 'cos_map', 'heavy_tail' or 'inverted_parabola' (got 'shift')."),
    ({"timestep_std": 0}, "train.timestep_std must be a number > 0 (got 0)."),
    ({"timestep_beta_a": -1}, "train.timestep_beta_a must be a number > 0 (got -1)."),
    ({"timestep_heavy_tail_scale": 2}, "train.timestep_heavy_tail_scale must be a number <= 1.75 (got 2)."),
    ({"timestep_mean": "high"}, "train.timestep_mean must be a number (got 'high')."),
])
def test_bad_parameters_are_one_sentence(train, message):
    with pytest.raises(SdloraError) as info:
        config_from_dict({"train": train})
    assert str(info.value) == message


def test_the_preflight_shows_the_histogram_and_unused_parameters():
    assert check_timesteps in CHECKS
    cfg = resolve_config("demo", ["train.timestep_distribution=logit_normal", "train.min_timestep=100",
                                  "train.max_timestep=900", "train.timestep_beta_a=2"])
    ctx = CheckContext(cfg)
    check_timesteps(ctx)
    text = ctx.report.render()
    shares = timestep_shares(cfg.train, 1000)
    assert [(first, last) for first, last, _ in shares] == [(100 + 80 * i, 179 + 80 * i) for i in range(10)]
    assert sum(share for *_, share in shares) == pytest.approx(1.0)
    assert "Timesteps are drawn logit-normal (mean 0, std 1) from 100 to 899: ▁▄▆▇██▇▆▃▁ (10 bins; the fullest " \
           "holds 16% of the draws)." in text
    assert "  - t 420-499 ████████████████████████  15.8%" in text  # the fullest bin, a full bar
    assert "  - t 100-179 ██▏                        1.4%" in text  # 1.4 / 15.8 of it, in eighths
    assert ("! train.timestep_beta_a shapes timestep_distribution beta, but this run draws logit_normal, so it does "
            "nothing; set train.timestep_distribution = beta or reset it.") in text
    assert [b["share"] for b in ctx.report.data["timesteps"]["bins"]] == [round(s, 4) for *_, s in shares]
    uniform = CheckContext(resolve_config("demo", []))
    check_timesteps(uniform)
    assert uniform.report.info == ["Timesteps are drawn uniformly from 0 to 999: ██████████ (10 bins; the fullest "
                                   "holds 10% of the draws)."]  # no bars for a flat line
    assert not uniform.report.warnings


def test_kohya_timestep_sampling_imports_or_is_named():
    sigmoid = import_kohya_preset({"timestep_sampling": "sigmoid", "sigmoid_scale": "1.5", "min_timestep": 100})
    assert sigmoid.config["train"] == {"timestep_distribution": "sigmoid", "timestep_sigmoid_scale": 1.5,
                                       "min_timestep": 100}
    assert not {"timestep_sampling", "sigmoid_scale"} & set(sigmoid.unmapped)
    uniform = import_kohya_preset({"timestep_sampling": "uniform", "sigmoid_scale": 1.0})
    assert uniform.config["train"] == {"timestep_distribution": "uniform"}
    assert uniform.unmapped == {"sigmoid_scale": 1.0}  # kohya's uniform does not read it
    shift = import_kohya_preset({"timestep_sampling": "shift", "sigmoid_scale": 1.0, "discrete_flow_shift": 3.0})
    assert "train" not in shift.config
    assert shift.unmapped == {"timestep_sampling": "shift", "sigmoid_scale": 1.0, "discrete_flow_shift": 3.0}
    assert "timestep_sampling='shift'" in shift.text()


def test_a_stopped_and_resumed_logit_normal_run_draws_the_same_timesteps(tmp_path, data4, monkeypatch):
    """Output preservation is on too: one stopped run checks that resuming repeats both."""
    drawn_steps = []
    noised = Objective.noised

    def recording(self, latents):
        out = noised(self, latents)
        drawn_steps.append(out[2].tolist())
        return out

    monkeypatch.setattr(Objective, "noised", recording)
    flags = ["train.max_steps=4", "train.batch_size=2", "train.timestep_distribution=logit_normal",
             "train.timestep_mean=0.8", "train.timestep_std=0.5", "train.min_timestep=100", "train.max_timestep=900",
             "train.preservation_caption=a circle"]
    train(tiny_config(data4, tmp_path / "straight", *flags), progress=False)
    straight, drawn_steps[:] = list(drawn_steps), []
    assert train(tiny_config(data4, tmp_path / "stopped", *flags), progress=False, on_step=stop_at(2)) is None
    resume_run(tmp_path / "stopped")
    assert drawn_steps == straight and len(straight) == 4
    every = [t for step in straight for t in step]
    assert all(100 <= t <= 899 for t in every) and sum(every) / len(every) > 560  # mean 0.8: noisier draws
    a, b = load_file(tmp_path / "straight" / "demo-lora.safetensors"), load_file(
        tmp_path / "stopped" / "demo-lora.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    losses = lambda run: [e["loss"] for e in events(run) if e["event"] == "step"]  # noqa: E731
    assert losses(tmp_path / "straight") == losses(tmp_path / "stopped")

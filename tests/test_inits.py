"""rsLoRA, PiSSA and LoRA-GA: the exported file, loaded by diffusers on the original base, reproduces
the trained model; the base-moving inits leave step-0 outputs unchanged."""

import pytest
import torch
from diffusers import DiffusionPipeline
from safetensors.torch import load_file

from networks.errors import SdloraError
from networks.inits import loraga_init, pissa_init
from networks.network import LoraNetwork
from networks.spec import NetworkSpec
from tests.helpers import unet_out
from trainer.config.presets import resolve_config
from trainer.demo.demo_data import make_demo_dataset
from trainer.model.tiny_models import build_tiny_pipeline_components, demo_model_path
from trainer.run.loop import run_training


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    make_demo_dataset(folder, count=4, seed=1)
    return folder


def trained(tmp_path, data, *overrides):
    cfg = resolve_config("demo", [f"dataset.path={data}", f"output.dir={tmp_path / 'run'}", "train.max_steps=3",
                                  "model.path=demo:sd1", "sample.at_start=false",
                                  "sample.every_steps=0", "save.every_steps=0", "save.precision=fp32",
                                  "network.rank=4", "network.type=locon", "network.conv_rank=2",
                                  "train.learning_rate=5e-3", *overrides])
    final, parts = run_training(cfg, progress=False)
    parts.network.eval()
    return parts, final


def diffusers_output(lora_path):
    pipe = DiffusionPipeline.from_pretrained(demo_model_path("sd1"))
    pipe.load_lora_weights(str(lora_path))
    return unet_out({"unet": pipe.unet})


@pytest.mark.parametrize("overrides, exported_rank", [
    (["network.init=pissa"], 8), (["network.init=loraga", "network.loraga_batches=2"], 8),
    (["network.rslora=true"], 4)])
def test_exported_file_reproduces_the_trained_model_on_the_original_base(tmp_path, data, overrides,
                                                                         exported_rank):
    trainer, final = trained(tmp_path, data, *overrides)
    expected = unet_out({"unet": trainer.model.unet})
    state = load_file(final)
    ranks = {v.shape[0] for k, v in state.items() if k.endswith("to_q.lora_down.weight")}
    assert ranks == {exported_rank}
    torch.testing.assert_close(diffusers_output(final), expected, rtol=1e-4, atol=1e-5)


def test_svd_export_reranks_to_r_and_reports_the_error(tmp_path, data):
    trainer, final = trained(tmp_path, data, "network.init=pissa", "network.export=svd")
    from safetensors import safe_open

    with safe_open(str(final), "pt") as handle:
        error = float(handle.metadata()["sdlora_rerank_max_relative_error"])
        ranks = {handle.get_tensor(k).shape[0] for k in handle.keys() if k.endswith("to_q.lora_down.weight")}
    assert ranks == {4}
    assert 0 <= error < 1
    assert max(trainer.network.export_errors.values()) == pytest.approx(error, rel=1e-5)


@pytest.mark.parametrize("init", ["pissa", "loraga"])
def test_base_moving_inits_change_no_output_and_detach_restores_the_base(init):
    components = build_tiny_pipeline_components("sd1")
    before = unet_out(components)
    weights = {k: v.clone() for k, v in components["unet"].state_dict().items()}
    network = LoraNetwork.create("sd1", components["unet"], [], NetworkSpec(rank=2, alpha=1.0)).attach()
    for adapter in network.adapters.values():
        if init == "pissa":
            pissa_init(adapter)
        else:
            loraga_init(adapter, torch.randn_like(adapter.base.weight))
    assert all(a.lora_up.weight.abs().sum() > 0 for a in network.adapters.values())
    torch.testing.assert_close(unet_out(components), before, rtol=1e-4, atol=1e-5)
    network.detach()
    for key, value in components["unet"].state_dict().items():
        assert torch.equal(value, weights[key]), key


def test_pissa_takes_the_principal_part_of_the_weight():
    layer = torch.nn.Linear(16, 12)
    network = LoraNetwork.create("sd1", _wrap(layer), [], NetworkSpec(rank=3, alpha=3.0))
    adapter = next(iter(network.adapters.values()))
    original = layer.weight.detach().clone()
    pissa_init(adapter)
    u, s, vh = torch.linalg.svd(original)
    torch.testing.assert_close(adapter.delta_weight(), (u[:, :3] * s[:3]) @ vh[:3], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(layer.weight + adapter.delta_weight(), original, rtol=1e-5, atol=1e-6)


def test_rslora_scale_and_exported_alpha():
    layer = torch.nn.Linear(16, 16)
    network = LoraNetwork.create("sd1", _wrap(layer), [], NetworkSpec(rank=4, alpha=2.0, rslora=True))
    adapter = next(iter(network.adapters.values()))
    assert adapter.scale == pytest.approx(2.0 / 2)  # alpha / sqrt(r)
    alpha = float(next(v for k, v in network.kohya_state_dict().items() if k.endswith(".alpha")))
    assert alpha / 4 == pytest.approx(adapter.scale)  # loaders compute alpha / r


def test_rank_too_large_for_loraga_is_one_sentence():
    layer = torch.nn.Linear(6, 6)
    network = LoraNetwork.create("sd1", _wrap(layer), [], NetworkSpec(rank=4, alpha=4.0))
    with pytest.raises(SdloraError, match=r"Rank 4 is too large for this init on a \(6, 6\) weight"):
        loraga_init(next(iter(network.adapters.values())), torch.randn(6, 6))


def _wrap(layer):
    """A module tree whose path matches the UNet's attention target table."""
    attn = torch.nn.Module()
    attn.to_q = layer
    block = torch.nn.Module()
    block.attn1 = attn
    root = torch.nn.Module()
    root.transformer_blocks = torch.nn.ModuleList([block])
    return root

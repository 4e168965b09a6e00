"""fp8 base weights (model.fp8_base, kohya's --fp8_base): frozen layers stored in float8_e4m3fn, computing in the
run's precision; the adapters, the exported file and the previews unchanged in form."""

import math

import pytest
import torch
from safetensors import safe_open
from torch import nn

from networks.errors import SdloraError
from networks.lora import LoraModule
from tests.training_support import tiny_config
from trainer.config.kohya_import import import_kohya_preset
from trainer.model.fp8 import FP8, Fp8Conv2d, Fp8Linear, fp8_layers, store_fp8
from trainer.run.loop import run_training

# float8_e4m3fn keeps 3 mantissa bits: a normal value is rounded by at most 2^-4 of itself.
FP8_RELATIVE_STEP = 2.0**-4


def _layers():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 48), nn.SiLU(), nn.Unflatten(1, (3, 4, 4)), nn.Conv2d(3, 8, 3, padding=1))


def test_store_fp8_keeps_each_layer_within_fp8_rounding_at_a_quarter_of_the_bytes():
    full = _layers()
    stored = _layers()
    fp32_bytes = sum(m.weight.nbytes for m in stored if isinstance(m, (nn.Linear, nn.Conv2d)))
    keys = {k: v.shape for k, v in stored.state_dict().items()}
    assert store_fp8(stored, torch.float32) == 2
    assert [type(m) for m in fp8_layers(stored)] == [Fp8Linear, Fp8Conv2d]
    weights = [m.weight for m in fp8_layers(stored)]
    assert all(w.dtype == FP8 and not w.requires_grad for w in weights)
    assert sum(w.nbytes for w in weights) * 4 == fp32_bytes
    assert all(m.bias.dtype == torch.float32 for m in fp8_layers(stored))  # biases keep the compute dtype
    assert {k: v.shape for k, v in stored.state_dict().items()} == keys  # the same keys for every reader

    x = torch.randn(5, 32)
    # Exactly the full-precision layers run on the fp8-rounded weights...
    rounded = _layers()
    for layer in rounded:
        if isinstance(layer, (nn.Linear, nn.Conv2d)):
            layer.weight.data = layer.weight.data.to(FP8).float()
    assert torch.allclose(stored(x), rounded(x), atol=1e-6)
    # ...so each weight is within fp8's rounding step of the original, and the output close to it.
    for a, b in zip(fp8_layers(stored), [full[0], full[3]]):
        error = (a.weight.float() - b.weight).abs()
        assert bool((error <= FP8_RELATIVE_STEP * b.weight.abs() + 2.0**-9).all())
    relative = (stored(x) - full(x)).norm() / full(x).norm()
    assert 0 < relative < FP8_RELATIVE_STEP, relative


def test_fp8_layers_compute_in_the_asked_dtype_and_keep_the_adapters_hook():
    layer = nn.Linear(16, 16)
    store_fp8(layer, torch.bfloat16)
    layer.bias.data = layer.bias.data.bfloat16()
    x = torch.randn(2, 16, dtype=torch.bfloat16)
    assert layer(x).dtype == torch.bfloat16
    base_only = layer(x)
    adapter = LoraModule(layer, rank=4, alpha=4)
    nn.init.normal_(adapter.lora_up.weight)
    adapter.hook()
    hooked = layer(x)
    assert adapter.lora_up.weight.dtype == torch.float32  # the adapter stays full precision
    assert torch.allclose(hooked.float(), (base_only + adapter.delta_output(x).to(torch.bfloat16)).float())
    adapter.unhook()
    assert torch.equal(layer(x), base_only)  # the class's upcasting forward shows again
    assert isinstance(layer, Fp8Linear) and layer.weight.dtype == FP8


def test_store_fp8_works_on_the_meta_device():
    with torch.device("meta"):
        layers = _layers()
    store_fp8(layers, torch.bfloat16)
    assert layers[0].weight.dtype == FP8 and layers[0].weight.device.type == "meta"
    assert layers(torch.empty(2, 32, device="meta", dtype=torch.bfloat16)).dtype == torch.bfloat16


def _file(path):
    with safe_open(str(path), framework="pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        return tensors, handle.metadata()


def test_an_fp8_base_run_trains_previews_and_exports_the_same_file_layout(tmp_path, data8):
    flags = ["train.max_steps=3", "train.batch_size=2", "sample.at_start=true",
             'sample.prompts=[{prompt="a circle", steps=2, width=64, height=64}]']
    plain = run_training(tiny_config(data8, tmp_path / "plain", *flags), progress=False)
    fp8 = run_training(tiny_config(data8, tmp_path / "fp8", *flags, "model.fp8_base=true"), progress=False)

    unet = fp8.parts.model.unet
    linears = [m for m in unet.modules() if isinstance(m, nn.Linear)]
    assert linears and all(m.weight.dtype == FP8 for m in linears)  # frozen UNet weights stored in fp8
    assert all(m.weight.dtype == torch.float32 for m in plain.parts.model.unet.modules() if isinstance(m, nn.Linear))
    weight_bytes = lambda run: sum(m.weight.nbytes for m in run.parts.model.unet.modules()  # noqa: E731
                                   if isinstance(m, (nn.Linear, nn.Conv2d)))
    assert weight_bytes(fp8) * 4 == weight_bytes(plain)  # a CPU run computes in fp32: a quarter of its bytes
    encoder_linears = [m for e in fp8.parts.model.text_encoders for m in e.modules() if isinstance(m, nn.Linear)]
    assert encoder_linears and all(m.weight.dtype == FP8 for m in encoder_linears)  # kept for previews, untrained
    assert all(p.dtype == torch.float32 for p in fp8.parts.network.parameters())  # adapters full precision
    assert (tmp_path / "fp8" / "samples").is_dir() and any((tmp_path / "fp8" / "samples").rglob("*.png"))

    (a, meta_a), (b, meta_b) = _file(plain.file), _file(fp8.file)
    assert a.keys() == b.keys()
    assert {k: (v.shape, v.dtype) for k, v in a.items()} == {k: (v.shape, v.dtype) for k, v in b.items()}
    assert meta_a.keys() == meta_b.keys()
    timing = {"modelspec.date", "ss_training_started_at", "ss_training_finished_at"}  # when, not what
    differing = {k for k in meta_a if meta_a[k] != meta_b[k]} - timing
    assert not differing, {k: (meta_a[k], meta_b[k]) for k in differing}
    ups = [v for k, v in b.items() if k.endswith("lora_up.weight")]
    assert all(math.isfinite(v.float().sum().item()) for v in b.values())
    assert any(v.abs().sum() > 0 for v in ups)  # the adapters moved off their zero start


def test_fp8_base_with_an_init_that_moves_the_base_is_one_sentence(tmp_path):
    with pytest.raises(SdloraError, match="model.fp8_base stores the base weights in 8 bits, but network.init "
                                          "pissa moves them"):
        tiny_config(tmp_path, tmp_path / "run", "model.fp8_base=true", "network.init=pissa")


def test_kohya_fp8_base_imports_as_model_fp8_base():
    imported = import_kohya_preset({"fp8_base": True, "LoRA_type": "Standard"})
    assert imported.config["model"]["fp8_base"] is True
    assert "fp8_base" not in imported.unmapped

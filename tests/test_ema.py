"""EMA of the adapter weights: the closed form on a toy sequence, resume, swapping in for export."""

import math

import pytest
import torch
from torch import nn

from networks.errors import SdloraError
from networks.lora import LoraModule
from networks.lora_file import read_lora, save_lora
from networks.network import LoraNetwork
from trainer.objective.ema import AdapterEMA, ema_file


def toy_network(seed=0):
    torch.manual_seed(seed)
    adapter = LoraModule(nn.Linear(3, 2), rank=2, alpha=1.0)
    return LoraNetwork("sd1", {"lora_unet_toy": adapter}, {"lora_unet_toy": "unet"})


def set_weights(network, value):
    with torch.no_grad():
        for p in network.parameters():
            p.fill_(value)


def decays(n_steps, decay, warmup, power=2 / 3):
    """diffusers' schedule written out: s = n - 1, decay 0 at s = 0."""
    out = []
    for n in range(1, n_steps + 1):
        s = n - 1
        if s <= 0:
            out.append(0.0)
        elif warmup:
            out.append(min(decay, 1 - (1 + s) ** -power))
        else:
            out.append(min(decay, (1 + s) / (10 + s)))
    return out


@pytest.mark.parametrize("warmup", [False, True])
def test_ema_equals_the_closed_form(warmup):
    network = toy_network()
    ema = AdapterEMA(network, decay=0.5, warmup=warmup)
    values = [float(k * k) for k in range(1, 13)]  # p_k = k^2
    for value in values:
        set_weights(network, value)
        ema.update()
    d = decays(len(values), 0.5, warmup)
    # EMA_n = sum_k p_k (1 - d_k) prod_{j > k} d_j
    expected = sum(p * (1 - d[k]) * math.prod(d[k + 1:]) for k, p in enumerate(values))
    for shadow in ema.shadow():
        assert torch.allclose(shadow, torch.full_like(shadow, expected), rtol=1e-6)
    assert ema.current_decay == pytest.approx(d[-1]) and ema.step == len(values)
    assert d[0] == 0 and 0 < d[1] < 0.5 and d[-1] == 0.5  # copy, warm-up, then the cap


def test_state_dict_resume_continues_identically():
    a_net, b_net = toy_network(), toy_network()
    a = AdapterEMA(a_net, decay=0.95)
    for value in (1.0, 2.0, 3.0):
        set_weights(a_net, value)
        a.update()
    saved = {k: ([t.clone() for t in v] if isinstance(v, list) else v) for k, v in a.state_dict().items()}
    b = AdapterEMA(b_net, decay=0.95)
    b.load_state_dict(saved)
    for value in (4.0, 5.0):
        for net, ema in ((a_net, a), (b_net, b)):
            set_weights(net, value)
            ema.update()
    assert all(torch.equal(x, y) for x, y in zip(a.shadow(), b.shadow()))
    other = LoraNetwork("sd1", {"m": LoraModule(nn.Linear(3, 2), rank=4, alpha=1.0)}, {"m": "unet"})
    with pytest.raises(SdloraError, match="do not fit this network"):
        AdapterEMA(other).load_state_dict(saved)


def test_swapped_in_exports_averages_and_restores_live_weights(tmp_path):
    network = toy_network()
    ema = AdapterEMA(network, decay=0.5, warmup=False)
    for value in (2.0, 4.0):
        set_weights(network, value)
        ema.update()
    # step 1 copies (2), step 2 uses min(0.5, 2/11) = 2/11: 2 * 2/11 + 4 * 9/11
    expected = 2 * 2 / 11 + 4 * 9 / 11
    state = ema.kohya_state_dict()
    assert torch.allclose(state["lora_unet_toy.lora_up.weight"], torch.full((2, 2), expected))
    assert all(torch.all(p == 4.0) for p in network.parameters())  # live weights untouched
    final = tmp_path / "my-lora.safetensors"
    path = save_lora(ema_file(final), state)
    assert path.name == "my-lora-ema.safetensors"
    assert torch.equal(read_lora(path)[0]["lora_unet_toy.lora_down.weight"], state["lora_unet_toy.lora_down.weight"])
    ema.copy_to()
    assert all(torch.allclose(p, torch.full_like(p, expected)) for p in network.parameters())


def test_the_exported_average_is_capped_like_the_live_weights():
    from networks.max_norm import delta_norm

    network = toy_network()
    ema = AdapterEMA(network, decay=0.5, warmup=False)
    set_weights(network, 1.0)
    ema.update()
    live = {k: v.clone() for k, v in network.state_dict().items()}
    adapter = network.adapters["lora_unet_toy"]
    uncapped = ema.kohya_state_dict()
    capped = ema.kohya_state_dict(max_norm=0.1)
    up, down = capped["lora_unet_toy.lora_up.weight"], capped["lora_unet_toy.lora_down.weight"]
    assert float(torch.linalg.matrix_norm(up @ down)) * adapter.scale == pytest.approx(0.1, rel=1e-5)
    assert float(delta_norm(adapter)) > 0.1  # the live weights are left alone ...
    assert all(torch.equal(v, live[k]) for k, v in network.state_dict().items())
    assert all(torch.equal(v, ema.kohya_state_dict()[k]) for k, v in uncapped.items())  # ... and so is the average

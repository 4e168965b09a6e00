"""Max-norm regularization (kohya's scale_weight_norms): the Gram-matrix norm and the scaling."""
import pytest
import torch

from networks.errors import SdloraError
from networks.max_norm import apply_max_norm, delta_norm
from tests.helpers import attached, randomise_up
from trainer.config import config_from_dict


@pytest.mark.parametrize("kind", ["lora", "locon"])
def test_norm_through_gram_matrices_equals_the_full_matrix_norm(kind):
    _, network = attached("sd1", kind)
    randomise_up(network)
    convs = 0
    for adapter in network.adapters.values():
        convs += adapter.lora_down.weight.dim() == 4 and adapter.lora_down.weight.shape[-1] == 3
        full = torch.linalg.vector_norm(adapter.delta_weight())
        torch.testing.assert_close(delta_norm(adapter), full, rtol=1e-5, atol=1e-7)
    assert (convs > 0) == (kind == "locon")  # the 3x3 LoCon convs are covered too


def test_modules_over_the_limit_end_at_it_and_the_rest_are_untouched():
    _, network = attached("sd1", "locon")
    randomise_up(network, std=0.5)
    norms = {name: float(delta_norm(a)) for name, a in network.items()}
    limit = sorted(norms.values())[len(norms) // 2]  # about half the modules are over it
    before = {name: (a.lora_up.weight.clone(), a.lora_down.weight.clone()) for name, a in network.items()}
    stats = apply_max_norm(network.adapters, limit)
    over = [name for name, norm in norms.items() if norm > limit]
    assert stats.keys_scaled == len(over) > 0
    for name, adapter in network.items():
        up, down = before[name]
        if name in over:
            assert float(delta_norm(adapter)) == pytest.approx(limit, rel=1e-5)
            # B and A shrink by the same factor, sqrt(limit / norm)
            factor = (limit / norms[name]) ** 0.5
            torch.testing.assert_close(adapter.lora_up.weight, up * factor)
            torch.testing.assert_close(adapter.lora_down.weight, down * factor)
        else:
            assert torch.equal(adapter.lora_up.weight, up) and torch.equal(adapter.lora_down.weight, down)
    after = [min(norm, limit) for norm in norms.values()]
    assert stats.max_norm == pytest.approx(limit, rel=1e-5)
    assert stats.mean_norm == pytest.approx(sum(after) / len(after), rel=1e-5)


def test_a_fresh_lora_is_zero_and_never_scaled():
    _, network = attached("sd1", "lora")  # lora_up starts at zero
    stats = apply_max_norm(network.adapters, 1.0)
    assert stats.keys_scaled == 0 and stats.max_norm == 0.0


def test_max_norm_with_an_init_that_moves_the_base_is_one_sentence():
    with pytest.raises(SdloraError) as error:
        config_from_dict({"network": {"init": "pissa"}, "train": {"scale_weight_norms": 1.0}}, source="run.toml")
    assert ("train.scale_weight_norms works on a LoRA that starts at zero, but network.init is pissa"
            in str(error.value))

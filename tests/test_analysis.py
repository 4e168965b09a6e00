"""Spectrum through QR, effective ranks, blocks, subspace similarity and amplification, against full-matrix math."""

import math

import pytest
import torch

from networks.analysis import (
    amplification,
    amplification_report,
    block_of,
    energy_rank,
    entropy_rank,
    lora_factors,
    phi_matrix,
    spectrum,
    subspace_basis,
    subspace_similarity,
)
from networks.errors import SdloraError
from tests.helpers import attached, randomise_up, text_encoders
from trainer.model.tiny_models import build_tiny_pipeline_components


def trained_state(family="sd1", kind="locon", seed=1):
    components, network = attached(family, kind)
    randomise_up(network, seed=seed)
    return components, network, network.kohya_state_dict()


def random_state(modules=30, d=64, r=8, out=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    state = {}
    for m in range(modules):
        state[f"lora_unet_m{m}.lora_down.weight"] = torch.randn(r, d, generator=g)
        state[f"lora_unet_m{m}.lora_up.weight"] = torch.randn(out, r, generator=g)
        state[f"lora_unet_m{m}.alpha"] = torch.tensor(float(r))
    return state


def module_with_singular_values(values, out=20, n=30, seed=0):
    g = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(out, len(values), generator=g))[0]
    v = torch.linalg.qr(torch.randn(n, len(values), generator=g))[0]
    r = len(values)
    return {"lora_unet_x.lora_down.weight": v.T.contiguous(),
            "lora_unet_x.lora_up.weight": (u * torch.tensor(values)).contiguous(),
            "lora_unet_x.alpha": torch.tensor(float(r))}


def test_spectrum_through_qr_equals_svdvals_of_the_full_delta():
    _, network, state = trained_state()
    report = spectrum(state)["modules"]
    kinds = set()
    # a sample of each kind keeps it quick: linear, 1x1 conv (proj_in/out), 3x3 conv, text encoder
    sample = [n for n in network.adapters if n.endswith(("attn2_to_k", "proj_in", "conv1", "fc1"))]
    for name in sample:
        adapter = network.adapters[name]
        full = torch.linalg.svdvals(adapter.delta_weight().detach().flatten(1).double())
        got = torch.tensor(report[name]["singular_values"], dtype=torch.float64)
        assert len(got) == adapter.rank
        torch.testing.assert_close(got, full[: adapter.rank], atol=1e-5, rtol=1e-5)
        assert float(torch.cat([full[adapter.rank:], torch.zeros(1)]).abs().max()) < 1e-5  # rank r: nothing beyond
        kinds.add(adapter.lora_down.weight.dim())
    assert kinds == {2, 4} and len(sample) > 10  # both linear and conv modules were checked


def test_effective_ranks_of_a_known_spectrum():
    # energies 16, 4, 1, 0.25 of 21.25: 75.3%, 94.1%, 98.8%, 100%
    report = spectrum(module_with_singular_values([4.0, 2.0, 1.0, 0.5]))["modules"]["lora_unet_x"]
    torch.testing.assert_close(torch.tensor(report["singular_values"]), torch.tensor([4.0, 2.0, 1.0, 0.5]))
    assert (report["energy_rank_90"], report["energy_rank_99"]) == (2, 4)
    p = torch.tensor([4.0, 2.0, 1.0, 0.5]) / 7.5
    assert report["entropy_rank"] == pytest.approx(math.exp(float(-(p * p.log()).sum())), rel=1e-6)
    assert entropy_rank(torch.ones(5)) == pytest.approx(5.0)
    assert entropy_rank(torch.tensor([3.0, 0.0, 0.0])) == pytest.approx(1.0)
    assert energy_rank(torch.ones(4), 1.0) == 4 and energy_rank(torch.ones(4), 0.5) == 2


def test_blocks_follow_the_model_order():
    assert block_of("lora_unet_down_blocks_1_attentions_0_proj_in") == "unet down_blocks.1"
    assert block_of("lora_unet_mid_block_attentions_0_proj_in") == "unet mid_block"
    assert block_of("lora_unet_output_blocks_3_1_proj_in") == "unet output_blocks.3"
    assert block_of("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q") == "unet input_blocks.4"
    assert block_of("lora_te_text_model_encoder_layers_11_mlp_fc1") == "te layers.11"
    assert block_of("lora_te2_text_model_encoder_layers_2_self_attn_q_proj") == "te2 layers.2"
    _, network, state = trained_state()
    blocks = spectrum(state)["blocks"]
    assert list(blocks) == ["unet down_blocks.0", "unet down_blocks.1", "unet mid_block", "unet up_blocks.0",
                            "unet up_blocks.1", "te layers.0", "te layers.1", "te layers.2"]
    assert sum(row["modules"] for row in blocks.values()) == len(network.adapters)
    te_norm = math.sqrt(sum(float(a.delta_weight().detach().norm()) ** 2 for n, a in network.adapters.items()
                            if n.startswith("lora_te_text_model_encoder_layers_1_")))
    assert blocks["te layers.1"]["norm"] == pytest.approx(te_norm, rel=1e-5)


def test_subspace_similarity_of_a_lora_with_itself_is_one_on_the_diagonal():
    _, _, state = trained_state()
    report = subspace_similarity(state, state)
    for row in report["modules"].values():
        phi = torch.tensor(row["phi"])
        torch.testing.assert_close(torch.diagonal(phi), torch.ones(phi.shape[0], dtype=phi.dtype),
                                   atol=1e-6, rtol=0)
        assert row["top1"] == pytest.approx(1.0) and row["full"] == pytest.approx(1.0)
    assert report["only_in_a"] == report["only_in_b"] == []


@pytest.mark.parametrize("side, dim", [("down", 64), ("up", 48)])
def test_independent_random_loras_have_phi_near_max_i_j_over_d(side, dim):
    # E||U1[:, :i]^T U2[:, :j]||_F^2 = i j / d for independent uniform subspaces, so E[phi] = max(i, j) / d
    # 200 modules: the worst cell, phi(8, 1) ~ Beta(4, 28) with sd 0.058, averages to sd 0.004
    report = subspace_similarity(random_state(200, seed=0), random_state(200, seed=1), side=side)
    mean = torch.tensor(report["mean"], dtype=torch.float64)
    i = torch.arange(1, 9, dtype=torch.float64)[:, None]
    j = torch.arange(1, 9, dtype=torch.float64)[None, :]
    expected = torch.maximum(i, j) / dim
    assert float((mean - expected).abs().max()) < 0.02
    assert float(expected.max()) == 8 / dim  # the tolerance is well below the values being checked
    assert {row["dim"] for row in report["modules"].values()} == {dim}


def test_phi_matrix_is_the_paper_formula():
    g = torch.Generator().manual_seed(3)
    a = torch.linalg.qr(torch.randn(16, 4, generator=g, dtype=torch.float64))[0]
    b = torch.linalg.qr(torch.randn(16, 3, generator=g, dtype=torch.float64))[0]
    phi = phi_matrix(a, b)
    for i in range(1, 5):
        for j in range(1, 4):
            direct = float((a[:, :i].T @ b[:, :j]).norm() ** 2) / min(i, j)
            assert float(phi[i - 1, j - 1]) == pytest.approx(direct, rel=1e-12)


def test_down_basis_is_the_right_singular_vectors_of_lora_down():
    module = lora_factors(random_state(modules=1))["lora_unet_m0"]
    basis = subspace_basis(module, "down")
    v = torch.linalg.svd(module.down.double())[2][:8].T
    torch.testing.assert_close(basis.T @ basis, torch.eye(8, dtype=torch.float64))
    torch.testing.assert_close((basis.T @ v).abs(), torch.eye(8, dtype=torch.float64), atol=1e-9, rtol=0)


def test_amplification_factor_matches_full_svd():
    state = random_state(modules=1, d=32, r=4, out=24)
    module = lora_factors(state)["lora_unet_m0"]
    weight = torch.randn(24, 32, generator=torch.Generator().manual_seed(5))
    u, s, vh = torch.linalg.svd(module.delta())
    expected = float(s[:4].norm() / (u[:, :4].T @ weight.double() @ vh[:4].T).norm())
    assert amplification(module, weight) == pytest.approx(expected, rel=1e-9)


def test_amplification_report_against_the_base_model():
    components, network, state = trained_state("sd1", "lora")
    network.detach()
    report = amplification_report("sd1", components["unet"], text_encoders(components), state)
    assert set(report) == set(network.adapters)
    name = next(n for n in network.adapters if n.endswith("attn1_to_q"))
    adapter = network.adapters[name]
    u, s, vh = torch.linalg.svd(adapter.delta_weight().detach().double())
    r = adapter.rank
    direct = float(s[:r].norm() / (u[:, :r].T @ adapter.base.weight.detach().double() @ vh[:r].T).norm())
    assert report[name] == pytest.approx(direct, rel=1e-6)
    sdxl = build_tiny_pipeline_components("sdxl")
    with pytest.raises(SdloraError, match=r"module name\(s\) in the file match no module of this sdxl model"):
        amplification_report("sdxl", sdxl["unet"], text_encoders(sdxl), state)


def test_bad_inputs_are_one_sentence():
    _, _, state = trained_state("sd1", "lora")
    checkpoint = {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2, 2)}
    with pytest.raises(SdloraError, match=r"'ckpt.safetensors' has 1 key\(s\) that are not lora_down/lora_up/alpha "
                                          r"\(e.g. 'model.diffusion_model.input_blocks.0.0.weight'\); it is not"):
        spectrum(checkpoint, "ckpt.safetensors")
    other = {k.replace("lora_unet_", "lora_unet_zz_").replace("lora_te_", "lora_te_zz_"): v for k, v in state.items()}
    with pytest.raises(SdloraError, match="^a.safetensors and b.safetensors share no module names; compare two "
                                          "LoRAs made for the same base model.$"):
        subspace_similarity(state, other, source_a="a.safetensors", source_b="b.safetensors")
    # SDXL's two text encoders under one prefix: same module names, 32 vs 64 wide
    sdxl = trained_state("sdxl", "lora")[2]
    narrow = {k.replace("lora_te1_", "lora_te_"): v for k, v in sdxl.items() if k.startswith("lora_te1_")}
    wide = {k.replace("lora_te2_", "lora_te_"): v for k, v in sdxl.items() if k.startswith("lora_te2_")}
    with pytest.raises(SdloraError, match=r"is 37x32 in a but 37x64 in b; the files were made for different base models\.$"):
        subspace_similarity(narrow, wide, source_a="a", source_b="b")
    with pytest.raises(SdloraError, match="Unknown side 'left'; use one of down, up."):
        subspace_similarity(state, state, side="left")

"""LoRA/LoCon attach, merge and the target table, on the tiny SD1/SD2/SDXL models."""

import re

import pytest
import torch
from annotated_types import Ge, Gt, Le, Lt

from networks.errors import SdloraError
from networks.naming import FAMILY_PREFIXES, prefix_of, role_of
from networks.network import LoraNetwork, count_adapter_parameters
from networks.spec import BOUNDS, FAMILIES, NetworkSpec
from tests.helpers import attached, randomise_up, text_encoders, unet_out
from trainer.config import NetworkSection
from trainer.model.tiny_models import build_tiny_pipeline_components


def categories(network):
    """Module path suffix classes that got an adapter, per role."""
    found = set()
    for name, path in network.paths.items():
        role = network.roles[name]
        leaf = re.search(r"(attn[12]\.\S+|ff\.net\.\S+|resnets\.\d+\.\S+|samplers\.0\.\S+|self_attn\.\S+"
                         r"|mlp\.\S+|attentions\.\d+\.proj_(in|out))$", path)[0]
        leaf = re.sub(r"\d+", "N", leaf)
        found.add((role, leaf))
    return found


LORA_UNET = {("unet", x) for x in ["attnN.to_q", "attnN.to_k", "attnN.to_v", "attnN.to_out.N", "ff.net.N.proj",
                                    "ff.net.N", "attentions.N.proj_in", "attentions.N.proj_out"]}
LORA_TE = {("text_encoder", x) for x in ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                          "self_attn.out_proj", "mlp.fcN"]}
LOCON_EXTRA = {("unet", x) for x in ["resnets.N.convN", "resnets.N.conv_shortcut", "resnets.N.time_emb_proj",
                                      "samplers.N.conv"]}


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_targets_exactly_attention_ff_proj_and_text_encoder(family):
    components, network = attached(family, "lora")
    expected = LORA_UNET | LORA_TE
    if family == "sdxl":
        expected |= {("text_encoder_2", leaf) for _, leaf in LORA_TE}
    assert categories(network) == expected
    # every attention/ff Linear of the UNet is covered: count them independently
    unet_linear = [n for n, m in components["unet"].named_modules()
                   if isinstance(m, torch.nn.Linear) and re.search(r"(to_[qkv]|to_out\.0|ff\.net\.(0\.proj|2)|proj_(in|out))$", n)]
    unet_conv_proj = [n for n, m in components["unet"].named_modules() if re.search(r"proj_(in|out)$", n)
                      and isinstance(m, torch.nn.Conv2d)]
    assert sum(r == "unet" for r in network.roles.values()) == len(unet_linear) + len(unet_conv_proj)


@pytest.mark.parametrize("family", FAMILIES)
def test_locon_adds_every_resnet_conv_and_sampler_with_conv_shapes(family):
    components, network = attached(family, "locon")
    assert LOCON_EXTRA <= categories(network)
    unet = components["unet"]
    resnet_parts = [n for n, _ in unet.named_modules()
                    if re.search(r"resnets\.\d+\.(conv1|conv2|conv_shortcut|time_emb_proj)$", n)]
    samplers = [n for n, _ in unet.named_modules() if re.search(r"(down|up)samplers\.0\.conv$", n)]
    adapted = set(network.paths.values())
    assert set(resnet_parts) | set(samplers) <= adapted
    for name, adapter in network.adapters.items():
        base = adapter.base
        if isinstance(base, torch.nn.Conv2d) and base.kernel_size == (3, 3):
            assert adapter.lora_down.weight.shape == (2, base.in_channels, 3, 3), name
            assert adapter.lora_up.weight.shape == (base.out_channels, 2, 1, 1), name
            assert adapter.lora_down.stride == base.stride and adapter.lora_down.padding == base.padding
            assert adapter.alpha == 2.0  # conv_alpha_ratio 1 x conv_rank 2
        else:
            assert adapter.rank == 4 and adapter.alpha == 2.0  # alpha_ratio 0.5 x rank 4


def test_sd1_proj_in_is_conv_lora_and_sd2_linear():
    _, sd1 = attached("sd1", "lora")
    _, sd2 = attached("sd2", "lora")
    proj = [a for n, a in sd1.adapters.items() if n.endswith("proj_in")]
    assert proj and all(a.lora_down.weight.dim() == 4 for a in proj)
    proj = [a for n, a in sd2.adapters.items() if n.endswith("proj_in")]
    assert proj and all(a.lora_down.weight.dim() == 2 for a in proj)


@pytest.mark.parametrize("family", FAMILIES)
def test_fresh_network_changes_nothing_and_detach_restores_modules(family):
    components = build_tiny_pipeline_components(family)
    before = unet_out(components)
    forwards = {n: m.forward for n, m in components["unet"].named_modules()}
    network = LoraNetwork.create(family, components["unet"], text_encoders(components),
                                 NetworkSpec(type="locon", rank=4, conv_rank=4)).attach()
    assert torch.equal(unet_out(components), before)
    randomise_up(network)
    assert not torch.allclose(unet_out(components), before, atol=1e-4)
    network.detach()
    assert torch.equal(unet_out(components), before)
    assert all("forward" not in m.__dict__ for _, m in components["unet"].named_modules())
    assert {n: m.forward.__func__ for n, m in components["unet"].named_modules()} == \
        {n: f.__func__ for n, f in forwards.items()}


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_merge_equals_attached_output_and_unmerge_restores_weights(family):
    components, network = attached(family, "locon")
    randomise_up(network)
    weights = {k: v.clone() for k, v in components["unet"].state_dict().items()}
    expected = unet_out(components)
    network.merge()
    changed = sum(not torch.equal(v, components["unet"].state_dict()[k]) for k, v in weights.items())
    assert changed >= len([a for a, r in network.roles.items() if r == "unet"])
    torch.testing.assert_close(unet_out(components), expected, rtol=1e-4, atol=1e-5)
    network.unmerge()
    for key, value in components["unet"].state_dict().items():
        torch.testing.assert_close(value, weights[key], rtol=1e-6, atol=1e-6)


def test_multiplier_scales_delta_and_disable_turns_it_off():
    components, network = attached("sd1", "lora")
    randomise_up(network, std=0.02)
    network.set_enabled(False)
    base = unet_out(components)
    network.set_enabled(True)
    full = unet_out(components)
    network.set_multiplier(0.5)
    half = unet_out(components)
    # the UNet is not linear in the delta, but at small deltas half the multiplier ~ half the change
    ratio = (half - base).norm() / (full - base).norm()
    assert 0.4 < ratio < 0.6


def test_dropout_only_in_training_and_rank_dropout_keeps_expectation():
    components, network = attached("sd1", "lora", rank_dropout=0.5, dropout=0.1)
    randomise_up(network)
    network.eval()
    assert torch.equal(unet_out(components), unet_out(components))
    network.train()
    assert not torch.equal(unet_out(components), unet_out(components))


@pytest.mark.parametrize("kwargs, message", [
    (dict(rank=0), "network.rank must be an integer >= 1 (got 0)."),
    (dict(conv_rank=-2), "network.conv_rank must be an integer >= 1 (got -2)."),
    (dict(alpha=-1.0), "network.alpha must be > 0 (got -1.0)."),
    (dict(type="glora"), "network.type must be one of lora, locon, loha, lokr, oft, dora (got 'glora')."),
    (dict(target_modules=("to_z",)), "Target module 'to_z' matches no adaptable module of this lora network"),
])
def test_bad_spec_is_one_sentence_and_leaves_model_untouched(kwargs, message):
    components = build_tiny_pipeline_components("sd1")
    with pytest.raises(SdloraError) as error:
        LoraNetwork.create("sd1", components["unet"], [components["text_encoder"]], NetworkSpec(**kwargs))
    assert str(error.value).startswith(message)
    assert all("forward" not in m.__dict__ for _, m in components["unet"].named_modules())


def test_target_modules_restricts_to_named_attention_projections():
    components = build_tiny_pipeline_components("sd1")
    network = LoraNetwork.create("sd1", components["unet"], [], NetworkSpec(target_modules=("to_q", "to_v")))
    assert {p.rsplit(".", 1)[1] for p in network.paths.values()} == {"to_q", "to_v"}


def test_continuing_a_file_keeps_its_modules_ranks_and_weights_and_starts_the_rest_fresh():
    components, locon = attached("sd1", "locon")  # the file: LoCon at rank 4, conv rank 2
    randomise_up(locon)
    state = locon.kohya_state_dict()
    locon.detach()
    spec = NetworkSpec(type="lora", rank=2, alpha_ratio=1.0, train_text_encoder=True, dropout=0.1)
    fresh = LoraNetwork.create("sd1", components["unet"], text_encoders(components), spec)
    network = LoraNetwork.continue_from("sd1", components["unet"], text_encoders(components), spec, state)
    from_file = {key.split(".", 1)[0] for key in state}
    assert set(network.adapters) == set(fresh.adapters) | from_file  # the file's conv modules come along
    assert from_file - set(fresh.adapters)  # (there are some: the spec is plain LoRA)
    for name, adapter in network.items():
        if name in from_file:
            up = adapter.lora_up.weight
            assert torch.equal(up, state[f"{name}.lora_up.weight"].reshape(up.shape))
            assert adapter.alpha == float(state[f"{name}.alpha"]) and adapter.dropout == 0.1
        else:
            assert adapter.rank == 2 and not adapter.lora_up.weight.any()
    # Continuing changes nothing before the first step: the model is base + the file's LoRA.
    reference = LoraNetwork.from_state_dict("sd1", components["unet"], text_encoders(components), state).attach()
    expected = unet_out(components)
    reference.detach()
    network.attach().eval()  # eval: the spec's dropout is off outside training
    torch.testing.assert_close(unet_out(components), expected)


def test_continuing_a_file_whose_parts_are_not_trained_is_one_sentence():
    components, network = attached("sd1", "lora")
    state = network.kohya_state_dict()
    network.detach()
    spec = NetworkSpec(type="lora", rank=4, train_text_encoder=False)
    with pytest.raises(SdloraError) as error:
        LoraNetwork.continue_from("sd1", components["unet"], text_encoders(components), spec, state,
                                  "old.safetensors")
    assert str(error.value) == ("old.safetensors adapts the text encoder, but network.train_text_encoder is false; "
                                "set it to true to continue those modules.")


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
@pytest.mark.parametrize("kind", ["lora", "locon", "loha", "lokr"])
def test_counted_adapter_parameters_equal_the_built_networks(family, kind):
    components = build_tiny_pipeline_components(family)
    unet, encoders = components["unet"], text_encoders(components)
    spec = NetworkSpec(type=kind, rank=4, conv_rank=2, train_text_encoder=True)
    before = {name: p.clone() for name, p in unet.named_parameters()}
    counted = count_adapter_parameters(family, unet, encoders, spec)
    built = LoraNetwork.create(family, unet, encoders, spec)
    assert counted == sum(p.numel() for p in built.parameters()) > 0
    assert all(torch.equal(p, before[name]) for name, p in unet.named_parameters())  # the model is untouched
    assert not any(a.base_forward for a in built.adapters.values())  # counting attached nothing


def test_counted_adapter_parameters_follow_the_lora_size_rule_on_a_meta_model():
    components = build_tiny_pipeline_components("sd1")
    with torch.device("meta"):
        meta_unet = type(components["unet"]).from_config(components["unet"].config)
    spec = NetworkSpec(type="lora", rank=4)
    # LoRA: down [r, in] + up [out, r] per Linear (1x1 convs alike); the rule the pre-flight wrote by hand
    bases = [a.base for a in LoraNetwork.create("sd1", components["unet"], [], spec).adapters.values()]
    expected = sum(4 * base.weight[0].numel() + base.weight.shape[0] * 4 for base in bases)
    assert count_adapter_parameters("sd1", meta_unet, [], spec) == expected


def test_spec_scale_is_alpha_over_rank_or_its_root_with_rslora():
    spec = NetworkSpec(rank=16, alpha=8.0, conv_rank=4, conv_alpha_ratio=1.0)
    assert (spec.scale(), spec.scale(conv=True)) == (0.5, 1.0)
    rs = NetworkSpec(rank=16, alpha=8.0, conv_rank=4, conv_alpha=1.0, rslora=True)
    assert (rs.scale(), rs.scale(conv=True)) == (2.0, 0.5)
    _, network = attached("sd1", "lora", rslora=True)
    assert {a.scale for a in network.adapters.values()} == {2 / 2.0}  # rank 4, alpha 0.5 x 4, rsLoRA: 2 / sqrt(4)


def test_kohya_prefixes_and_roles_are_named_once():
    assert tuple(FAMILY_PREFIXES) == FAMILIES
    assert [role_of(n) for n in ("lora_unet_conv_in", "lora_te_text_model_x", "lora_te1_text_model_x",
                                 "lora_te2_text_model_x.alpha", "lycoris_x", "lora_tex")] == \
        ["unet", "te", "te1", "te2", None, None]
    for family in FAMILIES:  # every name a network writes has one of its family's prefixes
        components, network = attached(family, "locon")
        assert {prefix_of(name) for name in network.adapters} == set(FAMILY_PREFIXES[family])


def test_the_configs_network_bounds_are_the_specs():
    """One fact: the [network] fields are declared with the spec's bounds, which `validate` checks too."""
    words = {Ge: "ge", Gt: "gt", Le: "le", Lt: "lt"}
    for key, bounds in BOUNDS.items():
        declared = {words[type(m)]: getattr(m, words[type(m)]) for m in NetworkSection.model_fields[key].metadata
                    if type(m) in words}
        assert declared == bounds, key
    with pytest.raises(SdloraError, match=r"^network\.rank must be an integer <= 1024 \(got 2000\)\.$"):
        NetworkSpec(rank=2000).validate()

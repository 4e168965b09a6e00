"""kohya's block-wise learning rates: block numbering, the weight syntax, and what the network does."""
import math

import pytest
import torch

from networks.block_lr import block_index, block_weights, parse_weights
from networks.errors import SdloraError
from networks.network import LoraNetwork
from networks.spec import NetworkSpec
from tests.helpers import text_encoders
from trainer.config import config_from_dict
from trainer.model.tiny_models import build_tiny_pipeline_components
from trainer.objective.optimizers import parameter_groups


@pytest.mark.parametrize("name, sdxl, index", [
    ("lora_unet_down_blocks_0_attentions_0_proj_in", False, 1),  # IN01
    ("lora_unet_down_blocks_0_downsamplers_0_conv", False, 3),  # IN03
    ("lora_unet_down_blocks_3_resnets_1_conv1", False, 11),  # IN11
    ("lora_unet_mid_block_attentions_0_proj_in", False, 12),  # MID
    ("lora_unet_up_blocks_0_resnets_0_conv1", False, 13),  # OUT00
    ("lora_unet_up_blocks_3_attentions_2_proj_out", False, 24),  # OUT11
    ("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q", True, 5),
    ("lora_unet_middle_block_1_transformer_blocks_0_attn2_to_k", True, 11),
    ("lora_unet_output_blocks_8_0_in_layers_2", True, 21),
    ("lora_te_text_model_encoder_layers_0_mlp_fc1", False, None),
    ("lora_te1_text_model_encoder_layers_0_mlp_fc1", True, None),
])
def test_blocks_are_numbered_as_kohya_numbers_them(name, sdxl, index):
    assert block_index(name, sdxl) == index


def test_weight_syntax_numbers_padded_and_kohyas_curves():
    assert parse_weights("0, 0.5", 4, "k") == [0.0, 0.5, 1.0, 1.0]
    assert parse_weights([2, 2, 2, 2, 2], 3, "k") == [2.0, 2.0, 2.0]
    sine = parse_weights("sine", 12, "k")
    assert sine[0] == 0.0 and sine[-1] == pytest.approx(1.0) and sine[6] == pytest.approx(math.sin(math.pi * 6 / 22))
    assert parse_weights("cosine+.5", 12, "k") == pytest.approx([w + 0.5 for w in reversed(sine)])
    assert parse_weights("zeros", 3, "k") == [0.0] * 3 and parse_weights("linear", 3, "k") == [0.0, 0.5, 1.0]
    with pytest.raises(SdloraError, match="neither numbers separated by commas nor one of"):
        parse_weights("fast", 12, "network.down_lr_weight")


def test_weights_fill_kohyas_lists_with_ones_and_zero_below_the_threshold():
    sd = block_weights(False, down="0,0.1,0.5", zero_threshold=0.2)
    assert len(sd) == 25 and sd[:4] == [0.0, 0.0, 0.5, 1.0] and sd[12:] == [1.0] * 13
    xl = block_weights(True, mid="0,2")
    assert len(xl) == 23 and xl[10:13] == [0.0, 2.0, 1.0] and xl[0] == xl[-1] == 1.0
    assert block_weights(False) is None


def test_zero_blocks_get_no_adapter_and_the_rest_train_at_their_weight():
    parts = build_tiny_pipeline_components("sd1")
    # The tiny UNet's attentions sit in down_blocks_0 (IN01, IN02), the middle and up_blocks_1 (OUT03-OUT05).
    spec = NetworkSpec(rank=4, train_text_encoder=True, down_lr_weight="zeros", up_lr_weight="1,1,1,0.5,0.5,0.5")
    network = LoraNetwork.create("sd1", parts["unet"], text_encoders(parts), spec)
    names = list(network.adapters)
    assert not [n for n in names if n.startswith("lora_unet_down_blocks")]
    assert [n for n in names if n.startswith("lora_unet_mid_block")] and [n for n in names if n.startswith("lora_te")]
    train = config_from_dict({"train": {"learning_rate": 1e-3, "text_encoder_lr": 1e-4}}).train
    groups = {g["name"]: g for g in parameter_groups(network, train)}
    assert groups["unet.down.x0.5"]["lr"] == pytest.approx(5e-4) and groups["unet.down"]["lr"] == 1e-3
    assert groups["text_encoder.down"]["lr"] == 1e-4  # the text encoder has no blocks
    up_blocks = {id(a.lora_down.weight) for n, a in network.items() if n.startswith("lora_unet_up_blocks")}
    assert {id(p) for p in groups["unet.down.x0.5"]["params"]} == up_blocks
    assert sum(len(g["params"]) for g in groups.values()) == 2 * len(names)


def test_all_blocks_at_zero_is_one_sentence():
    parts = build_tiny_pipeline_components("sd1")
    spec = NetworkSpec(rank=4, down_lr_weight="zeros", mid_lr_weight="0", up_lr_weight="zeros")
    with pytest.raises(SdloraError, match="Every block's learning-rate weight or rank is 0, so nothing would train"):
        LoraNetwork.create("sd1", parts["unet"], [], spec)


def test_a_bad_weight_in_the_config_is_one_sentence():
    with pytest.raises(SdloraError) as error:
        config_from_dict({"network": {"up_lr_weight": "sine+x"}}, source="run.toml")
    assert str(error.value) == ("In run.toml, network.up_lr_weight 'sine+x' has an offset that is not a number; "
                                "write e.g. sine+0.5.")


def test_unchanged_without_block_weights():
    parts = build_tiny_pipeline_components("sd1")
    network = LoraNetwork.create("sd1", parts["unet"], [], NetworkSpec(rank=4))
    train = config_from_dict({}).train
    assert [g["name"] for g in parameter_groups(network, train)] == ["unet.down", "unet.up"]


def test_kohya_reads_an_empty_entry_as_zero_and_mid_takes_numbers_only():
    assert parse_weights("1,,1,", 5, "k") == [1.0, 0.0, 1.0, 0.0, 1.0]
    with pytest.raises(SdloraError) as error:
        config_from_dict({"network": {"mid_lr_weight": "sine"}})
    assert "network.mid_lr_weight takes numbers, not the curve 'sine'" in str(error.value)


@pytest.mark.parametrize("settings, key", [
    ({"network": {"up_lr_weight": "0.5"}}, "block learning-rate weights can only be 0 or 1"),
    ({"train": {"loraplus_ratio": 4}}, "train.loraplus_ratio must be 1"),
    ({"network": {"train_text_encoder": True}, "train": {"text_encoder_lr": 0.5}},
     "leave train.unet_lr and train.text_encoder_lr empty or equal"),
])
def test_prodigy_refuses_groups_at_different_rates_in_one_sentence(settings, key):
    settings = {**settings, "train": {**settings.get("train", {}), "optimizer": "prodigy", "learning_rate": 1.0}}
    with pytest.raises(SdloraError) as error:
        config_from_dict(settings)
    assert "train.optimizer prodigy needs one learning rate for every parameter, so " in str(error.value)
    assert key in str(error.value)
    ok = {"network": {"down_lr_weight": "0,1,1"}, "train": {"optimizer": "prodigy", "learning_rate": 1.0}}
    assert config_from_dict(ok).network.down_lr_weight == "0,1,1"  # 0 and 1 are fine


def _blocks(**values):
    """A 25-entry SD1 list: every block `rest`, with some blocks set (IN04=5, MID=12, OUT03=16, ...)."""
    rest = values.pop("rest")
    entries = [rest] * 25
    for index, value in values.items():
        entries[int(index.removeprefix("b"))] = value
    return ",".join(str(v) for v in entries)


def test_block_dims_set_each_blocks_rank_and_alpha_follows_it():
    parts = build_tiny_pipeline_components("sd1")
    # The tiny UNet's attentions: IN01, IN02 (down_blocks_0), MID (12), OUT03-OUT05 (up_blocks_1, 16-18);
    # down_blocks_1's resnets are IN04 and IN05.
    spec = NetworkSpec(type="locon", rank=4, alpha_ratio=0.5, conv_rank=2, conv_alpha_ratio=1.0,
                       block_dims=_blocks(rest=8, b2=2, b12=6, b16=0, b17=0, b18=0),
                       conv_block_dims=_blocks(rest=3, b4=0))
    network = LoraNetwork.create("sd1", parts["unet"], [], spec)
    ranks = {name: (a.rank, a.alpha) for name, a in network.items()}
    assert ranks["lora_unet_down_blocks_0_attentions_1_proj_in"] == (2, 1.0)  # IN02, alpha 0.5 x 2
    assert ranks["lora_unet_down_blocks_0_attentions_0_proj_in"] == (8, 4.0)  # IN01
    assert ranks["lora_unet_mid_block_attentions_0_proj_in"] == (6, 3.0)
    assert not [n for n in ranks if n.startswith("lora_unet_up_blocks_1_attentions")]  # rank 0: none
    assert "lora_unet_down_blocks_1_resnets_0_conv1" not in ranks  # IN04's conv at conv rank 0
    assert ranks["lora_unet_down_blocks_1_resnets_1_conv1"] == (3, 3.0)  # IN05: conv_block_dims, ratio 1


def test_block_alphas_and_counts_per_family():
    parts = build_tiny_pipeline_components("sd1")
    spec = NetworkSpec(rank=4, block_dims=_blocks(rest=4), block_alphas=_blocks(rest=1, b12=2.5))
    alphas = {n: a.alpha for n, a in LoraNetwork.create("sd1", parts["unet"], [], spec).items()}
    assert alphas["lora_unet_mid_block_attentions_0_proj_in"] == 2.5 and set(alphas.values()) == {1.0, 2.5}
    xl = build_tiny_pipeline_components("sdxl")
    with pytest.raises(SdloraError) as error:
        LoraNetwork.create("sdxl", xl["unet"], [], spec)
    assert str(error.value) == "network.block_dims has 25 entries but needs one per block: 23 for this SDXL UNet."
    with pytest.raises(SdloraError) as error:
        config_from_dict({"network": {"block_dims": "4,4,4.5"}})
    assert "network.block_dims '4,4,4.5' must hold whole numbers of 0 or more" in str(error.value)


def test_a_file_with_block_ranks_gives_diffusers_the_same_outputs(tmp_path):
    import warnings

    from networks.lora_file import save_lora
    from tests.helpers import randomise_up
    from trainer.model.tiny_models import build_tiny_pipeline

    pipe = build_tiny_pipeline("sd1")
    spec = NetworkSpec(rank=4, alpha_ratio=1.0, block_dims=",".join(["4"] * 12 + ["8"] + ["2"] * 12))
    network = LoraNetwork.create("sd1", pipe.unet, [], spec)
    randomise_up(network)
    assert len({a.alpha for a in network.adapters.values()}) == 3  # alpha follows each block's rank
    state = network.kohya_state_dict()
    assert {float(t) for k, t in state.items() if k.endswith(".alpha")} == {2.0}  # one alpha in the file
    save_lora(tmp_path / "blocks.safetensors", state, {})
    sample, context = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.randn(1, 77, 32)
    network.attach().eval()
    with torch.no_grad():
        ours = pipe.unet(sample, 10, context).sample
    network.detach()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe.load_lora_weights(str(tmp_path / "blocks.safetensors"), adapter_name="x")
    with torch.no_grad():
        theirs = pipe.unet(sample, 10, context).sample
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)

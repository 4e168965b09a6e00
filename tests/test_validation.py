"""Validation loss: fixed noise and timesteps, comparable over time, and the global RNG left alone."""

import random
from types import SimpleNamespace

import pytest
import torch

from networks.errors import SdloraError
from networks.network import LoraNetwork
from networks.spec import NetworkSpec
from tests.helpers import randomise_up, text_encoders
from trainer.data.buckets import BucketSpec
from trainer.data.dataset import DatasetOptions, ImageDataset
from trainer.demo.demo_data import make_demo_dataset
from trainer.model.family import get_family
from trainer.model.tiny_models import build_tiny_pipeline_components
from trainer.objective.validation import (
    ValidationSample,
    ValidationSet,
    even_timesteps,
    split_dataset,
    unet_predictor,
    validation_items,
)


def setup(family, dropout=0.0):
    components = build_tiny_pipeline_components(family)
    spec = NetworkSpec(rank=4, dropout=dropout, module_dropout=dropout)
    network = LoraNetwork.create(family, components["unet"], [], spec).attach()
    model = SimpleNamespace(family=get_family(family), unet=components["unet"])
    encoders, tokenizers = text_encoders(components), [components[k] for k in ("tokenizer", "tokenizer_2") if k in components]

    def encode_text(captions):
        embeds = model.family.encode_prompt(encoders, tokenizers, captions)
        return {"hidden": embeds.encoder_hidden_states, **({"pooled": embeds.pooled} if embeds.pooled is not None else {})}

    g = torch.Generator().manual_seed(7)
    samples = [ValidationSample(torch.randn(4, 8, 8, generator=g), "sdlorastyle, a circle"),
               ValidationSample(torch.randn(4, 8, 16, generator=g), "a square")]  # two buckets
    validation = ValidationSet(samples, components["scheduler"].__class__.from_config(components["scheduler"].config),
                               "epsilon", timesteps=None, seed=1234, batch_size=3)
    return network, validation, unet_predictor(model, encode_text, "cpu", torch.float32)


def test_even_spread_of_timesteps():
    assert even_timesteps(5, 1000) == [100, 300, 500, 700, 900]
    assert even_timesteps(4, 1000) == [125, 375, 625, 875]


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_same_weights_same_number_other_weights_other_number(family):
    network, validation, predict = setup(family)
    randomise_up(network, seed=1, std=0.05)
    rng_before, py_before = torch.get_rng_state(), random.getstate()
    first = validation.evaluate(predict, network)
    assert torch.equal(torch.get_rng_state(), rng_before) and random.getstate() == py_before
    torch.manual_seed(99)  # whatever training drew meanwhile
    second = validation.evaluate(predict, network)
    assert second.loss == first.loss and second.per_timestep == first.per_timestep
    assert list(first.per_timestep) == [100, 300, 500, 700, 900]
    assert first.loss == pytest.approx(sum(first.per_timestep.values()) / 5, rel=1e-9)
    randomise_up(network, seed=2, std=0.05)
    assert validation.evaluate(predict, network).loss != first.loss


def test_dropout_is_off_during_evaluation_and_training_mode_comes_back():
    network, validation, predict = setup("sd1", dropout=0.5)
    randomise_up(network, seed=1, std=0.05)
    network.train()
    in_train_mode = validation.evaluate(predict, network)
    assert network.training
    network.eval()
    assert validation.evaluate(predict, network).loss == in_train_mode.loss


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    folder = tmp_path_factory.mktemp("val")
    make_demo_dataset(folder, count=6, seed=0)
    return ImageDataset.scan(DatasetOptions(folder, BucketSpec(resolution=64, min_side=64, max_side=128)), seed=3)


def test_held_out_images_leave_training_and_the_pick_is_fixed(dataset, tmp_path):
    train, held = split_dataset(dataset, 2, seed=5)
    again = split_dataset(dataset, 2, seed=5)[1]
    assert [i.path for i in held] == [i.path for i in again] and len(held) == 2
    assert {i.path for i in train.items}.isdisjoint({i.path for i in held}) and len(train) == 4
    assert [i.index for i in train.items] == [0, 1, 2, 3]  # re-numbered for the batch plan
    assert sum(len(b.samples) for b in train.batches(0, 1)) == train.report.samples_per_epoch == 4
    with pytest.raises(SdloraError, match="validation.images is 6 but the dataset has only 6 usable images"):
        split_dataset(dataset, 6, seed=5)
    other = tmp_path / "other"
    make_demo_dataset(other, count=2, seed=1)
    same, items = validation_items(dataset, folder=str(other))
    assert same is dataset and len(items) == 2 and all(i.path.parent == other for i in items)

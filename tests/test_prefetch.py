"""Worker processes decoding the coming batches: plan order, fallback, Ctrl+C."""

import os
import signal

import pytest
import torch

from networks.errors import SdloraError
from trainer.caches.prefetch import PixelPrefetch, batch_pixels
from trainer.data.buckets import BucketSpec
from trainer.data.dataset import DatasetOptions, ImageDataset
from trainer.demo.demo_data import make_demo_dataset


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    folder = tmp_path_factory.mktemp("prefetch")
    make_demo_dataset(folder, count=6, seed=1)
    buckets = BucketSpec(resolution=64, step=64, min_side=64, max_side=128)
    return ImageDataset.scan(DatasetOptions(folder=folder, buckets=buckets, flip=True), seed=0)


def test_plan_order_from_workers_and_anything_else_inline(dataset):
    plan = dataset.batches(0, 2)
    prefetch = PixelPrefetch(dataset, workers=2)
    prefetch.start(plan, first=1)  # resuming mid-epoch
    assert torch.equal(prefetch.pixels(plan[0]), batch_pixels(dataset, plan[0]))  # out of turn: loaded inline
    assert not prefetch.loader_pids
    for batch in plan[1:]:
        assert torch.equal(prefetch.pixels(batch), batch_pixels(dataset, batch))
    assert len(prefetch.loader_pids) >= 1 and os.getpid() not in prefetch.loader_pids
    prefetch.close()


def test_workers_survive_ctrl_c_so_the_step_can_finish(dataset):
    plan = dataset.batches(0, 1)
    prefetch = PixelPrefetch(dataset, workers=1, ahead=1)
    prefetch.start(plan)
    prefetch.pixels(plan[0])
    (worker,) = prefetch.loader_pids
    os.kill(worker, signal.SIGINT)  # what Ctrl+C does to every process of the group
    for batch in plan[1:]:
        assert torch.equal(prefetch.pixels(batch), batch_pixels(dataset, batch))
    assert prefetch.loader_pids == {worker}
    prefetch.close()


def test_an_unreadable_image_is_the_same_one_sentence_from_a_worker(tmp_path):
    make_demo_dataset(tmp_path, count=2, seed=3)
    buckets = BucketSpec(resolution=64, step=64, min_side=64, max_side=128)
    data = ImageDataset.scan(DatasetOptions(folder=tmp_path, buckets=buckets), seed=0)
    plan = data.batches(0, 1)
    plan_path = data.items[plan[0].samples[0].item].path
    plan_path.write_bytes(plan_path.read_bytes()[:100])  # damaged after the scan
    with pytest.raises(SdloraError) as inline:
        batch_pixels(data, plan[0])
    prefetch = PixelPrefetch(data, workers=1)
    prefetch.start(plan)
    with pytest.raises(SdloraError) as from_worker:
        prefetch.pixels(plan[0])
    prefetch.close()
    assert str(from_worker.value) == str(inline.value) and "\n" not in str(from_worker.value)
    assert plan_path.name in str(from_worker.value)

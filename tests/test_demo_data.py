"""The generated demo dataset: deterministic, captioned with the trigger, mixed shapes of image."""
import pytest
from PIL import Image

from networks.errors import SdloraError
from trainer.data.buckets import BucketSpec
from trainer.data.dataset import DatasetOptions, ImageDataset
from trainer.demo.demo_data import TRIGGER, make_demo_dataset


def test_writes_count_images_with_trigger_captions(tmp_path):
    paths = make_demo_dataset(tmp_path / "demo", count=12, seed=0)
    assert len(paths) == 12 and len(list((tmp_path / "demo").glob("*.txt"))) == 12
    sizes = [Image.open(path).size for path in paths]
    assert all(64 <= side <= 256 for size in sizes for side in size)
    assert {(w > h) - (w < h) for w, h in sizes} == {-1, 0, 1}  # portrait, square and landscape
    for path in paths:
        caption = path.with_suffix(".txt").read_text(encoding="utf-8").strip()
        assert caption.startswith(f"{TRIGGER}, a ")


def test_same_seed_same_bytes_other_seed_other_images(tmp_path):
    first = make_demo_dataset(tmp_path / "a", count=4, seed=3)
    second = make_demo_dataset(tmp_path / "b", count=4, seed=3)
    other = make_demo_dataset(tmp_path / "c", count=4, seed=4)
    assert [p.read_bytes() for p in first] == [p.read_bytes() for p in second]
    assert [p.read_bytes() for p in first] != [p.read_bytes() for p in other]


def test_demo_data_scans_cleanly_into_several_buckets(tmp_path):
    make_demo_dataset(tmp_path, count=12)
    spec = BucketSpec(resolution=128, step=64, min_side=64, max_side=256)
    report = ImageDataset.scan(DatasetOptions(folder=tmp_path, buckets=spec)).report
    assert (report.usable, report.skipped, report.captions_missing) == (12, [], [])
    assert len(report.bucket_counts) >= 3


def test_count_below_one_is_refused(tmp_path):
    with pytest.raises(SdloraError, match="--count"):
        make_demo_dataset(tmp_path, count=0)

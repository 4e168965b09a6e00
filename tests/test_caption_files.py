"""Caption edits from the Dataset tab: atomic, only beside the dataset's images, counted."""
import pytest

from app.ui.caption_files import add_trigger_everywhere, read_caption, replace_everywhere, write_caption
from networks.errors import SdloraError


@pytest.fixture
def images(tmp_path):
    paths = [tmp_path / f"{name}.png" for name in ("a", "b", "c")]
    for path in paths:
        path.write_bytes(b"not read here")
    (tmp_path / "a.txt").write_text("mystyle, red circle\n")
    (tmp_path / "b.txt").write_text("\ufeffblue square, red border\n")  # a BOM, as Windows editors write
    return paths


def test_the_trigger_goes_first_once_and_uncaptioned_images_get_it(images, tmp_path):
    assert add_trigger_everywhere(images, "mystyle", tmp_path) == 2
    assert [read_caption(p) for p in images] == ["mystyle, red circle", "mystyle, blue square, red border", "mystyle"]
    assert add_trigger_everywhere(images, "mystyle", tmp_path) == 0
    with pytest.raises(SdloraError, match="cannot contain a comma"):
        add_trigger_everywhere(images, "my, style", tmp_path)


def test_find_and_replace_changes_only_matching_captions(images, tmp_path):
    assert replace_everywhere(images, "red", "green", tmp_path) == 2
    assert read_caption(images[1]) == "blue square, green border"
    assert read_caption(images[2]) is None  # no caption file is created by a replace
    with pytest.raises(SdloraError, match="Enter the text to find"):
        replace_everywhere(images, "", "x", tmp_path)


def test_a_caption_is_written_atomically_and_only_inside_the_dataset(images, tmp_path):
    write_caption(images[2], "  new caption \n", tmp_path)
    assert (tmp_path / "c.txt").read_text() == "new caption\n"
    assert not list(tmp_path.glob(".*tmp"))  # no temporary file is left behind
    with pytest.raises(SdloraError, match="not in the opened dataset folder"):
        write_caption(tmp_path.parent / "elsewhere.png", "x", tmp_path)

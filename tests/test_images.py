"""Every image mode a user's folder can hold comes out as 8-bit RGB, with alpha kept when present."""
import numpy as np
import pytest
from PIL import Image

from networks.errors import SdloraError
from trainer.data.images import (
    ImageInfo,
    UnreadableImageError,
    is_image_file,
    load_image,
    probe_image,
    to_rgb,
)


def _save(image: Image.Image, path, **params):
    image.save(path, **params)
    return path


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (40, 20), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 20, 20))  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display"
    path = _save(image, tmp_path / "rotated.jpg", exif=exif, quality=95)
    loaded = load_image(path)
    assert loaded.size == (20, 40)
    assert probe_image(path)[0].size == (20, 40)
    top, bottom = loaded.rgb.getpixel((10, 5)), loaded.rgb.getpixel((10, 35))
    assert top[0] > 200 and top[2] < 60  # the red half is now on top
    assert bottom[2] > 200 and bottom[0] < 60


@pytest.mark.parametrize(
    "mode, pixel, expected_rgb",
    [
        ("L", 77, (77, 77, 77)),
        ("1", 1, (255, 255, 255)),
        ("CMYK", (0, 255, 255, 0), (255, 0, 0)),
        ("RGB", (1, 2, 3), (1, 2, 3)),
        ("I;16", 32896, (128, 128, 128)),  # 16-bit mid-grey stays mid-grey, not clipped to white
        ("I", 65535, (255, 255, 255)),
        ("I", 514, (2, 2, 2)),
    ],
)
def test_opaque_modes_become_rgb_without_alpha(mode, pixel, expected_rgb):
    loaded = to_rgb(Image.new(mode, (4, 4), pixel))
    assert loaded.rgb.mode == "RGB"
    assert loaded.rgb.getpixel((1, 1)) == expected_rgb
    assert loaded.alpha is None


@pytest.mark.parametrize(
    "mode, pixel, expected_rgb, expected_alpha",
    [
        ("RGBA", (0, 0, 0, 0), (255, 255, 255), 0),  # fully transparent -> white background
        ("RGBA", (10, 20, 30, 255), (10, 20, 30), 255),
        ("RGBA", (0, 0, 0, 128), (127, 127, 127), 128),  # half transparent black on white
        ("LA", (0, 0), (255, 255, 255), 0),
        ("LA", (40, 255), (40, 40, 40), 255),
    ],
)
def test_alpha_is_composited_on_white_and_returned(mode, pixel, expected_rgb, expected_alpha):
    loaded = to_rgb(Image.new(mode, (4, 4), pixel))
    assert loaded.rgb.mode == "RGB"
    assert loaded.rgb.getpixel((0, 0)) == expected_rgb
    assert loaded.alpha.mode == "L"
    assert loaded.alpha.getpixel((0, 0)) == expected_alpha


def test_palette_with_transparent_index(tmp_path):
    image = Image.new("P", (8, 8), 1)
    image.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)
    image.putpixel((0, 0), 0)
    path = _save(image, tmp_path / "palette.png", transparency=0)
    loaded = load_image(path)
    assert loaded.rgb.getpixel((0, 0)) == (255, 255, 255)
    assert loaded.rgb.getpixel((5, 5)) == (200, 10, 10)
    assert (loaded.alpha.getpixel((0, 0)), loaded.alpha.getpixel((5, 5))) == (0, 255)


def test_colour_key_transparency_becomes_white(tmp_path):
    image = Image.new("RGB", (8, 8), (0, 255, 0))
    image.putpixel((0, 0), (255, 0, 0))
    loaded = load_image(_save(image, tmp_path / "keyed.png", transparency=(255, 0, 0)))
    assert loaded.rgb.getpixel((0, 0)) == (255, 255, 255) and loaded.alpha.getpixel((0, 0)) == 0
    assert loaded.rgb.getpixel((4, 4)) == (0, 255, 0) and loaded.alpha.getpixel((4, 4)) == 255


def test_palette_without_transparency_has_no_alpha(tmp_path):
    path = _save(Image.new("RGB", (8, 8), (9, 99, 199)).quantize(4), tmp_path / "palette.bmp")
    loaded = load_image(path)
    assert loaded.alpha is None
    assert loaded.rgb.getpixel((3, 3)) == (9, 99, 199)


def test_sixteen_bit_png_keeps_its_gradient(tmp_path):
    ramp = np.tile(np.linspace(0, 65535, 16).astype(np.uint16), (4, 1))
    path = _save(Image.fromarray(ramp), tmp_path / "deep.png")
    red = np.asarray(load_image(path).rgb)[0, :, 0]
    assert red[0] == 0 and red[-1] == 255
    assert np.all(np.diff(red.astype(int)) > 0)  # clipping would flatten the ramp to 255


@pytest.mark.parametrize("suffix, params", [(".png", {}), (".jpg", {"quality": 100}), (".jpeg", {}), (".webp", {"lossless": True}), (".bmp", {})])
def test_every_supported_format_opens(tmp_path, suffix, params):
    path = _save(Image.new("RGB", (24, 16), (250, 0, 0)), tmp_path / f"image{suffix}", **params)
    assert is_image_file(path)
    loaded = load_image(path)
    assert loaded.size == (24, 16)
    assert loaded.rgb.getpixel((12, 8))[0] > 240


@pytest.mark.parametrize("name", ["notes.txt", "image.gif", "model.safetensors"])
def test_other_files_are_not_images(tmp_path, name):
    assert not is_image_file(tmp_path / name)


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".webp"])
def test_corrupt_and_truncated_files_are_reported(tmp_path, suffix):
    garbage = tmp_path / f"garbage{suffix}"
    garbage.write_bytes(b"not an image at all")
    whole = _save(Image.effect_noise((256, 256), 60).convert("RGB"), tmp_path / f"whole{suffix}")
    truncated = tmp_path / f"truncated{suffix}"
    truncated.write_bytes(whole.read_bytes()[: len(whole.read_bytes()) // 2])
    for path in (garbage, truncated):
        info, reason = probe_image(path)
        assert info is None and reason
        with pytest.raises(UnreadableImageError, match=path.name) as raised:
            load_image(path)
        assert isinstance(raised.value, SdloraError)
    assert probe_image(whole) == (ImageInfo((256, 256), False), None)


@pytest.mark.parametrize(
    "image, params, has_alpha",
    [
        (Image.new("RGBA", (8, 8)), {}, True),
        (Image.new("LA", (8, 8)), {}, True),
        (Image.new("RGB", (8, 8)), {"transparency": (0, 0, 0)}, True),
        (Image.new("P", (8, 8)), {"transparency": 0}, True),
        (Image.new("RGB", (8, 8)), {}, False),
        (Image.new("L", (8, 8)), {}, False),
    ],
)
def test_probe_reports_transparency_like_load_does(tmp_path, image, params, has_alpha):
    path = _save(image, tmp_path / "probe.png", **params)
    assert probe_image(path)[0].has_alpha is has_alpha
    assert (load_image(path).alpha is not None) is has_alpha

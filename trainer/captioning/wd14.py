"""WD14-style taggers (SmilingWolf's wd-v1-4 / wd-*-tagger-v3): an ONNX model and selected_tags.csv, run with
onnxruntime, as kohya_ss and the A1111 tagger extension run them.

The model reads a batch of square BGR images in 0-255 (NHWC) and gives one probability per row of the CSV;
rows of category 9 are ratings (never written), 4 are characters (their own threshold), the rest general tags.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from networks.errors import SdloraError
from trainer.captioning.settings import CaptionerSettings
from trainer.captioning.sources import CaptionerKind, loading, not_a_model_folder

MODEL_FILE, TAGS_FILE = "model.onnx", "selected_tags.csv"
RATING, CHARACTER = "9", "4"
# Tags that are faces drawn with underscores; every other tag's underscores become spaces (kohya, SmilingWolf).
KAOMOJIS = {"0_0", "(o)_(o)", "+_+", "+_-", "._.", "<o>_<o>", "<|>_<|>", "=_=", ">_<", "3_3", "6_9", ">_o", "@_@",
            "^_^", "o_o", "u_u", "x_x", "|_|", "||_||"}
PAD_COLOUR = (255, 255, 255)


@dataclass(frozen=True)
class Tag:
    name: str  # as written in captions: underscores replaced
    category: str


class Wd14Tagger:
    def __init__(self, kind: CaptionerKind, source: str | Path, settings: CaptionerSettings):
        try:
            import onnxruntime
        except ImportError:
            raise SdloraError("The WD14 tagger needs onnxruntime; install it with `pip install 'sdlora[caption]'` "
                              "(or `pip install onnxruntime`).") from None
        model_file, tags_file = _files(kind, source)
        self.tags = read_tags(tags_file)
        try:
            self.session = onnxruntime.InferenceSession(str(model_file), providers=_providers(onnxruntime))
        except Exception as error:  # noqa: BLE001 - onnxruntime's exception types are not public
            raise not_a_model_folder(kind, model_file.parent, str(error)) from None
        model_input = self.session.get_inputs()[0]
        self.input_name, self.side = model_input.name, _square_side(model_input.shape, model_file)
        outputs = self.session.get_outputs()[0].shape[-1]
        if isinstance(outputs, int) and outputs != len(self.tags):
            raise SdloraError(f"'{model_file}' gives {outputs} tag probabilities but '{tags_file}' lists "
                              f"{len(self.tags)} tags; use the selected_tags.csv of the same model.")
        self.settings = settings

    def caption(self, images: list[Image.Image]) -> list[str]:
        batch = np.stack([to_model_input(image, self.side) for image in images])
        probabilities = self.session.run(None, {self.input_name: batch})[0]
        return [", ".join(self.pick(row)) for row in probabilities]

    def pick(self, probabilities: np.ndarray) -> list[str]:
        """Character tags above their threshold, then general tags above theirs, each most likely first."""
        settings, excluded = self.settings, {tag.strip() for tag in self.settings.exclude_tags}
        characters, general = [], []
        for tag, p in zip(self.tags, probabilities.tolist()):
            if tag.category == RATING or tag.name in excluded:
                continue
            if tag.category == CHARACTER:
                if p >= settings.character_threshold:
                    characters.append((p, tag.name))
            elif p >= settings.threshold:
                general.append((p, tag.name))
        return [name for _, name in sorted(characters, reverse=True) + sorted(general, reverse=True)]


def read_tags(path: Path) -> list[Tag]:
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise SdloraError(f"Cannot read the tag list '{path}' ({error}); download the model's selected_tags.csv "
                          "again.") from None
    if not rows or not {"name", "category"} <= set(rows[0]):
        raise SdloraError(f"'{path}' is not a WD14 tag list (it needs 'name' and 'category' columns); use the "
                          "model's own selected_tags.csv.")
    return [Tag(tag_text(row["name"]), row["category"].strip()) for row in rows]


def tag_text(name: str) -> str:
    name = name.strip()
    return name if name in KAOMOJIS else name.replace("_", " ")


def to_model_input(image: Image.Image, side: int) -> np.ndarray:
    """The model's view of an RGB image: padded to a square with white, resized, BGR, 0-255 float32 (HWC)."""
    longest = max(image.size)
    square = Image.new("RGB", (longest, longest), PAD_COLOUR)
    square.paste(image, ((longest - image.width) // 2, (longest - image.height) // 2))
    if longest != side:
        square = square.resize((side, side), Image.BICUBIC)
    return np.asarray(square, dtype=np.float32)[:, :, ::-1].copy()


def _files(kind: CaptionerKind, source: str | Path) -> tuple[Path, Path]:
    if isinstance(source, Path):
        missing = [name for name in (MODEL_FILE, TAGS_FILE) if not (source / name).is_file()]
        if missing:
            raise not_a_model_folder(kind, source, f"no {' or '.join(missing)}")
        return source / MODEL_FILE, source / TAGS_FILE
    from huggingface_hub import hf_hub_download

    with loading(kind, source):
        return Path(hf_hub_download(source, MODEL_FILE)), Path(hf_hub_download(source, TAGS_FILE))


def _providers(onnxruntime) -> list[str]:
    available = onnxruntime.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


def _square_side(shape: list, model_file: Path) -> int:
    if len(shape) != 4 or shape[3] != 3 or not isinstance(shape[1], int) or shape[1] != shape[2]:
        raise SdloraError(f"'{model_file}' takes input of shape {shape}; a WD14 tagger takes [batch, side, side, 3] "
                          "images (SmilingWolf's wd-* taggers do).")
    return shape[1]

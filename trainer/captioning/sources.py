"""Where a captioner's files come from: a local folder, or a Hugging Face id (the local cache, else the hub).

Machines that train are often offline, so every way of not getting the model ends in one sentence that
names it and says how to fetch it elsewhere and pass the folder.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

from networks.errors import SdloraError


@dataclass(frozen=True)
class CaptionerKind:
    name: str  # the --model value
    label: str  # for sentences: "the BLIP captioner"
    default_id: str
    files: str  # what a local folder must hold, for the error sentence


KINDS = {
    "blip": CaptionerKind("blip", "BLIP captioner", "Salesforce/blip-image-captioning-large",
                          "config.json, the weights and the processor files"),
    # The transformers-native conversion; microsoft/Florence-2-* need remote code, which sdlora never runs.
    "florence2": CaptionerKind("florence2", "Florence-2 captioner", "florence-community/Florence-2-large",
                               "config.json, the weights and the processor files"),
    "wd14": CaptionerKind("wd14", "WD14 tagger", "SmilingWolf/wd-vit-tagger-v3", "model.onnx and selected_tags.csv"),
}


def captioner_kind(name: str) -> CaptionerKind:
    if name not in KINDS:
        raise SdloraError(f"Unknown captioner '{name}'; choose one of {', '.join(KINDS)}.")
    return KINDS[name]


def resolve(kind: CaptionerKind, model_id: str | None) -> str | Path:
    """The local folder to load from, or the hub id to look up; a path that does not exist is an error,
    not a hub id (an id is exactly `owner/name`)."""
    model_id = (model_id or "").strip() or kind.default_id
    folder = Path(model_id).expanduser()
    if folder.is_dir():
        return folder
    if folder.exists():
        raise SdloraError(f"'{model_id}' is a file; give the {kind.label}'s folder (with {kind.files}) or a "
                          "Hugging Face id.")
    parts = model_id.split("/")
    if model_id.startswith((".", "/", "~")) or len(parts) != 2 or not all(parts):
        raise SdloraError(f"The {kind.label} folder '{model_id}' does not exist; give a folder holding "
                          f"{kind.files}, or a Hugging Face id like {kind.default_id}.")
    return model_id


def unavailable(kind: CaptionerKind, model_id: str) -> SdloraError:
    return SdloraError(
        f"Cannot get the {kind.label} '{model_id}': it is not in the local Hugging Face cache and the hub "
        f"cannot be reached (or has no such model); on a machine with internet run `hf download {model_id} "
        f"--local-dir {model_id.split('/')[-1]}`, copy that folder here and give it as the model "
        "(--model-id FOLDER, or the Dataset tab's model field).")


def not_a_model_folder(kind: CaptionerKind, folder: str | Path, detail: str) -> SdloraError:
    # The libraries' messages run to several sentences and lines; their first sentence names the problem.
    detail = detail.strip().splitlines()[0].split(". ")[0][:160] if detail.strip() else "unreadable"
    return SdloraError(f"'{folder}' is not a {kind.label} folder ({detail.rstrip('.')}); it needs {kind.files}, "
                       f"as `hf download {kind.default_id} --local-dir FOLDER` writes them.")


@contextlib.contextmanager
def loading(kind: CaptionerKind, source: str | Path):
    """Turn the libraries' failures to find or read the model into the sentences above."""
    from huggingface_hub.errors import EntryNotFoundError

    try:
        yield
    except SdloraError:
        raise
    except (OSError, EntryNotFoundError) as error:
        if isinstance(source, Path):
            raise not_a_model_folder(kind, source, str(error)) from None
        raise unavailable(kind, source) from None
    except ValueError as error:  # transformers: a config.json without a model type, a foreign layout
        raise not_a_model_folder(kind, source, str(error)) from None

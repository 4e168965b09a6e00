"""The Train tab's "Import a kohya_ss preset": a kohya_ss GUI JSON becomes a user preset, as
`sdlora presets import-kohya FILE NAME` makes it, named after the file unless a name was typed."""
from __future__ import annotations

import re
from pathlib import Path

from trainer.config.kohya_import import import_kohya_file

SHOWN_UNMAPPED = 8  # the sentence names this many keys with no sdlora counterpart, then counts the rest


def preset_name_for(file_name: str, typed: str | None) -> str:
    """The typed name, else the file's stem as a preset name ("EDG LoCon.json" -> "edg-locon")."""
    if typed and typed.strip():
        return typed.strip()
    slug = re.sub(r"[^a-z0-9._-]+", "-", Path(file_name).stem.lower()).strip("-._")
    return slug or "kohya-preset"


def import_uploaded_kohya(path: str, typed_name: str | None) -> tuple[str, str]:
    """Import the uploaded file as a user preset: (preset name, what happened in sentences). Gradio keeps
    an upload's own file name, so the path's name is the one the user chose."""
    shown = Path(path).name
    name = preset_name_for(shown, typed_name)
    _, result = import_kohya_file(path, name)
    sentences = [f"Imported {shown} as preset {name}."]
    sentences += [note if note.endswith(".") else note + "." for note in result.notes]
    unmapped = sorted(result.meaningful_unmapped())
    if unmapped:
        listed = ", ".join(unmapped[:SHOWN_UNMAPPED])
        more = f" and {len(unmapped) - SHOWN_UNMAPPED} more" if len(unmapped) > SHOWN_UNMAPPED else ""
        sentences.append(f"Not imported, no sdlora counterpart: {listed}{more}.")
    return name, " ".join(sentences)

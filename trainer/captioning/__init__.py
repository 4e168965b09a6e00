"""Auto-captioning a dataset folder: BLIP and Florence-2 through transformers, WD14-style taggers through
onnxruntime. One file per captioner kind; `folder.py` runs one over a folder; `sources.py` says where a
model comes from (a Hugging Face id or a local folder) and what to do when it cannot be had; `settings.py`
is what a run is asked for. Nothing heavy is imported here, so the CLI's parser can read the choices."""
from __future__ import annotations


def load_captioner(settings):
    """The captioner `settings` (a CaptionerSettings) names, loaded: it has
    `caption(list of RGB images) -> list of str`."""
    from trainer.captioning.sources import captioner_kind, resolve

    kind = captioner_kind(settings.kind)
    source = resolve(kind, settings.model_id)
    if kind.name == "wd14":
        from trainer.captioning.wd14 import Wd14Tagger as captioner_class
    elif kind.name == "florence2":
        from trainer.captioning.florence2 import Florence2Captioner as captioner_class
    else:
        from trainer.captioning.blip import BlipCaptioner as captioner_class
    return captioner_class(kind, source, settings)

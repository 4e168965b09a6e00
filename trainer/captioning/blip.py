"""BLIP (Salesforce): one short plain-English sentence per image, through transformers."""
from __future__ import annotations

from pathlib import Path

from PIL import Image

from trainer.captioning.pretrained import load_pretrained
from trainer.captioning.settings import CaptionerSettings
from trainer.captioning.sources import CaptionerKind


class BlipCaptioner:
    MIN_TOKENS = 5  # kohya's make_captions default: no one-word captions

    def __init__(self, kind: CaptionerKind, source: str | Path, settings: CaptionerSettings):
        from transformers import BlipForConditionalGeneration, BlipProcessor

        self.model, self.processor = load_pretrained(kind, source, "blip", BlipForConditionalGeneration,
                                                     BlipProcessor)
        self.settings = settings

    def caption(self, images: list[Image.Image]) -> list[str]:
        import torch

        inputs = self.processor(images=images, return_tensors="pt").to(self.model.device, self.model.dtype)
        with torch.inference_mode():
            tokens = self.model.generate(**inputs, max_new_tokens=self.settings.tokens,
                                         min_length=self.MIN_TOKENS, num_beams=self.settings.num_beams)
        return [text.strip() for text in self.processor.batch_decode(tokens, skip_special_tokens=True)]

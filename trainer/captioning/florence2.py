"""Florence-2 (Microsoft) through transformers' own implementation (transformers >= 5; no remote code):
a caption, a detailed caption or a paragraph per image, chosen by its task token."""
from __future__ import annotations

from pathlib import Path

from PIL import Image

from networks.errors import SdloraError
from trainer.captioning.pretrained import load_pretrained
from trainer.captioning.settings import FLORENCE_TASKS, CaptionerSettings
from trainer.captioning.sources import CaptionerKind


class Florence2Captioner:
    def __init__(self, kind: CaptionerKind, source: str | Path, settings: CaptionerSettings):
        import transformers

        if not hasattr(transformers, "Florence2ForConditionalGeneration"):
            raise SdloraError(f"Florence-2 needs transformers 5 or newer (this is {transformers.__version__}); "
                              "upgrade with `pip install -U transformers`, or use --model blip or wd14.")
        self.model, self.processor = load_pretrained(kind, source, "florence2",
                                                     transformers.Florence2ForConditionalGeneration,
                                                     transformers.AutoProcessor)
        self.settings = settings

    def caption(self, images: list[Image.Image]) -> list[str]:
        import torch

        task = FLORENCE_TASKS[self.settings.florence_task]
        inputs = self.processor(text=[task] * len(images), images=images, return_tensors="pt")
        with torch.inference_mode():
            tokens = self.model.generate(input_ids=inputs["input_ids"].to(self.model.device),
                                         pixel_values=inputs["pixel_values"].to(self.model.device, self.model.dtype),
                                         max_new_tokens=self.settings.tokens, num_beams=self.settings.num_beams,
                                         do_sample=False)
        # Caption tasks are plain text: the processor's post-processing for them only drops <s> and </s>.
        return [text.strip() for text in self.processor.batch_decode(tokens, skip_special_tokens=True)]

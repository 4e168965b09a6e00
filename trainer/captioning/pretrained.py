"""Loading a transformers captioner (BLIP, Florence-2) from a folder or the hub, on the GPU when there is one."""
from __future__ import annotations

from pathlib import Path

from networks.errors import SdloraError
from trainer.captioning.sources import CaptionerKind, loading


def device_and_dtype():
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda"), torch.float16
    return torch.device("cpu"), torch.float32


def load_pretrained(kind: CaptionerKind, source: str | Path, model_type: str, model_class, processor_class):
    """(model in eval mode on the device, processor). The folder's model type is checked first:
    transformers would otherwise load another model's folder with random weights and a warning."""
    from transformers import AutoConfig

    device, dtype = device_and_dtype()
    with loading(kind, source):
        config = AutoConfig.from_pretrained(str(source))
        if config.model_type != model_type:
            raise SdloraError(f"'{source}' holds a {config.model_type} model, not a {kind.label}; choose the "
                              f"matching captioner kind, or give a {kind.label} such as {kind.default_id}.")
        processor = processor_class.from_pretrained(str(source))
        model = model_class.from_pretrained(str(source), dtype=dtype)
    return model.to(device).eval(), processor

"""What a caption run is asked to do: which captioner, how it generates, and the tagger's thresholds."""
from __future__ import annotations

from dataclasses import dataclass

from networks.errors import SdloraError
from trainer.captioning.sources import captioner_kind

# Florence-2's caption tasks by the names the CLI and UI offer; the values are its task tokens.
FLORENCE_TASKS = {"caption": "<CAPTION>", "detailed": "<DETAILED_CAPTION>", "more-detailed": "<MORE_DETAILED_CAPTION>"}
# kohya's tagger default for general tags; SmilingWolf's recommended one for character tags (kohya's
# default of 0.35 for those too names characters on a hunch).
GENERAL_THRESHOLD = 0.35
CHARACTER_THRESHOLD = 0.85
DEFAULT_MAX_TOKENS = {"blip": 75, "florence2": 256}  # Florence-2's detailed captions run past 75 tokens


@dataclass(frozen=True)
class CaptionerSettings:
    kind: str = "blip"  # blip | florence2 | wd14
    model_id: str = ""  # a Hugging Face id or a local folder; "" = the kind's default
    max_tokens: int = 0  # longest caption in tokens (BLIP, Florence-2); 0 = the kind's default
    num_beams: int = 3  # beam search: deterministic captions, as OneTrainer and Florence-2's card use
    florence_task: str = "detailed"
    threshold: float = GENERAL_THRESHOLD  # WD14: general tags at or above this probability
    character_threshold: float = CHARACTER_THRESHOLD  # WD14: character tags
    exclude_tags: tuple[str, ...] = ()  # WD14: tags never written (kohya's undesired_tags)
    batch_size: int = 1

    def __post_init__(self):
        captioner_kind(self.kind)
        for name in ("threshold", "character_threshold"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise SdloraError(f"The tag {name.replace('_', ' ')} must be between 0 and 1 (got {value}).")
        if self.florence_task not in FLORENCE_TASKS:
            raise SdloraError(f"Unknown Florence-2 task '{self.florence_task}'; choose one of "
                              f"{', '.join(FLORENCE_TASKS)}.")
        if self.batch_size < 1 or self.max_tokens < 0 or self.num_beams < 1:
            raise SdloraError(f"The caption batch size and beams must be at least 1 and the token limit 0 or more "
                              f"(got batch size {self.batch_size}, beams {self.num_beams}, "
                              f"tokens {self.max_tokens}).")

    @property
    def tokens(self) -> int:
        return self.max_tokens or DEFAULT_MAX_TOKENS.get(self.kind, 75)

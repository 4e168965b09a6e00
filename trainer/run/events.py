"""The run's events (docs/RUN_DIRECTORY.md): one frozen dataclass per kind of line in events.jsonl.

This is the only code that knows how an event is spelled on disk. The trainer builds these and
`RunDir.emit` writes them; every reader turns a line into one with `parse`, once, and then asks typed
questions. `parse` is lenient on purpose: run folders written by older versions (or by hand, in tests)
lack fields, and a newer trainer may add some, so a missing field takes its default, an unknown one is
ignored, and a value of the wrong type reads as absent rather than hiding the run.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import ClassVar

# Field metadata: left out of the line when None, as the trainer always did (and old lines lack them).
OMITTED_WHEN_NONE = {"omitted_when_none": True}


@dataclass(frozen=True)
class Event:
    event: ClassVar[str] = ""  # the `event` key
    time: str = field(default="", kw_only=True)  # ISO 8601, UTC; stamped by RunDir.emit

    def record(self) -> dict:
        """The line as written: `event`, `time`, then the fields in declaration order."""
        line = {"event": self.event}
        for item in fields(self):
            value = getattr(self, item.name)
            if value is None and item.metadata.get("omitted_when_none"):
                continue
            line[item.name] = list(value) if isinstance(value, tuple) else value
        return line


@dataclass(frozen=True)
class SkippedEvent(Event):
    event: ClassVar[str] = "skipped"
    name: str = ""  # relative to its folder
    reason: str = ""
    kind: str = ""  # "image", "folder" or "regularization image or folder"


@dataclass(frozen=True)
class StartedEvent(Event):
    event: ClassVar[str] = "started"
    total_steps: int | None = None
    epochs: int | None = None
    start_step: int = 0  # 0, or the step a resume continues from
    name: str = ""
    num_images: int | None = None
    encoded_images: int | None = field(default=None, metadata=OMITTED_WHEN_NONE)
    encoded_captions: int | None = field(default=None, metadata=OMITTED_WHEN_NONE)
    gpu_card_bytes: int | None = field(default=None, metadata=OMITTED_WHEN_NONE)  # on CUDA: the card's memory
    gpu_predicted_bytes: int | None = field(default=None, metadata=OMITTED_WHEN_NONE)  # the pre-flight's traced peak


@dataclass(frozen=True)
class StepEvent(Event):
    event: ClassVar[str] = "step"
    step: int = 0  # 1-based optimizer steps
    epoch: int | None = None
    loss: float | None = None
    lr: float | None = None
    it_per_s: float | None = None
    eta_s: float | None = None
    total_steps: int | None = None
    keys_scaled: int | None = field(default=None, metadata=OMITTED_WHEN_NONE)  # with train.scale_weight_norms
    max_key_norm: float | None = field(default=None, metadata=OMITTED_WHEN_NONE)
    mean_key_norm: float | None = field(default=None, metadata=OMITTED_WHEN_NONE)
    gpu_reserved_bytes: int | None = field(default=None, metadata=OMITTED_WHEN_NONE)  # on CUDA: the peaks so far
    gpu_allocated_bytes: int | None = field(default=None, metadata=OMITTED_WHEN_NONE)
    warning: str | None = field(default=None, metadata=OMITTED_WHEN_NONE)  # one sentence, the first time it applies


@dataclass(frozen=True)
class SampleEvent(Event):
    event: ClassVar[str] = "sample"
    step: int | None = None
    paths: tuple = ()  # relative to the run folder, one per prompt
    prompts: tuple = ()


@dataclass(frozen=True)
class CheckpointEvent(Event):
    event: ClassVar[str] = "checkpoint"
    step: int = 0
    path: str = ""  # relative to the run folder


@dataclass(frozen=True)
class ValidationEvent(Event):
    event: ClassVar[str] = "validation"
    step: int = 0
    loss: float | None = None
    per_timestep: dict = field(default_factory=dict)  # {timestep: loss}


@dataclass(frozen=True)
class LoadCheckEvent(Event):
    event: ClassVar[str] = "load_check"
    ok: bool = False
    problems: tuple = ()
    path: str = ""  # relative to the run folder
    modules: int | None = None
    not_loaded_by: tuple | None = field(default=None, metadata=OMITTED_WHEN_NONE)  # LoHa/LoKr: not diffusers


@dataclass(frozen=True)
class StoppedEvent(Event):
    event: ClassVar[str] = "stopped"
    step: int = 0
    checkpoint: str = ""  # relative to the run folder


@dataclass(frozen=True)
class FinishedEvent(Event):
    event: ClassVar[str] = "finished"
    step: int = 0
    path: str = ""  # the final <name>.safetensors, relative
    ema_path: str | None = field(default=None, metadata=OMITTED_WHEN_NONE)


@dataclass(frozen=True)
class ErrorEvent(Event):
    event: ClassVar[str] = "error"
    message: str = ""  # one sentence
    step: int = 0


EVENT_TYPES: dict[str, type[Event]] = {kind.event: kind for kind in (
    SkippedEvent, StartedEvent, StepEvent, SampleEvent, CheckpointEvent, ValidationEvent, LoadCheckEvent,
    StoppedEvent, FinishedEvent, ErrorEvent)}
EVENT_KINDS = tuple(EVENT_TYPES)  # in the order they appear in a run


def _integer(value):
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _number(value):
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _text(value):
    return str(value) if isinstance(value, (str, int, float)) and not isinstance(value, bool) else None


def _sequence(value):
    return tuple(value) if isinstance(value, (list, tuple)) else None


def _mapping(value):
    return dict(value) if isinstance(value, dict) else None


# How a JSON value is read as each annotation used above; None means "absent": the default applies.
_READERS = {"int": _integer, "int | None": _integer, "float | None": _number, "str": _text, "str | None": _text,
            "bool": lambda value: value if isinstance(value, bool) else None, "tuple": _sequence,
            "tuple | None": _sequence, "dict": _mapping}


def parse(record: dict) -> Event | None:
    """The event a line of events.jsonl holds, or None for a line that is not one of the known kinds."""
    if not isinstance(record, dict):
        return None
    kind = EVENT_TYPES.get(record.get("event"))
    if kind is None:
        return None
    values = {}
    for item in fields(kind):
        value = _READERS[item.type](record.get(item.name))
        if value is not None:
            values[item.name] = value
    return kind(**values)

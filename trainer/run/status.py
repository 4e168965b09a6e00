"""A run's status and progress as pure functions of its events (docs/RUN_DIRECTORY.md).

Whoever reads a run folder (the UI, a script) parses events.jsonl with `trainer.run.events.parse` and asks
here; what cannot be read from the events (whether the trainer process lives, what it printed before
dying) is found out by the caller and passed in as a value. Nothing here touches the disk.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone

from trainer.run.events import (
    ErrorEvent,
    Event,
    FinishedEvent,
    LoadCheckEvent,
    SampleEvent,
    StartedEvent,
    StepEvent,
    StoppedEvent,
    ValidationEvent,
)

LIFECYCLE = (StartedEvent, StoppedEvent, FinishedEvent, ErrorEvent)  # what a run's status is read from
STATUSES = ("created", "starting", "running", "stopped", "finished", "error", "interrupted")
ACTIVE = ("starting", "running")  # a trainer process is (or is about to be) alive
RESUMABLE = ("stopped", "interrupted", "error")


@dataclass(frozen=True)
class Process:
    """What the caller found out about the run's trainer process."""

    alive: bool = False
    started: bool = False  # the live process has written its own `started` event (else it is loading)
    failure: str = ""  # the sentence a process that exited without an event left (its log's last line)


@dataclass(frozen=True)
class RunState:
    """One run as a list of runs shows it."""

    status: str  # one of STATUSES
    message: str  # the error sentence, when there is one
    step: int
    total_steps: int | None
    name: str  # from the newest `started` event; "" before the first
    final_path: str | None  # the final file (relative), unless its load check failed
    final_check: LoadCheckEvent | None  # the final file's load check, when there is one
    final_loss: float | None  # the last logged training loss
    train_seconds: float | None  # time spent training, summed over its segments (a resume adds one)
    history: tuple[tuple[str, int], ...]  # (lifecycle event, step) in order: started, stopped, started...


@dataclass
class RunProgress:
    """What a live view draws of one run: curves, rates, samples and load checks, paths relative."""

    losses: list[tuple[int, float]] = field(default_factory=list)  # (step, loss)
    validation: list[tuple[int, float]] = field(default_factory=list)  # (step, validation loss)
    it_per_s: float | None = None
    eta_s: float | None = None
    epoch: int | None = None
    lr: float | None = None
    samples: list[tuple[str, str]] = field(default_factory=list)  # (image, "step N: prompt"), oldest first
    # The sample grid: step -> [(image or None, prompt)] by prompt index, steps in order of appearance.
    sample_sets: dict[int, list[tuple[str | None, str]]] = field(default_factory=dict)
    load_checks: dict[str, LoadCheckEvent] = field(default_factory=dict)  # path -> its newest load check
    last_check: LoadCheckEvent | None = None  # the newest load check of the run
    ema_path: str | None = None  # the EMA weights' export, when the run finished with EMA
    # On CUDA (this segment's process): the card, the traced prediction, the measured peaks, the warnings.
    gpu_card: int | None = None
    gpu_predicted: int | None = None
    gpu_reserved: int | None = None
    gpu_allocated: int | None = None
    warnings: list[str] = field(default_factory=list)


def last_lifecycle(events: list[Event]) -> Event | None:
    return next((e for e in reversed(events) if isinstance(e, LIFECYCLE)), None)


def exit_failure_matters(events: list[Event]) -> bool:
    """Whether a dead process's last words can be the status message (no event says how the run ended)."""
    return isinstance(last_lifecycle(events), (StartedEvent, type(None)))


def status(events: list[Event], process: Process) -> tuple[str, str]:
    """(status, message): `running` or `starting` while the process lives, else the last lifecycle event;
    `started` with no live process is `interrupted` (killed), resumable."""
    if process.alive:
        # Loading (a resumed run still has its old `stopped` last until its new `started`), or running;
        # after its final event the process is still saving and exiting, which counts as running.
        return ("running" if process.started else "starting"), ""
    last = last_lifecycle(events)
    if last is None:
        return ("error", process.failure) if process.failure else ("created", "")
    if isinstance(last, StartedEvent):
        return "interrupted", process.failure
    if isinstance(last, ErrorEvent):
        return "error", last.message or "The trainer reported an error."
    return last.event, ""


def run_state(events: list[Event], process: Process) -> RunState:
    kind, message = status(events, process)
    started = _last(events, StartedEvent)
    final = _last(events, FinishedEvent)
    final_path = final.path if final is not None and final.path else None
    final_check = next((e for e in reversed(events) if isinstance(e, LoadCheckEvent) and e.path == final_path),
                       None) if final_path else None
    if final_check is not None and not final_check.ok:
        # A file that does not load is never presented as a finished LoRA.
        problems = list(final_check.problems) or ["unknown problem"]
        kind, message = "error", (f"{final_path.rsplit('/', 1)[-1]} failed the load check ({problems[0]}); it is "
                                  "kept for inspection but is not a usable LoRA.")
        final_path = None
    loss = next((e.loss for e in reversed(events) if isinstance(e, StepEvent) and e.loss is not None), None)
    return RunState(kind, message, current_step(events), total_steps(events), started.name if started else "",
                    final_path, final_check, loss, train_seconds(events), history(events))


def current_step(events: list[Event]) -> int:
    """The newest step reached: of the last step/stop/finish, else where the last start began."""
    last = next((e for e in reversed(events) if isinstance(e, (StepEvent, StoppedEvent, FinishedEvent))), None)
    if last is not None:
        return last.step
    started = _last(events, StartedEvent)
    return started.start_step if started else 0


def total_steps(events: list[Event]) -> int | None:
    return next((e.total_steps for e in reversed(events) if isinstance(e, (StartedEvent, StepEvent))
                 and e.total_steps), None)


def history(events: list[Event]) -> tuple[tuple[str, int], ...]:
    return tuple((e.event, e.start_step if isinstance(e, StartedEvent) else e.step) for e in events
                 if isinstance(e, LIFECYCLE))


def resumed(history: tuple[tuple[str, int], ...]) -> int:
    """How many times the run continued from a checkpoint."""
    return max(0, sum(1 for kind, _ in history if kind == StartedEvent.event) - 1)


def train_seconds(events: list[Event]) -> float | None:
    """Seconds from each `started` to the last event of its segment (the next start, or now's last line)."""
    total, begun, last = 0.0, None, None
    for event in events:
        moment = event_moment(event)
        stamp = moment.timestamp() if moment else None
        if isinstance(event, StartedEvent):
            if begun is not None and last is not None:
                total += last - begun
            begun = last = stamp
        elif stamp is not None and begun is not None:
            last = stamp
    if begun is not None and last is not None:
        total += last - begun
    return total if any(isinstance(e, StartedEvent) for e in events) else None


def process_started(events: list[Event], started_before_launch: int | None, pid_written: float | None) -> bool:
    """Whether the live trainer has written its own `started` event yet: more `started` events than when it
    was launched, or (a process someone else launched) one newer than its pid file, which it writes first."""
    started = [e for e in events if isinstance(e, StartedEvent)]
    if started_before_launch is not None:
        return len(started) > started_before_launch
    if pid_written is None:
        return bool(started)
    moment = event_moment(started[-1]) if started else None
    return bool(started) and (moment.timestamp() if moment else 0.0) >= int(pid_written)


def event_moment(event: Event) -> datetime | None:
    try:
        moment = datetime.fromisoformat(event.time.replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def progress(events: list[Event]) -> RunProgress:
    """Curves, rates, samples and load checks, in the order the run wrote them."""
    seen = RunProgress()
    for event in events:
        if isinstance(event, StepEvent):
            if event.loss is not None:
                seen.losses.append((event.step, event.loss))
            seen.it_per_s, seen.eta_s, seen.epoch, seen.lr = event.it_per_s, event.eta_s, event.epoch, event.lr
            _add_memory(seen, event)
        elif isinstance(event, SampleEvent):
            _add_samples(seen, event)
        elif isinstance(event, LoadCheckEvent) and event.path:
            seen.load_checks[event.path] = seen.last_check = event
        elif isinstance(event, ValidationEvent) and event.loss is not None:
            seen.validation.append((event.step, event.loss))
        elif isinstance(event, LIFECYCLE):
            seen.it_per_s = seen.eta_s = None  # the rate of a finished segment means nothing now
            if isinstance(event, StartedEvent):
                # A resume after a crash replays the steps since the last checkpoint: keep the new ones.
                seen.losses = [point for point in seen.losses if point[0] <= event.start_step]
                seen.validation = [point for point in seen.validation if point[0] <= event.start_step]
                seen.gpu_card, seen.gpu_predicted = event.gpu_card_bytes, event.gpu_predicted_bytes
                seen.gpu_reserved = seen.gpu_allocated = None  # a new process: its own card and peaks
                seen.warnings = []
            seen.ema_path = event.ema_path if isinstance(event, FinishedEvent) else None
    return seen


def _add_memory(seen: RunProgress, event: StepEvent) -> None:
    if event.gpu_reserved_bytes is not None:
        seen.gpu_reserved, seen.gpu_allocated = event.gpu_reserved_bytes, event.gpu_allocated_bytes
    if event.warning:
        seen.warnings.append(event.warning)


def _add_samples(seen: RunProgress, event: SampleEvent) -> None:
    row = []
    for index, path in enumerate(event.paths):
        prompt = str(event.prompts[index]) if index < len(event.prompts) else ""
        path = path if isinstance(path, str) else None
        row.append((path, prompt))
        if path is not None:
            seen.samples.append((path, f"step {event.step}: {prompt}"))
    if event.step is not None:
        seen.sample_sets.pop(event.step, None)  # a resume replays it: keep the newest
        seen.sample_sets[event.step] = row


def _last(events: list[Event], kind: type[Event]):
    return next((e for e in reversed(events) if isinstance(e, kind)), None)

"""What every tab shares: the runs folder and its manager, where demo datasets go, the preview cache."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from app.runs import RunManager
from app.ui.lora_preview import LoraPreview


@dataclass
class UIContext:
    runs: RunManager
    datasets_dir: Path  # default home of generated demo datasets: beside the runs folder
    preview: LoraPreview = field(default_factory=LoraPreview)  # loads a model on first use only

    @classmethod
    def create(cls, runs_dir: str | Path, trainer_command: list[str] | None = None) -> UIContext:
        runs = RunManager(runs_dir, trainer_command)
        return cls(runs, runs.runs_dir.parent / "datasets")

    @property
    def runs_dir(self) -> Path:
        return self.runs.runs_dir

    def free_demo_folder(self) -> Path:
        """datasets/demo, or demo-2, demo-3... : the first that does not exist yet or is empty."""
        candidate, counter = self.datasets_dir / "demo", 1
        while candidate.exists() and (not candidate.is_dir() or any(candidate.iterdir())):
            counter += 1
            candidate = self.datasets_dir / f"demo-{counter}"
        return candidate

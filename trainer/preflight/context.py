"""What the checks share: the config, the report they write, and what earlier checks found out."""

from __future__ import annotations

from dataclasses import dataclass, field

from trainer.config import TrainConfig
from trainer.data.dataset import ImageDataset
from trainer.preflight.plan import StepPlan
from trainer.preflight.report import Report


@dataclass
class CheckContext:
    cfg: TrainConfig
    preset: str | None = None  # its name: what learning rates are compared against
    report: Report = field(default_factory=Report)
    family: str | None = None  # None until the model check knows it
    prediction: str = "epsilon"
    dataset: ImageDataset | None = None  # the scanned folder; None when it cannot be read
    train_set: ImageDataset | None = None  # the dataset less its held-out validation images
    plan: StepPlan | None = None

    @property
    def is_demo(self) -> bool:
        return self.cfg.model.path.startswith("demo:")

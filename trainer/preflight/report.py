"""The pre-flight report: errors block a run, warnings are advice, info is the plan; every line one sentence."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Report:
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    info: list[str] = field(default_factory=list)
    data: dict = field(default_factory=dict)  # structured: dataset, captions, steps, buckets, scale, estimate

    @property
    def ok(self) -> bool:
        """False when training would fail; warnings never block."""
        return not self.errors

    def to_dict(self) -> dict:
        return {"ok": self.ok, "errors": self.errors, "warnings": self.warnings, "info": self.info, **self.data}

    def render(self) -> str:
        verdict = "ready to train" if self.ok else "cannot train"
        lines = [f"Pre-flight check: {verdict} ({len(self.errors)} errors, {len(self.warnings)} warnings)."]
        for title, mark, items in (("Errors", "x", self.errors), ("Warnings", "!", self.warnings),
                                   ("Plan", "-", self.info)):
            if items:
                lines += ["", f"{title}:"] + [f"  {mark} {item}" for item in items]
        if self.data.get("buckets"):
            lines += ["", "Buckets:"] + bucket_histogram(self.data["buckets"])
        return "\n".join(lines)


def bucket_histogram(buckets: list[dict], width: int = 30) -> list[str]:
    """Text bars of samples per bucket, for the terminal."""
    top = max(b["samples"] for b in buckets)
    return [f"  {b['width']:>5}x{b['height']:<5} {b['images']:>5} images {b['samples']:>6} samples "
            f"{'#' * max(1, round(width * b['samples'] / top))}" for b in buckets]

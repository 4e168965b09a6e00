"""The UI's API for scripts and gradio_client: small typed endpoints, the same operations as the buttons.

The browser's own event handlers take and return page components; these take plain values and return
JSON, e.g. `Client(url).predict(dataset="/data", preset="demo", api_name="/start_training")`.
User errors come back as gradio's AppError carrying the one-sentence message.
"""
from __future__ import annotations

import json
from pathlib import Path

import gradio as gr

from app.security import user_file
from app.ui.context import UIContext
from app.ui.dataset_tab import create_demo, scan
from app.ui.live_view import run_dict
from app.ui.notices import api_errors
from networks.errors import SdloraError
from networks.inspect import inspect_lora as inspect_file
from trainer.config.presets import list_presets as preset_infos
from trainer.config.presets import resolve_config


def register(ctx: UIContext) -> None:
    runs = ctx.runs

    def pick(run: str, active_first: bool = True) -> Path:
        """The named run, or (for "") the newest one still training, else the newest one."""
        if run:
            return runs.resolve(run)
        all_runs = runs.list_runs()
        active = runs.newest_active() if active_first else None
        chosen = active or (all_runs[0] if all_runs else None)
        if chosen is None:
            raise SdloraError("There are no runs yet; start one first.")
        return chosen.path

    @api_errors
    def create_demo_dataset(folder: str = "", count: int = 12) -> dict:
        """Write the generated demo style dataset (PNG + .txt captions) into a new folder."""
        created = create_demo(folder, count, ctx)
        return {"folder": str(created), "images": len(list(created.glob("*.png")))}

    @api_errors
    def scan_dataset(folder: str, resolution: int = 512) -> dict:
        """The report the trainer would see: usable images, skipped files and why, captions, buckets."""
        return scan(folder, resolution).report.to_dict()

    @api_errors
    def list_presets() -> list[dict]:
        """Every preset with its network type, rank r, alpha and alpha/r."""
        return [{"name": p.name, "source": p.source, "type": p.network_type, "rank": p.rank, "alpha": p.alpha,
                 "alpha_ratio": p.alpha_ratio, "description": p.description, "error": p.error}
                for p in preset_infos()]

    def requested_config(dataset: str, preset: str, model: str, name: str, overrides: list[str] | None):
        base: dict = {"dataset": {"path": dataset}}
        if model:
            base["model"] = {"path": model}
        if name:
            base["name"] = name
        return resolve_config(preset or None, list(overrides or []), base)

    @api_errors
    def check_training(dataset: str, preset: str = "demo", model: str = "", name: str = "",
                       overrides: list[str] | None = None) -> dict:
        """The pre-flight report of what start_training would run: ok, errors, warnings, info, and the
        whole report as `sdlora check --json` prints it, as a JSON string in `report_json` (gradio_client
        would take its {"path": ...} entries for files to download)."""
        _, report = runs.check(requested_config(dataset, preset, model, name, overrides), preset or None)
        return {"ok": report.ok, "errors": report.errors, "warnings": report.warnings, "info": report.info,
                "report_json": json.dumps(report.to_dict(), default=str)}

    @api_errors
    def start_training(dataset: str, preset: str = "demo", model: str = "", name: str = "",
                       overrides: list[str] | None = None) -> dict:
        """Start a run in a new run folder: the preset, then model/dataset/name, then KEY=VALUE overrides.
        The pre-flight check runs first; its first error, if any, is the error returned."""
        cfg = requested_config(dataset, preset, model, name, overrides)
        return run_dict(runs.progress(runs.start(cfg, preset or None)))

    @api_errors
    def run_status(run: str = "") -> dict:
        """Status, step, loss, it/s, ETA, files and samples of a run ("" = the newest one training)."""
        return run_dict(runs.progress(pick(run)))

    @api_errors
    def stop_training(run: str = "") -> dict:
        """Ask the trainer to save a checkpoint and exit; the status becomes `stopped` shortly after."""
        run_dir = pick(run)
        runs.stop(run_dir)
        return run_dict(runs.progress(run_dir))

    @api_errors
    def resume_training(run: str = "") -> dict:
        """Continue a stopped or interrupted run from its saved state ("" = the newest run)."""
        run_dir = runs.resume(pick(run, active_first=False))
        return run_dict(runs.progress(run_dir))

    @api_errors
    def list_runs() -> list[dict]:
        """Every run in the runs folder, newest first."""
        return [run_dict(runs.progress(info.path)) for info in runs.list_runs()]

    @api_errors
    def delete_run(run: str) -> dict:
        """Delete a run folder that is not training."""
        run_dir = runs.resolve(run)
        runs.delete(run_dir)
        return {"deleted": run_dir.name}

    @api_errors
    def inspect_lora(path: str) -> dict:
        """Metadata, modules per block, rank/alpha per module and update norms of a LoRA file."""
        return inspect_file(user_file(path, "LoRA file", suffixes=(".safetensors",)))

    for endpoint in (create_demo_dataset, scan_dataset, list_presets, check_training, start_training, run_status,
                     stop_training, resume_training, list_runs, delete_run, inspect_lora):
        gr.api(endpoint, api_name=endpoint.__name__)

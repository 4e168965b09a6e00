"""The Gradio web UI: `build_ui(runs_dir)` makes the page, `launch(...)` serves it (`sdlora ui`).

Thin by design: tabs build a TrainConfig or read a run folder through app.runs; training always runs in
its own `sdlora train` process. Security defaults: loopback only, no share link unless asked, optional
login, and the browser is served files from the runs folder only (docs: app/security.py).
"""
from __future__ import annotations

import sys
import threading
from pathlib import Path

import gradio as gr
from starlette.middleware import Middleware

from app.security import is_loopback, parse_auth
from app.ui import api, dataset_tab, inspect_tab, runs_tab, train_tab, try_tab
from app.ui.context import UIContext
from app.ui.login_gate import LoginGate
from app.ui.theme import CSS, HEADER, theme
from networks.errors import SdloraError

__all__ = ["build_ui", "launch", "launch_options"]


def build_ui(runs_dir: str | Path = "runs", trainer_command: list[str] | None = None) -> gr.Blocks:
    """The whole page; `trainer_command` replaces `python -m app.cli train` (tests use a fake trainer)."""
    ctx = UIContext.create(runs_dir, trainer_command)
    with gr.Blocks(title="sdlora", analytics_enabled=False, fill_width=True) as demo:
        gr.HTML(HEADER)
        with gr.Tabs(selected="dataset") as tabs:
            with gr.Tab("Dataset", id="dataset") as dataset_item:
                dataset = dataset_tab.build(ctx, train_tab.start_config().dataset.resolution)
            with gr.Tab("Train", id="train"):
                train = train_tab.build(ctx)
            with gr.Tab("Runs", id="runs") as runs_item:
                runs = runs_tab.build(ctx)
            with gr.Tab("Try", id="try") as try_item:
                try_list = try_tab.build(ctx)
            with gr.Tab("Inspect", id="inspect") as inspect_item:
                inspect_list = inspect_tab.build(ctx)
        api.register(ctx)
        _wire(demo, tabs, dataset, train, runs)
        _share_dataset_settings(demo, dataset_item, dataset, train)
        runs_item.select(runs.refresh, None, runs.refresh_outputs, api_visibility="private")
        # The LoRA pickers list the runs' files as the page opens, and again whenever their tab is opened.
        for event in (demo.load, try_item.select):
            event(try_list.refresh, try_list.components, try_list.components, api_visibility="private",
                  show_progress="hidden")
        for event in (demo.load, inspect_item.select):
            event(inspect_list.refresh, inspect_list.components, inspect_list.components, api_visibility="private",
                  show_progress="hidden")
    demo.sdlora = ctx  # for tests and embedding: the run manager behind this page
    threading.Thread(target=_warm_up_checks, name="sdlora-warm-up", daemon=True).start()
    return demo


def _warm_up_checks() -> None:
    """The first pre-flight check builds model skeletons for its estimate (seconds); do it before the
    first click on Train instead of during it. Failure here only means the first check is slower."""
    from trainer.config import TrainConfig
    from trainer.preflight import preflight_report

    try:
        preflight_report(TrainConfig())
    except Exception:  # noqa: BLE001
        pass


def _wire(demo: gr.Blocks, tabs: gr.Tabs, dataset, train, runs) -> None:
    """Events that cross tabs."""
    dataset_path = train.form.widgets["dataset.path"]
    for event in dataset.opened:
        event.then(lambda saved: saved["folder"] if saved else gr.skip(), dataset.state, dataset_path,
                   api_visibility="private", show_progress="hidden")

    def watch(run):
        if not run:
            return gr.skip(), gr.skip(), gr.skip()
        return run, gr.Timer(active=True), gr.Tabs(selected="train")

    def show_watched(event):
        event.then(train.refresh, train.refresh_inputs, train.live_outputs, api_visibility="private",
                   show_progress="hidden").then(train.fill_from_run, train.watched, train.fill_outputs,
                                                api_visibility="private", show_progress="hidden")

    show_watched(runs.watch.click(watch, runs.selected, [train.watched, train.timer, tabs], api_visibility="private"))

    def on_load():
        preset, watched, timer = train.on_load()
        # A run still training after a refresh or a UI restart: show it straight away.
        return preset, watched, timer, gr.Tabs(selected="train") if watched else gr.skip()

    show_watched(demo.load(on_load, None, [*train.load_outputs, tabs], api_visibility="private"))
    demo.load(runs.refresh, None, runs.refresh_outputs, api_visibility="private")


def _share_dataset_settings(demo, dataset_item, dataset, train) -> None:
    """One set of bucket settings: the Dataset tab scans with the Train form's [dataset] settings (those the
    page opens with, then brought over each time the tab opens, rescanning an open folder when they
    changed), and its resolution box is the Train tab's Resolution shown in a second place. (API callers,
    which load no page, scan with the config defaults at the resolution they pass.)"""
    train_resolution = train.form.widgets["dataset.resolution"]
    demo.load(lambda: train_tab.start_config().dataset.model_dump(mode="json"), None, dataset.settings,
              api_visibility="private", show_progress="hidden")

    def train_settings(preset, prompts, *values):
        try:
            return train.form.to_config(preset, prompts, values).dataset.model_dump(mode="json")
        except SdloraError:
            return gr.skip()  # a half-typed form: keep the settings last brought over

    dataset_item.select(train_settings, [train.preset, train.prompts, *train.form.components], dataset.settings,
                        api_visibility="private", show_progress="hidden").then(
        dataset.follow_settings, [dataset.state, dataset.resolution, dataset.settings], dataset.view_outputs,
        api_visibility="private", show_progress="hidden")
    train_resolution.change(lambda value: value, train_resolution, dataset.resolution, api_visibility="private",
                            show_progress="hidden")
    dataset.resolution.input(lambda value: value, dataset.resolution, train_resolution, api_visibility="private",
                             show_progress="hidden")


def launch_options(runs_dir: str | Path, host: str = "127.0.0.1", port: int | None = 7860,
                   auth: str | tuple[str, str] | None = None, share: bool = False) -> dict:
    """Keyword arguments for Blocks.launch: the security settings and the look. With a login, Gradio's
    app sits behind our LoginGate, which serves nothing but a login page until Gradio's login succeeds."""
    login = parse_auth(auth)
    message = "sdlora: sign in with the user and password given to --auth." if login else None
    gate = {"middleware": [Middleware(LoginGate, message=message)]} if login else {}
    return dict(server_name=host, server_port=port, auth=login, share=share,
                allowed_paths=[str(Path(runs_dir).expanduser().resolve())], theme=theme(), css=CSS,
                show_error=False, footer_links=["api", "settings"], mcp_server=False, ssr_mode=False,
                auth_message=message, app_kwargs=gate)


def launch(host: str = "127.0.0.1", port: int = 7860, auth: str | tuple[str, str] | None = None,
           runs_dir: str | Path = "runs", share: bool = False, block: bool = True,
           trainer_command: list[str] | None = None) -> gr.Blocks:
    """Serve the UI; with block=False return at once (the server runs in a background thread)."""
    options = launch_options(runs_dir, host, port, auth, share)
    if not is_loopback(host) and options["auth"] is None:
        print(f"warning: the UI listens on {host} without --auth: anyone who can reach this port can start "
              "training and download your runs.", file=sys.stderr)
    demo = build_ui(runs_dir, trainer_command)
    demo.queue(default_concurrency_limit=4)
    try:
        demo.launch(prevent_thread_lock=not block, **options)
    except OSError:
        raise SdloraError(f"Cannot listen on {host}:{port}: the port is in use or not allowed; choose another "
                          "--port.") from None
    return demo

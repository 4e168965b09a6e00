"""Runs tab: every run in the runs folder, its files, config and samples; watch, resume, stop, delete."""
from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from app.ui.context import UIContext
from app.ui.live_view import (
    RUN_COLUMNS,
    files_html,
    header_markdown,
    progress_html,
    run_row,
    sample_grid_html,
)
from app.ui.notices import guarded, notice, ok
from networks.errors import SdloraError
from trainer.run.run_dir import RunDir
from trainer.run.status import ACTIVE, RESUMABLE


@dataclass
class RunsTab:
    table: gr.Dataframe
    refresh: object  # () -> (notice, table, folders)
    refresh_outputs: list
    selected: gr.State
    watch: gr.Button


def build(ctx: UIContext) -> RunsTab:
    folders = gr.State([])  # the table's run folders, in row order
    selected = gr.State(None)
    with gr.Row(equal_height=True):
        gr.Markdown(f"Runs in `{ctx.runs_dir}`. Click a row for its files, config and samples.")
        refresh_button = gr.Button("Refresh", size="sm", scale=0, min_width=100, elem_id="runs-refresh")
    message = gr.HTML(elem_id="runs-notice")
    table = gr.Dataframe(headers=RUN_COLUMNS, datatype="str", interactive=False, max_height=280,
                         elem_id="runs-table",
                         column_widths=["22%", "12%", "12%", "8%", "8%", "7%", "8%", "10%", "13%"])
    with gr.Column(visible=False, elem_classes="sd-panel") as details:
        header = gr.Markdown()
        bar = gr.HTML()
        with gr.Row():
            watch = gr.Button("Watch in Train tab", size="sm", elem_id="run-watch")
            resume = gr.Button("Resume", size="sm", elem_id="run-resume")
            stop = gr.Button("Stop", size="sm", variant="stop", elem_id="run-stop")
            delete = gr.Button("Delete…", size="sm", variant="secondary", elem_id="run-delete")
        with gr.Row(visible=False, elem_classes="sd-confirm") as confirm_row:
            confirm_text = gr.Markdown()
            confirm = gr.Button("Delete for good", variant="stop", size="sm", scale=0, min_width=150,
                                elem_id="run-delete-confirm")
            cancel = gr.Button("Cancel", size="sm", scale=0, min_width=100)
        with gr.Row():
            final = gr.DownloadButton("No final file yet", interactive=False, elem_id="run-download", scale=1)
            with gr.Column(scale=2):
                gr.Markdown("**Checkpoints and other files**", elem_classes="sd-muted")
                checkpoints = gr.HTML(elem_id="run-checkpoints")
        gr.Markdown("**Samples**", elem_classes="sd-muted")
        samples = gr.HTML(elem_id="run-samples")
        with gr.Accordion(RunDir.CONFIG_NAME, open=False):
            config = gr.Code(language=None, interactive=False, elem_id="run-config")

    def table_rows():
        runs = ctx.runs.list_runs()
        return [run_row(r) for r in runs], [r.folder for r in runs]

    @guarded(3)
    def refresh():
        rows, names = table_rows()
        return notice(), rows, names

    refresh_outputs = [message, table, folders]
    detail_outputs = [message, details, header, bar, resume, stop, final, checkpoints, samples, config, selected,
                      confirm_row]

    @guarded(len(detail_outputs))
    def show(run):
        run_dir = ctx.runs.resolve(run)
        progress = ctx.runs.progress(run_dir)
        info = progress.info
        final_file = info.final_file
        failed = info.final_check is not None and not info.final_check.ok
        download = (gr.DownloadButton(f"Download {final_file.name}", value=str(final_file), interactive=True,
                                      variant="primary") if final_file else
                    gr.DownloadButton("The final file failed its load check" if failed else "No final file yet",
                                      value=None, interactive=False, variant="secondary"))
        return (notice(info.message) if info.message else notice(), gr.Column(visible=True),
                header_markdown(info), progress_html(progress),
                gr.Button(interactive=info.status in RESUMABLE), gr.Button(interactive=info.status in ACTIVE),
                download, files_html(([progress.ema_file] if progress.ema_file else []) + progress.checkpoints[::-1],
                                     "No checkpoint yet.", progress.load_checks, run_dir), sample_grid_html(progress),
                ctx.runs.config_text(run_dir), run_dir.name, gr.Row(visible=False))

    def on_select(names, evt: gr.SelectData):
        row = evt.index[0] if isinstance(evt.index, (list, tuple)) else evt.index
        if not 0 <= row < len(names):
            return (notice("Refresh the list: that run is gone."), *[gr.skip()] * (len(detail_outputs) - 1))
        return show(names[row])

    @guarded(len(detail_outputs))
    def on_stop(run):
        ctx.runs.stop(ctx.runs.resolve(run))
        result = list(show(run))
        result[0] = ok("Stopping: the trainer saves a checkpoint, then exits.")
        return tuple(result)

    @guarded(len(detail_outputs))
    def on_resume(run):
        ctx.runs.resume(ctx.runs.resolve(run))
        result = list(show(run))
        result[0] = ok("Resumed; watch it in the Train tab.")
        return tuple(result)

    @guarded(3)
    def ask_delete(run):
        run_dir = ctx.runs.resolve(run)
        if ctx.runs.info(run_dir).status in ACTIVE:
            raise SdloraError(f"The run {run_dir.name} is training; stop it before deleting it.")
        return notice(), gr.Row(visible=True), f"Delete **{run_dir.name}** with its checkpoints and samples? " \
                                               "This cannot be undone."

    @guarded(5)
    def on_delete(run):
        run_dir = ctx.runs.resolve(run)
        ctx.runs.delete(run_dir)
        rows, names = table_rows()
        return ok(f"Deleted {run_dir.name}."), gr.Column(visible=False), gr.Row(visible=False), rows, names

    table.select(on_select, [folders], detail_outputs, api_visibility="private")
    refresh_button.click(refresh, None, refresh_outputs, api_visibility="private")
    stop.click(on_stop, [selected], detail_outputs, api_visibility="private")
    resume.click(on_resume, [selected], detail_outputs, api_visibility="private")
    delete.click(ask_delete, [selected], [message, confirm_row, confirm_text], api_visibility="private")
    cancel.click(lambda: gr.Row(visible=False), None, confirm_row, api_visibility="private")
    confirm.click(on_delete, [selected], [message, details, confirm_row, table, folders],
                  api_name="runs_delete", api_visibility="undocumented")
    return RunsTab(table, refresh, refresh_outputs, selected, watch)

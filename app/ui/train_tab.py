"""Train tab: the form (a view of TrainConfig), Train / Stop / Resume, and the live view of the run.

The live view polls the run folder every POLL_SECONDS (gr.Timer) and sends only what changed. Which run it
shows is per browser session; on page load it picks up the newest run still training, so a refresh or
a UI restart reattaches to a run that never stopped (it is a separate process).
"""
from __future__ import annotations

import html
import math
import time
from dataclasses import dataclass

import gradio as gr

from app.ui.config_form import ConfigForm, prompts_to_text
from app.ui.context import UIContext
from app.ui.live_view import header_markdown, log_html, loss_frame, progress_html, sample_grid_html
from app.ui.memory_changes import apply_memory_changes, listed_changes
from app.ui.notices import guarded, notice, ok
from app.ui.preflight_view import report_html
from app.ui.preset_fill import fill_from_preset
from app.ui.preset_import import import_uploaded_kohya
from networks.errors import SdloraError
from networks.spec import NetworkSpec, alpha_for
from trainer.config import TrainConfig, load_config
from trainer.config.presets import list_presets, resolve_config
from trainer.run.run_dir import RunDir
from trainer.run.status import ACTIVE, RESUMABLE

DEFAULT_PRESET = "demo"
POLL_SECONDS = 2.0
LOSS_REDRAW_SECONDS = 6.0
DISCOVER_SECONDS = 5.0  # how soon a run started from the CLI or another tab shows up
LOSS_COLOURS = {"loss": "#c7d2fe", "smoothed": "#4f46e5", "validation": "#f59e0b"}
LOG_LINES = 80
CONV_KEYS = ("network.conv_rank", "network.conv_alpha_ratio")
ALPHA_KEYS = ("network.type", "network.rank", "network.alpha_ratio", "network.alpha", "network.conv_rank",
              "network.conv_alpha_ratio", "network.conv_alpha", "network.include_convs")


def preset_choices() -> list[tuple[str, str]]:
    """(label, name) pairs; the label shows what the preset means: type, r, alpha and alpha/r."""
    choices = []
    for p in list_presets():
        if p.error:
            continue  # a broken user preset is reported by `sdlora presets list`, not offered here
        label = f"{p.name} · {p.network_type} r {p.rank} · alpha {p.alpha:g} (alpha/r {p.alpha_ratio:g})"
        if p.source == "user":
            label += " · yours"
        choices.append((label, p.name))
    return choices


def preset_description(name: str | None) -> str:
    info = next((p for p in list_presets() if p.name == name), None)
    return f"<span class='sd-muted'>{html.escape(info.description)}</span>" if info and info.description else ""


def adapts_convs(kind, include_convs) -> bool:
    """Whether the conv rank applies, by the spec's own rule: locon, or loha / lokr with include_convs."""
    return NetworkSpec(type=kind or "lora", include_convs=bool(include_convs)).adapts_convs


def alpha_text(kind, rank, ratio, alpha, conv_rank, conv_ratio, conv_alpha, include_convs=False) -> str:
    """The alpha the update will be scaled with, as the form stands (half-typed values show as '-')."""
    value, how = _resolved_alpha(alpha, rank, ratio)
    text = f"**alpha {value:g}** <span class='sd-muted'>({how})</span>" if value is not None else "alpha -"
    if adapts_convs(kind, include_convs):
        conv_value, conv_how = _resolved_alpha(conv_alpha, conv_rank, conv_ratio)
        if conv_value is not None:
            text += f"<br>**conv alpha {conv_value:g}** <span class='sd-muted'>({conv_how})</span>"
    return text


def _resolved_alpha(absolute, rank, ratio) -> tuple[float | None, str]:
    try:
        if absolute not in (None, ""):
            return alpha_for(float(absolute), 0.0, 0), f"set to {float(absolute):g}"
        if rank is None or ratio is None:
            return None, ""
        return alpha_for(None, float(ratio), int(rank)), f"= {float(ratio):g} x {int(rank)}"
    except (TypeError, ValueError):
        return None, ""


@dataclass
class TrainTab:
    form: ConfigForm
    preset: gr.Dropdown
    watched: gr.State  # folder name of the run the live view shows, or None
    timer: gr.Timer
    notice: gr.HTML
    refresh: object  # the live-view handler: (watched, fingerprint) -> live outputs
    fill_from_run: object  # (watched) -> the form showing that run's config
    fill_outputs: list
    refresh_inputs: list
    live_outputs: list
    load_outputs: list
    on_load: object
    prompts: gr.Textbox = None  # the sample prompts box (with preset and form: what to_config reads)


def start_config() -> TrainConfig:
    """What the form holds as the page opens: the default preset over the defaults."""
    return resolve_config(DEFAULT_PRESET)


def build(ctx: UIContext) -> TrainTab:
    start_cfg = start_config()
    form = ConfigForm(start_cfg)
    start_locon = start_cfg.network.adapts_convs
    with gr.Row(equal_height=False):
        with gr.Column(scale=5, elem_classes="sd-panel"):
            gr.Markdown("#### Data and model")
            with gr.Row():
                form.add("dataset.path", label="Dataset folder", info="Use the Dataset tab to check it.", scale=3)
                form.add("model.path", label="Base model",
                         info="Diffusers folder, .safetensors/.ckpt, or demo:shapes.", scale=2)
            gr.Markdown("#### Recipe")
            with gr.Row(equal_height=True):
                preset = gr.Dropdown(preset_choices(), value=DEFAULT_PRESET, label="Preset", scale=3,
                                     elem_id="preset", info="Sets r, alpha/r, learning rate and more.")
                form.add("name", label="Output name", info="Saved as NAME.safetensors.", scale=2)
            description = gr.Markdown(preset_description(DEFAULT_PRESET), elem_classes="sd-preset-note")
            with gr.Row(equal_height=True):
                form.add("network.type", label="Network", info="locon also adapts 3x3 convs.", min_width=110)
                form.add("network.rank", label="Rank r", info="Capacity and file size.", min_width=110)
                form.add("network.alpha_ratio", label="alpha / r", info="Kept when r changes.", min_width=110)
                alpha = gr.Markdown(alpha_text(*(_dotted(start_cfg, k) for k in ALPHA_KEYS)),
                                    elem_id="alpha-display", elem_classes="sd-alpha")
            with gr.Row(equal_height=True):
                form.add("network.conv_rank", label="Conv rank", info="3x3 convs: locon, or include_convs.",
                         visible=start_locon)
                form.add("network.conv_alpha_ratio", label="Conv alpha / r", info="Conv alpha = this x conv r.",
                         visible=start_locon)
            with gr.Row(equal_height=True):
                form.add("train.learning_rate", label="Learning rate",
                         info="The preset's value is a good start; lower it if samples burn.")
                form.add("train.batch_size", label="Batch size", info="Images per step.")
                form.add("dataset.resolution", label="Resolution", info="Multiple of 64.")
            with gr.Row(equal_height=True):
                form.add("train.epochs", label="Epochs", info="Passes over the data; Max steps wins when set.")
                form.add("train.max_steps", label="Max steps",
                         info="When set, training stops here, whatever Epochs says; empty = all the epochs.")
            prompts = gr.Textbox(prompts_to_text(start_cfg), label="Sample prompts", lines=2, max_lines=6,
                                 info="One per line, kohya style: a cat --n blurry --w 512 --h 512 --d 1 --s 20 --l 7 "
                                      "(negative, size, seed, steps, CFG). Drawn every sample.every_steps steps.",
                                 elem_id="sample-prompts")
            with gr.Accordion("Advanced: every setting", open=False, elem_id="advanced"):
                form.add_remaining()
            with gr.Row():
                start = gr.Button("Train", variant="primary", size="lg", elem_id="train-start", scale=2, min_width=90)
                check = gr.Button("Check", size="lg", elem_id="train-check", min_width=80)
                stop = gr.Button("Stop", variant="stop", size="lg", elem_id="train-stop", interactive=False,
                                 min_width=80)
                resume = gr.Button("Resume", size="lg", elem_id="train-resume", interactive=False, min_width=80)
            message = gr.HTML(elem_id="train-notice")
            report = gr.HTML(elem_id="preflight")
            apply_memory = gr.Button("Apply memory changes", visible=False, size="sm", elem_id="apply-memory")
            with gr.Accordion("Save these settings as a preset, or import a kohya_ss preset", open=False):
                with gr.Row(elem_classes="sd-align-end"):
                    preset_name = gr.Textbox(label="Preset name", placeholder="my-style", scale=3,
                                             elem_id="preset-name")
                    save_preset = gr.Button("Save preset", scale=1, min_width=120, elem_id="preset-save")
                import_kohya = gr.UploadButton("Import a kohya_ss preset (.json)", file_types=[".json"],
                                               type="filepath", size="sm", elem_id="preset-import-kohya")
        with gr.Column(scale=6, elem_classes="sd-panel"):
            header = gr.Markdown(header_markdown(None), elem_id="run-header")
            bar = gr.HTML(progress_html(None), elem_id="progress")
            run_message = gr.HTML(elem_id="run-notice")
            loss = gr.LinePlot(None, x="step", y="loss", color="series", title="Loss", height=260,
                               color_map=LOSS_COLOURS, elem_id="loss-plot",
                               x_title="step", y_title="loss", x_axis_format="d")
            gr.Markdown("**Samples**", elem_classes="sd-muted")
            samples = gr.HTML(sample_grid_html(None), elem_id="samples")
            gr.Markdown("**Trainer log**", elem_classes="sd-muted")
            log = gr.HTML(log_html(""), elem_id="train-log")
    watched = gr.State(None)
    fingerprint = gr.State(None)
    timer = gr.Timer(POLL_SECONDS, active=False)

    widgets = form.components
    fill_outputs = [message, *widgets, prompts, description]

    # -- the form ---------------------------------------------------------------------------------
    def form_values(cfg: TrainConfig) -> list:
        locon = cfg.network.adapts_convs
        values = form.values(cfg)
        return [gr.update(value=v, visible=locon) if k in CONV_KEYS else v for k, v in zip(form.keys, values)]

    applied = gr.State(DEFAULT_PRESET)  # the preset the form was last filled from

    def filled_by_preset(name, values, prompts_text, before: str = "") -> tuple:
        """fill_outputs after choosing preset `name`: the keys it names set, and a notice saying which."""
        fill = fill_from_preset(form, name, values, prompts_text)
        updates = [fill.updates.get(key, gr.skip()) for key in form.keys]
        prompts_value = gr.skip() if fill.prompts is None else fill.prompts
        return (ok(before + fill.sentence), *updates, prompts_value, preset_description(name))

    @guarded(len(fill_outputs) + 2)
    def on_preset(name, last, prompts_text, *values):
        """Set the keys the preset names, and say which. Gradio's dropdown sends an input event on every
        blur too (a look at the list, a Tab through the form): the same preset again changes nothing."""
        if not name or name == last:
            return (gr.skip(),) * (len(fill_outputs) + 2)
        return (*filled_by_preset(name, values, prompts_text), name, "")

    @guarded(len(fill_outputs))
    def fill_from_run(run):
        """The form shows the config of the run being watched (after a reload or "Watch in Train tab")."""
        if not run:
            return tuple(gr.skip() for _ in fill_outputs)
        cfg = load_config(RunDir(ctx.runs.resolve(run)).config)
        return (notice(), *form_values(cfg), prompts_to_text(cfg), gr.skip())

    alpha_inputs = [form.widgets[k] for k in ALPHA_KEYS]
    preset.input(on_preset, [preset, applied, prompts, *widgets], [*fill_outputs, applied, report],
                 api_visibility="private").then(alpha_text, alpha_inputs, alpha, api_visibility="private")
    for widget in alpha_inputs:
        widget.change(alpha_text, alpha_inputs, alpha, api_visibility="private", show_progress="hidden")
    conv_inputs = [form.widgets["network.type"], form.widgets["network.include_convs"]]
    for widget in conv_inputs:
        widget.change(lambda kind, convs: [gr.update(visible=adapts_convs(kind, convs))] * len(CONV_KEYS),
                      conv_inputs, [form.widgets[k] for k in CONV_KEYS], api_visibility="private",
                      show_progress="hidden")

    # -- the live view ----------------------------------------------------------------------------
    live_outputs = [header, bar, run_message, loss, samples, log, start, stop, resume, timer, fingerprint, message]

    def refresh(run, seen):
        return live_update(ctx, run, seen)

    refresh_inputs = [watched, fingerprint]
    timer.tick(refresh, refresh_inputs, live_outputs, api_visibility="private", show_progress="hidden",
               concurrency_limit=None)

    def discover(run):
        """A run started elsewhere (the CLI, another browser tab) while this page shows nothing live."""
        try:
            if run and ctx.runs.info(ctx.runs.resolve(run)).status in ACTIVE:
                return gr.skip(), gr.skip()
        except SdloraError:
            pass  # the watched run was deleted: look for another
        active = ctx.runs.newest_active()
        if active is None or active.folder == run:
            return gr.skip(), gr.skip()
        return active.folder, gr.Timer(active=True)

    gr.Timer(DISCOVER_SECONDS).tick(discover, watched, [watched, timer],
                                    api_visibility="private", show_progress="hidden", concurrency_limit=None) \
        .then(refresh, refresh_inputs, live_outputs, api_visibility="private", show_progress="hidden")

    # -- control ----------------------------------------------------------------------------------
    control_outputs = [message, watched, timer]

    memory_changes = gr.State([])  # the changes the last Check listed, for "Apply memory changes"

    @guarded(4, clears=(1,))
    def on_check(preset_name, prompts_text, *values):
        _, checked = ctx.runs.check(form.to_config(preset_name, prompts_text, values), preset_name)
        changes = listed_changes(checked)
        return notice(), report_html(checked, form.in_words), gr.Button(visible=bool(changes)), changes

    # A report answers the settings it checked: a typed change makes it stale, so it goes (in the browser,
    # no round trip per key press); Check or Train brings the new one.
    gr.on([widget.input for widget in [*widgets, prompts]], None, None, report, js="() => ''",
          api_visibility="private", show_progress="hidden")
    check.click(on_check, [preset, prompts, *widgets], [message, report, apply_memory, memory_changes],
                api_name="train_check", api_visibility="undocumented", show_progress="minimal")

    @guarded(len(widgets) + 2)
    def on_apply_memory(changes, *values):
        """Set the fields the listed memory changes name, and say which and the peak predicted after them."""
        fill = apply_memory_changes(form, changes or [], values)
        return (ok(fill.sentence), *[fill.updates.get(key, gr.skip()) for key in form.keys],
                gr.Button(visible=False))

    apply_memory.click(on_apply_memory, [memory_changes, *widgets], [message, *widgets, apply_memory],
                       api_visibility="private", show_progress="minimal")

    @guarded(len(control_outputs) + 1, clears=(len(control_outputs),))
    def on_start(preset_name, prompts_text, *values):
        cfg, checked = ctx.runs.check(form.to_config(preset_name, prompts_text, values), preset_name)
        if not checked.ok:  # the whole report shows below; the first error is the sentence
            return notice(form.in_words(checked.errors[0])), gr.skip(), gr.skip(), report_html(checked, form.in_words)
        ctx.preview.release()  # the Try tab's model leaves the GPU to the run
        run_dir = ctx.runs.start(cfg, preset_name, checked)
        shown = report_html(checked, form.in_words) if checked.warnings else ""  # warnings stay visible while it trains
        return ok(f"Started {run_dir.name}; it trains in its own process, so closing this page is safe."), \
            run_dir.name, gr.Timer(active=True), shown

    @guarded(len(control_outputs))
    def on_stop(run):
        run_dir = ctx.runs.resolve(run)
        ctx.runs.stop(run_dir)
        return ok("Stopping: the trainer finishes this step, saves a checkpoint, then exits."), run, gr.skip()

    @guarded(len(control_outputs))
    def on_resume(run):
        ctx.preview.release()
        run_dir = ctx.runs.resume(ctx.runs.resolve(run))
        return ok(f"Resuming {run_dir.name} from its last checkpoint."), run, gr.Timer(active=True)

    for button, handler, inputs, outputs, name in (
        (start, on_start, [preset, prompts, *widgets], [*control_outputs, report], "train_start"),
        (stop, on_stop, [watched], control_outputs, "train_stop"),
        (resume, on_resume, [watched], control_outputs, "train_resume"),
    ):
        button.click(handler, inputs, outputs, api_name=name, api_visibility="undocumented",
                     show_progress="minimal").then(refresh, refresh_inputs, live_outputs, api_visibility="private",
                                                   show_progress="hidden")

    @guarded(4)
    def on_save_preset(name, preset_name, prompts_text, *values):
        name = (name or "").strip()
        path = form.save_as_preset(name, preset_name, prompts_text, values)
        return (ok(f"Saved preset {name} to {path}."), gr.Dropdown(choices=preset_choices(), value=name),
                preset_description(name), name)  # the form holds the new preset: choosing it again changes nothing

    save_preset.click(on_save_preset, [preset_name, preset, prompts, *widgets], [message, preset, description, applied],
                      api_name="train_save_preset", api_visibility="undocumented")

    @guarded(len(fill_outputs) + 3)
    def on_import_kohya(path, typed_name, prompts_text, *values):
        """The uploaded kohya_ss preset becomes a user preset (named as typed, else after the file) and fills
        the form as choosing it would."""
        name, sentence = import_uploaded_kohya(path, typed_name)
        return (*filled_by_preset(name, values, prompts_text, before=sentence + " "),
                gr.Dropdown(choices=preset_choices(), value=name), name, "")

    import_kohya.upload(on_import_kohya, [import_kohya, preset_name, prompts, *widgets],
                        [*fill_outputs, preset, applied, report], api_visibility="private").then(
        alpha_text, alpha_inputs, alpha, api_visibility="private")

    # -- page load: presets may have changed on disk, and a run may be training ------------------
    def on_load():
        active = ctx.runs.newest_active()
        return gr.Dropdown(choices=preset_choices()), active.folder if active else None, gr.Timer(active=active is not None)

    return TrainTab(form, preset, watched, timer, message, refresh, fill_from_run, fill_outputs, refresh_inputs,
                    live_outputs, [preset, watched, timer], on_load, prompts)


LIVE_OUTPUTS = 12  # header, bar, run notice, loss, samples, log, start, stop, resume, timer, fingerprint, notice


def idle_update(ctx: UIContext, seen: list | None, control_notice=None) -> tuple:
    """Nothing shown live; the bar says how many runs the Runs tab holds (sent again only when that
    changes). `control_notice` replaces the Train notice (None keeps it)."""
    key = [None, len(ctx.runs.list_runs())]
    if key == seen:
        return (gr.skip(),) * LIVE_OUTPUTS
    return (header_markdown(None), progress_html(None, key[1]), notice(), None, sample_grid_html(None),
            log_html(""), gr.Button(interactive=True), gr.Button(interactive=False), gr.Button(interactive=False),
            gr.Timer(active=False), key, gr.skip() if control_notice is None else control_notice)


def live_update(ctx: UIContext, run: str | None, seen: list | None, now: float | None = None) -> tuple:
    """The live view's outputs for `run`; only what changed since `seen` (the last fingerprint) is sent.

    The fingerprint is [run, events, samples, status, log length, events the loss plot shows, when it was
    drawn]. While a run trains, the loss plot is redrawn at most every LOSS_REDRAW_SECONDS, the header
    and buttons only when the status changes (the header's final file and history come with one): every
    output a tick sends keeps the browser busy (gradio's status tracker animates it), and on a machine
    without a GPU that time comes out of the training itself."""
    if not run:
        return idle_update(ctx, seen)
    try:
        run_dir = ctx.runs.resolve(run)
    except SdloraError:
        return idle_update(ctx, seen, notice())  # deleted meanwhile (in the Runs tab, which said so)
    now = time.monotonic() if now is None else now
    progress = ctx.runs.progress(run_dir)
    info, log_text = progress.info, ctx.runs.log_tail(run_dir, LOG_LINES)
    state = [run, progress.event_count, len(progress.samples), info.status, len(log_text)]
    same_run = bool(seen) and seen[0] == run
    active = info.status in ACTIVE
    drawn_for, drawn_at = (seen[5], seen[6]) if same_run else (None, -math.inf)
    new_loss = drawn_for != progress.event_count and (not active or now - drawn_at >= LOSS_REDRAW_SECONDS)
    if same_run and seen[:5] == state and not new_loss:
        return (gr.skip(),) * LIVE_OUTPUTS
    new_status = not same_run or seen[3] != info.status
    key = state + ([progress.event_count, now] if new_loss else [drawn_for, drawn_at])
    error = notice(info.message) if info.status in ("error", "interrupted") and info.message else notice()
    # "Started ...", "Stopping ..." describe a run in motion: once it has stopped, the bar says the rest.
    ended = same_run and seen[3] in ACTIVE and not active
    controls = (gr.Button(interactive=not active), gr.Button(interactive=active),
                gr.Button(interactive=info.status in RESUMABLE), gr.Timer(active=active))
    return (header_markdown(info) if new_status else gr.skip(), progress_html(progress),
            error if new_status else gr.skip(),
            loss_frame(progress.losses, progress.validation, progress.validating) if new_loss else gr.skip(),
            sample_grid_html(progress) if not same_run or seen[2] != state[2] else gr.skip(),
            log_html(log_text) if not same_run or seen[4] != state[4] else gr.skip(),
            *(controls if new_status else (gr.skip(),) * len(controls)), key,
            notice() if ended else gr.skip())


def _dotted(cfg: TrainConfig, key: str):
    value = cfg
    for part in key.split("."):
        value = getattr(value, part)
    return value

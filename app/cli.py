"""`sdlora`: the command line front door (docs: ../README.md, the contract in shared CLI.md).

Thin by design: each command builds a config or calls one function of trainer/ or networks/. Errors a
user can cause are printed as one sentence on stderr with a non-zero exit code, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys

from app.caption_command import add_caption_subcommand
from app.check_command import add_check_subcommand, add_import_kohya_action
from app.lora_commands import add_lora_subcommands
from app.train_config import make_run_folder, remove_if_empty, train_config
from networks.errors import SdloraError
from networks.spec import FAMILIES

# transformers warns on import that torchvision is absent (it never is needed here); keep stderr for us.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    try:
        return int(args.handler(args) or 0)
    except SdloraError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `sdlora ... | head` closed the pipe: not an error
        sys.stderr.close()
        return 0
    except Exception as error:  # an sdlora bug, not a user error: one line, traceback on request
        if os.environ.get("SDLORA_DEBUG"):
            raise
        print(f"error: unexpected {type(error).__name__}: {error} (set SDLORA_DEBUG=1 for the traceback)",
              file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdlora", description="Train Stable Diffusion LoRA/LoCon adapters.")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")

    ui = commands.add_parser("ui", help="start the web UI")
    ui.add_argument("--host", default="127.0.0.1")
    ui.add_argument("--port", type=int, default=7860)
    ui.add_argument("--auth", help="USER:PASS required to open the UI")
    ui.add_argument("--runs-dir", default="runs", help="folder holding the runs (default ./runs)")
    ui.add_argument("--share", action="store_true", help="also open a public gradio.live link")
    ui.set_defaults(handler=run_ui)

    demo_model = commands.add_parser("demo-model", help="write the built-in tiny model as a diffusers folder")
    demo_model.add_argument("dir")
    demo_model.add_argument("--family", choices=("shapes", *FAMILIES), default="sd1",
                            help="shapes: the pretrained model that draws; sd1/sd2/sdxl: tiny, random weights")
    demo_model.set_defaults(handler=run_demo_model)

    demo_data = commands.add_parser("demo-data", help="write a small generated style dataset")
    demo_data.add_argument("dir")
    demo_data.add_argument("--count", type=int, default=12)
    demo_data.set_defaults(handler=run_demo_data)

    train = commands.add_parser("train", help="train a LoRA/LoCon")
    train.add_argument("--config", help="a TOML config file")
    train.add_argument("--model", help="diffusers folder, .safetensors/.ckpt file, or demo:shapes|sd1|sd2|sdxl")
    train.add_argument("--data", help="the image folder")
    train.add_argument("--preset", help="a preset name (sdlora presets list)")
    train.add_argument("--output", help="the run folder")
    train.add_argument("--name", help="the exported file's name (NAME.safetensors)")
    train.add_argument("--resume", metavar="RUN_DIR", help="continue a stopped or interrupted run")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config key, e.g. --set train.learning_rate=2e-4 (repeatable)")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.set_defaults(handler=run_train)

    presets = commands.add_parser("presets", help="list, show or save presets")
    preset_commands = presets.add_subparsers(metavar="ACTION")
    listing = preset_commands.add_parser("list")
    listing.set_defaults(handler=lambda a: _print(_presets().presets_list_text()))
    show = preset_commands.add_parser("show")
    show.add_argument("name")
    show.set_defaults(handler=lambda a: _print(_presets().presets_show_text(a.name)))
    save = preset_commands.add_parser("save")
    save.add_argument("name")
    save.add_argument("--from", dest="from_file", required=True, metavar="FILE.toml")
    save.set_defaults(handler=lambda a: _print(_presets().presets_save_text(a.name, a.from_file)))
    add_import_kohya_action(preset_commands)

    _add_optional_commands(commands)
    return parser


def _add_optional_commands(commands) -> None:
    """Command groups that live in their own modules."""
    add_check_subcommand(commands)
    add_lora_subcommands(commands)
    add_caption_subcommand(commands)


def _print(text: str) -> int:
    print(text)
    return 0


def _presets():
    from trainer.config import presets

    return presets


def run_ui(args) -> int:
    from app.ui import launch

    auth = None
    if args.auth:
        user, sep, password = args.auth.partition(":")
        if not sep or not user or not password:
            raise SdloraError("--auth must look like USER:PASS.")
        auth = (user, password)
    launch(host=args.host, port=args.port, auth=auth, runs_dir=args.runs_dir, share=args.share)
    return 0


def run_demo_model(args) -> int:
    from trainer.model.tiny_models import save_demo_model

    path = save_demo_model(args.dir, args.family)
    print(f"Wrote the tiny {args.family} model to {path}")
    return 0


def run_demo_data(args) -> int:
    from trainer.demo.demo_data import make_demo_dataset

    if args.count < 1:
        raise SdloraError(f"--count must be at least 1 (got {args.count}).")
    make_demo_dataset(args.dir, count=args.count)
    print(f"Wrote {args.count} demo images with captions to {args.dir}")
    return 0


def run_train(args) -> int:
    cfg, resume = train_config(args)  # config errors show before the heavy imports below
    created = make_run_folder(cfg.output.dir) if cfg.output.dir else None
    from trainer.run.loop import train

    preset = None if resume or args.config else args.preset
    try:
        final = train(cfg, resume=resume, progress=not args.no_progress, preset=preset)
    except BaseException:
        remove_if_empty(created)
        raise
    from accelerate import PartialState

    if not PartialState().is_main_process:  # one line per run, not per process
        return 0
    if final is None:
        print(f"Stopped; resume with: sdlora train --resume {cfg.output.dir}")
    else:
        print(f"Saved {final}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

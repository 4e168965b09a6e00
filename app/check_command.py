"""`sdlora check` (the pre-flight report) and `sdlora presets import-kohya FILE.json NAME`.

Thin bodies over trainer.preflight and trainer.kohya_import. `check` exits 1 when the report has errors
(training would fail), 0 otherwise: warnings are advice, so scripts can run `sdlora check && sdlora train`.
"""

from __future__ import annotations

import argparse
import json


def add_check_subcommand(subparsers) -> argparse.ArgumentParser:
    """Register `check` on the top-level subparsers."""
    check = subparsers.add_parser("check", help="pre-flight check: dataset, captions, steps, memory, risky settings")
    check.add_argument("--config", help="a TOML config file")
    check.add_argument("--model", help="diffusers folder, .safetensors/.ckpt file, or demo:shapes|sd1|sd2|sdxl")
    check.add_argument("--data", help="the image folder")
    check.add_argument("--preset", help="a preset name (also what learning rates are compared with)")
    check.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config key, e.g. --set dataset.caption_extension=.caption (repeatable)")
    check.add_argument("--json", action="store_true", help="print the report as JSON")
    check.set_defaults(handler=run_check)
    return check


def add_import_kohya_action(preset_actions) -> argparse.ArgumentParser:
    """Register `import-kohya` on the `presets` actions (the subparsers `presets list|show|save` live on)."""
    action = preset_actions.add_parser("import-kohya", help="convert a kohya_ss GUI preset (.json) into a user preset")
    action.add_argument("file", metavar="FILE.json")
    action.add_argument("name", metavar="NAME")
    action.set_defaults(handler=run_import_kohya)
    return action


def run_check(args) -> int:
    from app.train_config import train_config
    from networks.errors import SdloraError
    from trainer.preflight import preflight_report

    if not (args.config or args.data or args.preset):
        raise SdloraError("Give --data DIR (with --preset NAME and --model), or --config FILE.toml.")
    # train_config builds the same config `sdlora train` would (the run folder does not matter here).
    request = argparse.Namespace(resume=None, output=None, name=None, config=args.config, model=args.model,
                                 data=args.data, preset=args.preset, set=list(args.set))
    cfg, _ = train_config(request)
    report = preflight_report(cfg, preset=args.preset)
    print(json.dumps(report.to_dict(), indent=2, default=str) if args.json else report.render())
    return 0 if report.ok else 1


def run_import_kohya(args) -> int:
    from trainer.config.kohya_import import import_kohya_file

    path, result = import_kohya_file(args.file, args.name)
    print(result.text())
    print(f"Saved preset {args.name!r} to {path}; use it with --preset {args.name}.")
    return 0

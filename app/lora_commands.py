"""`sdlora lora inspect|resize|merge|extract|similarity|spectrum`: thin bodies over networks/ and trainer/.

Each `run_*` takes the parsed argparse namespace, prints its result (text, or JSON with --json) and
returns the exit code; user mistakes surface as SdloraError for app.cli to print as one sentence.
torch, numpy and Pillow are imported inside the commands: registering them must not slow `sdlora --help`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from networks.errors import SdloraError

FAMILY_CHOICES = ("auto", "sd1", "sd2", "sdxl")
DTYPE_CHOICES = ("fp16", "bf16", "fp32")  # the keys of networks.lora_file.DTYPES


def add_lora_subcommands(subparsers) -> argparse.ArgumentParser:
    """Register `lora` and its actions on the top-level subparsers; each action sets `handler`."""
    lora = subparsers.add_parser("lora", help="inspect, resize, merge, extract and analyse LoRA files")
    actions = lora.add_subparsers(metavar="ACTION")

    inspect = actions.add_parser("inspect", help="metadata, modules per block, rank/alpha per module")
    inspect.add_argument("file")
    inspect.add_argument("--json", action="store_true", help="print the full report as JSON")
    inspect.add_argument("--modules", action="store_true", help="also list every module")
    inspect.set_defaults(handler=run_inspect)

    resize = actions.add_parser("resize", help="SVD to a fixed rank or a per-module (dynamic) rank")
    resize.add_argument("file")
    _add_rank_flags(resize)
    resize.add_argument("--output", required=True, help="the resized .safetensors")
    _add_dtype_flag(resize, "the file's dtype")
    resize.add_argument("--json", action="store_true", help="print the per-module report as JSON")
    resize.set_defaults(handler=run_resize)

    merge = actions.add_parser("merge", help="merge LoRAs into a base model (--model), or into one LoRA")
    merge.add_argument("files", nargs="+", metavar="LORA")
    merge.add_argument("--weights", type=float, nargs="+", help="one weight per LoRA (default 1 each)")
    merge.add_argument("--model", help="base model (diffusers folder, .safetensors/.ckpt, demo:sd1...): "
                                       "bake the LoRAs into it; without it the LoRAs are mixed into one LoRA")
    merge.add_argument("--output", help="with --model: the merged diffusers folder; else the mixed .safetensors")
    merge.add_argument("--single-file", help="with --model: also (or only) write one .safetensors checkpoint")
    merge.add_argument("--family", choices=FAMILY_CHOICES, default="auto")
    merge.add_argument("--config-dir", help="diffusers config folder for a single-file --model")
    _add_rank_flags(merge, "mixing: ")
    _add_dtype_flag(merge, "fp32 for models, the first file's dtype for LoRAs")
    merge.add_argument("--json", action="store_true")
    merge.set_defaults(handler=run_merge)

    extract = actions.add_parser("extract", help="a LoRA/LoCon from a fine-tuned model minus its base")
    extract.add_argument("--base", required=True, help="the base model")
    extract.add_argument("--tuned", required=True, help="the fine-tuned model")
    extract.add_argument("--output", required=True, help="the extracted .safetensors")
    _add_rank_flags(extract)
    extract.add_argument("--conv-rank", type=int, help="rank of 3x3 conv (LoCon) modules (default --rank)")
    extract.add_argument("--no-conv", action="store_true", help="Linear/1x1 modules only (plain LoRA)")
    extract.add_argument("--unet-only", action="store_true", help="leave the text encoder(s) out")
    extract.add_argument("--min-change", type=float, default=1e-6,
                         help="skip modules whose relative change is at most this (default 1e-6)")
    extract.add_argument("--family", choices=FAMILY_CHOICES, default="auto")
    extract.add_argument("--device", default="cpu", help="where the SVDs run (cpu, cuda)")
    _add_dtype_flag(extract, "fp32")
    extract.add_argument("--json", action="store_true")
    extract.set_defaults(handler=run_extract)

    similarity = actions.add_parser("similarity", help="subspace similarity phi(i, j) of two LoRAs (LoRA paper 7.2)")
    similarity.add_argument("a")
    similarity.add_argument("b")
    similarity.add_argument("--side", choices=("down", "up"), default="down",
                            help="down: right-singular vectors of lora_down (the paper's choice); up: of lora_up")
    similarity.add_argument("--module", help="heatmap of this module instead of the mean over modules")
    similarity.add_argument("--png", help="save the heatmap as a PNG")
    similarity.add_argument("--json", action="store_true")
    similarity.set_defaults(handler=run_similarity)

    experiment = actions.add_parser(
        "rank-experiment", help="train the same data at two ranks (the LoRA paper's r 8 vs r 64) and save "
                                "their subspace-similarity heatmap")
    experiment.add_argument("--data", required=True, help="the image folder")
    experiment.add_argument("--output", required=True, help="folder for both runs and the heatmap")
    experiment.add_argument("--model", default="demo:sd1")
    experiment.add_argument("--preset", default="demo")
    experiment.add_argument("--ranks", type=int, nargs=2, default=(8, 64), metavar=("R1", "R2"))
    experiment.add_argument("--steps", type=int, default=40)
    experiment.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    experiment.add_argument("--json", action="store_true")
    experiment.set_defaults(handler=run_rank_experiment)

    spectrum = actions.add_parser("spectrum", help="singular values and effective ranks per module and block")
    spectrum.add_argument("file")
    spectrum.add_argument("--model", help="base model: adds each module's amplification factor")
    spectrum.add_argument("--family", choices=FAMILY_CHOICES, default="auto")
    spectrum.add_argument("--modules", action="store_true", help="also list every module")
    spectrum.add_argument("--json", action="store_true")
    spectrum.set_defaults(handler=run_spectrum)
    lora.set_defaults(handler=lambda args: _help(lora))
    return lora


def _add_rank_flags(parser, what: str = "") -> None:
    parser.add_argument("--rank", type=int, help=f"{what}the new rank (a cap with --energy / --sv-ratio)")
    parser.add_argument("--energy", type=float, help=f"{what}per module, keep this fraction of the energy (0.9)")
    parser.add_argument("--sv-ratio", type=float, help=f"{what}per module, keep s >= s_max / ratio")


def _add_dtype_flag(parser, default: str) -> None:
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, help=f"weights dtype of the output (default {default})")


def _help(parser) -> int:
    parser.print_help()
    return 2


def _rank_choice(args, required: bool = False):
    from networks.resize import RankChoice

    choice = RankChoice(rank=args.rank, energy=args.energy, sv_ratio=args.sv_ratio).validate()
    if required and choice.rank is None and not choice.dynamic:
        raise SdloraError("Give --rank R, --energy F or --sv-ratio X to choose the output rank.")
    return choice


def _dtype(args):
    from networks.lora_file import DTYPES

    return DTYPES[args.dtype] if args.dtype else None


def _emit(args, data, text: str) -> int:
    print(json.dumps(data, indent=2, default=str) if args.json else text)
    return 0


# -- inspect ------------------------------------------------------------------------------------
def run_inspect(args) -> int:
    from networks.inspect import inspect_lora, render_inspect

    report = inspect_lora(args.file)
    _emit(args, report, render_inspect(report, per_module=args.modules))
    return 1 if report.get("left_out") else 0  # the rest is reported, but the file is damaged: scripts must see it


# -- resize -------------------------------------------------------------------------------------
def run_resize(args) -> int:
    from networks.resize import resize_lora

    choice = _rank_choice(args, required=True)
    report = resize_lora(args.file, args.output, choice, _dtype(args))
    return _emit(args, report, f"Wrote {args.output} ({choice.describe()})\n" + rank_change_text(report))


def rank_change_text(report: dict[str, dict]) -> str:
    """One summary line: modules, rank range after, kept energy and relative error (mean / worst)."""
    if not report:
        return "no modules"
    rows = list(report.values())
    ranks = [r["rank_after"] for r in rows]
    errors = [r["relative_error"] for r in rows]
    worst = max(report, key=lambda n: report[n]["relative_error"])
    return (f"{len(rows)} modules, rank {min(ranks)}-{max(ranks)}, energy kept mean "
            f"{sum(r['energy_kept'] for r in rows) / len(rows):.4f}, relative error mean "
            f"{sum(errors) / len(errors):.4f}, worst {max(errors):.4f} ({worst})")


# -- merge / mix --------------------------------------------------------------------------------
def run_merge(args) -> int:
    if args.model:
        return _merge_into_model(args)
    if args.single_file:
        raise SdloraError("--single-file needs --model: it writes a merged base model.")
    if not args.output:
        raise SdloraError("Give --output OUT.safetensors for the mixed LoRA (or --model to merge into a model).")
    from networks.mix import mix_loras

    choice = _rank_choice(args)
    report = mix_loras(args.files, args.weights, args.output, choice, _dtype(args))
    return _emit(args, report, f"Wrote {args.output} ({choice.describe()})\n" + rank_change_text(report))


def _merge_into_model(args) -> int:
    import torch

    from trainer.model.merge_checkpoint import merge_checkpoint

    if args.rank or args.energy or args.sv_ratio:
        raise SdloraError("--rank/--energy/--sv-ratio apply when mixing LoRAs; drop them with --model.")
    if args.output and Path(args.output).suffix.lower() == ".safetensors":
        raise SdloraError(f"With --model, --output is a folder ({args.output} looks like a file); "
                          "use --single-file for one .safetensors checkpoint.")
    result = merge_checkpoint(args.model, args.files, args.weights, args.output, args.single_file,
                              family=args.family, dtype=_dtype(args) or torch.float32, config_dir=args.config_dir)
    written = " and ".join(str(p) for p in (result.folder, result.single_file) if p)
    merged = ", ".join(f"{src} ({n} modules)" for src, n in result.merged.items())
    data = {"family": result.family, "merged": result.merged, "folder": result.folder,
            "single_file": result.single_file}
    return _emit(args, data, f"Merged {merged} into the {result.family} model; wrote {written}")


# -- extract ------------------------------------------------------------------------------------
def run_extract(args) -> int:
    from dataclasses import replace

    import torch

    from networks.extract import extract_lora
    from networks.lora_file import save_lora
    from networks.resize import rank_metadata
    from trainer.model.model_loading import load_model

    choice = _rank_choice(args, required=True)
    conv_choice = replace(choice, rank=args.conv_rank).validate() if args.conv_rank else choice
    base = load_model(args.base, family=args.family)
    tuned = load_model(args.tuned, family=base.family.name)
    state, report = extract_lora(base.family.name, _roles(base), _roles(tuned), choice, conv_choice,
                                 locon=not args.no_conv, text_encoder=not args.unet_only,
                                 min_change=args.min_change, dtype=_dtype(args) or torch.float32,
                                 device=args.device)
    metadata = {"ss_base_model_version": base.family.base_model_version(base.prediction_type),
                "ss_v2": str(base.family.is_v2),
                "modelspec.sai_model_spec": "1.0.1",
                "modelspec.architecture": base.family.modelspec_architecture(base.prediction_type),
                "modelspec.title": f"extracted from {Path(args.tuned).name}"}
    save_lora(args.output, state, rank_metadata(metadata, state, f"extract {choice.describe()}"))
    return _emit(args, report, f"Wrote {args.output}\n" + rank_change_text(report))


def _roles(model) -> dict:
    return {"unet": model.unet, **dict(zip(model.family.text_encoder_attrs, model.text_encoders))}


# -- similarity ---------------------------------------------------------------------------------
def run_similarity(args) -> int:
    from networks.analysis import subspace_similarity
    from networks.lora_file import read_lora

    report = subspace_similarity(read_lora(args.a)[0], read_lora(args.b)[0], args.side, args.a, args.b)
    heatmap = report["mean"]
    if args.module:
        if args.module not in report["modules"]:
            raise SdloraError(f"Module '{args.module}' is not in both files; pick one listed by "
                              f"`sdlora lora similarity {args.a} {args.b}`.")
        heatmap = report["modules"][args.module]["phi"]
    if args.png:
        save_heatmap_png(heatmap, args.png)
    return _emit(args, report, similarity_text(report) + (f"\nheatmap: {args.png}" if args.png else ""))


def run_rank_experiment(args) -> int:
    """Two trainings that differ only in r, then phi(A_r1, A_r2) as in the LoRA paper's section 7.2."""
    from networks.analysis import subspace_similarity
    from networks.lora_file import read_lora
    from trainer.config.presets import resolve_config
    from trainer.run.loop import train

    out = Path(args.output)
    files = []
    for rank in args.ranks:
        cfg = resolve_config(args.preset, [f"dataset.path={Path(args.data).resolve()}", f"model.path={args.model}",
                                           f"output.dir={(out / f'r{rank}').resolve()}", f"network.rank={rank}",
                                           f"train.max_steps={args.steps}", "sample.every_steps=0", "sample.at_start=false",
                                           "save.every_steps=0", "save.precision=fp32", *args.set])
        files.append(train(cfg, progress=False))
    report = subspace_similarity(read_lora(files[0])[0], read_lora(files[1])[0], "down", str(files[0]),
                                 str(files[1]))
    png = save_heatmap_png(report["mean"], str(out / "similarity.png"))
    return _emit(args, report, similarity_text(report) + f"\nheatmap: {png}")


def similarity_text(report: dict) -> str:
    lines = [f"{'module':<72}{'phi(1,1)':>10}{'phi(r,r)':>10}"]
    for name, row in report["modules"].items():
        lines.append(f"{name:<72}{row['top1']:>10.3f}{row['full']:>10.3f}")
    for which in ("only_in_a", "only_in_b"):
        if report[which]:
            lines.append(f"{len(report[which])} module(s) {which.replace('_', ' ')}")
    return "\n".join(lines)


# viridis at 0, 0.25, 0.5, 0.75, 1: 0 = unrelated subspaces (dark), 1 = the same (yellow)
VIRIDIS = ((68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37))


def heatmap_image(matrix: list[list[float]], cell: int = 16):
    """phi as a PIL image: row i (top to bottom), column j (left to right), each cell `cell` pixels square,
    values in [0, 1] coloured from dark purple (0) to yellow (1) along VIRIDIS."""
    import numpy as np
    from PIL import Image

    palette = np.array(VIRIDIS, dtype=float)
    values = np.clip(np.asarray(matrix, dtype=float), 0.0, 1.0) * (len(palette) - 1)
    low = np.floor(values).astype(int).clip(max=len(palette) - 2)
    frac = (values - low)[..., None]
    rgb = palette[low] * (1 - frac) + palette[low + 1] * frac
    image = Image.fromarray(rgb.round().astype(np.uint8), "RGB")
    return image.resize((image.width * cell, image.height * cell), Image.NEAREST)


def save_heatmap_png(matrix: list[list[float]], path: str, cell: int = 16) -> Path:
    """heatmap_image(matrix, cell) written as a PNG (parent folders created)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    heatmap_image(matrix, cell).save(target)
    return target


# -- spectrum -----------------------------------------------------------------------------------
def run_spectrum(args) -> int:
    from networks.analysis import amplification_report, block_summary, spectrum
    from networks.lora_file import read_lora

    state, _ = read_lora(args.file)
    report = spectrum(state, args.file)
    if args.model:
        from trainer.model.model_loading import load_model

        model = load_model(args.model, family=args.family)
        factors = amplification_report(model.family.name, model.unet, model.text_encoders, state, args.file)
        for name, value in factors.items():
            report["modules"].setdefault(name, {})["amplification"] = value
        report["blocks"] = block_summary(report["modules"])
    return _emit(args, report, spectrum_text(report, args.modules))


def spectrum_text(report: dict, per_module: bool = False) -> str:
    amplified = any("mean_amplification" in row for row in report["blocks"].values())
    head = f"{'block':<26}{'modules':>8}{'rank':>6}{'e90':>7}{'e99':>7}{'entropy':>9}{'|dW|_F':>11}"
    lines = [head + (f"{'amplif.':>9}" if amplified else "")]
    for block, row in report["blocks"].items():
        line = (f"{block:<26}{row['modules']:>8}{row['mean_rank']:>6.1f}{row['mean_energy_rank_90']:>7.1f}"
                f"{row['mean_energy_rank_99']:>7.1f}{row['mean_entropy_rank']:>9.2f}{row['norm']:>11.4g}")
        lines.append(line + (f"{row.get('mean_amplification', float('nan')):>9.2f}" if amplified else ""))
    if per_module:
        lines += ["", f"{'module':<72}{'rank':>5}{'e90':>5}{'e99':>5}  top singular values"]
        for name, m in report["modules"].items():
            top = " ".join(f"{v:.3g}" for v in m["singular_values"][:4])
            lines.append(f"{name:<72}{m['rank']:>5}{m['energy_rank_90']:>5}{m['energy_rank_99']:>5}  {top}")
    return "\n".join(lines)

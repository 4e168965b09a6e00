"""Does the LoRA learn the style? Style and content scores against steps on demo:shapes (trainer/demo/quality.py).

    python -m bench.quality                      # every setting, ~20 min on 2 CPU cores
    python -m bench.quality --steps 20 --every 10 --only head-to-head   # a quick look
    python -m bench.quality --compare-types      # each adapter type against a full fine-tune (bench/compare_types.py)

Each setting trains on the demo dataset (12 images, 64 px, batch 2, fixed seeds) and is scored every
--every steps on the held-out prompts (colour/shape pairs the training captions never name):
- head-to-head: the diffusers+peft recipe (bench/peers.py) and sdlora at the same base, data, rank, alpha,
  learning rate, batch and steps; sdlora once on the recipe's modules (q, k, v, out of the UNet) and once on
  its own (attention, feed-forward, projections, text encoder);
- defaults: sdlora's `demo` preset against the recipe's own defaults (r 4, alpha 4, lr 1e-4);
- ranks: sdlora at r 1, 4, 16, 64 and alpha/r 0.5 and 1;
- locon: sdlora LoRA against LoCon at the same r.
It prints the scores, steps to reach half of the style gap (base -> training images) and their ratio
sdlora / recipe, writes bench/results/quality.json and score-vs-step plots (docs/quality-*.png), and the
LoRA paper's analyses of the r 8 and r 64 files: phi between their top directions, the amplification factor
of dW on W and effective ranks.
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from bench.models import BENCH_DIR, REPO_ROOT, work_dir

BATCH, RESOLUTION, SEED = 2, 64, 42
GROUPS = ("head-to-head", "defaults", "ranks", "locon")


@dataclass
class Setting:
    name: str
    group: str
    contender: str  # "sdlora" or "recipe"
    rank: int = 8
    alpha_ratio: float = 1.0
    learning_rate: float = 1e-3
    network: str = "lora"
    recipe_modules: bool = False  # sdlora adapts only the recipe's q, k, v, out
    preset: str | None = None  # sdlora's preset as shipped (its defaults)
    curve: list = field(default_factory=list)  # [(step, style, content)]
    file: str | None = None  # the trained LoRA, kept for the LoRA paper's analyses (r 8 and r 64)


def settings(lr: float) -> list[Setting]:
    rows = [
        Setting("recipe r8", "head-to-head", "recipe", learning_rate=lr),
        Setting("sdlora r8, recipe modules", "head-to-head", "sdlora", learning_rate=lr, recipe_modules=True),
        Setting("sdlora r8", "head-to-head", "sdlora", learning_rate=lr),
        Setting("recipe defaults (r4, lr 1e-4)", "defaults", "recipe", rank=4, learning_rate=1e-4),
        Setting("sdlora demo preset", "defaults", "sdlora", preset="demo"),
        Setting("sdlora locon r8", "locon", "sdlora", learning_rate=lr, network="locon"),
    ]
    for rank in (1, 4, 16, 64):
        for ratio in (0.5, 1.0):
            rows.append(Setting(f"sdlora r{rank} ratio {ratio:g}", "ranks", "sdlora", rank=rank, alpha_ratio=ratio,
                                learning_rate=lr))
    return rows


# --- contenders -------------------------------------------------------------------------------------


def sdlora_contender(setting: Setting, model_dir: Path, data_dir: Path, run_dir: Path, steps: int):
    from bench.ours import SdloraContender, bench_config
    from bench.peers import RECIPE_TARGETS
    from trainer.config import config_from_dict, merge_dicts
    from trainer.config.presets import resolve_config

    quiet = {"sample": {"every_steps": 0, "every_epochs": 0, "at_start": False},
             "save": {"every_steps": 0, "every_epochs": 0}}
    if setting.preset:
        data = merge_dicts(resolve_config(setting.preset).model_dump(), quiet)
        data = merge_dicts(data, {"model": {"path": str(model_dir)}, "dataset": {"path": str(data_dir)},
                                  "output": {"dir": str(run_dir)}, "train": {"max_steps": steps, "seed": SEED}})
        return SdloraContender(config_from_dict(data))
    rank = setting.rank
    cfg = bench_config(model_dir, data_dir, run_dir, RESOLUTION, BATCH, rank, alpha=rank * setting.alpha_ratio,
                       network=setting.network, conv_rank=rank, conv_alpha=rank * setting.alpha_ratio,
                       learning_rate=setting.learning_rate, seed=SEED, extra={"train": {"max_steps": steps}},
                       target_modules=RECIPE_TARGETS if setting.recipe_modules else None)
    return SdloraContender(cfg)


def recipe_contender(setting: Setting, model_dir: Path, data_dir: Path, run_dir: Path, steps: int):
    from bench.peers import Recipe

    epochs = math.ceil(steps * BATCH / 12) + 1
    return Recipe(model_dir, data_dir, RESOLUTION, BATCH, setting.rank, alpha=setting.rank * setting.alpha_ratio,
                  learning_rate=setting.learning_rate, seed=SEED, epochs=epochs, workdir=run_dir)


def sdlora_pipeline(contender, base):
    """The trainer's UNet (LoRA attached) and text encoder if it kept one (it trains it), else the base's."""
    from trainer.run.sampling import build_pipeline

    model = contender.parts.model
    encoders = model.text_encoders or base.text_encoders
    pipeline = build_pipeline(base, "ddim")
    pipeline.unet, pipeline.text_encoder = model.unet, encoders[0]
    return pipeline.to(model.unet.device)  # the base's VAE (and text encoder) join the trained UNet


def recipe_pipeline(contender, base):
    from trainer.run.sampling import build_pipeline

    pipeline = build_pipeline(base, "ddim")
    pipeline.unet = contender.accelerator.unwrap_model(contender.unet)
    return pipeline.to(pipeline.unet.device)


def train_and_score(setting: Setting, model_dir: Path, data_dir: Path, run_dir: Path, steps: int, every: int,
                    base, seeds: int = 4, log=print) -> Setting:
    from trainer.demo.quality import evaluate

    make = sdlora_contender if setting.contender == "sdlora" else recipe_contender
    contender = make(setting, model_dir, data_dir, run_dir, steps)
    contender.setup()
    pipeline_of = sdlora_pipeline if setting.contender == "sdlora" else recipe_pipeline
    batches = contender.batches()
    for step in range(steps + 1):
        if step % every == 0:
            scores = evaluate(pipeline_of(contender, base), seeds=seeds)
            setting.curve.append((step, scores.style, scores.content))
            log(f"  {setting.name}: step {step} style {scores.style:.1f} content {scores.content:.1f}")
        if step < steps:
            contender.step(next(batches))
    if setting.contender == "sdlora" and setting.rank in (8, 64) and setting.alpha_ratio == 1.0 \
            and not setting.recipe_modules and setting.network == "lora" and not setting.preset:
        setting.file = str(_export(contender, run_dir / f"r{setting.rank}.safetensors"))
    return setting


def _export(contender, path: Path) -> Path:
    from networks.lora_file import save_lora

    path.parent.mkdir(parents=True, exist_ok=True)
    return save_lora(path, contender.parts.network.kohya_state_dict(), {})


# --- results ----------------------------------------------------------------------------------------


def steps_to_reach(curve, level: float) -> float | None:
    """The first step at which style reaches `level`, interpolated between scored steps; None if never."""
    for (s0, v0, _), (s1, v1, _) in zip(curve, curve[1:]):
        if v1 >= level:
            return s0 if v0 >= level else s0 + (s1 - s0) * (level - v0) / (v1 - v0)
    return None


def summary_rows(rows: list[Setting], level: float) -> list[list]:
    out = []
    for row in rows:
        reach = steps_to_reach(row.curve, level)
        final = row.curve[-1]
        out.append([row.group, row.name, f"{final[1]:.1f}", f"{final[2]:.1f}",
                    "never" if reach is None else f"{reach:.0f}"])
    return out


def ratio_lines(rows: list[Setting], level: float, steps: int) -> list[str]:
    """steps-to-reach ratios sdlora / recipe for the pairs that share every setting but the trainer."""
    by_name = {row.name: row for row in rows}
    pairs = [("sdlora r8, recipe modules", "recipe r8"), ("sdlora r8", "recipe r8"),
             ("sdlora demo preset", "recipe defaults (r4, lr 1e-4)")]
    lines = []
    for ours, theirs in pairs:
        if ours in by_name and theirs in by_name:
            a, b = steps_to_reach(by_name[ours].curve, level), steps_to_reach(by_name[theirs].curve, level)
            text = ("n/a (neither reached it)" if a is None and b is None else
                    f"< {max(a, 1) / steps:.2f} (recipe never reached it in {steps} steps)" if b is None else
                    f"> {steps / max(b, 1):.2f} (sdlora never reached it)" if a is None else f"{a / max(b, 1e-9):.2f}")
            lines.append(f"{ours} / {theirs}: {text}")
    return lines


def plot(rows: list[Setting], out_dir: Path, base, train_style: float) -> list[Path]:
    """One PNG per group: style (solid) and content (dashed) against steps (needs sdlora[bench])."""
    try:
        import matplotlib
    except ImportError:
        print("no plots: matplotlib is missing; pip install -e '.[bench]'")
        return []

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for group in GROUPS:
        members = [row for row in rows if row.group == group]
        if not members:
            continue
        figure, axis = plt.subplots(figsize=(7, 4.2), dpi=110)
        for index, row in enumerate(members):
            steps = [c[0] for c in row.curve]
            colour = f"C{index}"
            axis.plot(steps, [c[1] for c in row.curve], color=colour, label=f"{row.name} style")
            axis.plot(steps, [c[2] for c in row.curve], color=colour, linestyle="--", alpha=0.6)
        axis.axhline(train_style, color="black", linewidth=0.8, linestyle=":", label="training images' style")
        axis.axhline(base.style, color="grey", linewidth=0.8, linestyle=":", label="base model's style")
        axis.set(xlabel="step", ylabel="score (style solid, content dashed)", ylim=(0, 105),
                 title=f"demo:shapes, {group}")
        axis.legend(fontsize=7, loc="lower right")
        figure.tight_layout()
        path = out_dir / f"quality-{group}.png"
        figure.savefig(path)
        plt.close(figure)
        paths.append(path)
    return paths


def lora_paper_analyses(rows: list[Setting], base_model) -> dict:
    """phi between the r 8 and r 64 files' top directions, amplification of dW on W, effective ranks."""
    from networks.analysis import amplification_report, spectrum, subspace_similarity
    from networks.lora_file import read_lora

    files = {row.rank: Path(row.file) for row in rows if row.file}
    if set(files) != {8, 64}:
        print("no LoRA paper analyses: they need the r 8 and r 64 runs (groups head-to-head and ranks)")
        return {}
    states = {rank: read_lora(path)[0] for rank, path in files.items()}
    similarity = subspace_similarity(states[8], states[64])
    modules = similarity["modules"].values()
    report = {"phi_top1_mean": sum(m["top1"] for m in modules) / len(modules),
              "phi_r8_mean": sum(m["full"] for m in modules) / len(modules),
              "random_subspace_phi_1_1": sum(1 / m["dim"] for m in modules) / len(modules)}
    for rank, state in states.items():
        amp = amplification_report("sd1", base_model.unet, base_model.text_encoders, state)
        ranks = spectrum(state)["modules"].values()
        report[f"r{rank}"] = {
            "amplification_median": sorted(amp.values())[len(amp) // 2],
            "amplification_max": max(amp.values()),
            "entropy_rank_mean": sum(m["entropy_rank"] for m in ranks) / len(ranks),
            "energy_rank_90_mean": sum(m["energy_rank_90"] for m in ranks) / len(ranks),
        }
    return report


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--compare-types" in argv:  # a comparison of its own, with its own options (bench/compare_types.py)
        from bench.compare_types import main as compare_types

        return compare_types([arg for arg in argv if arg != "--compare-types"])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compare-types", action="store_true",
                        help="each adapter type against a full fine-tune of the UNet instead (issue 24; "
                             "`--compare-types --help` lists its options)")
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--every", type=int, default=20)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--seeds", type=int, default=4, help="images per held-out prompt at each scoring")
    parser.add_argument("--only", choices=GROUPS, action="append", help="run only these groups")
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "results" / "quality.json")
    parser.add_argument("--plots", type=Path, default=REPO_ROOT / "docs")
    args = parser.parse_args(argv)
    from bench.harness import quiet_libraries, table
    from trainer.demo.demo_data import make_demo_dataset
    from trainer.demo.quality import evaluate, training_style
    from trainer.model.model_loading import load_model
    from trainer.model.tiny_models import demo_model_path
    from trainer.run.sampling import build_pipeline

    quiet_libraries()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    started = time.time()
    root = work_dir() / "quality"
    data_dir = root / "data"
    if not data_dir.is_dir():
        make_demo_dataset(data_dir)
    model_dir = demo_model_path("shapes")
    base_model = load_model("demo:shapes")
    base = evaluate(build_pipeline(base_model, "ddim"), seeds=args.seeds)
    train_style = training_style()
    level = base.style + 0.5 * (train_style - base.style)
    print(f"base model: style {base.style:.1f} content {base.content:.1f}; training images: style {train_style:.1f}; "
          f"half-way level {level:.1f}")
    rows = [row for row in settings(args.learning_rate) if not args.only or row.group in args.only]
    for row in rows:
        print(f"{row.name} ...", flush=True)
        train_and_score(row, model_dir, data_dir, root / row.name, args.steps, args.every, base_model, args.seeds)
    print(table(summary_rows(rows, level), ["group", "setting", "style", "content", f"steps to style {level:.0f}"]))
    for line in ratio_lines(rows, level, args.steps):
        print(line)
    analyses = lora_paper_analyses(rows, base_model)
    print(json.dumps(analyses, indent=2))
    result = {"commit": commit(), "steps": args.steps, "every": args.every, "batch": BATCH, "seed": SEED,
              "base": asdict(base), "training_style": train_style, "half_way_level": level,
              "settings": [asdict(row) for row in rows], "ratios": ratio_lines(rows, level, args.steps),
              "lora_paper": analyses, "seconds": round(time.time() - started)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    for path in plot(rows, args.plots, base, train_style):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

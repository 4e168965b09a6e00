"""Each adapter type against a full fine-tune of the UNet on demo:shapes (issue 24): the comparison every LoRA
paper makes, on the same data, steps, batch and training seeds.

    python -m bench.quality --compare-types                  # every type, 2 training seeds (see --help)
    python -m bench.compare_types --types lora full --steps 40 --every 20

Every type in networks.spec.NETWORK_TYPES runs (DoRA and OFT join by themselves once they are types), then the
full fine-tune (bench/full_finetune.py), and LoRA with output preservation when the config has it. Each is
scored every --every steps on the held-out prompts with the trigger (trainer/demo/quality.py: style and
content), and at its end on the same prompts without the trigger: the base model's own plain scenes, which the
adapter should leave alone (their style, content and how far its pixels moved from the base's images). The
tables give the steps each contestant takes to reach 90% of the full fine-tune's final style gain (base ->
full fine-tune, mean of the seeds), trainable parameters and file size; bench/results/quality_types.json holds
every number, docs/quality-types.png the curves.
"""
from __future__ import annotations

import argparse
import gc
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from bench.models import BENCH_DIR, REPO_ROOT, work_dir

FULL = "full"
TRAINING_SEEDS = (42, 43, 44, 45)
PRESERVATION_WEIGHT = 1.0
# A scene in the base model's own words (trainer/demo/plain_scenes.py), none of the held-out pairs: what the
# LoRA should still draw as the base does when the trigger is absent (kohya's DOP prompt, the class words).
PRESERVATION_CAPTION = "a red circle and a blue square"


@dataclass
class Contestant:
    name: str  # the network type, FULL, or "lora + preservation"
    seed: int
    overrides: dict  # over the demo preset (see contestant_settings)
    curve: list = field(default_factory=list)  # [(step, style, content)] on the held-out prompts with the trigger
    untriggered: dict = field(default_factory=dict)  # style, content, change: the prompts without the trigger
    trainable_params: int = 0
    file_bytes: int = 0
    train_seconds: float = 0.0  # setup and steps
    score_seconds: float = 0.0


# --- what each contestant trains ----------------------------------------------------------------------


def adapter_types() -> tuple[str, ...]:
    from networks.spec import NETWORK_TYPES

    return NETWORK_TYPES


def preservation_available() -> bool:
    from trainer.config.train_section import TrainSection

    return {"preservation_caption", "preservation_weight"} <= set(TrainSection.model_fields)


def type_overrides(network_type: str) -> dict:
    """LoRA is the demo preset as shipped. Another type keeps the demo's training (model, data, 64 px, steps,
    batch, schedule) and takes its [network] section from presets/style-<type>.toml when there is one (ranks,
    convs, factor or block size as sdlora recommends them for that type), with the demo's learning rate times
    that preset's rate over style-lora's (LyCORIS's guideline that LoHa and LoKr take larger steps); without a
    preset, the demo's network with the type set."""
    from trainer.config.presets import builtin_names, load_preset

    if network_type == "lora":
        return {}
    name = f"style-{network_type}"
    if name not in builtin_names():
        return {"network": {"type": network_type}}
    preset, lora = load_preset(name), load_preset("style-lora")
    scale = preset.get("train", {}).get("learning_rate", lora["train"]["learning_rate"]) / lora["train"]["learning_rate"]
    demo_rate = load_preset("demo")["train"]["learning_rate"]
    return {"network": dict(preset["network"], type=network_type), "train": {"learning_rate": demo_rate * scale}}


def contestants(types, seeds: int, preservation: bool) -> list[Contestant]:
    """The full fine-tune first (the others' yardstick), then each type, then LoRA with output preservation;
    each at every training seed."""
    from bench.full_finetune import FULL_LEARNING_RATE

    named = [(FULL, {"train": {"learning_rate": FULL_LEARNING_RATE}})] if FULL in types else []
    named += [(kind, type_overrides(kind)) for kind in types if kind != FULL]
    if preservation and "lora" in types and preservation_available():
        named.append(("lora + preservation", {"train": {"preservation_caption": PRESERVATION_CAPTION,
                                                        "preservation_weight": PRESERVATION_WEIGHT}}))
    return [Contestant(name, seed, overrides) for seed in TRAINING_SEEDS[:seeds] for name, overrides in named]


def demo_config(contestant: Contestant, data_dir: Path, run_dir: Path, steps: int):
    """The demo preset with the contestant's overrides, its seed and steps; no previews or checkpoints."""
    from trainer.config import merge_dicts
    from trainer.config.presets import resolve_config

    run = {"dataset": {"path": str(data_dir)}, "output": {"dir": str(run_dir)},
           "train": {"max_steps": steps, "seed": contestant.seed},
           "sample": {"every_steps": 0, "every_epochs": 0, "at_start": False},
           "save": {"every_steps": 0, "every_epochs": 0}}
    return resolve_config("demo", base=merge_dicts(run, contestant.overrides))


# --- training and scoring -----------------------------------------------------------------------------


@dataclass
class Scoring:
    """The base model and what the contestants are measured against: its untriggered images and scores."""
    base_model: object
    seeds: int
    sampler_steps: int
    base: object = None  # Scores with the trigger
    base_plain: object = None  # Scores without it
    base_images: list = field(default_factory=list)  # without it

    def __post_init__(self):
        from trainer.demo.quality import Scores, content_score, evaluate, render_held_out, style_score
        from trainer.run.sampling import build_pipeline

        pipeline = build_pipeline(self.base_model, "ddim")
        self.base = evaluate(pipeline, self.seeds, self.sampler_steps)
        self.base_images, targets = render_held_out(pipeline, self.seeds, self.sampler_steps, trigger=False)
        self.base_plain = Scores(style_score(self.base_images), content_score(self.base_images, targets))

    def triggered(self, pipeline):
        from trainer.demo.quality import evaluate

        return evaluate(pipeline, self.seeds, self.sampler_steps)

    def untriggered(self, pipeline) -> dict:
        from trainer.demo.quality import content_score, image_change, render_held_out, style_score

        images, targets = render_held_out(pipeline, self.seeds, self.sampler_steps, trigger=False)
        return {"style": style_score(images), "content": content_score(images, targets),
                "change": image_change(self.base_images, images)}


def train_and_score(contestant: Contestant, scoring: Scoring, data_dir: Path, run_dir: Path, steps: int,
                    every: int, log=print) -> Contestant:
    """Train `steps` steps, scoring every `every`; step 0 is the base model's score (every adapter type
    starts as a no-op, and the full fine-tune as the base)."""
    from bench.full_finetune import FullFineTune
    from bench.ours import SdloraContender
    from bench.quality import sdlora_pipeline

    clock = time.time()
    cfg = demo_config(contestant, data_dir, run_dir, steps)
    contender = (FullFineTune if contestant.name == FULL else SdloraContender)(cfg)
    contender.setup()
    contestant.curve = [(0, scoring.base.style, scoring.base.content)]
    batches = contender.batches()
    for step in range(1, steps + 1):
        contender.step(next(batches))
        if step % every == 0 or step == steps:
            contestant.train_seconds += time.time() - clock
            clock = time.time()
            pipeline = sdlora_pipeline(contender, scoring.base_model)
            pipeline.unet.eval()
            scores = scoring.triggered(pipeline)
            contestant.curve.append((step, scores.style, scores.content))
            contestant.score_seconds += time.time() - clock
            log(f"  {contestant.name} seed {contestant.seed}: step {step} style {scores.style:.1f} "
                f"content {scores.content:.1f} (trained {contestant.train_seconds:.0f} s, "
                f"scored {contestant.score_seconds:.0f} s)")
            clock = time.time()
    contestant.untriggered = scoring.untriggered(sdlora_pipeline(contender, scoring.base_model))
    contestant.score_seconds += time.time() - clock
    contestant.trainable_params = contender.trainable_params()
    contestant.file_bytes = contender.export(run_dir / "final.safetensors").stat().st_size
    return contestant


def run_all(rows: list[Contestant], scoring: Scoring, root: Path, steps: int, every: int,
            log=print) -> tuple[list[Contestant], list[str]]:
    """The contestants that finished, and a line for each that diverged (a result too, not a crash)."""
    from trainer.run.loop import NonFiniteLoss

    done, diverged = [], []
    for row in rows:
        log(f"{row.name} seed {row.seed} ...")
        try:
            done.append(train_and_score(row, scoring, root / "data", root / f"{row.name} {row.seed}", steps, every,
                                        log))
        except NonFiniteLoss as error:
            diverged.append(f"{row.name} seed {row.seed}: loss {error.value} (not finite)")
            log(f"  {diverged[-1]}")
        gc.collect()  # each contestant loads its own model; free the last one's before the next
    return done, diverged


# --- the tables -------------------------------------------------------------------------------------


def by_name(rows: list[Contestant]) -> dict[str, list[Contestant]]:
    groups: dict[str, list[Contestant]] = {}
    for row in rows:
        groups.setdefault(row.name, []).append(row)
    return groups


def mean_curve(runs: list[Contestant]) -> list[tuple[int, float, float]]:
    """The seeds' curves averaged step by step (every run of a contestant scores at the same steps)."""
    points = np.array([run.curve for run in runs], dtype=np.float64)
    return [(int(step), float(style), float(content)) for step, style, content in points.mean(axis=0)]


def ninety_percent_level(rows: list[Contestant], base_style: float) -> float | None:
    """90% of the way from the base's style to the full fine-tune's final style (mean of its seeds)."""
    full = by_name(rows).get(FULL)
    if not full:
        return None
    return base_style + 0.9 * (mean_curve(full)[-1][1] - base_style)


def type_rows(rows: list[Contestant], base_style: float) -> tuple[list[str], list[list]]:
    """One row per contestant (seeds averaged): style and content at each scored step, the final style of
    each seed, steps to 90% of the full fine-tune's gain, trainable parameters and file size."""
    from bench.quality import steps_to_reach

    level = ninety_percent_level(rows, base_style)
    header = ["contestant", "lr", "style per step", "content per step", "final style per seed",
              "steps to 90% of full FT" if level is None else f"steps to style {level:.1f} (90% of full FT)",
              "trainable params", "file KiB"]
    table = []
    for name, runs in by_name(rows).items():
        curve = mean_curve(runs)
        reach = None if level is None else steps_to_reach(curve, level)
        table.append([name, f"{run_rate(runs[0]):g}", " / ".join(f"{c[1]:.0f}" for c in curve),
                      " / ".join(f"{c[2]:.0f}" for c in curve), ", ".join(f"{r.curve[-1][1]:.1f}" for r in runs),
                      "n/a" if level is None else "never" if reach is None else f"{reach:.0f}",
                      runs[0].trainable_params, f"{runs[0].file_bytes / 1024:.0f}"])
    return header, table


def run_rate(row: Contestant) -> float:
    from trainer.config.presets import load_preset

    return row.overrides.get("train", {}).get("learning_rate", load_preset("demo")["train"]["learning_rate"])


def preservation_rows(rows: list[Contestant], scoring: Scoring) -> tuple[list[str], list[list]]:
    """What each contestant does to prompts without the trigger, beside the style it gives with it."""
    header = ["contestant", "style with trigger", "content with trigger", "style without", "content without",
              "pixel change without (%)"]
    table = [["base model (no adapter)", f"{scoring.base.style:.1f}", f"{scoring.base.content:.1f}",
              f"{scoring.base_plain.style:.1f}", f"{scoring.base_plain.content:.1f}", "0.0"]]
    for name, runs in by_name(rows).items():
        mean = {key: float(np.mean([r.untriggered[key] for r in runs])) for key in ("style", "content", "change")}
        final = mean_curve(runs)[-1]
        table.append([name, f"{final[1]:.1f}", f"{final[2]:.1f}", f"{mean['style']:.1f}", f"{mean['content']:.1f}",
                      f"{mean['change']:.1f}"])
    return header, table


def plot(rows: list[Contestant], scoring: Scoring, path: Path) -> Path | None:
    """One panel per contestant: style (solid) and content (dashed) against steps, a line per training seed,
    with the full fine-tune's mean style and the 90% level for reference (needs sdlora[bench])."""
    try:
        import matplotlib
    except ImportError:
        print("no plot: matplotlib is missing; pip install -e '.[bench]'")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = by_name(rows)
    columns = min(4, len(groups))
    lines = -(-len(groups) // columns)
    figure, axes = plt.subplots(lines, columns, figsize=(3.2 * columns, 2.8 * lines), dpi=100, squeeze=False,
                                sharey=True)
    level = ninety_percent_level(rows, scoring.base.style)
    full = mean_curve(groups[FULL]) if FULL in groups else None
    for axis, (name, runs) in zip(axes.flat, groups.items()):
        for index, run in enumerate(runs):
            steps = [c[0] for c in run.curve]
            axis.plot(steps, [c[1] for c in run.curve], color=f"C{index}", label=f"style, seed {run.seed}")
            axis.plot(steps, [c[2] for c in run.curve], color=f"C{index}", linestyle="--", alpha=0.5,
                      label=f"content, seed {run.seed}")
        if full and name != FULL:
            axis.plot([c[0] for c in full], [c[1] for c in full], color="grey", linewidth=0.8,
                      label="full fine-tune style")
        if level is not None:
            axis.axhline(level, color="black", linewidth=0.6, linestyle=":", label="90% of full FT gain")
        axis.set(title=name, xlabel="step", ylim=(0, 105))
    for axis in list(axes.flat)[len(groups):]:
        axis.axis("off")
    axes[0][0].set_ylabel("score")
    axes[0][0].legend(fontsize=6, loc="lower right")
    figure.suptitle("demo:shapes, held-out prompts: style (solid), content (dashed)", fontsize=9)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)
    return path


# --- the command --------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.quality --compare-types",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=120, help="training steps of every contestant")
    parser.add_argument("--every", type=int, default=40, help="score every N steps (and at the last)")
    parser.add_argument("--training-seeds", type=int, default=2, choices=range(1, len(TRAINING_SEEDS) + 1),
                        help=f"runs per contestant, at seeds {', '.join(map(str, TRAINING_SEEDS))}")
    parser.add_argument("--score-seeds", type=int, default=2, help="images per held-out prompt at each scoring")
    parser.add_argument("--sampler-steps", type=int, default=20, help="DDIM steps of each scored image")
    parser.add_argument("--types", nargs="+", help=f"contestants (default: every network type and {FULL})")
    parser.add_argument("--no-preservation", action="store_true", help="leave out LoRA with output preservation")
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "results" / "quality_types.json")
    parser.add_argument("--plot", type=Path, default=REPO_ROOT / "docs" / "quality-types.png")
    args = parser.parse_args(argv)
    known = (*adapter_types(), FULL)
    args.types = args.types or list(known)
    unknown = [name for name in args.types if name not in known]
    if unknown:
        parser.error(f"--types: {', '.join(unknown)} not among {', '.join(known)}")
    return args


def main(argv=None) -> int:
    import torch

    from bench.harness import quiet_libraries, table
    from bench.quality import commit
    from trainer.demo.demo_data import make_demo_dataset
    from trainer.model.model_loading import load_model

    args = parse_args(argv)
    head = commit()  # the code this run imports (others may commit while it runs)
    quiet_libraries()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    started = time.time()
    root = work_dir() / "quality-types"
    if not (root / "data").is_dir():
        make_demo_dataset(root / "data")
    scoring = Scoring(load_model("demo:shapes"), args.score_seeds, args.sampler_steps)
    print(f"base model: style {scoring.base.style:.1f} content {scoring.base.content:.1f} with the trigger; "
          f"{scoring.base_plain.style:.1f} / {scoring.base_plain.content:.1f} without")
    rows, diverged = run_all(contestants(args.types, args.training_seeds, not args.no_preservation), scoring,
                             root, args.steps, args.every)
    types_table, kept_table = type_rows(rows, scoring.base.style), preservation_rows(rows, scoring)
    print(table(types_table[1], types_table[0]))
    print(table(kept_table[1], kept_table[0]))
    for line in diverged:
        print(f"diverged: {line}")
    result = {"commit": head, "steps": args.steps, "every": args.every, "training_seeds":
              list(TRAINING_SEEDS[:args.training_seeds]), "score_seeds": args.score_seeds,
              "sampler_steps": args.sampler_steps, "base": asdict(scoring.base), "base_plain": asdict(scoring.base_plain),
              "ninety_percent_level": ninety_percent_level(rows, scoring.base.style),
              "contestants": [asdict(row) for row in rows], "types_table": types_table, "preservation_table": kept_table,
              "diverged": diverged, "threads": torch.get_num_threads(), "seconds": round(time.time() - started)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    if plotted := plot(rows, scoring, args.plot):
        print(f"wrote {plotted}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

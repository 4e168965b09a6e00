"""Does storing the frozen base in fp8 (model.fp8_base) change what a LoRA learns? (issue 23.3)

bench/quality.py's "sdlora r8" setting on demo:shapes (64 px, batch 2, lr 2e-3, r 8), trained with and
without model.fp8_base at two training seeds, each scored once at the end by trainer/demo/quality.py (style
and content on the held-out prompts). The answer is "within noise" when the fp8 - full difference at each
seed is no larger than the difference between the two seeds of the same setting.

    python -m bench.fp8_quality [--steps 150] [--seeds 42 43] [--score-seeds 2] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from bench.models import work_dir
from bench.quality import BATCH, RESOLUTION, commit, sdlora_pipeline


def train_and_score(fp8: bool, seed: int, steps: int, score_seeds: int, base_model, model_dir, data_dir) -> dict:
    from bench.ours import SdloraContender, bench_config
    from trainer.demo.quality import evaluate

    run_dir = work_dir() / "fp8-quality" / f"{'fp8' if fp8 else 'full'}-{seed}"
    cfg = bench_config(model_dir, data_dir, run_dir, RESOLUTION, BATCH, 8, learning_rate=2e-3, seed=seed,
                       extra={"train": {"max_steps": steps}, "model": {"fp8_base": fp8}})
    contender = SdloraContender(cfg)
    contender.setup()
    batches = contender.batches()
    losses = [contender.step(next(batches)) for _ in range(steps)]
    scores = evaluate(sdlora_pipeline(contender, base_model), seeds=score_seeds)
    return {"fp8_base": fp8, "seed": seed, "style": scores.style, "content": scores.content,
            "last_loss_mean": sum(losses[-20:]) / len(losses[-20:])}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 43])
    parser.add_argument("--score-seeds", type=int, default=2, help="images per held-out prompt")
    parser.add_argument("--out", type=str)
    args = parser.parse_args(argv)
    from bench.harness import quiet_libraries
    from trainer.demo.demo_data import make_demo_dataset
    from trainer.model.model_loading import load_model
    from trainer.model.tiny_models import demo_model_path

    quiet_libraries()
    started = time.time()
    data_dir = work_dir() / "quality" / "data"
    if not data_dir.is_dir():
        make_demo_dataset(data_dir)
    base_model = load_model("demo:shapes")
    rows = []
    for seed in args.seeds:
        for fp8 in (False, True):
            row = train_and_score(fp8, seed, args.steps, args.score_seeds, base_model, demo_model_path("shapes"),
                                  data_dir)
            rows.append(row)
            print(f"seed {seed} {'fp8 ' if fp8 else 'full'}: style {row['style']:.1f} content {row['content']:.1f} "
                  f"loss (last 20) {row['last_loss_mean']:.4f}", flush=True)
    result = {"commit": commit(), "steps": args.steps, "rows": rows, "seconds": round(time.time() - started)}
    if args.out:
        with open(args.out, "w") as handle:
            handle.write(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

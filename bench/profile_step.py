"""Where sdlora's training step goes: torch.profiler (operators) and cProfile (Python) over real steps.

    python -m bench.profile_step [--model sd1] [--network lora] [--steps 6] [--out FILE.json]

Builds the same contender bench.train_step measures (trainer.run.loop.Trainer on the bench model), warms up,
then profiles `Trainer.optimizer_step` and prints the top costs.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

from bench.harness import QKVO, quiet_libraries, table, write_json
from bench.models import BENCH_DIR, dataset_path, model_path, work_dir


def build(args):
    from bench.ours import SdloraContender, bench_config

    cfg = bench_config(model_path(args.model), dataset_path(args.images), work_dir() / "runs" / "profile",
                       args.resolution, args.batch_size, args.rank, network=args.network, epochs=1000,
                       target_modules=QKVO if args.network == "lora" else None)
    contender = SdloraContender(cfg)
    contender.setup()
    return contender


def profile(args) -> dict:
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    torch.set_num_threads(args.threads)
    quiet_libraries()
    contender = build(args)
    batches = contender.batches()
    for _ in range(args.warmup):
        contender.step(next(batches))
    started = time.perf_counter()
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            contender.step(next(batches))
    profiled_s = (time.perf_counter() - started) / args.steps
    averages = prof.key_averages()
    total_self = sum(e.self_cpu_time_total for e in averages)
    ops = sorted(averages, key=lambda e: e.self_cpu_time_total, reverse=True)[: args.top]
    operators = [{"op": e.key, "calls_per_step": e.count / args.steps,
                  "self_ms_per_step": e.self_cpu_time_total / 1000 / args.steps,
                  "share": e.self_cpu_time_total / total_self} for e in ops]

    profiler = cProfile.Profile()
    started = time.perf_counter()
    profiler.enable()
    for _ in range(args.steps):
        contender.step(next(batches))
    profiler.disable()
    cprofile_s = (time.perf_counter() - started) / args.steps
    stream = io.StringIO()
    stats = pstats.Stats(profiler, stream=stream)
    functions = []
    for (filename, line, name), (_cc, calls, tottime, cumtime, _callers) in stats.stats.items():
        functions.append({"function": f"{Path(filename).name}:{line}({name})", "calls_per_step": calls / args.steps,
                          "tottime_ms_per_step": tottime * 1000 / args.steps,
                          "cumtime_ms_per_step": cumtime * 1000 / args.steps})
    by_tottime = sorted(functions, key=lambda f: f["tottime_ms_per_step"], reverse=True)[: args.top]
    interesting = ("loop.py", "lora.py", "latent_cache.py", "text_cache.py", "objective.py", "family.py",
                   "dataset.py", "optimizer.py", "adamw.py", "accelerator.py", "clip_grad.py")
    ours = sorted((f for f in functions if f["function"].split(":")[0] in interesting),
                  key=lambda f: f["cumtime_ms_per_step"], reverse=True)[: args.top]
    plain = []
    for _ in range(args.steps):
        begin = time.perf_counter()
        contender.step(next(batches))
        plain.append(time.perf_counter() - begin)
    return {"settings": vars(args), "plain_step_s": sorted(plain)[len(plain) // 2],
            "torch_profiler_step_s": profiled_s, "cprofile_step_s": cprofile_s,
            "operators": operators, "python_by_tottime": by_tottime, "sdlora_and_loop_by_cumtime": ours}


def report(result: dict) -> str:
    lines = [f"median step {result['plain_step_s']:.4f} s (under torch.profiler {result['torch_profiler_step_s']:.4f} s, "
             f"under cProfile {result['cprofile_step_s']:.4f} s)", "", "Top operators (self CPU):"]
    lines.append(table([[o["op"], o["calls_per_step"], o["self_ms_per_step"], f"{o['share']:.1%}"]
                        for o in result["operators"]], ["operator", "calls/step", "self ms/step", "share"]))
    lines += ["", "Top Python functions (tottime):"]
    lines.append(table([[f["function"], f["calls_per_step"], f["tottime_ms_per_step"], f["cumtime_ms_per_step"]]
                        for f in result["python_by_tottime"]], ["function", "calls/step", "tottime ms", "cumtime ms"]))
    lines += ["", "sdlora and loop functions (cumtime):"]
    lines.append(table([[f["function"], f["calls_per_step"], f["tottime_ms_per_step"], f["cumtime_ms_per_step"]]
                        for f in result["sdlora_and_loop_by_cumtime"]],
                       ["function", "calls/step", "tottime ms", "cumtime ms"]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile_step")
    parser.add_argument("--model", default="sd1")
    parser.add_argument("--network", default="lora", choices=("lora", "locon"))
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--images", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--top", type=int, default=20)
    parser.add_argument("--out", help="JSON path (default bench/results/profile_step.json)")
    args = parser.parse_args(argv)
    result = profile(args)
    out = Path(args.out) if args.out else BENCH_DIR / "results" / "profile_step.json"
    write_json(result, out)
    print(report(result))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

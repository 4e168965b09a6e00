"""Per-step benchmark: sdlora against the diffusers+peft recipe and LyCORIS LoCon, same everything.

    python -m bench.train_step                 # CPU: the scaled SD1 model and the tiny SDXL, ~6-8 min
    python -m bench.train_step --gpu           # GPU: full SD1.5 at 512 px, SDXL at 1024 px (bench.gpu)
    python -m bench.train_step --models tiny --steps 2 --warmup 0 --repeats 1   # smoke test

Same model, data (40 generated images), resolution, rank, alpha, batch, optimizer, seed, steps for every
contender; the LoRA pair adapts the same modules (to_q, to_k, to_v, to_out.0), the LoCon pair the same
LoCon set. Figures: median s/step after warm-up, images/s, peak RSS (VmHWM of the contender's own
process), setup time, exported file size against params x bytes; ratios sdlora / peer.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from bench.harness import (
    CONTENDERS,
    PAIRS,
    finish,
    fmt,
    load_proposals,
    machine_info,
    pair_worker,
    run_alternating,
    run_interleaved,
    summarize,
    table,
    worker,
)
from bench.models import BENCH_DIR, dataset_path, model_path, work_dir

# Contenders that are compared run next to each other (see harness.interleaved_order).
GROUPS = (("sdlora", "diffusers-peft", "sdlora-proposed", "diffusers-peft-cached"),
          ("sdlora-locon", "lycoris-locon", "sdlora-locon-proposed"))
DEFAULT_CONTENDERS = {
    "sd1": ["sdlora", "diffusers-peft", "sdlora-locon", "lycoris-locon", "diffusers-peft-cached"],
    "sdxl": ["sdlora", "diffusers-peft"],
    "tiny": ["sdlora", "diffusers-peft", "sdlora-locon", "lycoris-locon", "diffusers-peft-cached"],
}
DEFAULT_REPEATS = {"sd1": 2, "sdxl": 2, "tiny": 1, "sd15": 1}
DEFAULT_STEPS = {"sd1": 8, "sdxl": 12, "tiny": 4, "sd15": 4}
DEFAULT_PAIR_STEPS = {"sd1": 10, "sdxl": 16, "tiny": 4, "sd15": 4}


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m bench.train_step", description=__doc__.split("\n")[0])
    parser.add_argument("--gpu", action="store_true", help="the GPU benchmark instead (options: --gpu --help)")
    parser.add_argument("--models", default="sd1,sdxl", help="comma list of sd1, sdxl, tiny")
    parser.add_argument("--contenders", help=f"comma list of {', '.join(CONTENDERS)} (default per model)")
    parser.add_argument("--repeats", type=int, help="interleaved repeats of the separate processes (default 2)")
    parser.add_argument("--pair-repeats", type=int, default=2,
                        help="runs of each pair alternating steps in one process (the step-time ratios); 0: none")
    parser.add_argument("--pair-steps", type=int, help="measured steps per contender in a pair run")
    parser.add_argument("--steps", type=int, help="measured steps per run (after warm-up)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--conv-rank", type=int, default=8)
    parser.add_argument("--images", type=int, default=40)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per process (default 1: on a shared 2-core machine 2 threads "
                             "oversubscribe and time out of all proportion)")
    parser.add_argument("--in-process", action="store_true",
                        help="run every contender in this process (fast, for tests; RSS is then shared)")
    parser.add_argument("--no-static", action="store_true", help="skip FLOP counts and real-shape file sizes")
    parser.add_argument("--proposed", action="store_true",
                        help="also run sdlora with bench/proposals/*.patch applied (bench.proposed)")
    parser.add_argument("--out", help="JSON path (default bench/results/train_step.json)")
    return parser.parse_args(argv)


def base_spec(args, model: str) -> dict:
    return dict(model_dir=str(model_path(model)), data_dir=str(dataset_path(args.images)),
                resolution=args.resolution, batch_size=args.batch_size, rank=args.rank, alpha=None,
                conv_rank=args.conv_rank, conv_alpha=None, seed=args.seed, mixed_precision="no",
                threads=args.threads, warmup=args.warmup, steps=args.steps or DEFAULT_STEPS[model],
                workdir=str(work_dir()), device="cpu")


def run_model(args, model: str, log=print, tree=None) -> dict:
    names = args.contenders.split(",") if args.contenders else list(DEFAULT_CONTENDERS[model])
    if tree is not None and not args.contenders:
        names += [f"{n}-proposed" for n in ("sdlora", "sdlora-locon") if n in names]
    unknown = [n for n in names if n not in CONTENDERS]
    if unknown:
        raise SystemExit(f"unknown contender(s) {unknown}; choose from {', '.join(CONTENDERS)}")
    spec = base_spec(args, model)
    spec["tree"] = str(tree) if tree else None
    repeats = args.repeats or DEFAULT_REPEATS[model]
    log(f"{model}: {', '.join(names)}; {repeats} repeat(s) x ({spec['warmup']} warm-up + {spec['steps']} steps), "
        f"batch {spec['batch_size']} at {spec['resolution']} px, rank {spec['rank']}")
    if args.in_process:
        names = [n for n in names if not CONTENDERS[n].proposed]  # another tree needs its own process
        runs = {name: [] for name in names}
        for name in names:
            for _ in range(repeats):
                runs[name].append(worker(dict(spec, contender=name)))
    else:
        groups = [[n for n in group if n in names] for group in GROUPS]
        groups = [g for g in groups if g] + [[n] for n in names if not any(n in g for g in GROUPS)]
        runs = run_interleaved(groups, spec, repeats, log=log)
    pairs = [(p.ours, p.peer) for p in PAIRS if p.ours in names and p.peer in names
             and not (CONTENDERS[p.ours].proposed and CONTENDERS[p.peer].adapter == "sdlora")]
    paired = {}
    if args.pair_repeats and pairs:
        pair_spec = dict(spec, steps=args.pair_steps or DEFAULT_PAIR_STEPS[model])
        if args.in_process:
            pairs = [pair for pair in pairs if not any(CONTENDERS[n].proposed for n in pair)]
            paired = {pair: [pair_worker(dict(pair_spec, pair=list(pair))) for _ in range(args.pair_repeats)]
                      for pair in pairs}
        else:
            paired = run_alternating(pairs, pair_spec, args.pair_repeats, log=log)
    summary = summarize(runs, spec["batch_size"], paired=paired)
    summary["settings"] = {k: v for k, v in spec.items() if k not in ("workdir", "tree")}
    summary["settings"].update(repeats=repeats, contenders=names, rss_shared=bool(args.in_process),
                               pair_repeats=args.pair_repeats, pair_steps=args.pair_steps or DEFAULT_PAIR_STEPS[model])
    summary["alternating"] = {f"{a} / {b}": results for (a, b), results in paired.items()}
    summary["runs"] = {name: [{k: v for k, v in r.items()} for r in results] for name, results in runs.items()}
    return summary


def static_figures(args, log=print) -> dict | None:
    if args.no_static:
        return None
    from bench.harness import run_measured

    out = work_dir() / "static.json"
    done = run_measured([sys.executable, "-m", "bench.sizes", "--resolution", str(args.resolution), "--out", str(out)],
                        args.threads, timeout=300)
    if done["returncode"] != 0:
        log(f"static figures failed: {done['stderr'][-500:]}")
        return None
    import json

    return json.loads(out.read_text())


def report(result: dict) -> str:
    lines = []
    machine = result["machine"]
    lines.append(f"{machine['date']}  {machine['cpu']}, {machine['cores']} cores, {machine['threads_per_process']} "
                 f"thread(s) per process, torch {machine['versions']['torch']}, diffusers "
                 f"{machine['versions']['diffusers']}, peft {machine['versions']['peft']}, lycoris "
                 f"{machine['versions']['lycoris-lora']}")
    rows, ratio_rows, breakdown_rows = [], [], []
    for model, summary in result["models"].items():
        settings = summary["settings"]
        for name, c in summary["contenders"].items():
            rows.append([model, name, c["median_step_s"], c["median_cpu_step_s"], fmt(c["images_per_s"], 2),
                         fmt(c["peak_rss_mib"], 0), fmt(c.get("steady_rss_mib"), 0),
                         fmt(c["setup_s"], 1), c["adapted_modules"], c["trainable_params"], c["export"]["bytes"],
                         fmt(c["export"]["ratio_to_params_x_bytes"], 4)])
            b = c["breakdown_s"]
            if len(b) > 1:
                breakdown_rows.append([model, name, b.get("data"), b.get("vae_encode"), b.get("text_encoder"),
                                       b.get("unet_forward_backward"), b.get("optimizer")])
        for r in summary["ratios"]:
            met = ", ".join(f"{m} {'met' if t['met'] else 'NOT met'} (<= {t['max']})" for m, t in r["targets"].items())
            ratio_rows.append([model, f"{r['ours']} / {r['peer']}", r["step_time"], r["cpu_step_time"],
                               r.get("step_time_separate", r["step_time"]), r["images_per_s"], r["peak_rss"],
                               r.get("steady_rss"), "yes" if r["same_adapted_modules"] else "NO", met or "-"])
        lines.append(f"{model}: batch {settings['batch_size']}, {settings['resolution']} px, rank {settings['rank']}, "
                     f"{settings['repeats']} repeat(s) x {settings['steps']} steps after {settings['warmup']} warm-up")
    lines.append("")
    lines.append(table(rows, ["model", "contender", "s/step", "cpu s/step", "img/s", "peak RSS MiB", "steady RSS MiB", "setup s", "modules",
                              "params", "file bytes", "file / (params x bytes)"]))
    lines.append("")
    lines.append("Ratios sdlora / peer (step time: median of per-step ratios with the two alternating in one process, "
                 "when measured; else of the separate runs):")
    lines.append(table(ratio_rows, ["model", "ratio", "step time", "cpu step time", "step (separate runs)", "img/s",
                                    "peak RSS", "steady RSS",
                                    "same modules", "targets"]))
    if breakdown_rows:
        lines.append("")
        lines.append("Where a peer's step goes (s/step):")
        lines.append(table(breakdown_rows, ["model", "contender", "data", "vae encode", "text encoder",
                                            "unet fwd+bwd", "optimizer"]))
    static = result.get("static")
    if static:
        lines.append("")
        lines.append("Exported file on the real model shapes (sdlora's save path, full metadata):")
        lines.append(table([[e["family"], e["network"], e["modules"], e["params"], e["bytes"],
                             fmt(e["ratio_to_params_x_bytes"], 4)] for e in static["real_shape_export"]],
                           ["family", "network", "modules", "params", "file bytes", "file / (params x bytes)"]))
        f = static["flops_per_image"]
        lines.append("")
        lines.append("FLOPs per image of a no-cache step (GFLOP): " + "; ".join(
            f"{name} at {v['resolution']} px: UNet step {v['unet_step'] / 1e9:.2f}, VAE encode {v['vae_encode'] / 1e9:.2f} "
            f"({v['vae_share']:.0%}), text encoder {v['text_encoder'] / 1e9:.3f} ({v['text_encoder_share']:.1%})"
            for name, v in f.items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--gpu" in argv:  # GPU mode has its own options (bench.gpu)
        from bench import gpu

        return gpu.main([a for a in argv if a != "--gpu"])
    args = parse_args(argv)
    started = time.perf_counter()
    result = {"benchmark": "train_step", "machine": machine_info(args.threads), "models": {}}
    tree = None
    if args.proposed:
        tree, result["proposals"] = load_proposals()
    for model in args.models.split(","):
        result["models"][model] = run_model(args, model, tree=tree)
    result["static"] = static_figures(args)
    return finish(result, Path(args.out) if args.out else BENCH_DIR / "results" / "train_step.json", report, started)


if __name__ == "__main__":
    sys.exit(main())

"""End-to-end benchmark: wall time of a whole training (10 epochs on 40 images), every cost included.

    python -m bench.end_to_end                 # ~6-8 min on 2 shared CPU cores
    python -m bench.end_to_end --models tiny --epochs 1 --images 4 --repeats 1   # smoke test

Each contender is one process, timed from launch to exit: Python start-up, imports, model load, image
preprocessing, sdlora's latent/text caching, the epochs, and the export. sdlora runs through its real
CLI (`sdlora train --model FOLDER --data DIR --output RUN --set ...`); its LoRA adapts the recipe's
q,k,v,out through `network.target_modules` (on a tree without that key, its default, larger set: a
handicap, not a help). The peers run `python -m bench.peers` (the diffusers recipe with peft,
LyCORIS LoCon on that loop). No samples and no intermediate checkpoints for anyone; peak RSS is the
process's VmHWM, polled every 20 ms.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

from bench.harness import finish, fmt, interleaved_order, load_proposals, machine_info, run_measured, table
from bench.models import BENCH_DIR, REPO_ROOT, dataset_path, model_path, work_dir

CONTENDERS = {
    "sdlora": ("sdlora", "lora"),
    "diffusers-peft": ("peft", "lora"),
    "sdlora-locon": ("sdlora", "locon"),
    "lycoris-locon": ("lycoris", "locon"),
    # --proposed: the CLI from the tree with bench/proposals/*.patch applied.
    "sdlora-proposed": ("sdlora", "lora"),
    "sdlora-locon-proposed": ("sdlora", "locon"),
}
GROUPS = (("sdlora", "diffusers-peft", "sdlora-proposed"), ("sdlora-locon", "lycoris-locon", "sdlora-locon-proposed"))
PAIRS = (("sdlora", "diffusers-peft", {"wall_time": 0.6, "peak_rss": 1.0}),
         ("sdlora-locon", "lycoris-locon", {"peak_rss": 1.0}),
         ("sdlora-proposed", "diffusers-peft", {"wall_time": 0.6, "peak_rss": 1.0}),
         ("sdlora-locon-proposed", "lycoris-locon", {"peak_rss": 1.0}))


def sdlora_command() -> list[str]:
    script = Path(sys.executable).with_name("sdlora")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "app.cli"]


def tree_has_target_modules(args, name: str) -> bool:
    """Whether the sdlora that runs `name` has network.target_modules (to adapt the recipe's modules)."""
    root = (getattr(args, "tree", None) if name.endswith("-proposed") else None) or REPO_ROOT
    # trainer/config.py until the config became a package; an older tree (--tree) may still have it
    files = [root / "trainer" / "config" / "sections.py", root / "trainer" / "config.py"]
    return any("target_modules" in path.read_text() for path in files if path.is_file())


def command(name: str, args, model_dir: Path, data_dir: Path, run_dir: Path) -> list[str]:
    adapter, network = CONTENDERS[name]
    if adapter == "sdlora":
        sets = {"train.epochs": args.epochs, "dataset.resolution": args.resolution, "dataset.enable_buckets": "false",
                "dataset.min_bucket_side": args.resolution, "dataset.flip": "false",
                "train.batch_size": args.batch_size, "network.type": f'"{network}"', "network.rank": args.rank,
                "network.alpha": float(args.rank), "network.conv_rank": args.conv_rank,
                "network.conv_alpha": float(args.conv_rank), "network.init": '"gaussian"',
                "train.learning_rate": 1e-4, "train.weight_decay": 0.01, "train.max_grad_norm": 1.0,
                "train.lr_scheduler": '"constant"', "train.seed": args.seed, "sample.every_steps": 0,
                "sample.every_epochs": 0, "save.every_steps": 0, "save.every_epochs": 0}
        if network == "lora" and tree_has_target_modules(args, name):
            sets["network.target_modules"] = '["to_q", "to_k", "to_v", "to_out.0"]'
        cmd = sdlora_command() + ["train", "--model", str(model_dir), "--data", str(data_dir), "--output",
                                  str(run_dir), "--name", "bench", "--no-progress"]
        for key, value in sets.items():
            cmd += ["--set", f"{key}={value}"]
        return cmd
    return [sys.executable, "-m", "bench.peers", "--adapter", adapter, "--network", network, "--model",
            str(model_dir), "--data", str(data_dir), "--output", str(run_dir), "--epochs", str(args.epochs),
            "--resolution", str(args.resolution), "--batch-size", str(args.batch_size), "--rank", str(args.rank),
            "--conv-rank", str(args.conv_rank), "--seed", str(args.seed)]


def exported_file(name: str, run_dir: Path) -> Path:
    return run_dir / ("bench.safetensors" if CONTENDERS[name][0] == "sdlora" else "pytorch_lora_weights.safetensors")


def file_facts(path: Path) -> dict:
    from safetensors import safe_open

    params, modules, bytes_per_param = 0, 0, None
    with safe_open(str(path), framework="pt") as handle:
        for key in handle.keys():
            shape = handle.get_slice(key).get_shape()
            count = 1
            for side in shape:
                count *= side
            if key.endswith(".alpha"):
                continue
            params += count
            modules += key.endswith(("lora_down.weight", "lora_A.weight", "lora.down.weight"))
            bytes_per_param = {"F16": 2, "BF16": 2, "F32": 4}[handle.get_slice(key).get_dtype()]
    size = path.stat().st_size
    return {"bytes": size, "params": params, "modules": modules, "bytes_per_param": bytes_per_param,
            "ratio_to_params_x_bytes": size / (params * bytes_per_param)}


def run_one(name: str, args, model_dir: Path, data_dir: Path, repeat: int, tree: Path | None = None) -> dict:
    run_dir = work_dir() / "e2e" / f"{name}-{repeat}-{os.getpid()}"
    shutil.rmtree(run_dir, ignore_errors=True)
    proposed = name.endswith("-proposed")
    done = run_measured(command(name, args, model_dir, data_dir, run_dir), args.threads, timeout=args.timeout,
                        tree=str(tree) if proposed else None)
    if done["returncode"] != 0:
        raise RuntimeError(f"{name} failed ({done['returncode']}):\n{done['stderr'][-3000:]}")
    result = {"wall_s": done["wall_s"], "cpu_s": done["cpu_s"], "peak_rss_mib": done["vmhwm_mib"],
              "ru_maxrss_mib": done["ru_maxrss_mib"],
              "file": file_facts(exported_file(name, run_dir))}
    events = run_dir / "events.jsonl"
    if events.is_file():
        log = [json.loads(line) for line in events.read_text().splitlines()]
        result["steps"] = max((e["step"] for e in log if e["event"] == "step"), default=0)
    if not args.keep:
        shutil.rmtree(run_dir, ignore_errors=True)
    return result


def summarize(runs: dict[str, list[dict]]) -> dict:
    contenders = {}
    for name, results in runs.items():
        contenders[name] = {
            "repeats": len(results),
            "wall_s": statistics.median(r["wall_s"] for r in results),
            "per_repeat_wall_s": [r["wall_s"] for r in results],
            "cpu_s": statistics.median(r["cpu_s"] for r in results),
            "peak_rss_mib": statistics.median(r["peak_rss_mib"] for r in results if r["peak_rss_mib"]),
            "file": results[0]["file"],
        }
    ratios = []
    for ours, peer, targets in PAIRS:
        if ours not in runs or peer not in runs:
            continue
        per_repeat = [a["wall_s"] / b["wall_s"] for a, b in zip(runs[ours], runs[peer])]
        row = {"ours": ours, "peer": peer, "wall_time": statistics.median(per_repeat),
               "wall_time_per_repeat": per_repeat,
               "wall_time_of_medians": contenders[ours]["wall_s"] / contenders[peer]["wall_s"],
               "cpu_time": statistics.median(a["cpu_s"] / b["cpu_s"] for a, b in zip(runs[ours], runs[peer])),
               "peak_rss": contenders[ours]["peak_rss_mib"] / contenders[peer]["peak_rss_mib"],
               "modules": [contenders[ours]["file"]["modules"], contenders[peer]["file"]["modules"]]}
        row["targets"] = {m: {"max": limit, "met": row[m] <= limit} for m, limit in targets.items()}
        ratios.append(row)
    return {"contenders": contenders, "ratios": ratios}


def report(result: dict) -> str:
    machine, s = result["machine"], result["settings"]
    lines = [f"{machine['date']}  {machine['cpu']}, {machine['cores']} cores, {machine['threads_per_process']} "
             f"thread(s) per process, torch {machine['versions']['torch']}",
             f"{s['model']}: {s['epochs']} epochs on {s['images']} images, batch {s['batch_size']}, {s['resolution']} px, "
             f"rank {s['rank']}, {s['repeats']} repeat(s)", ""]
    rows = [[name, c["wall_s"], c["cpu_s"], fmt(c["peak_rss_mib"], 0), c["file"]["modules"], c["file"]["params"], c["file"]["bytes"],
             fmt(c["file"]["ratio_to_params_x_bytes"], 4)] for name, c in result["contenders"].items()]
    lines.append(table(rows, ["contender", "wall s", "cpu s", "peak RSS MiB", "modules", "params", "file bytes",
                              "file / (params x bytes)"]))
    lines.append("")
    ratio_rows = []
    for r in result["ratios"]:
        met = ", ".join(f"{m} {'met' if t['met'] else 'NOT met'} (<= {t['max']})" for m, t in r["targets"].items())
        ratio_rows.append([f"{r['ours']} / {r['peer']}", r["wall_time"], r["cpu_time"], r["wall_time_of_medians"],
                           r["peak_rss"],
                           f"{r['modules'][0]} vs {r['modules'][1]}", met])
    lines.append(table(ratio_rows, ["ratio", "wall time", "cpu time", "wall (of medians)", "peak RSS", "modules",
                                    "targets"]))
    return "\n".join(lines)


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m bench.end_to_end", description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="sd1", help="sd1 (the scaled SD1 bench model), sdxl or tiny")
    parser.add_argument("--contenders", default="sdlora,diffusers-peft,sdlora-locon,lycoris-locon")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--images", type=int, default=40)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--conv-rank", type=int, default=8)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--keep", action="store_true", help="keep the run folders under bench/.work/e2e")
    parser.add_argument("--proposed", action="store_true",
                        help="also run the CLI with bench/proposals/*.patch applied (bench.proposed)")
    parser.add_argument("--out", help="JSON path (default bench/results/end_to_end.json)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    machine = machine_info(args.threads)
    names = args.contenders.split(",")
    unknown = [n for n in names if n not in CONTENDERS]
    if unknown:
        raise SystemExit(f"unknown contender(s) {unknown}; choose from {', '.join(CONTENDERS)}")
    model_dir, data_dir = model_path(args.models), dataset_path(args.images)
    tree, proposals = None, None
    if args.proposed:
        tree, proposals = load_proposals()
        if tree is not None:
            names += [f"{n}-proposed" for n in ("sdlora", "sdlora-locon") if n in names]
            args.tree = tree
    names = [n for n in names if tree is not None or not n.endswith("-proposed")]
    groups = [[n for n in group if n in names] for group in GROUPS]
    groups = [g for g in groups if g] + [[n] for n in names if not any(n in g for g in GROUPS)]
    runs: dict[str, list[dict]] = {name: [] for name in names}
    print(f"{args.models}: {', '.join(names)}; {args.repeats} repeat(s) of {args.epochs} epochs on {args.images} images")
    for repeat in range(args.repeats):
        for name in interleaved_order(groups, repeat):
            result = run_one(name, args, model_dir, data_dir, repeat, tree)
            runs[name].append(result)
            print(f"  [{repeat + 1}/{args.repeats}] {name:16s} {result['wall_s']:.1f} s (cpu {result['cpu_s']:.1f} s)  "
                  f"rss {fmt(result['peak_rss_mib'], 0)} MiB", flush=True)
    result = {"benchmark": "end_to_end", "machine": machine,
              "settings": {"model": args.models, "epochs": args.epochs, "images": args.images,
                           "resolution": args.resolution, "batch_size": args.batch_size, "rank": args.rank,
                           "conv_rank": args.conv_rank, "seed": args.seed, "repeats": args.repeats,
                           "threads": args.threads, "sdlora_command": sdlora_command()},
              "proposals": proposals, **summarize(runs), "runs": runs}
    return finish(result, Path(args.out) if args.out else BENCH_DIR / "results" / "end_to_end.json", report, started)


if __name__ == "__main__":
    sys.exit(main())

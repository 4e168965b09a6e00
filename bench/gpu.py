"""GPU mode: the same harness on the full-size models, with peak CUDA memory and throughput against the
GPU's FLOP limit.

    python -m bench.train_step --gpu                       # every config below, ~10 min on an H100
    python -m bench.train_step --gpu --configs sd15-512-bs8-bf16 --out bench/results/gpu.json   # one

Configs: SD1.5 (trainer/assets/configs/sd15: UNet 860M, VAE, 12-layer CLIP) at 512 px, batch 1 and 8,
fp16 and bf16, and batch 1 bf16 with gradient checkpointing (`-gc`, as memory targets are quoted); SDXL base (configs/sdxl-base) at 1024 px, batch 1, bf16. Weights are random (built once
from the shipped configs into bench/.work/models; nothing is downloaded): speed and memory do not
depend on their values. Contenders: sdlora's Trainer and the diffusers+peft recipe, LoRA r=16 on
to_q/to_k/to_v/to_out.0, each config and contender in its own process, repeats interleaved. Add
`--contenders sdlora,diffusers-peft,sdlora-compiled` (and `--warmup 10`) to measure `train.compile`,
whose compiling happens in the warm-up steps.

Throughput share of the FLOP limit ("MFU"): images/s x the FLOPs of one image's UNet LoRA step (forward
and backward to the input, counted with torch's FlopCounterMode on the meta device; 1.73 TFLOP for
SD1.5 at 512 px) / the GPU's dense fp16/bf16 tensor peak. The recipe's VAE encode and text encoder
work is not counted as useful (sdlora caches it), so the figure is comparable across contenders.

`--device cpu --configs tiny-64-bs1-no` runs the same code path on a CPU (a check that GPU mode works;
tests/test_bench.py does this).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from bench.harness import finish, fmt, machine_info, run_interleaved, summarize, table, worker, write_json
from bench.models import (
    BENCH_DIR,
    dataset_path,
    model_path,
    sd15_config,
    sdxl_config,
    unet_step_flops,
    work_dir,
)

GPU_MODELS = {"sd15": "sd15", "sdxl": "sdxl-base", "sd1": "sd1", "tiny": "tiny"}  # config token -> bench model
DEFAULT_CONFIGS = ("sd15-512-bs1-fp16", "sd15-512-bs1-bf16", "sd15-512-bs1-bf16-gc", "sd15-512-bs8-fp16",
                   "sd15-512-bs8-bf16", "sdxl-1024-bs1-bf16")
# Dense fp16/bf16 tensor-core peaks (FLOP/s), by a substring of torch.cuda.get_device_name().
PEAK_FLOPS = (("H100 PCIe", 756e12), ("H100", 989.4e12), ("H200", 989.4e12), ("GH200", 989.4e12),
              ("A100", 312e12), ("L40S", 362e12), ("L4", 121e12), ("A10", 125e12), ("4090", 165.2e12),
              ("3090", 71e12), ("V100", 125e12), ("T4", 65e12))


def parse_config(name: str) -> dict:
    """"sd15-512-bs8-bf16" -> model sd15, resolution 512, batch 8, mixed precision bf16; a "-gc" suffix turns
    on gradient checkpointing (for sdlora and the recipe alike), the setting memory targets are quoted with."""
    try:
        model, resolution, batch, precision, *extra = name.split("-")
        config = {"name": name, "model": model, "resolution": int(resolution), "batch_size": int(batch.removeprefix("bs")),
                  "mixed_precision": precision, "gradient_checkpointing": extra == ["gc"]}
        if extra not in ([], ["gc"]):
            raise ValueError
    except ValueError:
        raise SystemExit(f"config {name!r} is not MODEL-RES-bsN-PRECISION[-gc] like sd15-512-bs8-bf16") from None
    if model not in GPU_MODELS or precision not in ("fp16", "bf16", "no"):
        raise SystemExit(f"config {name!r}: model is sd15, sdxl (or sd1, tiny), precision fp16, bf16 or no")
    return config


def step_flops_per_image(model: str, resolution: int) -> float:
    if model == "sd15":
        return unet_step_flops(sd15_config("unet"), resolution)["step"]
    if model == "sdxl":
        return unet_step_flops(sdxl_config("unet"), resolution, added_cond=True)["step"]
    import json as _json

    config = _json.loads((model_path(GPU_MODELS[model]) / "unet" / "config.json").read_text())
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    return unet_step_flops(config, resolution, added_cond=config.get("addition_embed_type") == "text_time")["step"]


def peak_flops(device_name: str | None, override_tflops: float | None) -> float | None:
    if override_tflops:
        return override_tflops * 1e12
    for key, value in PEAK_FLOPS:
        if device_name and key in device_name:
            return value
    return None


def run_config(args, config: dict, log=print) -> dict:
    names = args.contenders.split(",")
    spec = dict(model_dir=str(model_path(GPU_MODELS[config["model"]])), data_dir=str(dataset_path(args.images)),
                resolution=config["resolution"], batch_size=config["batch_size"], rank=args.rank, alpha=None,
                gradient_checkpointing=config["gradient_checkpointing"],
                conv_rank=8, conv_alpha=None, seed=42, mixed_precision=config["mixed_precision"], threads=None,
                warmup=args.warmup, steps=args.steps, workdir=str(work_dir()), device=args.device, tree=None)
    log(f"{config['name']}: {', '.join(names)}; {args.repeats} repeat(s) x ({args.warmup} warm-up + {args.steps} steps)")
    if args.in_process:
        runs = {name: [worker(dict(spec, contender=name)) for _ in range(args.repeats)] for name in names}
    else:
        runs = run_interleaved([names], spec, args.repeats, log=log, timeout=args.timeout)
    summary = summarize(runs, config["batch_size"])
    flops = step_flops_per_image(config["model"], config["resolution"])
    first = next(iter(runs.values()))[0]
    peak = peak_flops(first.get("cuda_device"), args.peak_tflops)
    for c in summary["contenders"].values():
        c["useful_tflop_per_image"] = flops / 1e12
        c["achieved_tflops"] = c["images_per_s"] * flops / 1e12
        c["mfu"] = c["images_per_s"] * flops / peak if peak else None
    summary["settings"] = {**config, "device": first.get("cuda_device", args.device), "peak_tflops": peak / 1e12 if peak else None,
                           "repeats": args.repeats, "warmup": args.warmup, "steps": args.steps, "rank": args.rank}
    summary["runs"] = runs
    return summary


def report(result: dict) -> str:
    rows, ratio_rows = [], []
    for name, summary in result["configs"].items():
        for contender, c in summary["contenders"].items():
            rows.append([name, contender, c["median_step_s"], fmt(c["images_per_s"], 2), fmt(c.get("cuda_peak_mib"), 0),
                         fmt(c["peak_rss_mib"], 0), fmt(c["achieved_tflops"], 1),
                         f"{c['mfu']:.1%}" if c.get("mfu") is not None else "-"])
        for r in summary["ratios"]:
            ratio_rows.append([name, f"{r['ours']} / {r['peer']}", r["step_time"], r["images_per_s"],
                               r.get("cuda_peak_memory"), r["peak_rss"]])
    device = next(iter(result["configs"].values()))["settings"]["device"] if result["configs"] else "-"
    lines = [f"{result['machine']['date']}  {device}, torch {result['machine']['versions']['torch']}", ""]
    lines.append(table(rows, ["config", "contender", "s/step", "img/s", "CUDA peak MiB", "peak RSS MiB",
                              "TFLOP/s (UNet)", "MFU"]))
    lines.append("")
    lines.append(table(ratio_rows, ["config", "ratio", "step time", "img/s", "CUDA peak", "peak RSS"]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.train_step --gpu", description=__doc__.split("\n")[0])
    parser.add_argument("--configs", default=",".join(DEFAULT_CONFIGS), help="comma list of MODEL-RES-bsN-PRECISION")
    parser.add_argument("--contenders", default="sdlora,diffusers-peft")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--images", type=int, default=40)
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--peak-tflops", type=float, help="the GPU's dense fp16/bf16 peak, if not in the table")
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--in-process", action="store_true")
    parser.add_argument("--out", help="JSON path (default bench/results/gpu.json); configs already in it are kept")
    args = parser.parse_args(argv)
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("no CUDA device: GPU mode needs a GPU (or --device cpu --configs tiny-64-bs1-no to check the "
                  "code path)", file=sys.stderr)
            return 2
    started = time.perf_counter()
    out = Path(args.out) if args.out else BENCH_DIR / "results" / "gpu.json"
    result = json.loads(out.read_text()) if out.is_file() else {"benchmark": "gpu", "configs": {}}
    result["machine"] = machine_info(None)
    for name in args.configs.split(","):
        result["configs"][name] = run_config(args, parse_config(name))
        write_json(result, out)  # after every config, so a cut-off run keeps what it measured
    return finish(result, out, report, started)


if __name__ == "__main__":
    sys.exit(main())

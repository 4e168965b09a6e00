"""The traced memory prediction (trainer/memory) beside a measurement of the same step without the tracer.

    python -m bench.memory                           # the CPU rows (ROWS; minutes each for SDXL)
    python -m bench.memory --rows sd15-256-fp32      # one row
    python -m bench.memory --gpu                     # on a CUDA machine: GPU_ROWS against torch.cuda's peaks

Each row runs in a fresh subprocess: the UNet of the shipped config with random weights, placed as the run
places it (the weight dtype, fp8 storage with model.fp8_base), the network attached, cached-text-state
conditioning in the weight dtype, the trainer's autocast for a half-precision run, AdamW. The optimizer's
states are made first (one step on zero gradients), so the measured step is a steady one, as from step 2 on.

Measured on a CPU: the peak of the bytes PyTorch's CPU allocator holds for tensors during the step
(torch.profiler's memory events, "Total Allocated": every allocation and free the step makes, nothing of
the tracer), plus the optimizer's states made before it; beside it, the process's peak resident bytes above
the loaded model (VmHWM, reset through /proc/self/clear_refs), which also holds what glibc keeps of freed
blocks. On a GPU: torch.cuda.max_memory_allocated and max_memory_reserved above the loaded model.

Predicted: the traced step peak with the optimizer's states (trainer/memory), less what was loaded before
the step (frozen UNet weights and the adapters), without the fixed CUDA costs; on a GPU also the reserved
figure (the traced bytes with the allocator's slack and the library workspaces, without the context, which
the allocator does not see).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Row:
    family: str  # "sd1" or "sdxl": the shipped config whose UNet is built
    side: int  # the square bucket's side in pixels
    checkpointing: bool = False
    precision: str = "no"  # train.mixed_precision: "no" (fp32) or "bf16"
    fp8: bool = False  # model.fp8_base

    def overrides(self) -> list[str]:
        return [f"dataset.resolution={self.side}", f"train.gradient_checkpointing={str(self.checkpointing).lower()}",
                f"train.mixed_precision={self.precision}", f"model.fp8_base={str(self.fp8).lower()}"]


# The CPU rows. bf16 runs about 8x slower than fp32 on this CPU (no native bf16 matmul), so bf16 and fp8 rows
# are SD1.5 at 256 px only; SDXL at 256 px only (fp32 weights 10 GB, minutes a step on 2 shared cores).
ROWS = {
    "sd15-256-fp32": Row("sd1", 256),
    "sd15-256-fp32-gc": Row("sd1", 256, True),
    "sd15-384-fp32": Row("sd1", 384),
    "sd15-384-fp32-gc": Row("sd1", 384, True),
    "sd15-256-fp32-fp8": Row("sd1", 256, False, "no", True),
    "sd15-256-bf16": Row("sd1", 256, False, "bf16"),
    "sd15-256-bf16-gc": Row("sd1", 256, True, "bf16"),
    "sd15-256-bf16-fp8": Row("sd1", 256, False, "bf16", True),
    "sdxl-256-fp32": Row("sdxl", 256),
    "sdxl-256-fp32-gc": Row("sdxl", 256, True),
}
# The rows `--gpu` runs: the sizes people train at, bf16 as they do.
GPU_ROWS = {
    "sd15-512-bf16": Row("sd1", 512, False, "bf16"),
    "sd15-512-bf16-gc": Row("sd1", 512, True, "bf16"),
    "sd15-512-bf16-fp8": Row("sd1", 512, False, "bf16", True),
    "sdxl-1024-bf16-gc": Row("sdxl", 1024, True, "bf16"),
    "sdxl-1024-bf16": Row("sdxl", 1024, False, "bf16"),
    "sdxl-1024-bf16-gc-fp8": Row("sdxl", 1024, True, "bf16", True),
}
# glibc raises its mmap threshold as large blocks are freed (up to 32 MiB), after which freed activations stay
# in its heap and in the resident size (919 MiB against 563 MiB for sd15-256-fp32); held at 128 KiB, large
# blocks go back when freed, so the RSS column is close to the tensors. The allocator column needs neither.
MEASURING_ENV = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
KEYS = {"sd1": "cond_stage_model.transformer.text_model.final_layer_norm.weight",
        "sdxl": "conditioner.embedders.1.model.ln_final.weight"}


def row_config(row: Row, folder: Path):
    """The run's config for a row: a single file whose keys say the family (the pre-flight reads only the
    header; its configs are the shipped ones), one image per step."""
    import torch
    from safetensors.torch import save_file

    from trainer.config import TrainConfig
    from trainer.config.overrides import apply_overrides

    file = folder / f"{row.family}.safetensors"
    if not file.is_file():
        save_file({KEYS[row.family]: torch.zeros(1), "model.diffusion_model.out.2.bias": torch.zeros(1)}, str(file))
    return apply_overrides(TrainConfig(), [f"model.path={file}", f"dataset.path={folder}", *row.overrides()])


def predicted(cfg, gpu: bool = False) -> dict[str, int]:
    """The traced step's peak above the loaded model, and its total on a GPU (allocated and reserved)."""
    from trainer.memory import (
        ALLOCATOR_SLACK,
        CUBLAS_WORKSPACE_BYTES,
        CUDNN_WORKSPACE_BYTES,
        _traced,
        state_bytes,
    )

    step, _, _ = _traced(cfg, "cuda" if gpu else "cpu")  # whose autocast the measured step runs under
    total = step.peak + state_bytes(cfg, step.trainable_parameters)
    adapters = step.trainable_parameters * 4  # fp32 adapters
    return {"above_loaded": total - step.frozen_weights - adapters, "allocated": total,
            "reserved": int(total * (1 + ALLOCATOR_SLACK)) + CUBLAS_WORKSPACE_BYTES + CUDNN_WORKSPACE_BYTES}


def build_step(cfg, device: str):
    """(one training step as a function, the optimizer's state bytes) for the row's UNet on `device`, with
    random weights and the optimizer's states already made."""
    import torch

    from networks.network import LoraNetwork
    from trainer.memory import _model_configs
    from trainer.memory.meta_model import build_meta_model

    model = build_meta_model(*_model_configs(cfg), cfg)
    unet = model.unet.to_empty(device=device)
    with torch.no_grad():
        for tensor in [*unet.parameters(), *unet.buffers()]:  # every page written (fp8 has no normal_)
            tensor.copy_(torch.empty(tensor.shape, device=device).normal_(0, 0.02))
    network = LoraNetwork.create(model.family.name, unet, [], cfg.network.spec(), device=device).attach()
    trainable = list(network.parameters())
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    for parameter in trainable:
        parameter.grad = torch.zeros_like(parameter)
    optimizer.step()  # makes AdamW's states, as the first step does
    optimizer.zero_grad(set_to_none=True)
    states = sum(t.nbytes for state in optimizer.state.values() for t in state.values()
                 if isinstance(t, torch.Tensor) and t.device.type == device)
    dtype, side = model.weight_dtype, cfg.dataset.resolution
    factor = 2 ** (len(model.vae.config.block_out_channels) - 1)
    latents = torch.randn(1, unet.config.in_channels, side // factor, side // factor, device=device).to(dtype)
    hidden = torch.randn(1, 77, unet.config.cross_attention_dim, device=device).to(dtype)
    added = None
    if model.family.name == "sdxl":
        added = {"text_embeds": torch.randn(1, 1280, device=device).to(dtype),
                 "time_ids": torch.tensor([[side, side, 0, 0, side, side]], device=device).to(dtype)}
    timestep = torch.tensor([500], device=device)
    half = dtype != torch.float32  # the trainer's accelerator.autocast() on a half-precision run


    def step() -> None:
        with torch.autocast(device, dtype=dtype) if half else nullcontext():
            prediction = unet(latents, timestep, hidden, added_cond_kwargs=added).sample
        torch.nn.functional.mse_loss(prediction.float(), latents.float()).backward()
        del prediction
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, states


@contextmanager
def allocator_peak():
    """Yields a dict whose "peak" is, on exit, the most bytes the CPU allocator held for tensors allocated
    inside the block (torch.profiler's memory events; frees of older blocks are not counted against it)."""
    from torch.profiler import ProfilerActivity, profile

    result = {}
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        yield result
    with tempfile.TemporaryDirectory() as folder:
        trace = Path(folder) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())["traceEvents"]
    totals = [e["args"]["Total Allocated"] for e in events
              if e.get("name") == "[memory]" and e["args"].get("Device Type") == 0]
    result["peak"] = max([0, *totals])


def measure_cpu(cfg) -> dict[str, int]:
    """The step's allocator peak above the loaded model (with the states made before it) and the RSS one."""
    step, states = build_step(cfg, "cpu")
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident size
    before = _status("VmRSS")
    with allocator_peak() as measured:
        step()
    return {"measured_bytes": measured["peak"] + states, "rss_bytes": _status("VmHWM") - before + states}


def measure_gpu(cfg) -> dict[str, int]:
    """torch.cuda's peaks over a steady step: allocated and reserved, in total and above the loaded model."""
    import torch

    step, states = build_step(cfg, "cuda")
    loaded = torch.cuda.memory_allocated() - states
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    allocated = torch.cuda.max_memory_allocated()
    return {"measured_bytes": allocated - loaded, "max_allocated": allocated,
            "max_reserved": torch.cuda.max_memory_reserved()}


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def run_row(name: str, folder: Path, gpu: bool = False) -> dict:
    row = (GPU_ROWS if gpu else ROWS)[name]
    cfg = row_config(row, folder)
    prediction = predicted(cfg, gpu)
    measured = (measure_gpu if gpu else measure_cpu)(cfg)
    result = {"row": name, "predicted_bytes": prediction["above_loaded"], **measured,
              "ratio": prediction["above_loaded"] / measured["measured_bytes"]}
    if gpu:
        result.update(predicted_allocated=prediction["allocated"], predicted_reserved=prediction["reserved"],
                      allocated_ratio=prediction["allocated"] / measured["max_allocated"],
                      reserved_ratio=prediction["reserved"] / measured["max_reserved"])
    return result


def table_line(row: dict) -> str:
    mib = 2 ** 20
    line = (f"{row['row']:<22} {row['predicted_bytes'] / mib:>10.0f} {row['measured_bytes'] / mib:>10.0f} "
            f"{row['ratio']:>6.2f}")
    if "rss_bytes" in row:
        return line + f" {row['rss_bytes'] / mib:>8.0f}"
    return line + (f" {row['predicted_allocated'] / mib:>10.0f} {row['max_allocated'] / mib:>10.0f} "
                   f"{row['allocated_ratio']:>6.2f} {row['predicted_reserved'] / mib:>10.0f} "
                   f"{row['max_reserved'] / mib:>10.0f} {row['reserved_ratio']:>6.2f}")


def header(gpu: bool) -> str:
    head = f"{'row':<22} {'pred MiB':>10} {'meas MiB':>10} {'ratio':>6}"
    return head + (f" {'pred tot':>10} {'max alloc':>10} {'ratio':>6} {'pred rsv':>10} {'max rsv':>10} {'ratio':>6}"
                   if gpu else f" {'RSS MiB':>8}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", action="store_true", help="measure on CUDA (GPU_ROWS) against torch.cuda's peaks")
    parser.add_argument("--rows", nargs="*", help=f"CPU: {', '.join(ROWS)}; --gpu: {', '.join(GPU_ROWS)}")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # a row in this process (the subprocess's side)
    parser.add_argument("--folder", default="/tmp/sdlora-bench-memory")
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--onednn", action="store_true",
                        help="CPU: convolutions through oneDNN, whose backward keeps a reordered copy of the weight")
    args = parser.parse_args(argv)
    table = GPU_ROWS if args.gpu else ROWS
    rows = args.rows or list(table)
    unknown = [name for name in rows if name not in table]
    if unknown:
        parser.error(f"unknown rows {unknown}; choose from {', '.join(table)}")
    folder = Path(args.folder)
    folder.mkdir(parents=True, exist_ok=True)
    flags = ["--gpu"] * args.gpu + ["--onednn"] * args.onednn
    if args.one:
        if not args.onednn:
            import torch

            torch.backends.mkldnn.enabled = False
        print(json.dumps(run_row(args.one, folder, args.gpu)))
        return 0
    print(header(args.gpu), flush=True)
    results = []
    for name in rows:
        out = subprocess.run([sys.executable, "-m", "bench.memory", "--one", name, "--folder", str(folder), *flags],
                             capture_output=True, text=True, check=True, env=MEASURING_ENV).stdout
        results.append(json.loads(out.strip().splitlines()[-1]))
        print(table_line(results[-1]), flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

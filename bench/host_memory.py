"""Host memory of loading a single-file model the way a training run loads it (issue 23: the goal is at most
the file's size + 2 GB on a half-precision run).

Builds SD1.5- and SDXL-shaped original-layout .safetensors files (the shipped configs, random fp16 weights,
as A1111/ComfyUI checkpoints are shipped) once, streamed tensor by tensor so building needs no more RAM
than one tensor, then loads each in a fresh subprocess with the trainer's loader and placement
(trainer/run/build.py's dtypes: the UNet and text encoders in the run's dtype, the VAE in fp32, fp8 when
model.fp8_base is set) and reads the process's peak resident memory (VmHWM of /proc/self/status, which
includes Python, torch and diffusers themselves).

    python -m bench.host_memory [--models sd15 sdxl] [--precisions bf16 fp8 fp32] [--dir /tmp/x] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

GB = 1e9
PRECISIONS = ("bf16", "fp8", "fp32")
# In the subprocess: load as trainer/run/build.py's _load_model does (without a GPU: the parts stay on the CPU).
_LOAD = """
import json, sys, torch
from trainer.model.fp8 import store_fp8
from trainer.model.model_loading import load_model
path, precision = sys.argv[1], sys.argv[2]
dtype = torch.float32 if precision == "fp32" else torch.bfloat16
def place(name, module):
    if precision == "fp8" and name != "vae":
        store_fp8(module, dtype)
model = load_model(path, dtype=dtype, vae_dtype=torch.float32, place=place)
unet_dtypes = sorted({str(p.dtype) for p in model.unet.parameters()})
status = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
print(json.dumps({"peak_rss": int(status["VmHWM"].split()[0]) * 1024, "unet_dtypes": unet_dtypes}))
"""


def _meta_parts(model: str) -> dict:
    """The model's parts on the meta device (shapes only), from the shipped configs."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from bench.models import sd15_config, sdxl_config

    config = sd15_config if model == "sd15" else sdxl_config
    with torch.device("meta"):
        parts = dict(unet=UNet2DConditionModel.from_config(config("unet")),
                     vae=AutoencoderKL.from_config(config("vae")),
                     text_encoder=CLIPTextModel(CLIPTextConfig.from_dict(config("text_encoder"))))
        if model == "sdxl":
            parts["text_encoder_2"] = CLIPTextModelWithProjection(CLIPTextConfig.from_dict(config("text_encoder_2")))
    return parts


def build_single_file(model: str, path: Path) -> Path:
    """An original-layout fp16 .safetensors of `model` with random weights, written tensor by tensor."""
    import torch

    from trainer.model.single_file import to_original_state_dict

    if path.is_file():
        return path
    shapes = to_original_state_dict(_meta_parts(model))  # meta tensors: names and shapes, no memory
    header, offset = {}, 0
    for name, tensor in shapes.items():
        dtype = "F16" if tensor.is_floating_point() else "I64"
        size = tensor.numel() * (2 if dtype == "F16" else 8)
        header[name] = {"dtype": dtype, "shape": list(tensor.shape), "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = {"format": "pt"}
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)  # safetensors aligns the data to 8 bytes
    # Drawing 3.5 billion normal values takes minutes on 2 cores; each tensor takes a run (a slice, or repeats) of one pool of
    # 16M random values instead (the loader's memory does not depend on the values).
    pool = (torch.randn(1 << 24, generator=torch.Generator().manual_seed(0)) * 0.02).half()
    partial = path.with_suffix(".partial")
    with partial.open("wb") as handle:
        handle.write(len(text).to_bytes(8, "little"))
        handle.write(text)
        for index, tensor in enumerate(shapes.values()):
            if tensor.is_floating_point():
                count = tensor.numel()
                start = index * 7919 % max(1, pool.numel() - count)
                values = pool[start:start + count] if count <= pool.numel() else \
                    pool.repeat(count // pool.numel() + 1)[:count]
            else:
                values = torch.zeros(tensor.shape, dtype=torch.int64)
            handle.write(values.contiguous().view(torch.uint8).numpy().tobytes())
    partial.rename(path)
    return path


def measure(path: Path, precision: str) -> dict:
    """Peak RSS of a fresh process loading `path` for a run in `precision`."""
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-c", _LOAD, str(path), precision], cwd=root, capture_output=True,
                            text=True, check=True)
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    size = path.stat().st_size
    return {"file_bytes": size, "precision": precision, "peak_rss_bytes": loaded["peak_rss"],
            "above_file_bytes": loaded["peak_rss"] - size, "unet_dtypes": loaded["unet_dtypes"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["sd15", "sdxl"], choices=["sd15", "sdxl"])
    parser.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=PRECISIONS)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/sdlora-host-memory"))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    args.dir.mkdir(parents=True, exist_ok=True)
    rows = []
    print(f"{'model':6} {'run':5} {'file GB':>8} {'peak RSS GB':>12} {'above file GB':>14}  UNet dtypes")
    for model in args.models:
        path = build_single_file(model, args.dir / f"{model}-random-fp16.safetensors")
        for precision in args.precisions:
            row = {"model": model, **measure(path, precision)}
            rows.append(row)
            print(f"{model:6} {precision:5} {row['file_bytes'] / GB:8.2f} {row['peak_rss_bytes'] / GB:12.2f} "
                  f"{row['above_file_bytes'] / GB:14.2f}  {', '.join(row['unet_dtypes'])}", flush=True)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

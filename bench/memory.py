"""The traced memory prediction (trainer/memory) beside a measurement of the same step without the tracer.

    python -m bench.memory                      # every CPU row (minutes each for SDXL; see ROWS)
    python -m bench.memory --rows sd15-256-fp32  # one row

Each row runs in a fresh subprocess: the UNet of the shipped config (random weights: every page written, so
the step touches no new weight pages), the network attached, cached-text-state conditioning; the process's
peak resident size (VmHWM) is reset through /proc/self/clear_refs once the model is loaded, then two real
training steps run (the second is the steady state, with AdamW's states) and the peak above the loaded
model is read. The prediction for the same config (fp32 on a CPU; frozen UNet only, as resident_frozen
says for cached text states without previews) is the traced step peak less what was already loaded (the
frozen weights and the adapters), without the fixed CUDA costs. CPU only: a GPU run compares against
torch.cuda.max_memory_allocated instead (not written yet).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

# name: (model file keys say..., resolution, gradient checkpointing). fp32 only: the CPU trains in fp32
# (train.mixed_precision applies on a GPU); bf16 rows would need a GPU. SDXL rows take minutes per step here.
ROWS = {
    "sd15-256-fp32": ("sd1", 256, False),
    "sd15-256-fp32-gc": ("sd1", 256, True),
    "sd15-384-fp32": ("sd1", 384, False),
    "sd15-384-fp32-gc": ("sd1", 384, True),
    "sdxl-256-fp32": ("sdxl", 256, False),
    "sdxl-256-fp32-gc": ("sdxl", 256, True),
}
# glibc raises its mmap threshold as large blocks are freed (up to 32 MiB), after which freed activations stay
# in the heap and in the resident size: 919 MiB measured for sd15-256-fp32 against 563 MiB with the
# threshold held at 128 KiB. Held, large tensors come from mmap and go back when freed, as a GPU caching
# allocator's blocks return to its pool; the measurement is then of the step's tensors, not of glibc.
MEASURING_ENV = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
KEYS = {"sd1": "cond_stage_model.transformer.text_model.final_layer_norm.weight",
        "sdxl": "conditioner.embedders.1.model.ln_final.weight"}


def row_config(family: str, resolution: int, checkpointing: bool, folder: Path):
    """The run's config for a row: a single file whose keys say the family (the pre-flight reads only the
    header; its configs are the shipped ones), fp32, one image per step."""
    import torch
    from safetensors.torch import save_file

    from trainer.config import TrainConfig
    from trainer.config.overrides import apply_overrides

    file = folder / f"{family}.safetensors"
    if not file.is_file():
        save_file({KEYS[family]: torch.zeros(1), "model.diffusion_model.out.2.bias": torch.zeros(1)}, str(file))
    return apply_overrides(TrainConfig(), [f"model.path={file}", f"dataset.path={folder}",
                                           f"dataset.resolution={resolution}",
                                           f"train.gradient_checkpointing={str(checkpointing).lower()}"])


def predicted_above_loaded(cfg) -> int:
    from trainer.memory import _traced, state_bytes

    step, _, _ = _traced(cfg)
    adapters = step.trainable_parameters * 4
    return step.peak + state_bytes(cfg, step.trainable_parameters) - step.frozen_weights - adapters


def measure(cfg) -> int:
    """Peak resident bytes above the loaded model over two real training steps (this process)."""
    import torch

    from networks.network import LoraNetwork
    from trainer.memory import _model_configs
    from trainer.memory.meta_model import build_meta_model

    model = build_meta_model(*_model_configs(cfg), cfg)
    unet = model.unet.to_empty(device="cpu")
    with torch.no_grad():
        for tensor in [*unet.parameters(), *unet.buffers()]:
            tensor.normal_(0, 0.02)  # every page written, so the step touches none for the first time
    network = LoraNetwork.create(model.family.name, unet, [], cfg.network.spec()).attach()
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-4)
    side, factor = cfg.dataset.resolution, 2 ** (len(model.vae.config.block_out_channels) - 1)
    latents = torch.randn(1, unet.config.in_channels, side // factor, side // factor)
    hidden = torch.randn(1, 77, unet.config.cross_attention_dim)
    added = None
    if model.family.name == "sdxl":
        added = {"text_embeds": torch.randn(1, 1280), "time_ids": torch.tensor([[side, side, 0, 0, side, side]], dtype=torch.float32)}
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident size
    before = _status("VmRSS")
    for _ in range(2):
        prediction = unet(latents, torch.tensor([500]), hidden, added_cond_kwargs=added).sample
        torch.nn.functional.mse_loss(prediction, latents).backward()
        torch.nn.utils.clip_grad_norm_(list(network.parameters()), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        del prediction
    return _status("VmHWM") - before


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def run_row(name: str, folder: Path) -> dict:
    cfg = row_config(*ROWS[name], folder)
    predicted = predicted_above_loaded(cfg)
    measured = measure(cfg)
    return {"row": name, "predicted_bytes": predicted, "measured_bytes": measured, "ratio": predicted / measured}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", nargs="*", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--one", help=argparse.SUPPRESS)  # a row in this process (the subprocess's side)
    parser.add_argument("--folder", default="/tmp/sdlora-bench-memory")
    parser.add_argument("--no-mkldnn", action="store_true",
                        help="measure with oneDNN off (its weight reorders and workspaces are CPU-only costs)")
    args = parser.parse_args(argv)
    folder = Path(args.folder)
    folder.mkdir(parents=True, exist_ok=True)
    if args.one:
        if args.no_mkldnn:
            import torch

            torch.backends.mkldnn.enabled = False
        print(json.dumps(run_row(args.one, folder)))
        return 0
    print(f"{'row':<20} {'predicted MiB':>14} {'measured MiB':>13} {'ratio':>6}")
    for name in args.rows:
        flags = ["--no-mkldnn"] if args.no_mkldnn else []
        out = subprocess.run([sys.executable, "-m", "bench.memory", "--one", name, "--folder", str(folder), *flags],
                             capture_output=True, text=True, check=True, env=MEASURING_ENV).stdout.strip().splitlines()[-1]
        row = json.loads(out)
        print(f"{name:<20} {row['predicted_bytes'] / 2**20:>14.0f} {row['measured_bytes'] / 2**20:>13.0f} "
              f"{row['ratio']:>6.2f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

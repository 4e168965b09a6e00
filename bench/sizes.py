"""Figures that need no timing: FLOPs per step part, and the exported file size on the real model shapes.

The bench model's adapters are small, so a safetensors header (kohya's long module names, 3 entries per
module) is a visible fraction of the file there; on SD1.5/SDXL shapes it is not. This builds the real
UNet on the meta device, attaches sdlora's LoraNetwork, materialises only the adapters, and writes the file
through the same functions Trainer._export uses (network_metadata + save_lora, full metadata).

    python -m bench.sizes [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

QKVO = ("to_q", "to_k", "to_v", "to_out.0")


def real_shape_export(family: str = "sd1", network_type: str = "lora", rank: int = 16, conv_rank: int = 8,
                      target_modules=QKVO, precision: str = "fp16", tag_captions: int = 40) -> dict:
    import torch
    from diffusers import UNet2DConditionModel

    from bench.models import sd15_config, sdxl_config
    from networks.lora_file import DTYPES, save_lora
    from networks.metadata import network_metadata
    from networks.network import LoraNetwork
    from networks.spec import NetworkSpec

    config = sd15_config("unet") if family == "sd1" else sdxl_config("unet")
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    spec = NetworkSpec(type=network_type, rank=rank, alpha=float(rank), conv_rank=conv_rank,
                       conv_alpha=float(conv_rank), init="gaussian", target_modules=target_modules)
    network = LoraNetwork.create(family, unet, [], spec)
    generator = torch.Generator().manual_seed(0)
    for adapter in network.adapters.values():
        adapter.to_empty(device="cpu")
        for layer in (adapter.lora_down, adapter.lora_up):
            with torch.no_grad():
                layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator) * 0.01)
    params = sum(p.numel() for p in network.parameters())
    # The ss_* training facts Trainer._export writes, with a tag table the size of the bench dataset's.
    tags = {f"tag {i}": 1 for i in range(tag_captions * 3)}
    training = {"ss_resolution": "(512, 512)", "ss_steps": 400, "ss_epoch": 10, "ss_learning_rate": 1e-4,
                "ss_num_train_images": tag_captions, "ss_seed": 42, "ss_tag_frequency": {"data": tags},
                "modelspec.resolution": "512x512"}
    metadata = network_metadata(network, network_type, False, title="bench", training=training)
    bytes_per_param = DTYPES[precision].itemsize
    with tempfile.TemporaryDirectory() as folder:
        path = save_lora(Path(folder) / "bench.safetensors", network.kohya_state_dict(DTYPES[precision]), metadata)
        size = path.stat().st_size
    return {"family": family, "network": network_type, "rank": rank, "target_modules": list(target_modules or []),
            "modules": len(network.adapters), "params": params, "precision": precision, "bytes": size,
            "ratio_to_params_x_bytes": size / (params * bytes_per_param)}


def static_figures(resolution: int) -> dict:
    from bench.models import flop_table

    return {
        "flops_per_image": flop_table(resolution),
        "real_shape_export": [real_shape_export("sd1", "lora", target_modules=QKVO),
                              real_shape_export("sd1", "locon", target_modules=None),
                              real_shape_export("sdxl", "lora", target_modules=QKVO)],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.sizes")
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    figures = static_figures(args.resolution)
    text = json.dumps(figures, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

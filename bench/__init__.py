"""Benchmarks of sdlora against its peers (the diffusers+peft LoRA recipe, LyCORIS LoCon), in one harness.

    python -m bench.train_step     # s/step, images/s, peak RSS, exported file size; ratios sdlora / peer
    python -m bench.end_to_end     # wall time of 10 epochs on 40 images, preprocessing and caching included
    python -m bench.train_step --gpu   # on a GPU machine: full SD1.5 at 512 px and SDXL at 1024 px

Every contender runs in its own subprocess (so peak RSS is its own), contenders are interleaved and
repeated (the machine is shared, timings are noisy), and the tables report medians and ratios.
See docs/PERFORMANCE.md for the results and the method.
"""

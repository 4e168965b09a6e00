"""The config's enumerations and fixed value sets, written once (the network's are in networks/spec.py) and
read everywhere else: the sections validate against them, the UI offers them, the pre-flight names them."""
from __future__ import annotations

from typing import Literal, get_args

from networks.spec import FAMILIES

Family = Literal[("auto", *FAMILIES)]


PREDICTION_TYPES = ("epsilon", "v_prediction")


PredictionType = Literal[("auto", *PREDICTION_TYPES)]


LossType = Literal["l2", "huber", "smooth_l1"]


LOSS_TYPES: tuple[str, ...] = get_args(LossType)


# How training timesteps are drawn inside [min_timestep, max_timestep) (trainer/objective/timesteps.py): kohya's
# uniform, SD3's logit-normal, cos-map and heavy-tail, kohya's sigmoid, and OneTrainer's beta and inverted parabola.
TimestepDistribution = Literal["uniform", "logit_normal", "sigmoid", "beta", "cos_map", "heavy_tail",
                               "inverted_parabola"]


Optimizer = Literal["adamw", "adamw8bit", "lion", "prodigy", "adafactor"]


# The names diffusers.optimization.get_scheduler accepts, so the loop can pass the value straight through.
LrScheduler = Literal["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"]


Sampler = Literal["euler_a", "euler", "ddim", "dpmpp_2m"]
MixedPrecision = Literal["no", "fp16", "bf16"]


# Built-in models and their family: demo:shapes was pretrained to draw (docs/DEMO_MODEL.md); the other
# three have random weights and exist so every family's layout can be tried and tested in seconds.
DEMO_MODELS = {"demo:shapes": "sd1", "demo:sd1": "sd1", "demo:sd2": "sd2", "demo:sdxl": "sdxl"}


SEED_MAX = 2**32 - 1  # numpy's limit; torch accepts more, but a seed must work everywhere


OptimizerArg = float | int | bool | str | list[float]

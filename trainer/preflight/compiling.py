"""train.compile: torch.compile's default backend builds kernels with Triton on a GPU and a C++ compiler on a
CPU; without them it fails only at the first step, with torch's own long error."""

from __future__ import annotations

import importlib.util
import shutil

import torch

from trainer.preflight.context import CheckContext

CXX_COMPILERS = ("c++", "g++", "clang++", "cl")


def check_compile(ctx: CheckContext, cuda: bool | None = None) -> None:
    """`cuda` says whether the run has a GPU (tests set it; None asks torch)."""
    if not ctx.cfg.train.compile:
        return
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if cuda and importlib.util.find_spec("triton") is None:
        ctx.report.warnings.append("train.compile is on but Triton is not installed, so compiling will fail at the "
                                   "first step; install triton or set train.compile = false.")
    elif not cuda and not any(shutil.which(c) for c in CXX_COMPILERS):
        ctx.report.warnings.append("train.compile is on but no C++ compiler (c++, g++, clang++ or cl) is on the "
                                   "PATH, so compiling will fail at the first step; install one or set "
                                   "train.compile = false.")
    ctx.report.info.append("train.compile: the first step (and the first of each new bucket shape) compiles the "
                           "UNet, which takes minutes; later steps are faster, so it pays off on long runs.")

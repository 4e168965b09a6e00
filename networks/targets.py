"""Which modules of a UNet / text encoder get an adapter, and with which rank (see docs/LORA_FORMAT.md).

kohya's rule, which every generator's expectations are built on: Linear layers and 1x1 convs take the
linear rank/alpha; convs with a larger kernel (ResNet conv1/conv2, down/upsamplers) take the conv rank.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

# Attention q/k/v/out (self and cross), feed-forward, and the transformer's proj_in/proj_out.
UNET_LORA = re.compile(r"(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2)|attentions\.\d+\.proj_(in|out))$")
# LoCon adds every ResNet part and the down/upsampler convs.
UNET_LOCON = re.compile(r"(resnets\.\d+\.(conv1|conv2|conv_shortcut|time_emb_proj)|(down|up)samplers\.0\.conv)$")
UNET_CONV_IN_OUT = re.compile(r"^(conv_in|conv_out)$")
UNET_TIME_EMBEDDING = re.compile(r"^time_embedding\.linear_[12]$")
TEXT_ENCODER_LORA = re.compile(r"encoder\.layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|out_proj)|mlp\.(fc1|fc2))$")


@dataclass(frozen=True)
class TargetRules:
    """Which optional module groups a network covers."""

    locon: bool = False
    conv_in_out: bool = False
    time_embedding: bool = False

    def matches_unet(self, name: str) -> bool:
        if UNET_LORA.search(name):
            return True
        if self.locon and UNET_LOCON.search(name):
            return True
        if self.conv_in_out and UNET_CONV_IN_OUT.search(name):
            return True
        return bool(self.time_embedding and UNET_TIME_EMBEDDING.search(name))

    @staticmethod
    def matches_text_encoder(name: str) -> bool:
        return bool(TEXT_ENCODER_LORA.search(name))


def is_adaptable(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and module.groups == 1)


def uses_conv_rank(module: nn.Module) -> bool:
    """A conv with a kernel larger than 1x1 takes conv rank/alpha; Linear and 1x1 conv the linear ones."""
    return isinstance(module, nn.Conv2d) and tuple(module.kernel_size) != (1, 1)


def find_targets(model: nn.Module, is_unet: bool, rules: TargetRules) -> list[tuple[str, nn.Module]]:
    """(diffusers module path, module) for every module the rules adapt, in model order."""
    match = rules.matches_unet if is_unet else rules.matches_text_encoder
    return [(name, module) for name, module in model.named_modules() if is_adaptable(module) and match(name)]

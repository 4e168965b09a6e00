"""What every config section shares: unknown keys and non-finite numbers are refused, assignments are
validated, and a rule across keys fails with a sentence that names them."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict
from pydantic_core import PydanticCustomError


class Section(BaseModel):
    # inf and nan are valid TOML floats but no key means them (train.max_grad_norm's inf aside, allowed
    # there): a learning rate of inf trains to a NaN loss.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


def rule(message: str) -> PydanticCustomError:
    """A cross-field error whose message is already a full sentence naming its keys."""
    return PydanticCustomError("sdlora_rule", message)

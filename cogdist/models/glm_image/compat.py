"""A fix for the stock image-to-image AR path of the installed diffusers/transformers."""

from __future__ import annotations

import types
from typing import Any

import torch
from diffusers import GlmImagePipeline


def ensure_i2i_compat(pipe: GlmImagePipeline) -> None:
    """Make the stock image-to-image AR path work with transformers 5.x (idempotent, this instance).

    diffusers 0.42 (`generate_prior_tokens`) concatenates `get_image_features(...).pooler_output`
    and passes the tensor to `get_image_tokens`; transformers 5 returns, and iterates over, a list
    of per-image maps, so after the cat it walks channels and the VQ conv fails ("expected input
    ... to have 32 channels"). This splits the tensor back into the list; the model's own forward,
    which passes the list, is unaffected.
    """
    model = pipe.vision_language_encoder
    if getattr(model, "_cogdist_i2i_compat", False):
        return
    hidden = model.config.vision_config.hidden_size  # channels of one image's map
    stock = model.get_image_tokens

    def get_image_tokens(self: Any, hidden_states: Any, image_grid_thw: torch.Tensor | None = None) -> Any:
        if isinstance(hidden_states, torch.Tensor) and hidden_states.dim() == 3:
            hidden_states = list(hidden_states.split(hidden, dim=0))
        return stock(hidden_states, image_grid_thw)

    model.get_image_tokens = types.MethodType(get_image_tokens, model)
    model._cogdist_i2i_compat = True

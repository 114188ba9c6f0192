"""GLM-Image's input preparation: condition images fitted to what the AR tokenizer and the
decoder agree on (Pillow only, no torch)."""

from __future__ import annotations

from PIL import Image

from cogdist.inputs import InputError, Inputs
from cogdist.work import WorkItem

# The processor's token grid is 1/32 of the pixels, upsampled 2x for the decoder (one token per
# vae_scale 8 x patch 2). Condition images must be multiples of 32 too, or the condition token grid
# and its latents disagree (a crash, or for tiny images a silent broadcast).
MULTIPLE = 32
CONDITION_MAX_SIDE = 2048
CONDITION_MAX_ASPECT = 4  # the image processor's smart_resize refuses more


def prepare_inputs(item: WorkItem, inputs: Inputs) -> Inputs:
    """Fit a condition image to what the AR tokenizer and the decoder agree on, or refuse the row.

    An image larger than CONDITION_MAX_SIDE is scaled down, then centre-cropped to multiples of 32
    (at most 31 pixels per side), which the stock pipeline would otherwise mis-shape.
    """
    image = inputs.image
    if image is None:
        return inputs
    width, height = image.size
    if max(width, height) > CONDITION_MAX_SIDE:
        scale = CONDITION_MAX_SIDE / max(width, height)
        width, height = max(1, round(width * scale)), max(1, round(height * scale))
        image = image.resize((width, height), Image.Resampling.LANCZOS)
    if min(width, height) < MULTIPLE or max(width, height) > CONDITION_MAX_ASPECT * min(width, height):
        raise InputError(
            f"condition image of {item.id!r} is {width}x{height}: GLM-Image needs sides of at least "
            f"{MULTIPLE} pixels and an aspect ratio of at most {CONDITION_MAX_ASPECT}"
        )
    crop_w, crop_h = width - width % MULTIPLE, height - height % MULTIPLE
    if (crop_w, crop_h) != image.size:
        left, top = (width - crop_w) // 2, (height - crop_h) // 2
        image = image.crop((left, top, left + crop_w, top + crop_h))
    return Inputs(image=image)

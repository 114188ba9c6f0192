"""CogView4 text-to-image, declared: presets, configs, pipelines, parallel plans (no torch).

The torch side (the tiny pipeline, loading, rendering) is `runner.py`.
"""

from __future__ import annotations

from cogdist.models.spec import (
    FIRST_BLOCK,
    GATHER,
    PAB,
    PAIRED,
    ROPE_OUTPUT,
    TAYLORSEER,
    TEXT_TO_IMAGE,
    TOKENS,
    ConfigReader,
    FamilyRunner,
    FamilySpec,
    ModelSpec,
    SequencePlan,
    SizeRule,
    vae_scale,
)

NAME = "cogview4"

PRESETS = (
    ModelSpec(
        name="tiny-cogview4",
        family=NAME,
        source="",
        kind="image",
        tasks=(TEXT_TO_IMAGE,),
        width=64,
        height=64,
        num_inference_steps=4,
        guidance_scale=5.0,
        sizes=SizeRule(multiple=32, min_side=64, max_side=512),
        tiny=True,
        heads=6,
        description="CogView4 architecture, random weights, about 0.1 M parameters (CPU friendly)",
    ),
    ModelSpec(
        name="THUDM/CogView4-6B",
        family=NAME,
        source="THUDM/CogView4-6B",
        # GLM-4-9B's encoder (THUDM/glm-4-9b-hf's config, without its LM head)
        weights=(("transformer", 6_369_118_272), ("text_encoder", 8_779_194_368), ("vae", 406_100_643)),
        kind="image",
        tasks=(TEXT_TO_IMAGE,),
        width=1024,
        height=1024,
        num_inference_steps=50,
        guidance_scale=3.5,
        sizes=SizeRule(multiple=32, min_side=512, max_side=2048, max_area=2**21),
        heads=32,  # tests/data/checkpoints holds the real configs
        description="CogView4 6B text-to-image (GLM-4-9B text encoder)",
    ),
)


def from_configs(name: str, source: str, tasks: tuple[str, ...], read: ConfigReader) -> ModelSpec:
    vae = read("vae/config.json")
    transformer = read("transformer/config.json")
    multiple = vae_scale(vae) * transformer.get("patch_size", 2)
    default_side = transformer.get("sample_size", 128) * vae_scale(vae)
    return ModelSpec(
        name=name,
        family=NAME,
        source=source,
        kind="image",
        tasks=tasks,
        width=default_side,
        height=default_side,
        num_inference_steps=50,
        guidance_scale=5.0,
        sizes=SizeRule(multiple=multiple, min_side=multiple, max_side=4096),
        heads=transformer.get("num_attention_heads", 0),
        description="CogView4 checkpoint (not a preset: sizes checked structurally only)",
    )


_TWO_CALLS = (
    "its pipeline makes the conditional and unconditional passes in two calls per step, and PAB "
    "would hand the second the first one's attention"
)


def _runner() -> FamilyRunner:
    from cogdist.models.cogview4.runner import RUNNER  # torch: imported only when a worker loads

    return RUNNER


SPEC = FamilySpec(
    name=NAME,
    presets=PRESETS,
    pipelines={TEXT_TO_IMAGE: "CogView4Pipeline"},
    index_classes={"CogView4Pipeline": (TEXT_TO_IMAGE,)},
    from_configs=from_configs,
    runner=_runner,
    # The pipeline calls the transformer twice per step, conditional first.
    cfg_parallel=PAIRED,
    sequence_plans={
        "CogView4Transformer2DModel": SequencePlan(
            # The first block's tokens, the rotary tables of its `rope` module, the gather after
            # the output projection (before unpatchifying).
            modules={
                "rope": {0: ROPE_OUTPUT, 1: ROPE_OUTPUT},
                "transformer_blocks.0": {"hidden_states": TOKENS, "encoder_hidden_states": TOKENS},
                "proj_out": GATHER,
            },
            # Its processor calls F.scaled_dot_product_attention itself.
            dispatch=("diffusers.models.transformers.transformer_cogview4",),
        )
    },
    vae_tiles={"AutoencoderKL": "2d"},
    first_rank_models=("text_encoder",),
    step_caches=(FIRST_BLOCK, TAYLORSEER),
    # Not pab: PAB's state is one per attention layer, not per call, so the unconditional pass
    # would reuse the conditional pass's attention (it fails on the shapes).
    no_step_cache={PAB: _TWO_CALLS},
)

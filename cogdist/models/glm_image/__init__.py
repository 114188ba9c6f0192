"""GLM-Image text-to-image and image-to-image, declared: presets, configs, pipelines, plans.

No torch here. The torch side: `runner.py` (loading, the two-stage rendering), `tiny.py` (the
tiny random-weight pipeline), `inputs.py` (condition images fitted before rendering).
"""

from __future__ import annotations

from cogdist.models.spec import (
    FIRST_BLOCK,
    GATHER,
    IMAGE_TO_IMAGE,
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

NAME = "glm_image"

PRESETS = (
    ModelSpec(
        name="tiny-glm-image",
        family=NAME,
        source="",
        kind="image",
        tasks=(TEXT_TO_IMAGE, IMAGE_TO_IMAGE),
        width=64,
        height=64,
        num_inference_steps=4,
        guidance_scale=1.5,
        sizes=SizeRule(multiple=32, min_side=32, max_side=256),
        tiny=True,
        heads=6,
        negative_prompt=False,
        ar_prior=True,
        description="GLM-Image architecture (autoregressive prior + diffusion decoder), random weights",
    ),
    ModelSpec(
        name="zai-org/GLM-Image",
        family=NAME,
        source="zai-org/GLM-Image",
        # Its ByT5 glyph encoder's size is not known here (no config in tests/data/checkpoints).
        weights=(
            ("vision_language_encoder", 10_114_245_632),
            ("transformer", 6_926_882_880),
            ("vae", 406_100_643),
        ),
        kind="image",
        tasks=(TEXT_TO_IMAGE, IMAGE_TO_IMAGE),
        width=1024,
        height=1024,
        num_inference_steps=50,
        guidance_scale=1.5,
        sizes=SizeRule(multiple=32, min_side=512, max_side=2048),
        heads=32,  # tests/data/checkpoints holds the real configs
        negative_prompt=False,
        ar_prior=True,
        description="GLM-Image: autoregressive prior (GLM) + DiT decoder; text- and image-to-image",
    ),
)


def from_configs(name: str, source: str, tasks: tuple[str, ...], read: ConfigReader) -> ModelSpec:
    vae = read("vae/config.json")
    transformer = read("transformer/config.json")
    # The AR prior works on a 32-pixel token grid; the decoder needs vae_scale * patch_size * 2.
    multiple = max(32, vae_scale(vae) * transformer.get("patch_size", 2) * 2)
    return ModelSpec(
        name=name,
        family=NAME,
        source=source,
        kind="image",
        tasks=tasks,
        width=1024,
        height=1024,
        num_inference_steps=50,
        guidance_scale=1.5,
        sizes=SizeRule(multiple=multiple, min_side=multiple, max_side=4096),
        negative_prompt=False,
        ar_prior=True,
        heads=transformer.get("num_attention_heads", 0),
        description="GLM-Image checkpoint (not a preset: sizes checked structurally only)",
    )


_NO_CACHE_CONTEXT = "its pipeline sets no cache context"


def _runner() -> FamilyRunner:
    from cogdist.models.glm_image.runner import RUNNER  # torch: imported only when a worker loads

    return RUNNER


SPEC = FamilySpec(
    name=NAME,
    presets=PRESETS,
    pipelines={TEXT_TO_IMAGE: "GlmImagePipeline", IMAGE_TO_IMAGE: "GlmImagePipeline"},
    index_classes={"GlmImagePipeline": (TEXT_TO_IMAGE, IMAGE_TO_IMAGE)},
    from_configs=from_configs,
    runner=_runner,
    # The pipeline calls the transformer twice per step, conditional first.
    cfg_parallel=PAIRED,
    sequence_plans={
        "GlmImageTransformer2DModel": SequencePlan(
            modules={
                "rope": {0: ROPE_OUTPUT, 1: ROPE_OUTPUT},
                "transformer_blocks.0": {"hidden_states": TOKENS},
                "proj_out": GATHER,
            },
            # Its processor already dispatches. Its glyph tokens are often fewer than the ranks
            # (one, for a prompt without quoted text), which diffusers cannot split.
            text_on_first_rank="transformer_blocks.0",
        )
    },
    vae_tiles={"AutoencoderKL": "2d"},
    no_lora="diffusers' GlmImagePipeline has no LoRA loader (load_lora_weights)",
    # The AR model: the pipeline embeds the empty negative glyphs itself on every rank.
    first_rank_models=("vision_language_encoder",),
    # None: first-block and taylorseer need a `cache_context` ("No cache context is set"), and
    # first-block diffusers' block metadata; pab fails on paired calls as with CogView4.
    no_step_cache={
        FIRST_BLOCK: f"{_NO_CACHE_CONTEXT} and diffusers has no block metadata for its transformer",
        TAYLORSEER: f"{_NO_CACHE_CONTEXT}, which the hook needs",
        PAB: "its pipeline makes the conditional and unconditional passes in two calls per step, "
        "and PAB would hand the second the first one's attention",
    },
)

"""CogVideoX, declared: presets, configs, pipelines per task, parallel plans (no torch).

Text-to-video, video-to-video, image-to-video and CogVideoX-Fun control; the torch side (the tiny
pipelines, loading, rendering) is `runner.py`.
"""

from __future__ import annotations

from dataclasses import replace

from cogdist.models.spec import (
    BATCHED,
    CONTROL_TO_VIDEO,
    FIRST_BLOCK,
    GATHER,
    IMAGE_TO_VIDEO,
    PAB,
    ROPE,
    TAYLORSEER,
    TEXT_TO_VIDEO,
    TOKENS,
    VIDEO_MEMORY_DEFAULTS,
    VIDEO_TO_VIDEO,
    ConfigReader,
    FamilyRunner,
    FamilySpec,
    FrameRule,
    ModelSpec,
    SequencePlan,
    SizeRule,
    vae_scale,
)

T5_XXL_ENCODER = 4_762_310_656
"""Parameters of the T5 v1.1 XXL encoder every CogVideoX checkpoint uses (google/t5-v1_1-xxl's config)."""
COGVIDEOX_VAE = 215_583_907
"""Parameters of the CogVideoX VAE (every checkpoint's vae/config.json)."""

NAME = "cogvideox"

TINY_VIDEO_SIZES = SizeRule(multiple=16, min_side=32, max_side=256)
TINY_VIDEO_FRAMES = FrameRule(step=4, min_frames=1, max_frames=33)


def _presets() -> tuple[ModelSpec, ...]:
    tiny = dict(
        family=NAME,
        source="",
        kind="video",
        width=64,
        height=64,
        num_inference_steps=4,
        guidance_scale=6.0,
        sizes=TINY_VIDEO_SIZES,
        num_frames=9,
        frames=TINY_VIDEO_FRAMES,
        fps=8.0,
        tiny=True,
        heads=6,
        **VIDEO_MEMORY_DEFAULTS,
    )

    def weights(transformer: int) -> tuple[tuple[str, int], ...]:
        return (("transformer", transformer), ("text_encoder", T5_XXL_ENCODER), ("vae", COGVIDEOX_VAE))

    v10_sizes = SizeRule(multiple=16, min_side=480, max_side=720, only=((720, 480),))
    v10_frames = FrameRule(step=4, min_frames=9, max_frames=49, only=(49,))
    v10 = dict(
        family=NAME,
        heads=48,  # the 5B; the 2B has 30 (tests/data/checkpoints holds the real configs)
        kind="video",
        width=720,
        height=480,
        num_inference_steps=50,
        guidance_scale=6.0,
        sizes=v10_sizes,
        num_frames=49,
        frames=v10_frames,
        fps=8.0,
        **VIDEO_MEMORY_DEFAULTS,
    )
    # CogVideoX-Fun was trained at several resolutions (512..1280) on 49 frames at 8 fps.
    fun = {
        **v10,
        "sizes": SizeRule(multiple=16, min_side=256, max_side=1360),
        "frames": FrameRule(max_frames=49),
    }
    v15_frames = FrameRule(step=4, min_frames=9, max_frames=161, only=(81, 161), latent_multiple=2)
    v15 = dict(
        family=NAME,
        heads=48,
        kind="video",
        width=1360,
        height=768,
        num_inference_steps=50,
        guidance_scale=6.0,
        num_frames=81,
        frames=v15_frames,
        fps=16.0,
        **VIDEO_MEMORY_DEFAULTS,
    )
    return (
        ModelSpec(
            name="tiny-cogvideox",
            tasks=(TEXT_TO_VIDEO, VIDEO_TO_VIDEO),
            variant="t2v",
            description="CogVideoX 1.0 architecture (rotary, DPM scheduler as in CogVideo's demo), random weights",
            **tiny,
        ),
        ModelSpec(
            name="tiny-cogvideox1.5",
            tasks=(TEXT_TO_VIDEO, VIDEO_TO_VIDEO),
            variant="t2v-1.5",
            description="CogVideoX 1.5 traits (temporal patch 2, 16 fps), random weights",
            **{
                **tiny,
                "fps": 16.0,
                "frames": replace(TINY_VIDEO_FRAMES, latent_multiple=2),
                "num_frames": 9,
            },
        ),
        ModelSpec(
            name="tiny-cogvideox-i2v",
            tasks=(IMAGE_TO_VIDEO,),
            variant="i2v",
            description="CogVideoX image-to-video architecture, random weights",
            **tiny,
        ),
        ModelSpec(
            name="tiny-cogvideox-fun",
            tasks=(CONTROL_TO_VIDEO,),
            variant="fun",
            description="CogVideoX-Fun control architecture (DDIM scheduler), random weights",
            **tiny,
        ),
        ModelSpec(
            name="THUDM/CogVideoX-2b",
            source="THUDM/CogVideoX-2b",
            weights=weights(1_693_783_872),
            tasks=(TEXT_TO_VIDEO, VIDEO_TO_VIDEO),
            dtype_gpu="float16",
            description="CogVideoX 2B text-to-video and video-to-video, 49 frames 720x480 at 8 fps",
            **{**v10, "heads": 30},
        ),
        ModelSpec(
            name="THUDM/CogVideoX-5b",
            source="THUDM/CogVideoX-5b",
            weights=weights(5_570_283_072),
            tasks=(TEXT_TO_VIDEO, VIDEO_TO_VIDEO),
            description="CogVideoX 5B text-to-video and video-to-video, 49 frames 720x480 at 8 fps",
            **v10,
        ),
        ModelSpec(
            name="THUDM/CogVideoX-5b-I2V",
            source="THUDM/CogVideoX-5b-I2V",
            weights=weights(5_570_479_680),
            tasks=(IMAGE_TO_VIDEO,),
            description="CogVideoX 5B image-to-video, 49 frames 720x480 at 8 fps",
            **v10,
        ),
        ModelSpec(
            name="THUDM/CogVideoX1.5-5B",
            source="THUDM/CogVideoX1.5-5B",
            weights=weights(5_570_676_352),
            tasks=(TEXT_TO_VIDEO, VIDEO_TO_VIDEO),
            sizes=SizeRule(multiple=16, min_side=768, max_side=1360, only=((1360, 768),)),
            description="CogVideoX 1.5 5B text-to-video, 81 or 161 frames 1360x768 at 16 fps",
            **v15,
        ),
        ModelSpec(
            name="THUDM/CogVideoX1.5-5B-I2V",
            source="THUDM/CogVideoX1.5-5B-I2V",
            weights=weights(5_571_594_880),
            tasks=(IMAGE_TO_VIDEO,),
            sizes=SizeRule(multiple=16, min_side=768, max_side=1360, short_side=768),
            description="CogVideoX 1.5 5B image-to-video, 81 or 161 frames, shorter side 768, at 16 fps",
            **v15,
        ),
        ModelSpec(
            name="alibaba-pai/CogVideoX-Fun-V1.1-2b-Pose",
            source="alibaba-pai/CogVideoX-Fun-V1.1-2b-Pose",
            weights=weights(1_693_906_752),
            tasks=(CONTROL_TO_VIDEO,),
            description="CogVideoX-Fun 2B pose control: a control video in, 49 frames at 8 fps",
            **{**fun, "heads": 30},
        ),
        ModelSpec(
            name="alibaba-pai/CogVideoX-Fun-V1.1-5b-Pose",
            source="alibaba-pai/CogVideoX-Fun-V1.1-5b-Pose",
            weights=weights(5_570_479_680),
            tasks=(CONTROL_TO_VIDEO,),
            description="CogVideoX-Fun 5B pose control: a control video in, 49 frames at 8 fps",
            **fun,
        ),
    )


def from_configs(name: str, source: str, tasks: tuple[str, ...], read: ConfigReader) -> ModelSpec:
    vae = read("vae/config.json")
    transformer = read("transformer/config.json")
    scale = vae_scale(vae)
    patch_t = transformer.get("patch_size_t") or 1
    multiple = scale * transformer.get("patch_size", 2)
    temporal = vae.get("temporal_compression_ratio", 4)
    latent_channels = vae.get("latent_channels", 16)
    if TEXT_TO_VIDEO in tasks and transformer.get("in_channels") == 2 * latent_channels:
        # CogVideoX-Fun control checkpoints ship a CogVideoXPipeline index; their transformer
        # takes the control video's latents beside the noise.
        tasks = (CONTROL_TO_VIDEO,)
    if patch_t > 1:  # CogVideoX 1.5: its configs say 300x300 latents, it was trained at 1360x768
        width, height, frames, fps = 1360, 768, 81, 16.0
    else:
        width = transformer.get("sample_width", 90) * scale
        height = transformer.get("sample_height", 60) * scale
        frames, fps = transformer.get("sample_frames", 49), 8.0
    sizes = SizeRule(multiple=multiple, min_side=multiple, max_side=4096)
    if transformer.get("use_learned_positional_embeddings"):  # positions learned for one size only
        sizes = replace(sizes, only=((width, height),))
    return ModelSpec(
        name=name,
        family=NAME,
        source=source,
        kind="video",
        tasks=tasks,
        width=width,
        height=height,
        num_inference_steps=50,
        guidance_scale=6.0,
        sizes=sizes,
        num_frames=frames,
        frames=FrameRule(step=temporal, min_frames=1, max_frames=1024, latent_multiple=patch_t),
        fps=fps,
        **VIDEO_MEMORY_DEFAULTS,
        heads=transformer.get("num_attention_heads", 0),
        description="CogVideoX checkpoint (not a preset: sizes and frames checked structurally only)",
    )


def _runner() -> FamilyRunner:
    from cogdist.models.cogvideox.runner import RUNNER  # torch: imported only when a worker loads

    return RUNNER


SPEC = FamilySpec(
    name=NAME,
    presets=_presets(),
    pipelines={
        TEXT_TO_VIDEO: "CogVideoXPipeline",
        VIDEO_TO_VIDEO: "CogVideoXVideoToVideoPipeline",
        IMAGE_TO_VIDEO: "CogVideoXImageToVideoPipeline",
        CONTROL_TO_VIDEO: "CogVideoXFunControlPipeline",
    },
    index_classes={
        "CogVideoXPipeline": (TEXT_TO_VIDEO, VIDEO_TO_VIDEO),
        "CogVideoXVideoToVideoPipeline": (TEXT_TO_VIDEO, VIDEO_TO_VIDEO),
        "CogVideoXImageToVideoPipeline": (IMAGE_TO_VIDEO,),
        "CogVideoXFunControlPipeline": (CONTROL_TO_VIDEO,),
    },
    from_configs=from_configs,
    runner=_runner,
    # The pipeline calls the transformer once per step on the batch [uncond; cond].
    cfg_parallel=BATCHED,
    sequence_plans={
        "CogVideoXTransformer3DModel": SequencePlan(
            # 1.5 receives its rotary tables from the pipeline as the `image_rotary_emb` argument
            # (1.0 2B has none: learned positions).
            modules={
                "": {"image_rotary_emb": (ROPE, ROPE)},
                "transformer_blocks.0": {"hidden_states": TOKENS, "encoder_hidden_states": TOKENS},
                "proj_out": GATHER,
            },
            # CogVideoXAttnProcessor2_0 calls F.scaled_dot_product_attention itself.
            dispatch=("diffusers.models.attention_processor",),
        )
    },
    vae_tiles={"AutoencoderKLCogVideoX": "3d-causal"},
    first_rank_models=("text_encoder",),
    # One call per step on the batch [uncond; cond]: all three.
    step_caches=(FIRST_BLOCK, TAYLORSEER, PAB),
    step_checkpoints=True,
)

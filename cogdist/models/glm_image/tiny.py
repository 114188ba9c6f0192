"""GLM-Image at toy size with random weights (~0.2 M parameters): nothing is downloaded."""

from __future__ import annotations

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    GlmImagePipeline,
    GlmImageTransformer2DModel,
)
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    ByT5Tokenizer,
    GenerationConfig,
    GlmImageConfig,
    GlmImageForConditionalGeneration,
    GlmImageImageProcessorPil,
    GlmImageProcessor,
    PreTrainedTokenizerFast,
    T5Config,
    T5EncoderModel,
)

from cogdist.models.glm_image.compat import ensure_i2i_compat
from cogdist.models.glm_image.inputs import CONDITION_MAX_SIDE, MULTIPLE

# One codebook size everywhere in the tiny model: VQ codes, the AR head (`vision_vocab_size`) and
# the decoder's prior embedding. With exactly CODEBOOK head outputs, random weights can only sample
# valid prior tokens: image start/end (= EOS) sit just above the codebook and are never sampled, so
# generate() always runs to max_new_tokens. (A wider head samples EOS early, or ids the decoder
# cannot look up, and the stock pipeline then fails with a shape or index error.)
CODEBOOK = 64
IMAGE_START_ID = CODEBOOK  # the processor's bos_token: opens every image
IMAGE_END_ID = CODEBOOK + 1  # closes condition images; the AR model's EOS
AR_SPECIAL_TOKENS = ("<|image|>", "<sop>", "<eop>", "<pad>")

_AR_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message.content is string -%}{{ message.content }}"
    "{%- else -%}{%- for item in message.content -%}"
    "{%- if item.type == 'image' -%}{{ bos_token }}<|image|>{{ eos_token }}"
    "{%- elif item.type == 'text' -%}{{ item.text }}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}{%- endfor -%}"
)


def ar_tokenizer() -> PreTrainedTokenizerFast:
    """The processor's tokenizer: byte-level text plus GLM-Image's special tokens, no download.

    Ids 0..CODEBOOK+1 are `<|dit_token_i|>` (image codes, image start, image end) as in the real
    tokenizer, then the 256 byte symbols, then <|image|>, <sop>, <eop>, <pad>.
    """
    dit_tokens = [f"<|dit_token_{i}|>" for i in range(IMAGE_END_ID + 1)]
    symbols = dit_tokens + sorted(pre_tokenizers.ByteLevel.alphabet()) + list(AR_SPECIAL_TOKENS)
    tokenizer = Tokenizer(models.BPE(vocab={s: i for i, s in enumerate(symbols)}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    # No post-processor: the processor always appends the grid spec and bos, so no input is empty.
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=dit_tokens[IMAGE_START_ID],
        eos_token=dit_tokens[IMAGE_END_ID],
        pad_token="<pad>",
        image_token="<|image|>",  # GlmImageProcessor reads these three from its tokenizer
        grid_bos_token="<sop>",
        grid_eos_token="<eop>",
        padding_side="left",
    )
    # Special, so they match whole (already in the vocabulary: ids unchanged).
    fast.add_special_tokens({"additional_special_tokens": dit_tokens + list(AR_SPECIAL_TOKENS)})
    return fast


def build_tiny(seed: int = 0) -> GlmImagePipeline:
    """The GLM-Image architecture at toy size (~0.2 M parameters), identical in every process."""
    tokenizer = ar_tokenizer()
    vocab = tokenizer.get_vocab()
    # The glyph tokenizer is the real class: ByT5 needs no vocabulary file and appends </s>, so the
    # empty glyph text of a prompt without quotes still has one token.
    glyph_tokenizer = ByT5Tokenizer()
    processor = GlmImageProcessor(
        image_processor=GlmImageImageProcessorPil(
            # As in the released processor: 16-pixel patches, no temporal patch, no spatial merge.
            patch_size=16,
            temporal_patch_size=1,
            merge_size=1,
            image_mean=[0.5, 0.5, 0.5],
            image_std=[0.5, 0.5, 0.5],
            size={"shortest_edge": MULTIPLE**2, "longest_edge": CONDITION_MAX_SIDE**2},
        ),
        tokenizer=tokenizer,
        chat_template=_AR_CHAT_TEMPLATE,
    )
    ar_config = GlmImageConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "vision_vocab_size": CODEBOOK,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "max_position_embeddings": 1024,
            "pad_token_id": vocab["<pad>"],
            "eos_token_id": IMAGE_END_ID,
            # mrope sections (t, h, w) sum to head_dim / 2 = 8.
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 2, 2]},
        },
        vision_config={
            "depth": 1,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "patch_size": 16,
            "image_size": 64,
            "spatial_merge_size": 1,
        },
        vq_config={"embed_dim": 16, "num_embeddings": CODEBOOK, "latent_channels": 32},
        image_token_id=vocab["<|image|>"],
        image_start_token_id=IMAGE_START_ID,
        image_end_token_id=IMAGE_END_ID,
    )
    glyph_config = T5Config(
        vocab_size=len(glyph_tokenizer),
        d_model=32,
        d_kv=16,
        d_ff=64,
        num_layers=1,
        num_heads=2,
        relative_attention_num_buckets=8,
        dropout_rate=0.0,
        pad_token_id=glyph_tokenizer.pad_token_id,
        eos_token_id=glyph_tokenizer.eos_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vision_language_encoder = GlmImageForConditionalGeneration(ar_config)
        text_encoder = T5EncoderModel(glyph_config)
        transformer = GlmImageTransformer2DModel(
            patch_size=2,
            in_channels=4,
            out_channels=4,
            num_layers=2,
            attention_head_dim=8,  # divisible by 4: the 2D RoPE splits it over height and width
            num_attention_heads=6,  # divisible by 2 and 3: room for sequence-parallel degrees
            text_embed_dim=glyph_config.d_model,
            time_embed_dim=16,
            condition_dim=8,
            prior_vq_quantizer_codebook_size=CODEBOOK,
        )
        vae = AutoencoderKL(
            block_out_channels=(8, 8, 16, 16),  # four levels: the 8x scale of the real VAE
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            latent_channels=4,
            norm_num_groups=4,
            layers_per_block=1,
            sample_size=64,
            # Not the identity, so the pipeline's latent (de)normalisation is exercised.
            latents_mean=[0.1, -0.1, 0.05, 0.0],
            latents_std=[1.0, 0.9, 1.1, 1.2],
        )
    vision_language_encoder.generation_config = GenerationConfig(
        bos_token_id=IMAGE_START_ID, eos_token_id=IMAGE_END_ID, pad_token_id=vocab["<pad>"]
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        base_shift=0.25,
        max_shift=0.75,
        base_image_seq_len=256,
        use_dynamic_shifting=True,
        time_shift_type="linear",
    )
    for model in (vision_language_encoder, text_encoder, transformer, vae):
        model.eval()
    pipe = GlmImagePipeline(
        tokenizer=glyph_tokenizer,
        processor=processor,
        text_encoder=text_encoder,
        vision_language_encoder=vision_language_encoder,
        vae=vae,
        transformer=transformer,
        scheduler=scheduler,
    )
    ensure_i2i_compat(pipe)
    return pipe

"""A tiny LLaVA-OneVision base (llava_onevision) built with the config fields of
llava-hf/llava-onevision-qwen2-0.5b-ov-hf, shrunk, and a real Qwen byte-level BPE tokenizer.

The fields, and where they come from:
- transformers 5.24's `LlavaOnevisionConfig` defaults (its docstring checkpoint is the 7b-ov-hf; the 0.5b
  has the same multimodal fields): SigLIP tower (`vision_use_head` False, layer -1, "full" features: no
  CLS to drop), gelu projector with bias, `vision_aspect_ratio` "anyres_max_9", and the 6x6 grid of
  pinpoints in multiples of the tower's side (384 px there; the tiny side here).
- the 0.5b's hub card, not verifiable offline: Qwen2 text model with tied embeddings (the 7b unties
  them), 14 heads over 2 KV heads (here 4 over 2), rope_theta 1e6, rms_norm_eps 1e-6, the padded
  151936-row vocabulary, and the image processor's SigLIP mean/std of 0.5.
- the tokenizer is npm's Qwen3 one (`real_tokenizers` "qwen3"), standing in for Qwen2's: the same
  pre-tokenizer and ChatML specials (`<|im_start|>`, `<|im_end|>` = 151644/151645, as in Qwen2), a
  few more added tokens, so `<image>`/`<video>` get 151669/151670 instead of Qwen2's 151646/151647 and
  the config's image_token_index follows the tokenizer.
The first image samples are re-saved at several aspect ratios: their grids (and so their token counts)
differ, and the largest one's 6x6 grid is scaled down by anyres_max_9.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image
from real_tokenizers import load_real_tokenizer

from llava_cluster.rundir import atomic_write_bytes, atomic_write_json
from llava_cluster.tiny.build import TinyPaths
from llava_cluster.tiny.task import make_samples

SIDE, PATCH = 28, 7  # the tower's input side and patch (384 and 14 there): 4x4 = 16 features per tile
QWEN2_VOCAB_ROWS = 151936
VAL_SAMPLES = 6
# (width, height): 1x1 grid, 1x3 wide, 3x1 tall, 2x2, and 6x6 (its 24x24 features scaled to 12x12)
ASPECTS = ((28, 28), (84, 28), (28, 84), (50, 45), (168, 168))


def pinpoints(side: int) -> list[list[int]]:
    return [[h * side, w * side] for h in range(1, 7) for w in range(1, 7)]


def build_processor(tokenizer):
    from transformers import LlavaOnevisionImageProcessorPil

    from llava_cluster.model.onevision_processor import images_only_processor_class

    image_processor = LlavaOnevisionImageProcessorPil(size={"height": SIDE, "width": SIDE},
                                                      image_grid_pinpoints=pinpoints(SIDE),
                                                      image_mean=[0.5] * 3, image_std=[0.5] * 3)
    return images_only_processor_class()(image_processor=image_processor, tokenizer=tokenizer,
                                         num_image_tokens=(SIDE // PATCH) ** 2, vision_feature_select_strategy="full",
                                         vision_aspect_ratio="anyres_max_9")


def build_model(tokenizer, seed: int = 0):
    import torch
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        Qwen2Config,
        SiglipVisionConfig,
    )

    text = Qwen2Config(vocab_size=QWEN2_VOCAB_ROWS, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, rope_theta=1e6, rms_norm_eps=1e-6,
                       max_position_embeddings=2048, tie_word_embeddings=True, use_sliding_window=False,
                       bos_token_id=None, eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
                       pad_token_id=tokenizer.pad_token_id)
    vision = SiglipVisionConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                image_size=SIDE, patch_size=PATCH, vision_use_head=False)
    config = LlavaOnevisionConfig(
        vision_config=vision, text_config=text, image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"), projector_hidden_act="gelu",
        vision_feature_select_strategy="full", vision_feature_layer=-1, image_grid_pinpoints=pinpoints(SIDE),
        vision_aspect_ratio="anyres_max_9", tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    return LlavaOnevisionForConditionalGeneration._from_config(config, dtype=torch.float32).eval()


def build_tiny_onevision(out: Path, samples: int = 24) -> TinyPaths:
    """DIR/model (checkpoint + processor) and DIR/data/{train,val}.json + images/ (shapes task)."""
    tokenizer = load_real_tokenizer("qwen3", extra_special=("<image>", "<video>"))
    model, processor = build_model(tokenizer), build_processor(tokenizer)
    model.save_pretrained(out / "model")
    processor.save_pretrained(out / "model")
    images = out / "data" / "images"
    images.mkdir(parents=True)
    task = make_samples(samples, seed=3)
    for sample in task:
        if sample.png is not None:
            atomic_write_bytes(images / sample.record["image"], sample.png)
    for sample, size in zip([s for s in task if s.png is not None], ASPECTS, strict=False):
        path = images / sample.record["image"]
        with Image.open(path) as img:
            img.convert("RGB").resize(size).save(path)
    records = [s.record for s in task]
    paths = TinyPaths(model=out / "model", train=out / "data" / "train.json", val=out / "data" / "val.json",
                      images=images)
    atomic_write_json(paths.train, records[:-VAL_SAMPLES])  # each sample has its own image: disjoint
    atomic_write_json(paths.val, records[-VAL_SAMPLES:])
    return paths

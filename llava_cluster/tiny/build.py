"""A tiny random-weight LLaVA plus a dataset it can learn, built offline in a few seconds.

Tests, the demo and CI need a real `LlavaForConditionalGeneration` (so every code path is the one a
13B run takes) without downloading anything: the tokenizer is trained here with `tokenizers`, the
weights are random (seeded), and the data is the synthetic shapes task of `tiny.task`.
`family="llava_next"` builds a `LlavaNextForConditionalGeneration` instead, with the config fields of
llava-hf/llava-v1.6-mistral-7b-hf (Mistral text model, CLIP tower, "default" features from layer -2,
the five anyres pinpoints scaled from 336 px to the tiny tower's side, image_newline), so the task's
32-64 px images of several aspect ratios get different tile grids and token counts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from llava_cluster.data.templates import TEMPLATES
from llava_cluster.model.tokens import IMAGE_TOKEN
from llava_cluster.rundir import atomic_dir, atomic_write_bytes, atomic_write_json
from llava_cluster.tiny.task import make_samples

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")
SPECIAL_TOKENS = (UNK, BOS, EOS, PAD, IMAGE_TOKEN, *CHATML_TOKENS)

VAL_FRACTION = 0.1
HEAD_ROW_NORM = 2.0
VOCAB_SIZE = 1000


@dataclass(frozen=True)
class Shape:
    """Sizes of the random model: the tiny default, or LLaVA-1.5-7B's for smoke runs on GPUs."""

    text: dict[str, int]
    vision: dict[str, int]
    image_size: int
    patch_size: int
    vocab_padded_to: int | None = None  # llava-hf pads the vocabulary rows (32002 -> 32064)

    @property
    def image_seq_length(self) -> int:
        return (self.image_size // self.patch_size) ** 2  # CLS is dropped by the "default" feature strategy


MODEL_SHAPES = {
    # Sized so that LoRA r=32 + trainable projector, AdamW 2e-3, batch 8, learns the task in ~300 steps
    # on one CPU core: val exact match goes from 0% to ~75% (colour 100%, shape ~60%, text-only ~75%).
    "tiny": Shape(text=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4),
                  vision=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4),
                  image_size=32, patch_size=8),
    # LLaVA-1.5-7B: Vicuna-7B + CLIP ViT-L/14 at 336 px; random weights, built in bf16 on a GPU in seconds.
    "7b": Shape(text=dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32),
                vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16),
                image_size=336, patch_size=14, vocab_padded_to=32064),
}
TINY = MODEL_SHAPES["tiny"]
IMAGE_SEQ_LENGTH = TINY.image_seq_length


@dataclass(frozen=True)
class TinyPaths:
    model: Path
    train: Path
    val: Path
    images: Path


def _corpus(records: list[dict]) -> list[str]:
    """Every conversation rendered with every template, so prompts of all templates tokenize compactly."""
    texts = []
    for rec in records:
        turns = [("user" if t["from"] == "human" else "assistant", t["value"]) for t in rec["conversations"]]
        texts += [t for _, t in turns]
        texts += [tpl.render(turns).text for tpl in TEMPLATES.values()]
    for special in SPECIAL_TOKENS:  # specials are whole tokens: keep them out of the BPE merges
        texts = [t.replace(special, " ") for t in texts]
    return texts


def train_tokenizer(texts: list[str], vocab_size: int = VOCAB_SIZE):
    """Byte-level BPE with a BOS-prepending post-processor and trimmed offsets.

    Offsets must point at the word, not at its leading space: label masking maps the character spans
    of each reply to tokens through these offsets.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=True),
        processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]),
    ])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        extra_special_tokens=[IMAGE_TOKEN, *CHATML_TOKENS],
        model_max_length=2048,
        padding_side="right",
    )


# llava-v1.6's anyres grid, in units of the vision tower's input side (336 px there).
NEXT_PINPOINTS = ((1, 2), (2, 1), (2, 2), (3, 1), (1, 3))


def next_pinpoints(shape: Shape) -> list[list[int]]:
    return [[h * shape.image_size, w * shape.image_size] for h, w in NEXT_PINPOINTS]


def build_processor(tokenizer, shape: Shape = TINY, family: str = "llava"):
    from transformers import CLIPImageProcessor, LlavaProcessor

    side = shape.image_size
    if family == "llava_next":
        from transformers import LlavaNextImageProcessorPil, LlavaNextProcessor

        image_processor = LlavaNextImageProcessorPil(
            size={"shortest_edge": side}, crop_size={"height": side, "width": side},
            image_grid_pinpoints=next_pinpoints(shape))
        return LlavaNextProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=shape.patch_size,
                                  vision_feature_select_strategy="default", num_additional_image_tokens=1)
    image_processor = CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=shape.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )


def build_model(tokenizer, seed: int = 0, shape: Shape = TINY, device: str = "cpu", dtype: str = "fp32",
                family: str = "llava"):
    """Random weights, the same for the same seed, tokenizer, shape and family."""
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    from llava_cluster.precision import torch_dtype

    text_config, gqa = LlamaConfig, {}
    if family == "llava_next":
        from transformers import MistralConfig as text_config

        gqa = {"num_key_value_heads": max(1, shape.text["num_attention_heads"] // 4)}  # Mistral-7B: 32 / 8
    text = text_config(
        vocab_size=max(len(tokenizer), shape.vocab_padded_to or 0),
        max_position_embeddings=4096 if shape.vocab_padded_to else 2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        **shape.text,
        **gqa,
    )
    vision = CLIPVisionConfig(image_size=shape.image_size, patch_size=shape.patch_size, **shape.vision)
    config_class, model_class, extra = LlavaConfig, LlavaForConditionalGeneration, {}
    if family == "llava_next":
        from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

        config_class, model_class = LlavaNextConfig, LlavaNextForConditionalGeneration
        extra = {"image_grid_pinpoints": next_pinpoints(shape), "projector_hidden_act": "gelu",
                 "tie_word_embeddings": False}
    config = config_class(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=shape.image_seq_length,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        pad_token_id=tokenizer.pad_token_id,
        **extra,
    )
    torch.manual_seed(seed)
    with torch.device(device):
        model = model_class._from_config(config, dtype=torch_dtype(dtype)).eval()
    # At the usual 0.02 init the output head cannot turn a normalised hidden state into logits above
    # ~1, so LoRA (which leaves lm_head frozen, as in a real fine-tune) could never make the model
    # confident. Rows of norm ~2, like a trained head's, fix that and keep everything random.
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, HEAD_ROW_NORM / text.hidden_size**0.5)
    return model


def build_tiny(out_dir: Path, samples: int = 600, seed: int = 0, shape: str = "tiny", device: str = "cpu",
               dtype: str = "fp32", family: str = "llava") -> TinyPaths:
    """Write DIR/model (HF LLaVA checkpoint + processor) and DIR/data/{train,val}.json + images/.

    `shape` "7b" writes LLaVA-1.5-7B's sizes (build it with device "cuda" and dtype "bf16": 14 GB);
    `family` "llava_next" a LLaVA-NeXT model of that shape (see the module docstring)."""
    out_dir = Path(out_dir)
    task = make_samples(samples, seed)
    n_val = max(1, round(len(task) * VAL_FRACTION)) if len(task) > 1 else 0
    records = [s.record for s in task]

    tokenizer = train_tokenizer(_corpus(records))
    processor = build_processor(tokenizer, MODEL_SHAPES[shape], family)
    model = build_model(tokenizer, seed, MODEL_SHAPES[shape], device, dtype, family)
    with atomic_dir(out_dir / "model") as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)

    data = out_dir / "data"
    images = data / "images"
    images.mkdir(parents=True, exist_ok=True)
    for s in task:
        if s.png is not None:
            atomic_write_bytes(images / s.record["image"], s.png)
    paths = TinyPaths(model=out_dir / "model", train=data / "train.json", val=data / "val.json", images=images)
    # Each sample has its own image, so a split by sample keeps train and val images disjoint.
    atomic_write_json(paths.train, records[: len(records) - n_val])
    atomic_write_json(paths.val, records[len(records) - n_val :])
    return paths

"""A tiny random-weight LLaVA plus a dataset it can learn, built offline in a few seconds.

Tests, the demo and CI need a real `LlavaForConditionalGeneration` (so every code path is the one a
13B run takes) without downloading anything: the tokenizer is trained here with `tokenizers`, the
weights are random (seeded), and the data is the synthetic shapes task of `tiny_task`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from llava_cluster.data.templates import IMAGE_TOKEN, TEMPLATES
from llava_cluster.model.tiny_task import make_samples
from llava_cluster.rundir import atomic_dir, atomic_write_bytes, atomic_write_json

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")
SPECIAL_TOKENS = (UNK, BOS, EOS, PAD, IMAGE_TOKEN, *CHATML_TOKENS)

IMAGE_SIZE = 32
PATCH_SIZE = 8
IMAGE_SEQ_LENGTH = (IMAGE_SIZE // PATCH_SIZE) ** 2  # CLS is dropped by the "default" feature strategy
VOCAB_SIZE = 1000
VAL_FRACTION = 0.1
HEAD_ROW_NORM = 2.0

# Sized so that LoRA r=32 + trainable projector, AdamW 2e-3, batch 8, learns the task in ~300 steps
# on one CPU core: val exact match goes from 0% to ~75% (colour 100%, shape ~60%, text-only ~75%).
TEXT_SIZE = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4)
VISION_SIZE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)


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


def build_processor(tokenizer):
    from transformers import CLIPImageProcessor, LlavaProcessor

    image_processor = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )


def build_model(tokenizer, seed: int = 0):
    """Random fp32 weights, the same for the same seed and tokenizer."""
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    text = LlamaConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        **TEXT_SIZE,
    )
    vision = CLIPVisionConfig(image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, **VISION_SIZE)
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=IMAGE_SEQ_LENGTH,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).to(torch.float32).eval()
    # At the usual 0.02 init the output head cannot turn a normalised hidden state into logits above
    # ~1, so LoRA (which leaves lm_head frozen, as in a real fine-tune) could never make the model
    # confident. Rows of norm ~2, like a trained head's, fix that and keep everything random.
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, HEAD_ROW_NORM / text.hidden_size**0.5)
    return model


def build_tiny(out_dir: Path, samples: int = 600, seed: int = 0) -> TinyPaths:
    """Write DIR/model (HF LLaVA checkpoint + processor) and DIR/data/{train,val}.json + images/."""
    out_dir = Path(out_dir)
    task = make_samples(samples, seed)
    n_val = max(1, round(len(task) * VAL_FRACTION)) if len(task) > 1 else 0
    records = [s.record for s in task]

    tokenizer = train_tokenizer(_corpus(records))
    processor = build_processor(tokenizer)
    model = build_model(tokenizer, seed)
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

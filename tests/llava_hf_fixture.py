"""A faithful miniature of llava-hf/llava-1.5-7b-hf, built offline: the same file set and fields, only smaller.

The suite's own tiny model is saved by our own code (fp32, one shard, transformers' newer key layout,
a locally trained byte-level BPE), so it cannot show what breaks on the checkpoints users actually
start from. This folder is written the way the hub's llava-1.5 checkpoints are:

    config.json                     model_type llava, LlavaForConditionalGeneration, <image> 32000,
                                    pad 32001, vocab 32064, CLIP 336 px / patch 14 (576 image tokens),
                                    vision_feature_layer -2, strategy "default", gelu projector
    generation_config.json
    model-0000N-of-00003.safetensors  fp16, sharded, keys in the hub's older layout
    model.safetensors.index.json      (language_model.model.*, language_model.lm_head.*,
                                     vision_tower.vision_model.*, multi_modal_projector.*)
    preprocessor_config.json        CLIPImageProcessor: CLIP mean/std, crop 336, shortest edge 336, bicubic
    processor_config.json           patch 14, strategy default, 1 additional image token
    chat_template.json
    tokenizer.json, tokenizer_config.json, special_tokens_map.json, added_tokens.json
                                    the real Llama-2 SentencePiece vocabulary plus <image> and <pad>

Only the widths and depths are shrunk (hidden 32, 2 layers; vision hidden 32, 2 layers). The cost that
remains is the real one: ~680 positions per sample (576 image tokens) times the 32064-row output head;
on a CPU without bf16 instructions a bf16 step of one sample takes seconds, an fp32 one a fraction. The data are the tiny model's shapes
task (`llava_cluster.tiny.task`); the processor resizes its small images to 336 px.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from real_tokenizers import real_tokenizer_dir

IMAGE_TOKEN_INDEX = 32000
PAD_TOKEN_INDEX = 32001
VOCAB_SIZE = 32064  # llava-hf pads the 32002-token vocabulary to a multiple of 64
IMAGE_SIZE = 336
PATCH_SIZE = 14
IMAGE_SEQ_LENGTH = (IMAGE_SIZE // PATCH_SIZE) ** 2  # 576: CLS dropped by the "default" strategy
SHARDS = 3
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

# The 7B's text_config leaves the Llama sizes at their defaults (4096 hidden, 32 layers); here they are
# written out, shrunk. Everything else is the real file's value.
TEXT_CONFIG = {
    "_name_or_path": "lmsys/vicuna-7b-v1.5",
    "architectures": ["LlamaForCausalLM"],
    "max_position_embeddings": 4096,
    "model_type": "llama",
    "rms_norm_eps": 1e-05,
    "torch_dtype": "float16",
    "vocab_size": VOCAB_SIZE,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
}
VISION_CONFIG = {
    "hidden_size": 32,
    "image_size": IMAGE_SIZE,
    "intermediate_size": 64,
    "model_type": "clip_vision_model",
    "num_attention_heads": 2,
    "num_hidden_layers": 2,
    "patch_size": PATCH_SIZE,
    "projection_dim": 32,
    "vocab_size": 32000,
}
CONFIG = {
    "architectures": ["LlavaForConditionalGeneration"],
    "ignore_index": -100,
    "image_seq_length": IMAGE_SEQ_LENGTH,
    "image_token_index": IMAGE_TOKEN_INDEX,
    "model_type": "llava",
    "pad_token_id": PAD_TOKEN_INDEX,
    "projector_hidden_act": "gelu",
    "text_config": TEXT_CONFIG,
    "tie_word_embeddings": False,
    "torch_dtype": "float16",
    "transformers_version": "4.36.0.dev0",
    "vision_config": VISION_CONFIG,
    "vision_feature_layer": -2,
    "vision_feature_select_strategy": "default",
    "vocab_size": VOCAB_SIZE,
}
PREPROCESSOR_CONFIG = {
    "crop_size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE},
    "do_center_crop": True,
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": CLIP_MEAN,
    "image_processor_type": "CLIPImageProcessor",
    "image_std": CLIP_STD,
    "processor_class": "LlavaProcessor",
    "resample": 3,
    "rescale_factor": 0.00392156862745098,
    "size": {"shortest_edge": IMAGE_SIZE},
}
PROCESSOR_CONFIG = {
    "image_token": "<image>",
    "num_additional_image_tokens": 1,
    "patch_size": PATCH_SIZE,
    "processor_class": "LlavaProcessor",
    "vision_feature_select_strategy": "default",
}
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
    "{% endif %}{# Render all images first #}{% for content in message['content'] | selectattr('type', "
    "'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != "
    "'assistant' %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', "
    "'equalto', 'text') %}{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
GENERATION_CONFIG = {"_from_model_config": True, "bos_token_id": 1, "eos_token_id": 2,
                     "pad_token_id": PAD_TOKEN_INDEX, "transformers_version": "4.36.0.dev0"}


def _added(content: str) -> dict:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False, "special": True}


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def write_tokenizer(out: Path) -> None:
    """The real Llama-2 tokenizer.json with `<image>` (32000) and `<pad>` (32001) added, and the
    tokenizer_config / special_tokens_map / added_tokens files in llava-hf's form."""
    source = real_tokenizer_dir("llama2")
    tokenizer = json.loads((source / "tokenizer.json").read_text())
    assert len(tokenizer["model"]["vocab"]) == IMAGE_TOKEN_INDEX, "not the 32000-token Llama-2 vocabulary"
    extra = {IMAGE_TOKEN_INDEX: "<image>", PAD_TOKEN_INDEX: "<pad>"}
    tokenizer["added_tokens"] += [{"id": i, **_added(c)} for i, c in extra.items()]
    _write_json(out / "tokenizer.json", tokenizer)
    decoder = {str(t["id"]): {k: v for k, v in t.items() if k != "id"} for t in tokenizer["added_tokens"]}
    _write_json(out / "tokenizer_config.json", {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": decoder,
        "bos_token": "<s>",
        "clean_up_tokenization_spaces": False,
        "eos_token": "</s>",
        "legacy": False,
        "model_max_length": 1000000000000000019884624838656,
        "pad_token": "<pad>",
        "padding_side": "left",
        "processor_class": "LlavaProcessor",
        "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer",
        "trust_remote_code": False,
        "unk_token": "<unk>",
        "use_default_system_prompt": False,
    })
    _write_json(out / "special_tokens_map.json", {
        "bos_token": _added("<s>"), "eos_token": _added("</s>"), "pad_token": _added("<pad>"),
        "unk_token": _added("<unk>"),
    })
    _write_json(out / "added_tokens.json", {c: i for i, c in sorted(extra.items())})


def hub_key(name: str) -> str:
    """transformers 5's in-memory parameter name -> the key llava-hf's safetensors files use."""
    for new, old in (("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head."),
                     ("model.vision_tower.", "vision_tower."), ("model.multi_modal_projector.", "multi_modal_projector.")):
        if name.startswith(new):
            return old + name.removeprefix(new)
    raise ValueError(f"unexpected LLaVA parameter {name}")


def write_weights(out: Path, seed: int = 0) -> None:
    """Random weights (seeded), fp16, split over SHARDS files with the hub's index."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    from llava_cluster.tiny.build import HEAD_ROW_NORM

    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(LlavaConfig.from_pretrained(str(out)))
    with torch.no_grad():  # a trained head's row norm, so LoRA can make the model confident (see tiny.py)
        model.lm_head.weight.normal_(0.0, HEAD_ROW_NORM / TEXT_CONFIG["hidden_size"] ** 0.5)
    state = {hub_key(k): v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    keys = sorted(state)
    weight_map, total = {}, 0
    for i in range(SHARDS):
        shard = f"model-{i + 1:05d}-of-{SHARDS:05d}.safetensors"
        part = {k: state[k] for k in keys[i::SHARDS]}
        save_file(part, str(out / shard), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, shard))
        total += sum(t.numel() * t.element_size() for t in part.values())
    _write_json(out / "model.safetensors.index.json",
                {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))})


@dataclass(frozen=True)
class HfPaths:
    model: Path
    train: Path
    val: Path
    images: Path


def write_data(out: Path, samples: int, seed: int = 0) -> tuple[Path, Path, Path]:
    """The shapes task (train/val JSON + PNGs); a fifth of the samples held out."""
    from llava_cluster.tiny.task import make_samples

    task = make_samples(samples, seed)
    images = out / "images"
    images.mkdir(parents=True)
    for s in task:
        if s.png is not None:
            (images / s.record["image"]).write_bytes(s.png)
    records = [s.record for s in task]
    n_val = max(1, samples // 5)
    train, val = out / "train.json", out / "val.json"
    train.write_text(json.dumps(records[:-n_val]))
    val.write_text(json.dumps(records[-n_val:]))
    return train, val, images


def build_llava_hf(out_dir: Path, samples: int = 24, seed: int = 0) -> HfPaths:
    """Write OUT/llava-1.5-mini-hf (the checkpoint) and OUT/data (train.json, val.json, images/)."""
    out_dir = Path(out_dir)
    model = out_dir / "llava-1.5-mini-hf"
    model.mkdir(parents=True)
    _write_json(model / "config.json", CONFIG)
    _write_json(model / "generation_config.json", GENERATION_CONFIG)
    _write_json(model / "preprocessor_config.json", PREPROCESSOR_CONFIG)
    _write_json(model / "processor_config.json", PROCESSOR_CONFIG)
    _write_json(model / "chat_template.json", {"chat_template": CHAT_TEMPLATE})
    write_tokenizer(model)
    write_weights(model, seed)
    train, val, images = write_data(out_dir / "data", samples, seed)
    return HfPaths(model=model, train=train, val=val, images=images)

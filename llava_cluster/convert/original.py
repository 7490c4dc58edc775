"""`llava-cluster convert original`: an original-layout LLaVA-1.5 checkpoint (haotian-liu/LLaVA) -> HF LLaVA.

Original checkpoints are a flat Llama config with `mm_*` keys, Llama weight names plus
`model.mm_projector.{0,2}`, a tokenizer without `<image>`/`<pad>`, and no vision tower (CLIP is loaded
by name at run time, so the user hands us a local CLIP folder). We write a Hugging Face native
`LlavaForConditionalGeneration` + `LlavaProcessor` once, so nothing downstream needs the original code.

Pickles (`*.bin`) are read only with `torch.load(weights_only=True)` and only when the caller allows it;
everything written is safetensors.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from llava_cluster.errors import UserError
from llava_cluster.model.tokens import IMAGE_TOKEN
from llava_cluster.precision import torch_dtype
from llava_cluster.rundir import atomic_dir

PAD_TOKEN = "<pad>"
ORIGINAL_ARCHITECTURES = ("LlavaLlamaForCausalLM",)
SELECT_FEATURE = {"patch": "default", "cls_patch": "full"}
# Original LM/projector names -> in-memory LlavaForConditionalGeneration names.
_ORIGINAL_RENAMES = (
    (r"model\.mm_projector\.0\.(weight|bias)", r"model.multi_modal_projector.linear_1.\1"),
    (r"model\.mm_projector\.2\.(weight|bias)", r"model.multi_modal_projector.linear_2.\1"),
    (r"model\.vision_tower\.vision_tower\.vision_model\.(.+)", r"model.vision_tower.\1"),
    (r"model\.(embed_tokens|norm|layers)\.(.+)", r"model.language_model.\1.\2"),
    (r"lm_head\.weight", r"lm_head.weight"),
)
# Buffers older transformers saved that current models recompute.
_DROPPED = re.compile(r".*rotary_emb\.inv_freq|.*position_ids")


def is_original_layout(config: dict[str, Any]) -> bool:
    """An original-repo LLaVA config: flat Llama keys plus `mm_vision_tower`, no `text_config`."""
    archs = config.get("architectures") or []
    return "text_config" not in config and (
        "mm_vision_tower" in config or any(a in ORIGINAL_ARCHITECTURES for a in archs)
    )


def original_name(key: str) -> str | None:
    """The in-memory name of an original checkpoint key; None for buffers we drop."""
    if _DROPPED.fullmatch(key):
        return None
    for pattern, repl in _ORIGINAL_RENAMES:
        if re.fullmatch(pattern, key):
            return re.sub(pattern, repl, key)
    raise UserError(
        f"unexpected tensor {key!r} in the original checkpoint: only LLaVA-1.5 (Llama LM + mlp2x_gelu "
        "projector) checkpoints are supported"
    )


def read_weights(folder: Path, allow_pickle: bool) -> Iterator[tuple[str, Any]]:
    """(key, tensor) of a checkpoint folder: safetensors if there are any, else pickled `*.bin`."""
    import torch
    from safetensors import safe_open

    st = sorted(folder.glob("*.safetensors"))
    if st:
        for path in st:
            with safe_open(path, "pt") as fh:
                for key in fh.keys():
                    yield key, fh.get_tensor(key)
        return
    pickles = sorted(p for p in folder.glob("*.bin") if p.name != "training_args.bin")
    if not pickles:
        raise UserError(f"{folder}: no *.safetensors or *.bin weight files")
    if not allow_pickle:
        raise UserError(
            f"{folder}: the weights are pickles ({pickles[0].name}); a pickle can run code when loaded. "
            "Pass --allow-pickle to read them with torch.load(weights_only=True), which loads tensors only."
        )
    for path in pickles:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as err:
            raise UserError(f"{path}: not a plain tensor pickle ({err.__class__.__name__}: {err})") from None
        yield from state.items()


def _vision_config(clip_dir: Path):
    from transformers import CLIPConfig, CLIPVisionConfig

    cfg_path = clip_dir / "config.json"
    if not cfg_path.is_file():
        raise UserError(f"--vision-tower {clip_dir}: no config.json (give a local CLIP checkpoint folder)")
    model_type = json.loads(cfg_path.read_text()).get("model_type")
    if model_type == "clip":
        return CLIPConfig.from_pretrained(clip_dir).vision_config
    if model_type == "clip_vision_model":
        return CLIPVisionConfig.from_pretrained(clip_dir)
    raise UserError(f"--vision-tower {clip_dir}: model_type {model_type!r} is not a CLIP checkpoint")


def _vision_weights(clip_dir: Path, allow_pickle: bool) -> Iterator[tuple[str, Any]]:
    """The vision tower's weights of a CLIPModel or CLIPVisionModel folder, as in-memory names."""
    for key, tensor in read_weights(clip_dir, allow_pickle):
        if _DROPPED.fullmatch(key):
            continue
        if key.startswith("vision_model."):
            yield "model.vision_tower." + key.removeprefix("vision_model."), tensor
        elif not key.startswith(("text_model.", "visual_projection", "text_projection", "logit_scale")):
            yield "model.vision_tower." + key, tensor


def _text_config(flat: dict[str, Any], vocab_size: int, pad_token_id: int):
    from transformers import LlamaConfig

    llama_keys = set(LlamaConfig().to_dict()) | {"rope_scaling", "rope_theta"}
    skip = {"architectures", "_name_or_path", "model_type", "transformers_version", "dtype", "torch_dtype"}
    kwargs = {k: v for k, v in flat.items() if k in llama_keys and k not in skip}
    if kwargs.get("rope_scaling") is None:
        kwargs.pop("rope_scaling", None)
    return LlamaConfig(**{**kwargs, "vocab_size": vocab_size, "pad_token_id": pad_token_id,
                          "tie_word_embeddings": False})


def _load_tokenizer(src: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(src)
    except Exception as err:
        raise UserError(
            f"{src}: cannot load the tokenizer ({err.__class__.__name__}: {err}); expected tokenizer.json or "
            "a SentencePiece tokenizer.model with its tokenizer_config.json"
        ) from None


def _add_tokens(tokenizer) -> list[str]:
    """Add `<image>` and a `<pad>` pad token where missing (the original pads with <unk>)."""
    added = []
    vocab = tokenizer.get_vocab()
    if IMAGE_TOKEN not in vocab:
        tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
        added.append(IMAGE_TOKEN)
    if PAD_TOKEN not in vocab:
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
        added.append(PAD_TOKEN)
    else:
        tokenizer.pad_token = PAD_TOKEN
    return added


def _resize_rows(weight, rows: int):
    """Grow an embedding/lm_head matrix to `rows`; new rows = the mean of the existing rows, so new
    tokens start as an 'average' token instead of random noise that would dominate the softmax."""
    import torch

    extra = rows - weight.shape[0]
    if extra <= 0:
        return weight
    mean = weight.float().mean(dim=0, keepdim=True).to(weight.dtype)
    return torch.cat([weight, mean.expand(extra, -1)], dim=0)


def check_original_config(src: Path) -> dict[str, Any]:
    cfg_path = src / "config.json"
    if not cfg_path.is_file():
        raise UserError(f"{src}: no config.json")
    flat = json.loads(cfg_path.read_text())
    if not is_original_layout(flat):
        raise UserError(f"{src}: not an original-layout LLaVA checkpoint (no mm_vision_tower in config.json)")
    problems = []
    if flat.get("mm_projector_type", "linear") != "mlp2x_gelu":
        problems.append(f"mm_projector_type={flat.get('mm_projector_type', 'linear')!r} (need 'mlp2x_gelu')")
    if flat.get("mm_use_im_start_end") or flat.get("mm_use_im_patch_token"):
        problems.append("mm_use_im_start_end/mm_use_im_patch_token (image start/end tokens)")
    if flat.get("mm_vision_select_feature", "patch") not in SELECT_FEATURE:
        problems.append(f"mm_vision_select_feature={flat['mm_vision_select_feature']!r}")
    if problems:
        raise UserError(f"{src}: not convertible to HF LlavaForConditionalGeneration: {'; '.join(problems)}")
    return flat


def convert_original(
    src: Path, vision_tower: Path, out: Path, allow_pickle: bool = False, pad_to: int = 64,
    dtype: str | None = None,
) -> dict[str, Any]:
    """Write `out` as a native HF LLaVA checkpoint + processor; returns what was done (also saved as
    out/conversion.json). `pad_to` rounds the vocabulary up (64 suits tensor cores; 1 keeps it)."""
    import torch
    from transformers import CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    src, vision_tower, out = Path(src), Path(vision_tower), Path(out)
    flat = check_original_config(src)
    vision_cfg = _vision_config(vision_tower)
    if flat.get("mm_hidden_size", vision_cfg.hidden_size) != vision_cfg.hidden_size:
        raise UserError(
            f"--vision-tower {vision_tower}: hidden size {vision_cfg.hidden_size} != the checkpoint's "
            f"mm_hidden_size {flat['mm_hidden_size']} (it was trained with {flat.get('mm_vision_tower')})"
        )
    if not (vision_tower / "preprocessor_config.json").is_file():
        raise UserError(f"--vision-tower {vision_tower}: no preprocessor_config.json (CLIP image processor)")

    tokenizer = _load_tokenizer(src)
    added = _add_tokens(tokenizer)

    state: dict[str, Any] = {}
    for key, tensor in read_weights(src, allow_pickle):
        name = original_name(key)
        if name is not None:
            state[name] = tensor
    if "model.vision_tower.embeddings.patch_embedding.weight" not in state:
        state.update(_vision_weights(vision_tower, allow_pickle))
    lm_dtype = state["model.language_model.embed_tokens.weight"].dtype
    target = torch_dtype(dtype) if dtype else lm_dtype
    state = {k: v.to(target) if v.is_floating_point() else v for k, v in state.items()}

    old_vocab = state["model.language_model.embed_tokens.weight"].shape[0]
    needed = max(old_vocab, len(tokenizer))
    vocab = -(-needed // pad_to) * pad_to
    for key in ("model.language_model.embed_tokens.weight", "lm_head.weight"):
        state[key] = _resize_rows(state[key], vocab)

    strategy = SELECT_FEATURE[flat.get("mm_vision_select_feature", "patch")]
    patches = (vision_cfg.image_size // vision_cfg.patch_size) ** 2
    config = LlavaConfig(
        text_config=_text_config(flat, vocab, tokenizer.pad_token_id),
        vision_config=vision_cfg,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=patches + (1 if strategy == "full" else 0),
        vision_feature_layer=flat.get("mm_vision_select_layer", -2),
        vision_feature_select_strategy=strategy,
        projector_hidden_act="gelu",
        multimodal_projector_bias=True,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    with torch.device("meta"):
        model = LlavaForConditionalGeneration._from_config(config, dtype=target)
    expected = set(model.state_dict())
    if set(state) != expected:
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        raise UserError(
            f"{src}: the weights do not make a LLaVA model: missing {missing[:3]}, unexpected {extra[:3]}"
        )
    model.load_state_dict(state, assign=True, strict=True)
    model.generation_config.pad_token_id = tokenizer.pad_token_id

    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor.from_pretrained(vision_tower),
        tokenizer=tokenizer,
        patch_size=vision_cfg.patch_size,
        vision_feature_select_strategy=strategy,
        num_additional_image_tokens=1,
    )
    report = {
        "source": str(src),
        "vision_tower": str(vision_tower),
        "added_tokens": added,
        "vocab_size": {"before": old_vocab, "after": vocab},
        "new_rows": "mean of the existing embedding / lm_head rows",
        "image_token_index": config.image_token_index,
        "pad_token_id": tokenizer.pad_token_id,
        "dtype": str(target).removeprefix("torch."),
        "image_aspect_ratio": flat.get("image_aspect_ratio", "pad"),
    }
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        (tmp / "conversion.json").write_text(json.dumps(report, indent=2) + "\n")
    return report

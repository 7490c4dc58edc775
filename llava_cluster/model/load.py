"""Load a Hugging Face LLaVA base model and its processor, full precision or 4-bit (QLoRA).

Every stage loads the base through here so that a wrong path, a non-LLaVA model or an
original-layout (haotian-liu/LLaVA) checkpoint fails at once with a message saying what to do,
instead of a transformers traceback or, worse, a silently random projector. The model class and
the 4-bit skip list are the family's (`family.py`), from config.json's model_type.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llava_cluster.errors import UserError
from llava_cluster.model.family import FAMILIES, Family, family_of, supported_list

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, ProcessorMixin

ORIGINAL_LAYOUT_KEYS = ("mm_vision_tower", "mm_projector_type", "mm_hidden_size")


def read_llava_config(path: str | Path) -> dict[str, Any]:
    """config.json of a native HF LLaVA folder, or a UserError that names the problem and the fix."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"model path {path} does not exist")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise UserError(f"{path} has no config.json: expected a Hugging Face model folder")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"{config_file} is not valid JSON: {err}") from None
    model_type = config.get("model_type")
    original = any(k in config for k in ORIGINAL_LAYOUT_KEYS) or (
        str(model_type).startswith("llava") and "text_config" not in config
    )
    if original:
        raise UserError(
            f"{path} is an original-layout LLaVA checkpoint (haotian-liu/LLaVA: "
            f"{', '.join(k for k in ORIGINAL_LAYOUT_KEYS if k in config) or 'flat ' + str(model_type) + ' config'}); "
            f"convert it first with `llava-cluster convert original {path} --vision-tower <CLIP folder> --out <folder>`"
        )
    if model_type not in FAMILIES:
        raise UserError(
            f"{path} is a {model_type!r} model, not a LLaVA one llava-cluster fine-tunes: "
            f"supported are {supported_list()}"
        )
    return config


def model_family(path: str | Path) -> Family:
    """The family of the model folder `path`, from its config.json."""
    return family_of(read_llava_config(path))


def template_for(path: str | Path, name: str | None = None) -> str:
    """`name`, or the default template of the model's family (`family.default_template`)."""
    from llava_cluster.model.family import default_template

    return name or default_template(read_llava_config(path))


def load_processor(path: str | Path) -> ProcessorMixin:
    """The family's processor (tokenizer + image processor) saved next to the model; OneVision's
    without its video processor (images only, no torchvision)."""
    if model_family(path).images_only_processor:
        from llava_cluster.model.onevision_processor import load_images_only

        processor = load_images_only(str(path))
    else:
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(str(path))
    if not hasattr(processor, "image_processor"):
        raise UserError(
            f"{path} has a tokenizer but no image processor (processor_config.json or "
            "preprocessor_config.json): save the LlavaProcessor next to the model"
        )
    return processor


def image_seq_length(processor_or_config: Any) -> int:
    """How many tokens one `<image>` becomes: patches of the (square) model input, +CLS if kept.

    Computed from the processor or the vision config rather than trusting `config.image_seq_length`,
    which older conversions leave at a default that does not match the vision tower.
    """
    obj = processor_or_config
    if hasattr(obj, "image_processor"):
        ip = obj.image_processor
        size = ip.crop_size if getattr(ip, "do_center_crop", False) else ip.size
        side = size.get("height") or size.get("shortest_edge")
        tokens = (side // obj.patch_size) ** 2 + (obj.num_additional_image_tokens or 0)
        return tokens - (1 if obj.vision_feature_select_strategy == "default" else 0)
    if hasattr(obj, "vision_config"):
        vision = obj.vision_config
        tokens = (vision.image_size // vision.patch_size) ** 2
        return tokens if obj.vision_feature_select_strategy == "default" else tokens + 1
    raise TypeError(f"expected a LlavaProcessor or a LlavaConfig, got {type(obj).__name__}")


def image_tokens(processor: Any, path: str | Path) -> Any:
    """The `family.ImageTokens` counter of the model at `path` with its processor."""
    from llava_cluster.model.family import ImageTokens

    return ImageTokens(processor, model_family(path))


def load_llava(
    path: str | Path,
    *,
    dtype: torch.dtype | None = None,
    load_in_4bit: bool = False,
    compute_dtype: torch.dtype | None = None,
    device_map: Any = None,
) -> PreTrainedModel:
    """The base model of its family's class in `dtype` (default float32); with `load_in_4bit`, the
    language model in NF4.

    4-bit is bitsandbytes NF4 with double quantization; the family's skip list (vision tower,
    projector, lm_head) stays in `dtype` (the projector is trained, quantizing the tower only loses accuracy).
    """
    family = model_family(path)
    import torch
    from transformers import BitsAndBytesConfig

    dtype = dtype or torch.float32
    kwargs: dict[str, Any] = {"dtype": dtype}
    if device_map is not None:
        kwargs["device_map"] = device_map
    if load_in_4bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype or dtype,
            llm_int8_skip_modules=list(family.skip_4bit),
        )
    return family.model_cls().from_pretrained(str(path), **kwargs)

"""LLaVA-OneVision's processor without its video processor: what llava-cluster loads for images.

transformers' `LlavaOnevisionProcessor` always builds a `LlavaOnevisionVideoProcessor`, and video
processors need torchvision, which is not a dependency here (the training images install torch only;
PyPI's torchvision wheel is the CUDA build and does not even import beside a CPU torch). Fine-tuning
here is images only, so this subclass holds the image processor and the tokenizer and nothing else:
`<image>` expansion and token counting are the stock class's own code (inherited), and what it saves
is the stock layout (it is named as the stock class), which `AutoProcessor` loads wherever
torchvision is installed (inference servers).
"""

from __future__ import annotations

from functools import cache
from typing import Any


@cache
def images_only_processor_class() -> type:
    """The class, built on first use so that importing this module does not import transformers."""
    from transformers import LlavaOnevisionProcessor

    class ImagesOnly(LlavaOnevisionProcessor):
        # ProcessorMixin takes its sub-processors and saved settings from this signature: the stock
        # one minus `video_processor` (the stock __init__ passes None for it, which is dropped).
        def __init__(self, image_processor: Any = None, tokenizer: Any = None, num_image_tokens: int | None = None,
                     vision_feature_select_strategy: str | None = None, chat_template: str | None = None,
                     image_token: str = "<image>", video_token: str = "<video>",
                     vision_aspect_ratio: str = "anyres_max_9", **kwargs: Any) -> None:
            super().__init__(image_processor, tokenizer, None, num_image_tokens, vision_feature_select_strategy,
                             chat_template, image_token, video_token, vision_aspect_ratio, **kwargs)

    ImagesOnly.__name__ = ImagesOnly.__qualname__ = LlavaOnevisionProcessor.__name__  # saves the stock layout
    return ImagesOnly


def load_images_only(path: str) -> Any:
    """The OneVision processor of a model folder (llava-hf layout, or one this class saved)."""
    return images_only_processor_class().from_pretrained(path)

"""The LLaVA model families llava-cluster fine-tunes, and everything that differs between them.

One table, read by every stage: the family comes from the base's `config.json` `model_type` (never
from a folder name), and loading, the trainable set, the 4-bit skip list, image-token counting and the
streaming merge's key map all come from its entry here.

  llava        LLaVA-1.5 (`LlavaForConditionalGeneration`): one fixed-size image -> a fixed token count
  llava_next   LLaVA-NeXT / v1.6 (`LlavaNextForConditionalGeneration`): any-resolution tiles chosen by
               `image_grid_pinpoints` from each image's size, so the token count depends on the image;
               `image_sizes` goes with `pixel_values`, and the learned `image_newline` vector (ends
               each row of tile features) is trained beside the projector, as in the original v1.6 recipe
  llava_onevision  LLaVA-OneVision (`LlavaOnevisionForConditionalGeneration`, Qwen2 + SigLIP): any-resolution
               as v1.6 on a 6x6 grid of pinpoints, but "anyres_max_9": a grid of more than ~9 tiles' features
               is scaled down to about 9 tiles' worth, and the base tile keeps every feature (SigLIP has no
               CLS; "full" strategy); image_newline trained beside the projector; ChatML; its processor is
               loaded without the video processor (`onevision_processor.py`)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from llava_cluster.errors import UserError

# Checkpoint keys as transformers writes them (the older layout) -> in-memory parameter names.
# A key matches an entry when it is the old name or starts with the old name and a dot.
_LLAVA_DISK_TO_MEMORY = (
    ("language_model.model", "model.language_model"),
    ("language_model.lm_head", "lm_head"),
    ("language_model", "model.language_model"),
    ("vision_tower.vision_model", "model.vision_tower"),
    ("vision_tower", "model.vision_tower"),
    ("multi_modal_projector", "model.multi_modal_projector"),
)


@dataclass(frozen=True)
class Family:
    model_type: str
    model_class: str  # the transformers class that loads, trains and (merged) serves the checkpoint
    processor_class: str  # what AutoProcessor loads for it
    # Substrings of the non-LoRA parameter names trained fully (saved in non_lora_trainables).
    trainable: tuple[str, ...]
    default_template: str
    anyres: bool  # image tokens depend on each image's size; images are not padded to a square
    # bitsandbytes matches these against full module paths: short names would quantize the projector.
    skip_4bit: tuple[str, ...] = ("model.vision_tower", "model.multi_modal_projector", "lm_head")
    disk_to_memory: tuple[tuple[str, str], ...] = _LLAVA_DISK_TO_MEMORY
    projector: str = "multi_modal_projector"
    vision: str = "vision_tower"
    language_model: str = "language_model"  # LoRA targets are anchored under this module
    images_only_processor: bool = False  # the stock processor also builds a video processor (torchvision)

    def model_cls(self) -> Any:
        import transformers

        return getattr(transformers, self.model_class)

    def is_trainable(self, name: str) -> bool:
        """Whether a (non-LoRA) parameter of this family is trained fully."""
        return any(part in name for part in self.trainable)

    def memory_name(self, disk_key: str) -> str:
        """The in-memory parameter name of a checkpoint key, in either layout."""
        for old, new in self.disk_to_memory:
            if disk_key == old or disk_key.startswith(old + "."):
                return new + disk_key[len(old):]
        return disk_key


FAMILIES = {
    f.model_type: f for f in (
        Family("llava", "LlavaForConditionalGeneration", "LlavaProcessor", ("multi_modal_projector",), "vicuna_v1",
               anyres=False),
        Family("llava_next", "LlavaNextForConditionalGeneration", "LlavaNextProcessor",
               ("multi_modal_projector", "image_newline"),
               "mistral_instruct", anyres=True,
               disk_to_memory=(*_LLAVA_DISK_TO_MEMORY, ("image_newline", "model.image_newline"))),
        Family("llava_onevision", "LlavaOnevisionForConditionalGeneration", "LlavaOnevisionProcessor",
               ("multi_modal_projector", "image_newline"), "chatml", anyres=True,
               disk_to_memory=(*_LLAVA_DISK_TO_MEMORY, ("image_newline", "model.image_newline")),
               images_only_processor=True),
    )
}


def supported_list() -> str:
    return ", ".join(f"{f.model_class} (model_type {t!r})" for t, f in FAMILIES.items())


def family_of(config: dict[str, Any]) -> Family:
    """The family of a parsed config.json; a UserError naming the supported list otherwise."""
    model_type = config.get("model_type")
    if model_type not in FAMILIES:
        raise UserError(f"model_type {model_type!r} is not a family llava-cluster fine-tunes; supported: "
                        f"{supported_list()}")
    return FAMILIES[model_type]


def family_of_processor(processor: Any) -> Family:
    """The family a loaded processor belongs to (the dataset sees the processor, not the config)."""
    name = type(processor).__name__
    for family in FAMILIES.values():
        if family.processor_class == name:
            return family
    raise UserError(f"{name} is not the processor of a family llava-cluster fine-tunes ({supported_list()})")


def default_template(config: dict[str, Any]) -> str:
    """The conversation template the family's llava-hf checkpoints were trained with: v1.6 on Mistral
    uses `[INST]`, v1.6 on Vicuna (text model_type llama) the Vicuna template. (The 34B, on Yi with
    ChatML, also reports llama: pass `chatml` for it.)"""
    family = family_of(config)
    if family.model_type == "llava_next":
        text_type = (config.get("text_config") or {}).get("model_type", "llama")
        return "mistral_instruct" if text_type == "mistral" else "vicuna_v1"
    return family.default_template


class ImageTokens:
    """How many `<image>` tokens one image becomes, exactly as the family's processor counts them.

    llava: fixed, from the square model input. llava_next: the processor's own count for the image's
    (height, width): base tile features + the unpadded grid of the best `image_grid_pinpoints`
    resolution + one `image_newline` per feature row, minus CLS under the "default" strategy.
    llava_onevision: the same count by its own processor, the unpadded grid scaled down by
    `anyres_max_9` when it exceeds 9 tiles' features by more than 10% (in each side: floor(side / ratio)).
    """

    def __init__(self, processor: Any, family: Family) -> None:
        from llava_cluster.model.load import image_seq_length

        self.processor = processor
        self.anyres = family.anyres
        self._cache: dict[tuple[int, int], int] = {}
        if family.anyres:
            size = processor.image_processor.size
            side = size.get("shortest_edge") or min(size["height"], size["width"])
            self.square = self.for_size(side, side)
        else:
            self.square = image_seq_length(processor)

    def for_size(self, width: int, height: int) -> int:
        """Tokens of an image of (width, height) pixels (PIL order)."""
        if not self.anyres:
            return self.square
        if (width, height) not in self._cache:
            counted = self.processor._get_num_multimodal_tokens(image_sizes=[(height, width)])
            self._cache[width, height] = int(counted["num_image_tokens"][0])
        return self._cache[width, height]

    def for_image(self, image: Any | None) -> int:
        """Tokens of a PIL image; of a square model-input image when the size is not known."""
        return self.square if image is None else self.for_size(*image.size)

    def for_sample(self, sample: dict[str, Any], folder: Any | None) -> int:
        """Tokens of a sample's image with its size read from the file header only (`ImageFolder.size`),
        no decode; a square image's count when there is no folder or the header cannot be read (then
        `data check` names the file, and training refuses it when it loads it)."""
        if not self.anyres or folder is None:
            return self.square
        try:
            size = folder.size(sample["image"])
        except Exception:  # data.images.ImageProblem (model/ does not import data/), a missing or odd path
            return self.square
        return self.for_size(*size)

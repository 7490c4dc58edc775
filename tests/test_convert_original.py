"""An original-layout (haotian-liu/LLaVA) checkpoint written from the tiny model converts back to it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from llava_cluster.cli import main
from llava_cluster.convert.original import convert_original, is_original_layout
from llava_cluster.errors import UserError

ORIGINAL_MM_KEYS = {
    "mm_vision_tower": "openai/clip-vit-large-patch14-336",
    "mm_projector_type": "mlp2x_gelu",
    "mm_vision_select_layer": -2,
    "mm_vision_select_feature": "patch",
    "mm_use_im_start_end": False,
    "mm_use_im_patch_token": False,
    "image_aspect_ratio": "pad",
    "use_mm_proj": True,
    "tune_mm_mlp_adapter": False,
    "freeze_mm_mlp_adapter": False,
}


def original_lm_key(name: str) -> str:
    """In-memory LLaVA name -> the original repo's name (inverse of the converter's renames)."""
    for new, old in (("model.language_model.", "model."),
                     ("model.multi_modal_projector.linear_1.", "model.mm_projector.0."),
                     ("model.multi_modal_projector.linear_2.", "model.mm_projector.2.")):
        if name.startswith(new):
            return old + name[len(new):]
    return name


def flat_config(text_config, mm_hidden_size: int) -> dict:
    """A flat Llama config.json with the original repo's model_type, architecture and mm_* keys."""
    flat = text_config.to_dict()
    rope = flat.pop("rope_parameters", None) or {}
    flat.update(rope_theta=rope.get("rope_theta", 10000.0), rope_scaling=None, model_type="llava",
                architectures=["LlavaLlamaForCausalLM"], mm_hidden_size=mm_hidden_size,
                torch_dtype="float32", **ORIGINAL_MM_KEYS)
    return flat


def write_clip_dir(model, image_processor, out: Path) -> Path:
    from transformers import CLIPVisionModel

    clip = CLIPVisionModel(model.config.vision_config)
    clip.load_state_dict(model.model.vision_tower.state_dict())
    clip.save_pretrained(out)
    image_processor.save_pretrained(out)
    return out


def write_original(model, tokenizer_dir: Path, out: Path, pickle: bool = True) -> Path:
    """The tiny model in the original layout: LM + projector only, pickled like LLaVA-1.5's release."""
    from safetensors.torch import save_file

    out.mkdir(parents=True)
    state = {original_lm_key(k): v.clone() for k, v in model.state_dict().items() if "vision_tower" not in k}
    if pickle:
        torch.save(state, out / "pytorch_model.bin")
    else:
        save_file(state, out / "model.safetensors")
    cfg = flat_config(model.config.text_config, model.config.vision_config.hidden_size)
    (out / "config.json").write_text(json.dumps(cfg))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / name, out / name)
    return out


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(tiny_dir.model, dtype=torch.float32).eval()
    return model, AutoProcessor.from_pretrained(tiny_dir.model)


@pytest.fixture(scope="module")
def original(tiny, tiny_dir, tmp_path_factory):
    model, processor = tiny
    root = tmp_path_factory.mktemp("original")
    clip = write_clip_dir(model, processor.image_processor, root / "clip")
    return write_original(model, tiny_dir.model, root / "llava-v1.5-tiny"), clip


def image_batch(processor, tiny_dir):
    from PIL import Image

    record = json.loads((tiny_dir.val).read_text())[0]
    image = Image.open(tiny_dir.images / record["image"]).convert("RGB")
    return processor(images=image, text="USER: <image>\nWhat shape is this? ASSISTANT:", return_tensors="pt")


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def test_round_trip_gives_the_tiny_models_logits(tiny, original, tiny_dir, tmp_path):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model, processor = tiny
    src, clip = original
    report = convert_original(src, clip, tmp_path / "hf", allow_pickle=True, pad_to=1)

    converted = LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    new_processor = AutoProcessor.from_pretrained(tmp_path / "hf")
    batch = image_batch(processor, tiny_dir)
    assert torch.equal(image_batch(new_processor, tiny_dir)["input_ids"], batch["input_ids"])
    assert (batch["input_ids"] == model.config.image_token_index).sum() == 16
    assert torch.equal(logits(converted, batch), logits(model, batch))
    assert report["added_tokens"] == []  # the tiny tokenizer already has <image> and <pad>
    assert converted.config.image_token_index == model.config.image_token_index
    assert converted.config.vision_feature_layer == -2
    assert converted.config.vision_feature_select_strategy == "default"
    assert sorted(p.name for p in (tmp_path / "hf").glob("*.bin")) == []


def test_vocab_is_padded_to_64_with_mean_rows(tiny, original, tiny_dir, tmp_path):
    from transformers import LlavaForConditionalGeneration

    model, processor = tiny
    src, clip = original
    report = convert_original(src, clip, tmp_path / "hf", allow_pickle=True)

    vocab = model.config.text_config.vocab_size
    padded = -(-vocab // 64) * 64
    assert report["vocab_size"] == {"before": vocab, "after": padded}
    converted = LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert converted.config.text_config.vocab_size == padded
    for new, old in ((converted.get_input_embeddings().weight, model.get_input_embeddings().weight),
                     (converted.lm_head.weight, model.lm_head.weight)):
        assert torch.equal(new[:vocab], old)
        assert torch.allclose(new[vocab:], old.mean(dim=0).expand(padded - vocab, -1))
    got = logits(converted, image_batch(processor, tiny_dir))
    assert got.shape[-1] == padded
    assert torch.equal(got[..., :vocab], logits(model, image_batch(processor, tiny_dir)))


def test_pickles_need_the_flag(original, tmp_path):
    src, clip = original
    with pytest.raises(UserError, match="--allow-pickle"):
        convert_original(src, clip, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_tokenizer_without_image_and_pad_gets_both(tiny, tiny_dir, tmp_path):
    """LLaVA-1.5's tokenizer has neither token: they are appended, and the text model is unchanged."""
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        LlavaForConditionalGeneration,
        PreTrainedTokenizerFast,
    )

    model, processor = tiny
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel()
    bpe.train_from_iterator(["what colour is the square", "a red circle on blue"] * 20,
                            trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"]))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    src = tmp_path / "orig"
    tok.save_pretrained(src)
    torch.manual_seed(0)
    text_cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, tie_word_embeddings=False)
    llama = LlamaForCausalLM(text_cfg).eval()
    vision_hidden = model.config.vision_config.hidden_size
    state = {k: v.clone() for k, v in llama.state_dict().items()}
    state.update({"model.mm_projector.0.weight": torch.randn(32, vision_hidden), "model.mm_projector.0.bias": torch.randn(32),
                  "model.mm_projector.2.weight": torch.randn(32, 32), "model.mm_projector.2.bias": torch.randn(32)})
    save_file(state, src / "model.safetensors")
    (src / "config.json").write_text(json.dumps(flat_config(text_cfg, vision_hidden)))
    clip = write_clip_dir(model, processor.image_processor, tmp_path / "clip")

    report = convert_original(src, clip, tmp_path / "hf")

    old = len(tok)
    assert report["added_tokens"] == ["<image>", "<pad>"]
    assert (report["image_token_index"], report["pad_token_id"]) == (old, old + 1)
    assert report["vocab_size"]["after"] == -(-(old + 2) // 64) * 64
    converted = LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    assert converted.config.image_token_index == old
    ids = torch.tensor([tok("what colour is the square")["input_ids"]])
    with torch.no_grad():
        want = llama(input_ids=ids).logits
        got = converted(input_ids=ids).logits
    assert torch.allclose(got[..., :old], want, atol=1e-6, rtol=0)
    assert torch.equal(converted.model.multi_modal_projector.linear_1.bias, state["model.mm_projector.0.bias"])


def test_unsupported_projector_is_refused(original, tmp_path):
    src, clip = original
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "mm_projector_type": "linear"}))
    with pytest.raises(UserError, match="mm_projector_type"):
        convert_original(bad, clip, tmp_path / "hf", allow_pickle=True)


def test_original_layout_is_recognised_and_refused_by_the_loader(original, tiny_dir):
    from llava_cluster.model.load import read_llava_config

    src, _ = original
    assert is_original_layout(json.loads((src / "config.json").read_text()))
    assert not is_original_layout(json.loads((tiny_dir.model / "config.json").read_text()))
    with pytest.raises(UserError, match="llava-cluster convert original"):
        read_llava_config(src)


def test_cli_convert_original(original, tmp_path, capsys):
    src, clip = original
    assert main(["convert", "original", str(src), "--vision-tower", str(clip), "--out", str(tmp_path / "x")]) == 2
    assert "--allow-pickle" in capsys.readouterr().err
    rc = main(["convert", "original", str(src), "--vision-tower", str(clip), "--out", str(tmp_path / "hf"),
               "--allow-pickle", "--json"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert report["vocab_size"]["after"] % 64 == 0
    assert (tmp_path / "hf" / "model.safetensors").is_file()
    assert json.loads((tmp_path / "hf" / "conversion.json").read_text()) == report

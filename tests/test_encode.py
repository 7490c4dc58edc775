"""Label masking: decoded supervised tokens are exactly the replies + end-of-turn, for every template,
with the tiny byte-level BPE tokenizer and with a SentencePiece-style (Unigram + Metaspace) one.
Exact ids on real vocabularies (Llama-2-style SentencePiece, Llama-3, Qwen): test_encode_real_tokenizers.py."""

from __future__ import annotations

import pytest

from llava_cluster.data.encode import IGNORE_INDEX, conversation_turns, encode_sample, image_token_id
from llava_cluster.data.templates import IMAGE_TOKEN, TEMPLATES
from llava_cluster.errors import UserError

SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", IMAGE_TOKEN, "<|im_start|>", "<|im_end|>"]
IMAGE_SEQ = 16

SAMPLES = {
    "one_turn": {"id": "a", "image": "a.png", "conversations": [
        {"from": "human", "value": "What colour is the shape?\n<image>"},
        {"from": "gpt", "value": "The shape is red."}]},
    "multi_turn": {"id": "b", "image": "b.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat shape is shown?"},
        {"from": "gpt", "value": "A square, drawn in blue."},
        {"from": "human", "value": "And its colour?"},
        {"from": "gpt", "value": "Blue."},
        {"from": "human", "value": "Is it large?"},
        {"from": "gpt", "value": "No, it is small and sits in the corner."}]},
    "text_only": {"id": "c", "conversations": [
        {"from": "human", "value": "What comes after monday?"},
        {"from": "gpt", "value": "tuesday"},
        {"from": "human", "value": "And after that?"},
        {"from": "gpt", "value": "wednesday, then thursday"}]},
}


def _corpus() -> list[str]:
    words = ("what colour shape is shown the a square circle red blue green small large it sits in corner "
             "after monday tuesday wednesday thursday and then no yes drawn of image picture you see").split()
    texts = [" ".join(words[i:] + words[:i]) for i in range(len(words))]
    for sample in SAMPLES.values():
        turns = conversation_turns(sample)
        texts += [t.render(turns).text for t in TEMPLATES.values()]
    return [t.replace(IMAGE_TOKEN, " ") for t in texts]


@pytest.fixture(scope="module")
def sp_tokenizer():
    """Legacy-style SentencePiece: Unigram pieces with `▁` word prefixes, `▁` prepended after every special."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.train_from_iterator(_corpus(), trainers.UnigramTrainer(
        vocab_size=300, special_tokens=SPECIALS, unk_token="<unk>", show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", extra_special_tokens=SPECIALS[4:])


@pytest.fixture(scope="module")
def tiny_tokenizer(tiny_dir):
    from llava_cluster.model.load import load_processor

    return load_processor(tiny_dir.model).tokenizer


@pytest.fixture(params=["tiny", "sentencepiece"])
def tokenizer(request):
    return request.getfixturevalue("tiny_tokenizer" if request.param == "tiny" else "sp_tokenizer")


def supervised_runs(input_ids: list[int], labels: list[int]) -> list[list[int]]:
    runs, current = [], []
    for token, label in zip(input_ids, labels, strict=True):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


def expected_runs(text: str, spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Supervised spans, merged where one reply's end-of-turn touches the next reply (template `plain`)."""
    merged: list[list[int]] = []
    for start, end in spans:
        if merged and merged[-1][1] == start:
            merged[-1][1] = end
        else:
            merged.append([start, end])
    return [(s, e) for s, e in merged]


@pytest.mark.parametrize("template", sorted(TEMPLATES))
@pytest.mark.parametrize("kind", sorted(SAMPLES))
def test_supervised_tokens_decode_to_replies(tokenizer, template, kind):
    sample = SAMPLES[kind]
    tpl = TEMPLATES[template]
    rendered = tpl.render(conversation_turns(sample))
    enc = encode_sample(sample, tokenizer, tpl, IMAGE_SEQ, max_length=None)
    runs = supervised_runs(enc.input_ids, enc.labels)
    expected = expected_runs(rendered.text, rendered.supervised)
    assert len(runs) == len(expected)
    for run, (start, end) in zip(runs, expected, strict=True):
        decoded = tokenizer.decode(run)
        # The span starts with the blank that separates the prompt from the reply (byte-level "Ġred",
        # SentencePiece "▁red"), which decoders drop at the start of a text.
        want = rendered.text[start:end].lstrip(" ")
        # A token reaching from the prompt into the reply may carry the prompt's last blank (a toy
        # Unigram "\nBlue" after chatml's "assistant\n"): nothing else of the prompt is ever supervised.
        extra = decoded[: len(decoded) - len(want)]
        assert decoded.endswith(want), (decoded, want)
        assert extra.strip() == "" and rendered.text[: end - len(want)].endswith(extra), (decoded, want)
    image_id = image_token_id(tokenizer)
    assert enc.input_ids.count(image_id) == (IMAGE_SEQ if "image" in sample else 0)
    assert enc.has_image == ("image" in sample)
    assert all(label == IGNORE_INDEX for t, label in zip(enc.input_ids, enc.labels, strict=True) if t == image_id)
    assert enc.full_length == len(enc.input_ids) and enc.lost_tokens == 0 and enc.dropped_rounds == 0


@pytest.mark.parametrize("template", sorted(TEMPLATES))
def test_reply_span_starts_where_the_generation_prompt_ends(template):
    """One rule for training and inference: the supervised span of a reply begins exactly where the prompt
    a model is given at inference ends, so the separator's trailing space is part of the reply."""
    tpl = TEMPLATES[template]
    turns = conversation_turns(SAMPLES["multi_turn"])
    rendered = tpl.render(turns)
    for k, (start, end) in zip(range(1, len(turns), 2), rendered.supervised, strict=True):
        prompt = tpl.prompt(turns[:k])
        assert rendered.text.startswith(prompt) and start == len(prompt)
        assert rendered.text[start:end].lstrip(" ") == turns[k][1] + tpl.eot


def test_image_moves_to_front_of_first_turn(tiny_tokenizer):
    turns = conversation_turns(SAMPLES["one_turn"])
    assert turns[0] == ("user", "<image>\nWhat colour is the shape?")
    enc = encode_sample(SAMPLES["one_turn"], tiny_tokenizer, TEMPLATES["vicuna_v1"], IMAGE_SEQ, None)
    first = enc.input_ids.index(image_token_id(tiny_tokenizer))
    assert enc.input_ids[first:first + IMAGE_SEQ] == [image_token_id(tiny_tokenizer)] * IMAGE_SEQ
    assert tiny_tokenizer.decode(enc.input_ids[:first]).endswith("USER: ")


def _round_lengths(tokenizer, sample, template):
    """Token count of the sample cut after each whole round (image expanded)."""
    full = encode_sample(sample, tokenizer, template, IMAGE_SEQ, None)
    ends = []
    for k in range(1, len(sample["conversations"]) // 2 + 1):
        part = dict(sample, conversations=sample["conversations"][: 2 * k])
        ends.append(encode_sample(part, tokenizer, template, IMAGE_SEQ, None).full_length)
    return full, ends


@pytest.mark.parametrize("template", ["vicuna_v1", "chatml"])
def test_truncation_keeps_whole_rounds(tokenizer, template):
    tpl = TEMPLATES[template]
    sample = SAMPLES["multi_turn"]
    full, ends = _round_lengths(tokenizer, sample, tpl)
    for max_length, kept in [(ends[0], 1), (ends[1] + 1, 2), (ends[2] - 1, 2), (ends[2], 3)]:
        enc = encode_sample(sample, tokenizer, tpl, IMAGE_SEQ, max_length)
        assert len(enc.input_ids) == ends[kept - 1] <= max_length
        assert enc.dropped_rounds == 3 - kept
        assert enc.lost_tokens == full.full_length - ends[kept - 1]
        assert enc.input_ids == full.input_ids[: ends[kept - 1]]
        assert enc.labels == full.labels[: ends[kept - 1]]
        assert len(supervised_runs(enc.input_ids, enc.labels)) == kept
        assert enc.has_image


def test_first_round_too_long_keeps_no_labels_and_no_image(tokenizer):
    tpl = TEMPLATES["vicuna_v1"]
    sample = SAMPLES["multi_turn"]
    full, ends = _round_lengths(tokenizer, sample, tpl)
    enc = encode_sample(sample, tokenizer, tpl, IMAGE_SEQ, ends[0] - 1)
    assert not enc.has_image
    assert image_token_id(tokenizer) not in enc.input_ids
    assert len(enc.input_ids) == ends[0] - 1
    assert set(enc.labels) == {IGNORE_INDEX}
    assert enc.dropped_rounds == 3
    assert enc.full_length == full.full_length
    assert enc.lost_tokens == full.full_length - (ends[0] - 1)


@pytest.mark.parametrize("sample, message", [
    ({"id": "t1", "conversations": [{"from": "human", "value": "<image>\nhi"}, {"from": "gpt", "value": "x"}]},
     "sample t1: conversations[0] has <image> in a sample without 'image'"),
    ({"id": "t2", "image": "a.png", "conversations": [{"from": "human", "value": "hi"},
                                                      {"from": "gpt", "value": "<image> x"}]},
     "sample t2: conversations[1] has <image> in a later turn"),
    ({"id": "t3", "conversations": [{"from": "gpt", "value": "x"}]}, "sample t3: conversations[0] is from 'gpt'"),
    ({"id": "t4", "conversations": [{"from": "bot", "value": "x"}]}, "sample t4: conversations[0] must be"),
    ({"id": "t5", "conversations": []}, "sample t5: 'conversations' must be a non-empty list"),
])
def test_bad_samples_raise_user_errors_naming_the_sample(tiny_tokenizer, sample, message):
    with pytest.raises(UserError) as err:
        encode_sample(sample, tiny_tokenizer, TEMPLATES["vicuna_v1"], IMAGE_SEQ, None)
    assert message in err.value.message


def test_slow_tokenizer_is_refused():
    class SlowTokenizer:
        is_fast = False

    with pytest.raises(UserError, match="not a fast tokenizer"):
        encode_sample(SAMPLES["text_only"], SlowTokenizer(), TEMPLATES["vicuna_v1"], IMAGE_SEQ, None)

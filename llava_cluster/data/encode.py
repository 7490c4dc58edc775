"""Turn one LLaVA record into the token ids and labels the model trains on.

Labels come from character spans, never from token arithmetic: the template renders the conversation
and says which characters are supervised (each reply plus its end-of-turn string, from where the
generation prompt ends: the separator's trailing spaces included, see `templates.generation_start`);
the text is tokenized once by a fast tokenizer with offsets. A token is supervised iff it ends inside a
span (start < token end <= end): so it holds reply text, or it is the space before the reply split off
on its own (SentencePiece `:`,`▁`,`1`,`2` for "ASSISTANT: 12"; byte-level `Ġ` before digits), which the
model must generate after the prompt, as in the original LLaVA. A token that begins in the prompt and
reaches into the reply (`ĊĊ` for a chatml reply starting with a newline) is supervised: predicting it is
predicting the reply. A token that runs past the end-of-turn holds prompt text and is not. A token with
an empty span is supervised iff it lies strictly inside a span: that keeps a blank whose offsets were
trimmed away (byte-level `Ġ` with `trim_offsets`) and excludes what the tokenizer inserts itself
(BOS/EOS from its post-processor, at (0, 0)). So the supervised ids of a reply are exactly the ids a
model must emit after `Template.prompt` up to and including its end-of-turn token(s).

Image: an image sample's `<image>` is moved to the front of the first user turn ("<image>\\n" + rest),
tokenized as the single image token, then expanded to `image_seq_length` copies (never supervised),
which is what `LlavaForConditionalGeneration` expects next to one `pixel_values` entry. For an
any-resolution family (LLaVA-NeXT) the caller passes that image's own count (`family.ImageTokens`).

Truncation policy (`max_length`): whole rounds (a user turn and its reply) are kept while the sample,
image expanded, still fits; later rounds are dropped. So a sample is never cut inside a reply (half
supervised) or inside its image run (image tokens that no longer match the image features). If even the
first round does not fit, the sample keeps no labels and no image: `input_ids` is the text without the
image token, cut to `max_length`, every label is -100 and `has_image` is False. It then trains nothing
but can never break a batch; `llava-cluster data check --model` reports such samples before training.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Any

from llava_cluster.data.templates import IMAGE_TOKEN, Template
from llava_cluster.errors import UserError

IGNORE_INDEX = -100
ROLES = {"human": "user", "gpt": "assistant"}
CHARS_PER_TOKEN = 4  # rough English figure for BPE/SentencePiece vocabularies; only used to rank lengths
TOKENS_PER_TURN = 6  # role markers and separators a template adds around each turn


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX where not supervised
    full_length: int  # tokens before truncation, image expanded
    lost_tokens: int  # full_length - len(input_ids)
    dropped_rounds: int
    has_image: bool


def sample_id(sample: dict) -> str:
    return str(sample.get("id", "?"))


def has_image(sample: dict) -> bool:
    return bool(sample.get("image"))


def estimate_length(sample: dict, image_seq_length: int) -> int:
    """Token count guessed from characters: cheap enough for 665k samples, good enough to group by."""
    turns = sample.get("conversations") or []
    chars = sum(len(str(t.get("value", ""))) for t in turns if isinstance(t, dict))
    length = chars // CHARS_PER_TOKEN + TOKENS_PER_TURN * len(turns)
    return length + (image_seq_length if has_image(sample) else 0)


def conversation_turns(sample: dict) -> list[tuple[str, str]]:
    """(role, text) turns with roles user/assistant and the image placeholder where LLaVA puts it."""
    sid = sample_id(sample)
    conversations = sample.get("conversations")
    if not isinstance(conversations, list) or not conversations:
        raise UserError(f"sample {sid}: 'conversations' must be a non-empty list")
    turns: list[tuple[str, str]] = []
    for i, turn in enumerate(conversations):
        if not isinstance(turn, dict) or turn.get("from") not in ROLES or not isinstance(turn.get("value"), str):
            raise UserError(f"sample {sid}: conversations[{i}] must be {{'from': 'human'|'gpt', 'value': str}}")
        role = ROLES[turn["from"]]
        expected = "user" if i % 2 == 0 else "assistant"
        if role != expected:
            raise UserError(f"sample {sid}: conversations[{i}] is from {turn['from']!r}; turns must alternate "
                            "human, gpt, human, ... starting with human")
        turns.append((role, turn["value"]))
    image = has_image(sample)
    for i, (_, text) in enumerate(turns):
        if IMAGE_TOKEN in text and not (image and i == 0):
            where = "a later turn" if image else "a sample without 'image'"
            raise UserError(f"sample {sid}: conversations[{i}] has {IMAGE_TOKEN} in {where}; only the first "
                            "human turn of an image sample may hold it")
    if image:
        rest = turns[0][1].replace(IMAGE_TOKEN, "").strip()
        turns[0] = ("user", f"{IMAGE_TOKEN}\n{rest}")
    return turns


def _check_fast(tokenizer: Any) -> None:
    if not getattr(tokenizer, "is_fast", False):
        raise UserError(f"{type(tokenizer).__name__} is not a fast tokenizer: label masking needs character "
                        "offsets (return_offsets_mapping); load the model's tokenizer.json with AutoTokenizer")


def image_token_id(tokenizer: Any) -> int:
    """The id `<image>` tokenizes to, checked to be one whole token."""
    ids = tokenizer(IMAGE_TOKEN, add_special_tokens=False)["input_ids"]
    if len(ids) != 1 or ids[0] == tokenizer.unk_token_id:
        raise UserError(f"the tokenizer does not have {IMAGE_TOKEN} as one token (it becomes {ids}); "
                        "use the processor saved with the LLaVA model")
    return ids[0]


def _positions(offsets: list[tuple[int, int]]) -> list[int]:
    """Character position of each token; tokens with empty spans (added specials) sit where the previous one ended."""
    out, last_end = [], 0
    for start, end in offsets:
        if end > start:
            out.append(start)
            last_end = end
        else:
            out.append(last_end)
    return out


def _supervised(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[bool]:
    """Whether each token [start, end) ends inside a supervised span (spans sorted, disjoint); see the module docstring."""
    ends = [e for _, e in spans]
    out = []
    for start, end in offsets:
        if end <= start:  # empty: a blank trimmed away inside the text, or a post-processor special at (0, 0)
            k = bisect.bisect_right(ends, start)  # the first span ending after it
            out.append(k < len(spans) and spans[k][0] < start)
            continue
        k = bisect.bisect_left(ends, end)  # the first span ending at or after this token's end
        out.append(k < len(spans) and spans[k][0] < end)
    return out


def encode_sample(sample: dict, tokenizer: Any, template: Template, image_seq_length: int,
                  max_length: int | None) -> Encoded:
    """Encode one record; see the module docstring for the labelling and truncation rules."""
    _check_fast(tokenizer)
    turns = conversation_turns(sample)
    image = has_image(sample)
    rendered = template.render(turns)
    enc = tokenizer(rendered.text, add_special_tokens=True, return_offsets_mapping=True)
    ids: list[int] = list(enc["input_ids"])
    offsets = [tuple(o) for o in enc["offset_mapping"]]
    supervised = _supervised(offsets, rendered.supervised)
    positions = _positions(offsets)

    image_id = image_token_id(tokenizer) if image else None
    if image and ids.count(image_id) != 1:
        raise UserError(f"sample {sample_id(sample)}: expected one {IMAGE_TOKEN} token after rendering with "
                        f"{template.name}, found {ids.count(image_id)}")
    width = [image_seq_length if t == image_id else 1 for t in ids]
    full_length = sum(width)

    keep_tokens = len(ids)
    kept_rounds = len(rendered.rounds)
    if max_length is not None and full_length > max_length:
        kept_rounds, total, keep_tokens = 0, 0, 0
        for i, w in enumerate(width):
            while kept_rounds < len(rendered.rounds) and positions[i] >= rendered.rounds[kept_rounds]:
                kept_rounds += 1  # token i starts after round `kept_rounds` ended: that round fits whole
                keep_tokens = i
            if total + w > max_length:
                break
            total += w
    dropped_rounds = len(rendered.rounds) - kept_rounds

    if kept_rounds == 0:
        text_ids = [t for t in ids if t != image_id][:max_length]
        return Encoded(text_ids, [IGNORE_INDEX] * len(text_ids), full_length, full_length - len(text_ids),
                       dropped_rounds, has_image=False)

    input_ids: list[int] = []
    labels: list[int] = []
    for token, sup in zip(ids[:keep_tokens], supervised[:keep_tokens], strict=True):
        if token == image_id:
            input_ids += [token] * image_seq_length
            labels += [IGNORE_INDEX] * image_seq_length
        else:
            input_ids.append(token)
            labels.append(token if sup else IGNORE_INDEX)
    return Encoded(input_ids, labels, full_length, full_length - len(input_ids), dropped_rounds, has_image=image)

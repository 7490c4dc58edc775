"""The synthetic visual task of the tiny model: name the colour or the shape of one drawn object.

Answers are single words, so exact match on held-out samples measures learning without any fuzzy
scoring. The task is small enough that a ~1M-parameter LLaVA learns it in a few hundred CPU steps,
which is what lets `validate` show a real before/after difference in tests and in the demo.
Some samples ask two questions (multi-turn) and some have no image (text-only), so the data path
exercises round handling and modality grouping too.
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 225),
    "yellow": (240, 215, 30),
}
SHAPES = ("circle", "square", "triangle", "cross")

COLOUR_QUESTIONS = (
    "What colour is the shape?",
    "What color is the object?",
    "Which colour is this shape?",
    "Name the colour of the shape.",
)
SHAPE_QUESTIONS = (
    "What shape is shown?",
    "What shape is this?",
    "Which shape do you see?",
    "Name the shape in the picture.",
)
FOLLOW_UPS = ("And {q}", "Also, {q}", "{q}")

# Text-only questions: facts whose answers are the same words the image questions use, so the
# answer vocabulary stays small and the text-only samples are learnable without an image.
TEXT_FACTS = {
    "colour": {"the sky": "blue", "grass": "green", "a banana": "yellow", "a tomato": "red"},
    "shape": {"a ball": "circle", "a chessboard": "square", "a plus sign": "cross", "a slice of pizza": "triangle"},
}
TEXT_QUESTIONS = {
    "colour": ("What colour is {x}?", "Which colour does {x} have?", "Name the colour of {x}."),
    "shape": ("What shape is {x}?", "Which shape does {x} have?", "Name the shape of {x}."),
}

MULTI_TURN_FRACTION = 0.15
TEXT_ONLY_FRACTION = 0.10


@dataclass(frozen=True)
class TaskSample:
    """One record before it is written: the LLaVA JSON dict and its PNG bytes (None if text-only)."""

    record: dict
    png: bytes | None


def draw_shape(shape: str, colour: str, rng: random.Random) -> Image.Image:
    """A plain light background with one shape, at a random size and place; 32-64 px, some non-square."""
    width = rng.randint(32, 64)
    height = width if rng.random() < 0.7 else rng.randint(32, 64)
    grey = rng.randint(200, 255)
    img = Image.new("RGB", (width, height), (grey, grey, grey))
    side = int(min(width, height) * rng.uniform(0.75, 0.95))
    x0 = rng.randint(0, width - side)
    y0 = rng.randint(0, height - side)
    box = (x0, y0, x0 + side - 1, y0 + side - 1)
    fill = tuple(max(0, min(255, c + rng.randint(-20, 20))) for c in COLOURS[colour])
    draw = ImageDraw.Draw(img)
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([(x0 + side / 2, y0), (x0, y0 + side - 1), (x0 + side - 1, y0 + side - 1)], fill=fill)
    else:
        bar = side // 3
        draw.rectangle((x0 + bar, y0, x0 + 2 * bar, y0 + side - 1), fill=fill)
        draw.rectangle((x0, y0 + bar, x0 + side - 1, y0 + 2 * bar), fill=fill)
    return img


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _image_sample(idx: int, rng: random.Random) -> TaskSample:
    shape, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
    asks = [("colour", colour), ("shape", shape)]
    rng.shuffle(asks)
    rounds = 2 if rng.random() < MULTI_TURN_FRACTION / (1 - TEXT_ONLY_FRACTION) else 1
    conversations = []
    for i, (kind, answer) in enumerate(asks[:rounds]):
        question = rng.choice(COLOUR_QUESTIONS if kind == "colour" else SHAPE_QUESTIONS)
        if i == 0:
            question = "<image>\n" + question
        else:
            question = rng.choice(FOLLOW_UPS).format(q=question[0].lower() + question[1:])
        conversations += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    name = f"{idx:06d}.png"
    record = {"id": f"tiny-{idx:06d}", "image": name, "conversations": conversations}
    return TaskSample(record, _png(draw_shape(shape, colour, rng)))


def _text_sample(idx: int, rng: random.Random) -> TaskSample:
    kind = rng.choice(list(TEXT_FACTS))
    thing, answer = rng.choice(sorted(TEXT_FACTS[kind].items()))
    question = rng.choice(TEXT_QUESTIONS[kind]).format(x=thing)
    conversations = [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    return TaskSample({"id": f"tiny-{idx:06d}", "conversations": conversations}, None)


def make_samples(count: int, seed: int) -> list[TaskSample]:
    """`count` samples, the same for the same seed (images included, byte for byte)."""
    rng = random.Random(seed)
    return [
        _text_sample(i, rng) if rng.random() < TEXT_ONLY_FRACTION else _image_sample(i, rng)
        for i in range(count)
    ]

"""Conversation templates. A template renders turns to text and returns, next to the text, the
character spans that are supervised: each assistant reply followed by its end-of-turn string, starting
where the generation prompt ends (`generation_start`), so the separator's trailing spaces belong to the
reply.

Labels are later derived from these spans and the fast tokenizer's offsets (see `encode.py`), so no
template ever does token-length arithmetic — the arithmetic that silently masks whole samples in the
original LLaVA scripts when a tokenizer version changes how a separator is split.
"""

from __future__ import annotations

from dataclasses import dataclass

from llava_cluster.model.tokens import IMAGE_TOKEN  # re-exported: data/ modules import it from here


def generation_start(prompt: str) -> int:
    """Where the model's own text starts after `prompt`: before the separator's trailing spaces.

    Real vocabularies tokenize the space before a reply with the reply: merged into its first word
    (`▁Red`, `ĠRed`) or split off as a lone `▁`/`Ġ` before a digit, CJK or emoji (`:`,`▁`,`1`,`2`).
    Either way the model has to generate that token after the prompt, so the prompt a model is given
    at inference ends here and the supervised span of a reply starts here.
    """
    return len(prompt.rstrip(" "))


@dataclass(frozen=True)
class Rendered:
    text: str
    supervised: list[tuple[int, int]]  # [start, end) character spans, one per reply: from generation_start to eot end
    rounds: list[int]  # character offset where each round (user turn + reply) ends


@dataclass(frozen=True)
class Template:
    """`user`/`assistant` wrap one turn ({msg}); `eot` ends each assistant reply and is supervised."""

    name: str
    system: str
    prefix: str  # before the first round ({system} is substituted)
    user: str
    assistant_open: str  # between the user turn and the reply
    eot: str
    after_eot: str = ""
    user_next: str | None = None  # user turns after the first, when they differ (Llama-2's "<s>[INST]")
    drop_user_text: bool = False  # `plain`: pre-training captions keep only the image

    def render(self, turns: list[tuple[str, str]], system: str | None = None) -> Rendered:
        """Render (role, text) turns, roles `user`/`assistant`, user first and alternating."""
        parts: list[str] = [self.prefix.format(system=self.system if system is None else system)]
        pos = len(parts[0])
        spans: list[tuple[int, int]] = []
        rounds: list[int] = []
        for i, (role, msg) in enumerate(turns):
            if role == "user":
                if self.drop_user_text:
                    msg = IMAGE_TOKEN if IMAGE_TOKEN in msg else ""
                wrap = self.user_next if (self.user_next and spans) else self.user
                chunk = wrap.format(msg=msg) + self.assistant_open
            else:
                chunk = msg + self.eot
                spans.append((generation_start("".join(parts)), pos + len(chunk)))
                chunk += self.after_eot
            parts.append(chunk)
            pos += len(chunk)
            if role == "assistant" or i == len(turns) - 1:
                rounds.append(pos)
        return Rendered(text="".join(parts), supervised=spans, rounds=rounds)

    def prompt(self, turns: list[tuple[str, str]], system: str | None = None) -> str:
        """The text a model sees before it generates the next reply (turns end with a user turn).

        It ends at `generation_start`: a prompt ending in a lone space token would ask the model for a
        token sequence it never saw in training (it stops at once).
        """
        text = self.render(turns, system).text
        return text[: generation_start(text)]


_VICUNA_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
_LLAMA2_SYSTEM = (
    "You are a helpful language and vision assistant. You are able to understand the visual content "
    "that the user provides, and assist the user with a variety of tasks using natural language."
)

TEMPLATES: dict[str, Template] = {
    t.name: t
    for t in (
        # LLaVA-1.5: "SYSTEM USER: <image>\nQ ASSISTANT: A</s>USER: ..."
        Template("vicuna_v1", _VICUNA_SYSTEM, "{system} ", "USER: {msg}", " ASSISTANT: ", "</s>"),
        # Llama-2 chat: system folded into the first [INST] block; later rounds start with <s>.
        Template(
            "llava_llama_2", _LLAMA2_SYSTEM, "[INST] <<SYS>>\n{system}\n<</SYS>>\n\n", "{msg}", " [/INST] ",
            "</s>", user_next="<s>[INST] {msg}",
        ),
        Template("mistral_instruct", "", "", "[INST] {msg}", " [/INST] ", "</s>"),
        Template(
            "chatml", "You are a helpful assistant.", "<|im_start|>system\n{system}<|im_end|>\n",
            "<|im_start|>user\n{msg}<|im_end|>\n", "<|im_start|>assistant\n", "<|im_end|>", after_eot="\n",
        ),
        Template("plain", "", "", "{msg}", "", "\n", drop_user_text=True),
    )
}


def get_template(name: str) -> Template:
    from llava_cluster.errors import UserError

    if name not in TEMPLATES:
        raise UserError(unknown_template(name))
    return TEMPLATES[name]


def unknown_template(name: str) -> str:
    """The message for a template name that does not exist, with the closest one when there is one."""
    import difflib

    close = difflib.get_close_matches(name, list(TEMPLATES), n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f"unknown template {name!r}; {hint}choose one of {', '.join(TEMPLATES)}"

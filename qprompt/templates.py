"""How a row becomes what the model reads, in one place: training and scoring (data.py), the export
(export.py) and the torch-free runtime (runtime.py) all apply these rules, so an export sees exactly
the text its prompt was trained on.

    template = Template(prompt="Review: {text}\\nSentiment:", instruction="Label the review.", target=" {label}")
    template.text({"text": "a warm film"})          # 'Review: a warm film\\nSentiment:'
    template.target_text("positive")                # ' positive'

Needs neither torch nor a tokenizer, except `chat_wrap_of`, which asks one for its chat template.
"""

from __future__ import annotations

import string
from dataclasses import dataclass

CHAT_MARKER = "\u0000BODY\u0000"  # stands for the body while a chat template is rendered


def template_fields(prompt: str) -> list[str]:
    """The row fields a template reads, in order: "{premise} ... {hypothesis}" -> ["premise", "hypothesis"]."""
    return [name for _, name, _, _ in string.Formatter().parse(prompt) if name]


@dataclass(frozen=True)
class Template:
    """A recipe's template, as trained and as exported."""

    prompt: str  # the row's fields in their frame, e.g. "Review: {text}\nSentiment:"
    instruction: str = ""  # the hand-written prompt: put before the body for the hard-prompt baseline
    target: str = " {label}"  # what follows the prompt: a label word (classification) or the reference text
    chat_wrap: tuple[str, str] | None = None  # the text before and after the body in the tokenizer's chat template

    @property
    def fields(self) -> list[str]:
        return template_fields(self.prompt)

    @property
    def add_special_tokens(self) -> bool:
        """A chat template writes its own special tokens; plain text gets the tokenizer's (e.g. BOS)."""
        return self.chat_wrap is None

    def missing(self, row: dict) -> list[str]:
        return [f for f in self.fields if f not in row]

    def body(self, row: dict, hard_prompt: bool = False, demonstrations: list[tuple[dict, str]] = ()) -> str:
        """The prompt for `row`; with `hard_prompt`, the instruction and the demonstrations ((row, label word)
        pairs) before it."""
        body = self.prompt.format(**{f: row[f] for f in self.fields})
        if not hard_prompt:
            return body
        shots = [self.prompt.format(**{f: d[f] for f in self.fields}) + self.target_text(word)
                 for d, word in demonstrations]
        return "\n\n".join(([self.instruction] if self.instruction else []) + shots + [body])

    def text(self, row: dict, hard_prompt: bool = False, demonstrations: list[tuple[dict, str]] = ()) -> str:
        """The whole text the tokenizer encodes (chat-wrapped where the recipe asks for it)."""
        body = self.body(row, hard_prompt, demonstrations)
        return self.chat_wrap[0] + body + self.chat_wrap[1] if self.chat_wrap else body

    def target_text(self, word: str) -> str:
        return self.target.format(label=word)

    def to_dict(self) -> dict:
        return {"prompt": self.prompt, "instruction": self.instruction, "target": self.target,
                "chat_wrap": list(self.chat_wrap) if self.chat_wrap else None}

    @classmethod
    def from_dict(cls, data: dict) -> Template:
        wrap = data.get("chat_wrap")
        return cls(data["prompt"], data.get("instruction", ""), data.get("target", " {label}"),
                   tuple(wrap) if wrap else None)


def chat_wrap_of(tokenizer) -> tuple[str, str] | None:
    """The text a tokenizer's chat template puts before and after a user message (with the generation prompt),
    or None if it has no chat template."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": CHAT_MARKER}], tokenize=False,
                                             add_generation_prompt=True)
    before, marker, after = rendered.partition(CHAT_MARKER)
    if not marker or CHAT_MARKER in after:
        raise ValueError("the tokenizer's chat template does not write a user message as it is")
    return before, after


def real_positions(attention_mask, virtual_tokens):
    """Position ids of real tokens: each counts the real tokens before it, after the virtual ones, so left or
    right padding gives a row the positions it has alone. Works on torch tensors and numpy arrays alike;
    `virtual_tokens` is a number or one per row, shaped (B, 1)."""
    return (attention_mask.cumsum(-1) - 1).clip(min=0) + virtual_tokens

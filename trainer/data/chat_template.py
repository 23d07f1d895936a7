"""A model's own chat template (Hugging Face `tokenizer_config.json`) as token ids and a loss mask.

A tokenizer imported from Hugging Face keeps the `chat_template` its model was trained with,
in `tokenizer_config.json` beside the tokenizer file (tools/hf_import.py); `Tokenizer` reads it
(`tok.chat_template`) and trainer/data/chat.py formats every conversation with it instead of
chatforge's ChatML. The template is rendered by transformers' own renderer (the one
`apply_chat_template` uses), so the text is exactly what transformers gives.

Ids and mask, by rendering prefix by prefix. For each assistant turn i the template renders
the conversation before it with the generation prompt (P_i) and the conversation up to and
including it (F_i); every render must extend the one before it (a template that rewrites
earlier turns, e.g. one that drops past reasoning, is refused with a clear error). The text
is cut into those segments and each is encoded on its own, so

  * the prompt a stage generates from (prompt_ids) is token for token the context the
    model was trained on, and
  * the target of turn i is F_i minus P_i (what the model writes after the generation
    prompt: its content and the template's end-of-turn token), cut after the first special
    token in it: whatever the template puts after the end-of-turn (a newline) is context, as
    in chatforge's ChatML mask.

Special tokens written as text by the template (`bos_token`, `eos_token`, `<|eot_id|>`, ...)
become their single ids even where the tokenizer would not match them in text (a
sentencepiece model's control symbols).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Optional, Protocol, Sequence

TEMPLATE_FILE = "tokenizer_config.json"
# Where save_pretrained puts the template itself: transformers 4.43+ writes chat_template.jinja
# (older ones a chat_template.json, or the template inside tokenizer_config.json).
JINJA_FILE = "chat_template.jinja"
TEMPLATE_FILES: tuple[str, ...] = (TEMPLATE_FILE, JINJA_FILE, "chat_template.json")


@dataclass(frozen=True)
class _Probe:
    """A turn of the probe conversation (not trainer.data.chat.Message: that module imports this one)."""

    role: str
    content: str


class _Turn(Protocol):
    role: str
    content: str


def _token_text(value: Any) -> Optional[str]:
    """A tokenizer_config.json token entry: a string or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


@dataclass
class TemplateConfig:
    """What tokenizer_config.json says about chat formatting."""

    template: str
    bos_token: Optional[str]
    eos_token: Optional[str]
    special: tuple[str, ...]  # every special token string the config names


def read_template_config(tokenizer_path: Path) -> Optional[TemplateConfig]:
    """The chat template kept beside `tokenizer_path` (TEMPLATE_FILES), or None (chatforge's
    ChatML then)."""
    directory = Path(tokenizer_path).parent
    config: dict[str, Any] = {}
    for name in (TEMPLATE_FILE, "chat_template.json"):
        path = directory / name
        if path.is_file():
            try:
                config = {**json.loads(path.read_text(encoding="utf-8")), **config}
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}: invalid JSON: {err}") from err
    if (directory / JINJA_FILE).is_file():
        config["chat_template"] = (directory / JINJA_FILE).read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: the default one
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    if not isinstance(template, str) or not template.strip():
        return None
    names = [_token_text(config.get(key)) for key in ("bos_token", "eos_token", "pad_token", "unk_token")]
    names += [_token_text(t) for t in (config.get("added_tokens_decoder") or {}).values()
              if isinstance(t, dict) and t.get("special")]
    names += [_token_text(t) for t in config.get("additional_special_tokens") or []]
    return TemplateConfig(template, _token_text(config.get("bos_token")), _token_text(config.get("eos_token")),
                          tuple(sorted({n for n in names if n}, key=len, reverse=True)))


class ChatTemplate:
    """Render and tokenize conversations with a Hugging Face chat template (module doc).
    `tok` is a trainer.data.tokenizer.Tokenizer."""

    def __init__(self, config: TemplateConfig, tok: Any) -> None:
        self.config = config
        self.tok = tok
        self.special_ids: dict[str, int] = {}
        for name in config.special:
            idx = tok.piece_id(name)
            if idx is not None:
                self.special_ids[name] = idx
        self._split = re.compile("(" + "|".join(map(re.escape, self.special_ids)) + ")") if self.special_ids else None

    def render(self, messages: Sequence[_Turn], add_generation_prompt: bool) -> str:
        """The template's text of `messages` (transformers' renderer, as apply_chat_template)."""
        from transformers.utils.chat_template_utils import render_jinja_template

        chat = [{"role": m.role, "content": m.content} for m in messages]
        extra = {k: v for k, v in (("bos_token", self.config.bos_token), ("eos_token", self.config.eos_token)) if v}
        try:
            rendered, _ = render_jinja_template([chat], chat_template=self.config.template,
                                                add_generation_prompt=add_generation_prompt, **extra)
        except Exception as err:  # jinja errors and the template's own raise_exception
            raise ValueError(f"the chat template of {self.tok.path} failed on a conversation of roles "
                             f"{[m.role for m in messages]}: {err}") from err
        return str(rendered[0])

    def encode(self, text: str) -> list[int]:
        """ids of `text`, its special token strings as their single ids."""
        if self._split is None:
            return self.tok.encode(text)
        ids: list[int] = []
        for part in self._split.split(text):
            if part in self.special_ids:
                ids.append(self.special_ids[part])
            elif part:
                ids += self.tok.encode(part)
        return ids

    def _extend(self, done: str, text: str) -> str:
        if not text.startswith(done):
            raise ValueError(f"the chat template of {self.tok.path} is not prefix-consistent (rendering one "
                             f"more turn changed the text before it), so the prompt a model sees cannot be "
                             f"the context it was trained on; use a template that renders turns in order")
        return text[len(done):]

    def _target(self, span: str) -> tuple[list[int], list[int]]:
        """ids and mask of an assistant turn's text: 1 up to its first special id, 0 after."""
        ids = self.encode(span)
        specials = set(self.special_ids.values()) | {self.tok.eod_id}
        end = next((i + 1 for i, t in enumerate(ids) if t in specials), len(ids))
        return ids, [1] * end + [0] * (len(ids) - end)

    def tokenize(self, messages: Sequence[_Turn], add_generation_prompt: bool = False
                 ) -> tuple[list[int], list[int]]:
        """ids [T] and target mask [T] of `messages` (module doc). With add_generation_prompt,
        the ids end with the prompt for the next assistant turn (and the mask is all 0 there)."""
        ids: list[int] = []
        mask: list[int] = []
        done = ""
        for i, m in enumerate(messages):
            if m.role != "assistant":
                continue
            before = self.render(messages[:i], add_generation_prompt=True)
            context = self.encode(self._extend(done, before))
            target, target_mask = self._target(self._extend(before, self.render(messages[:i + 1], False)))
            ids += context + target
            mask += [0] * len(context) + target_mask
            done = self.render(messages[:i + 1], False)
        rest = self.encode(self._extend(done, self.render(messages, add_generation_prompt)))
        return ids + rest, mask + [0] * len(rest)

    def response(self, text: str) -> list[int]:
        """ids of an assistant reply as it follows the generation prompt, up to its end-of-turn."""
        probe = [_Probe("user", "?")]
        before = self.render(probe, add_generation_prompt=True)
        ids, mask = self._target(self._extend(before, self.render([*probe, _Probe("assistant", text)], False)))
        return ids[:sum(mask)]

    @cached_property
    def end_of_turn_id(self) -> int:
        """The id that ends an assistant turn: what generation stops at."""
        probe = self.response("x")
        specials = set(self.special_ids.values()) | {self.tok.eod_id}
        return probe[-1] if probe and probe[-1] in specials else int(self.tok.eod_id)

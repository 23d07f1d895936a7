"""The chatML conversation format, its loss mask, and the truncation rule.

A conversation renders as one block per message:

    <|im_start|>{role}\\n{content}<|im_end|>\\n

Token ids are built by encoding each segment separately (header, content, footer) and
concatenating. The tokenizer has no dummy prefix and identity normalization, so this is well
defined, and it means the ids of a header never depend on the content after it: the generation
prompt `<|im_start|>assistant\\n` (prompt_ids) is token for token what training saw.

The loss (target) mask is 1 exactly on each assistant turn's content tokens and its
`<|im_end|>`: the model learns what to say and when to stop, never the header it is given
nor the user's words, nor the "\\n" that separates blocks (it carries no information).

ChatML is the format of chatforge's own tokenizers. A tokenizer with a Hugging Face chat
template beside it (an imported model: trainer/data/chat_template.py) is formatted with that
template instead, by the same three functions, with the same mask rule.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from trainer.data.tokenizer import Tokenizer

ROLES: tuple[str, ...] = ("system", "user", "assistant")
ASSISTANT = "assistant"


@dataclass(frozen=True)
class Message:
    """One turn: `role` is one of ROLES, `content` its text."""

    role: str
    content: str


def check_roles(messages: Sequence[Message]) -> None:
    """ValueError naming the first role outside ROLES (or an empty conversation)."""
    if not messages:
        raise ValueError("a conversation needs at least one message")
    for i, m in enumerate(messages):
        if m.role not in ROLES:
            raise ValueError(f"message {i} has role {m.role!r}; expected one of {ROLES}")


def render(messages: Sequence[Message]) -> str:
    """The chatML text of `messages` (for reading and logging; ids come from the encoders)."""
    return "".join(f"<|im_start|>{m.role}\n{m.content}<|im_end|>\n" for m in messages)


def _header(tok: Tokenizer, role: str) -> list[int]:
    return [tok.im_start_id] + tok.encode(role + "\n")


def tokenize_conversation(tok: Tokenizer, messages: Sequence[Message]) -> tuple[list[int], list[int]]:
    """ids [T] and target mask [T] (0/1) of a whole conversation.

    mask is 1 exactly on the content tokens and the `<|im_end|>` of every assistant turn.
    ValueError for an unknown role or a conversation without an assistant turn.
    """
    check_roles(messages)
    if not any(m.role == ASSISTANT for m in messages):
        raise ValueError("a training conversation needs at least one assistant turn")
    if tok.chat_template is not None:  # an imported model's own template (chat_template.py)
        return tok.chat_template.tokenize(messages)
    newline = tok.encode("\n")
    ids: list[int] = []
    mask: list[int] = []
    for m in messages:
        header = _header(tok, m.role)
        body = tok.encode(m.content) + [tok.im_end_id]
        target = 1 if m.role == ASSISTANT else 0
        ids += header + body + newline
        mask += [0] * len(header) + [target] * len(body) + [0] * len(newline)
    return ids, mask


def prompt_ids(tok: Tokenizer, messages: Sequence[Message]) -> list[int]:
    """ids of the conversation so far plus the generation prompt `<|im_start|>assistant\\n`.

    What generation, best-of-N and PPO feed the policy; append response_ids(...) to it to get
    the ids a trained conversation would have (minus its final "\\n").
    """
    check_roles(messages)
    if tok.chat_template is not None:
        return tok.chat_template.tokenize(messages, add_generation_prompt=True)[0]
    newline = tok.encode("\n")
    ids: list[int] = []
    for m in messages:
        ids += _header(tok, m.role) + tok.encode(m.content) + [tok.im_end_id] + newline
    return ids + _header(tok, ASSISTANT)


def response_ids(tok: Tokenizer, text: str) -> list[int]:
    """ids of an assistant reply as it follows prompt_ids: its content then `<|im_end|>` (the
    chat template's end-of-turn for an imported model)."""
    if tok.chat_template is not None:
        return tok.chat_template.response(text)
    return tok.encode(text) + [tok.im_end_id]


def truncate(prompt: Sequence[int], response: Sequence[int], max_len: int) -> tuple[list[int], list[int]]:
    """Cut (prompt, response) to at most `max_len` ids together: keep the prompt's end and the
    response's start.

    The rule, with p = len(prompt), r = len(response):

        R = min(r, max(max_len - p, max_len // 2))    response ids kept: its FIRST R
        P = max_len - R                               prompt ids kept: its LAST P (all if p <= P)

    So a pair that fits is unchanged; otherwise the response keeps whatever room the whole
    prompt leaves, but at least half of max_len (a long prompt cannot squeeze the reply out),
    and the prompt keeps its most recent tokens (the question being answered is at its end).
    Example: p=100, r=50, max_len=64 -> R=32, P=32.
    """
    if max_len < 1:
        raise ValueError(f"max_len={max_len} must be at least 1")
    keep_r = min(len(response), max(max_len - len(prompt), max_len // 2))
    keep_p = min(len(prompt), max_len - keep_r)
    # Explicit start index: prompt[-0:] would keep everything.
    return list(prompt[len(prompt) - keep_p:]), list(response[:keep_r])


def response_start(mask: Sequence[int]) -> int:
    """Index where the final assistant turn's content starts: the start of the last run of 1s
    in `mask` (len(mask) when there is no target at all)."""
    end = len(mask)
    while end > 0 and not mask[end - 1]:
        end -= 1
    if end == 0:
        return len(mask)
    start = end
    while start > 0 and mask[start - 1]:
        start -= 1
    return start


def truncate_masked(ids: Sequence[int], mask: Sequence[int], max_len: int) -> tuple[list[int], list[int]]:
    """truncate() for a tokenized SFT conversation: ids [T], mask [T] -> at most max_len each.

    "prompt" = everything before the final assistant turn's content (earlier turns, the
    system prompt, the final header); "response" = that content, its `<|im_end|>` and the
    trailing "\\n". The mask is cut at the same places as the ids.
    """
    if len(ids) != len(mask):
        raise ValueError(f"ids and mask differ in length: {len(ids)} != {len(mask)}")
    split = response_start(mask)
    p_ids, r_ids = truncate(ids[:split], ids[split:], max_len)
    p_mask = list(mask[split - len(p_ids):split])
    r_mask = list(mask[split:split + len(r_ids)])
    return p_ids + r_ids, p_mask + r_mask

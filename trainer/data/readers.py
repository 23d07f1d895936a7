"""Readers for the chat data formats users bring: chatML, Alpaca, HH-RLHF and preference JSONL.

Every reader returns plain python structures (lists of Message / PreferencePair) and reports a
malformed record as `ValueError("{path}:{line}: what is wrong")` with a 1-based line number, so
a user can open the file at the bad record.

Formats (one JSON object a line unless said otherwise):

    chatml      {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}
    alpaca      a JSON list or JSONL of {"instruction", "input"?, "output"} (classic Alpaca) or
                {"instruction", "instances": [{"input", "output"}, ...]} (the seed-task form:
                one conversation per instance)
    hh_rlhf     {"chosen": str, "rejected": str}, each a whole "\\n\\nHuman: ...\\n\\nAssistant: ..."
                dialogue; the two share everything up to the last Assistant turn
    preference  {"prompt": str | [messages], "chosen": str, "rejected": str}
    prompts     {"prompt": str | [messages]} or {"messages": [messages]}, plus any other fields
                (a reference "answer", a task family ...) that RL reward functions read; a
                "messages" list ending with an assistant turn gives the prompt before it
                (the reply is kept as the field "completion")

HH-RLHF rule for odd records. Broken structure (bad JSON, missing keys, text that is not a
Human/Assistant dialogue) is always an error. Records that are well formed but carry no usable
preference are known to occur in the public dumps (an empty final reply, identical replies,
or a "Human:" glued into a turn so that the two dialogues no longer share their prefix);
by default they are skipped, counted and logged once per file; `strict=True` raises instead.
The 1,800-line test slice in tests/data/ gives 1,794 pairs (4 empty final replies, 2 prefix
mismatches).
"""
from __future__ import annotations

import itertools
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from trainer.data.chat import ASSISTANT, ROLES, Message

log = logging.getLogger(__name__)
Record = tuple[int, Any]  # (1-based line number, parsed JSON value)


@dataclass
class PreferencePair:
    """A prompt (ending with a user turn) and two candidate final assistant replies."""

    prompt: list[Message]
    chosen: str
    rejected: str


class _Bad(ValueError):
    """A record problem, raised without location; the reader adds `path:line`."""


# ---- JSON plumbing --------------------------------------------------------------------------

def _jsonl_records(path: Path, text: str) -> Iterator[Record]:
    for no, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield no, json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{no}: invalid JSON: {err.msg} (column {err.colno})") from err


def _json_list_records(path: Path, text: str) -> Iterator[Record]:
    """Items of a top-level JSON list, each with the line its value starts on."""
    try:
        items = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}:{err.lineno}: invalid JSON: {err.msg} (column {err.colno})") from err
    if not isinstance(items, list):
        raise ValueError(f"{path}:1: expected a JSON list of records, got {type(items).__name__}")
    # Re-scan item by item (the text is known valid) only to learn where each one starts.
    decoder, ws = json.JSONDecoder(), re.compile(r"[\s,]*")
    pos = ws.match(text, text.index("[") + 1).end()
    for item in items:
        _, end = decoder.raw_decode(text, pos)
        yield text.count("\n", 0, pos) + 1, item
        pos = ws.match(text, end).end()


def _records(path: str | Path, allow_list: bool = False) -> tuple[Path, Iterator[Record]]:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"data file not found: {p}")
    text = p.read_text(encoding="utf-8")
    if allow_list and text.lstrip().startswith("["):
        return p, _json_list_records(p, text)
    return p, _jsonl_records(p, text)


def _located(path: Path, records: Iterator[Record], parse: Callable[[Any], Any]) -> Iterator[tuple[int, Any]]:
    """(line, parse(record)) for each record; a _Bad from parse becomes `path:line: ...`."""
    for no, rec in records:
        try:
            yield no, parse(rec)
        except _Bad as err:
            raise ValueError(f"{path}:{no}: {err}") from None


# ---- field checks ---------------------------------------------------------------------------

def _obj(rec: Any, what: str = "record") -> dict[str, Any]:
    if not isinstance(rec, dict):
        raise _Bad(f"expected a JSON object as the {what}, got {type(rec).__name__}")
    return rec


def _text(obj: dict[str, Any], key: str, *, required: bool = True, empty_ok: bool = False) -> str:
    if key not in obj:
        if required:
            raise _Bad(f"missing key {key!r} (keys: {sorted(obj)})")
        return ""
    value = obj[key]
    if not isinstance(value, str):
        raise _Bad(f"{key!r} must be a string, got {type(value).__name__}")
    if not empty_ok and not value.strip():
        raise _Bad(f"{key!r} is empty")
    return value


def _messages(value: Any, key: str) -> list[Message]:
    if not isinstance(value, list) or not value:
        raise _Bad(f"{key!r} must be a non-empty list of messages")
    out = []
    for i, item in enumerate(value):
        m = _obj(item, f"{key}[{i}]")
        role, content = _text(m, "role"), _text(m, "content")
        if role not in ROLES:
            raise _Bad(f"{key}[{i}] has role {role!r}; expected one of {ROLES}")
        out.append(Message(role, content))
    return out


# ---- chatml and alpaca ----------------------------------------------------------------------

def _parse_chatml(rec: Any) -> list[Message]:
    obj = _obj(rec)
    if "messages" not in obj:
        raise _Bad(f"missing key 'messages' (keys: {sorted(obj)})")
    msgs = _messages(obj["messages"], "messages")
    if not any(m.role == ASSISTANT for m in msgs):
        raise _Bad("the conversation has no assistant turn to train on")
    return msgs


def read_chatml(path: str | Path) -> list[list[Message]]:
    """Conversations of a chatML JSONL file."""
    p, records = _records(path)
    return [msgs for _, msgs in _located(p, records, _parse_chatml)]


def _alpaca_turns(instruction: str, inp: str, output: str) -> list[Message]:
    user = instruction if not inp.strip() else f"{instruction}\n\n{inp}"
    return [Message("user", user), Message(ASSISTANT, output)]


def _parse_alpaca(rec: Any) -> list[list[Message]]:
    obj = _obj(rec)
    instruction = _text(obj, "instruction")
    if "instances" not in obj:
        return [_alpaca_turns(instruction, _text(obj, "input", required=False, empty_ok=True),
                              _text(obj, "output"))]
    instances = obj["instances"]
    if not isinstance(instances, list) or not instances:
        raise _Bad("'instances' must be a non-empty list of {input, output} objects")
    out = []
    for i, inst in enumerate(instances):
        try:
            o = _obj(inst, f"instances[{i}]")
            out.append(_alpaca_turns(instruction, _text(o, "input", required=False, empty_ok=True),
                                     _text(o, "output")))
        except _Bad as err:
            raise _Bad(f"instances[{i}]: {err}") from None
    return out


def read_alpaca(path: str | Path) -> list[list[Message]]:
    """[user, assistant] conversations of an Alpaca JSON list / JSONL (classic or seed tasks)."""
    p, records = _records(path, allow_list=True)
    return [conv for _, convs in _located(p, records, _parse_alpaca) for conv in convs]


# ---- preference pairs -----------------------------------------------------------------------

def _parse_preference(rec: Any) -> PreferencePair:
    obj = _obj(rec)
    if "prompt" not in obj:
        raise _Bad(f"missing key 'prompt' (keys: {sorted(obj)})")
    prompt = [Message("user", _text(obj, "prompt"))] if isinstance(obj["prompt"], str) \
        else _messages(obj["prompt"], "prompt")
    if prompt[-1].role != "user":
        raise _Bad(f"the prompt must end with a user turn, not {prompt[-1].role!r}")
    chosen, rejected = _text(obj, "chosen"), _text(obj, "rejected")
    if chosen == rejected:
        raise _Bad("'chosen' and 'rejected' are identical")
    return PreferencePair(prompt, chosen, rejected)


def read_preference(path: str | Path) -> list[PreferencePair]:
    """Pairs of an explicit preference JSONL; a string prompt is one user turn."""
    p, records = _records(path)
    return [pair for _, pair in _located(p, records, _parse_preference)]


# ---- HH-RLHF --------------------------------------------------------------------------------

_HH_TURN = re.compile(r"\n\n(Human|Assistant):")
_HH_ROLE = {"Human": "user", "Assistant": ASSISTANT}


class _Skip(Exception):
    """A well-formed HH record without a usable preference; `reason` is how it is counted."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


def _hh_dialogue(text: str, key: str) -> list[Message]:
    """Turns of one "\\n\\nHuman: ...\\n\\nAssistant: ..." text (contents stripped)."""
    parts = _HH_TURN.split(text)
    if parts[0].strip() or len(parts) < 3:
        raise _Bad(f"{key!r} is not a dialogue of '\\n\\nHuman: ' / '\\n\\nAssistant: ' turns")
    msgs = [Message(_HH_ROLE[r], c.strip()) for r, c in zip(parts[1::2], parts[2::2])]
    if msgs[0].role != "user":
        raise _Bad(f"{key!r} does not start with a Human turn")
    if msgs[-1].role != ASSISTANT:
        raise _Bad(f"{key!r} does not end with an Assistant turn")
    return msgs


def _parse_hh(rec: Any) -> PreferencePair | _Skip:
    obj = _obj(rec)
    chosen = _hh_dialogue(_text(obj, "chosen"), "chosen")
    rejected = _hh_dialogue(_text(obj, "rejected"), "rejected")
    prompt = chosen[:-1]
    if prompt != rejected[:-1]:
        return _Skip("prefix_mismatch", "'chosen' and 'rejected' do not share the dialogue "
                     "up to their last Assistant turn")
    if not prompt or prompt[-1].role != "user" or any(not m.content for m in prompt):
        return _Skip("bad_prompt", "the prompt must be non-empty turns ending with a Human turn")
    if not chosen[-1].content or not rejected[-1].content:
        return _Skip("empty_reply", "the final Assistant turn is empty")
    if chosen[-1].content == rejected[-1].content:
        return _Skip("identical", "the chosen and rejected final replies are identical")
    return PreferencePair(prompt, chosen[-1].content, rejected[-1].content)


def read_hh_rlhf_report(path: str | Path,
                       strict: bool = False) -> tuple[list[PreferencePair], dict[str, list[int]]]:
    """(pairs, skipped) of an HH-RLHF JSONL file; skipped maps a reason to its line numbers.

    Reasons: "prefix_mismatch", "bad_prompt", "empty_reply", "identical". With strict=True
    the first such record raises `path:line: ...` instead.
    """
    p, records = _records(path)
    pairs: list[PreferencePair] = []
    skipped: dict[str, list[int]] = {}
    for no, got in _located(p, records, _parse_hh):
        if isinstance(got, PreferencePair):
            pairs.append(got)
        elif strict:
            raise ValueError(f"{p}:{no}: {got}")
        else:
            skipped.setdefault(got.reason, []).append(no)
    return pairs, skipped


def read_hh_rlhf(path: str | Path, strict: bool = False) -> list[PreferencePair]:
    """Pairs of an HH-RLHF JSONL file; unusable records are skipped and logged (see module doc)."""
    pairs, skipped = read_hh_rlhf_report(path, strict)
    if skipped:
        detail = "; ".join(f"{r}: {len(v)} (lines {', '.join(map(str, v[:5]))}"
                           f"{', ...' if len(v) > 5 else ''})" for r, v in sorted(skipped.items()))
        total = sum(len(v) for v in skipped.values())
        log.warning("%s: skipped %d of %d records without a usable preference: %s",
                    path, total, total + len(pairs), detail)
    return pairs


# ---- dispatch -------------------------------------------------------------------------------

def _chosen_conversations(pairs: list[PreferencePair]) -> list[list[Message]]:
    return [p.prompt + [Message(ASSISTANT, p.chosen)] for p in pairs]


PromptItem = tuple[list[Message], dict[str, Any]]  # (prompt ending with a user turn, its other fields)


def _parse_prompt_record(rec: Any) -> PromptItem:
    obj = _obj(rec)
    if "prompt" in obj:
        value = obj["prompt"]
        prompt = [Message("user", _text(obj, "prompt"))] if isinstance(value, str) else _messages(value, "prompt")
        key = "prompt"
    elif "messages" in obj:
        prompt, key = _messages(obj["messages"], "messages"), "messages"
    else:
        raise _Bad(f"needs \"prompt\" or \"messages\" (keys: {sorted(obj)})")
    fields = {k: v for k, v in obj.items() if k != key}
    if prompt[-1].role == ASSISTANT:
        fields.setdefault("completion", prompt[-1].content)
        prompt = prompt[:-1]
    if not prompt or prompt[-1].role != "user":
        raise _Bad(f"{key!r} must end with a user turn (or a user turn and its assistant reply)")
    return prompt, fields


def read_prompts(path: str | Path) -> list[PromptItem]:
    """RL prompts with their per-prompt fields (format "prompts"): JSONL or a JSON list."""
    p, records = _records(path, allow_list=True)
    return [item for _, item in _located(p, records, _parse_prompt_record)]


READERS: dict[str, Callable[[str | Path], list[Any]]] = {
    "chatml": read_chatml,
    "alpaca": read_alpaca,
    "hh_rlhf": read_hh_rlhf,
    "preference": read_preference,
}
# Preference data also serves SFT: the prompt followed by the chosen reply.
CONVERSATION_FORMATS: tuple[str, ...] = ("chatml", "alpaca", "hh_rlhf", "preference")
PAIR_FORMATS: tuple[str, ...] = ("hh_rlhf", "preference")


def read_conversations(fmt: str, path: str | Path) -> list[list[Message]]:
    """Training conversations of `path` in format `fmt` (pair formats give prompt + chosen)."""
    if fmt not in CONVERSATION_FORMATS:
        raise ValueError(f"data.format={fmt!r} does not hold conversations; "
                         f"use one of {CONVERSATION_FORMATS}")
    if fmt in PAIR_FORMATS:
        return _chosen_conversations(READERS[fmt](path))
    return READERS[fmt](path)


def read_pairs(fmt: str, path: str | Path) -> list[PreferencePair]:
    """Preference pairs of `path` in format `fmt`."""
    if fmt not in PAIR_FORMATS:
        raise ValueError(f"data.format={fmt!r} does not hold preference pairs; use one of {PAIR_FORMATS}")
    return READERS[fmt](path)


# ---- sniffing (the launcher's check before start) ------------------------------------------

PARSERS: dict[str, Callable[[Any], Any]] = {
    "chatml": _parse_chatml, "alpaca": _parse_alpaca, "hh_rlhf": _parse_hh,
    "preference": _parse_preference, "prompts": _parse_prompt_record,
}
SNIFF_RECORDS = 20
SNIFF_BYTES = 1 << 20


def _head_text(path: Path) -> tuple[Optional[str], str]:
    """(problem, whole lines of the first SNIFF_BYTES): not UTF-8 or empty is a problem."""
    with open(path, "rb") as handle:
        head = handle.read(SNIFF_BYTES)
        more = bool(handle.read(1))
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as err:
        if not (more and err.start >= len(head) - 3):  # a character cut by the read is fine
            line = head[:err.start].count(b"\n") + 1
            return f"{path}:{line}: not UTF-8 text (byte {err.start}: {head[err.start:err.start + 1]!r})", ""
        text = head[:err.start].decode("utf-8")
    if more:
        text = text[:text.rfind("\n") + 1]
    if not text.strip():
        return f"{path}: {'empty' if not more else 'no line break in the first MiB'}", ""
    return None, text


def sniff(fmt: str, path: str | Path, records: int = SNIFF_RECORDS) -> Optional[str]:
    """The first problem in the head of a `fmt` data file ("path:line: what"), or None: UTF-8,
    not empty and, for the JSON formats, the first `records` records parse as that format.
    Reads at most SNIFF_BYTES, so the launcher can check before anything starts."""
    p = Path(path)
    problem, text = _head_text(p)
    if problem or fmt not in PARSERS:
        return problem
    if fmt == "alpaca" and text.lstrip().startswith("["):
        if p.stat().st_size > SNIFF_BYTES:
            return None  # a JSON list parses only whole: the trainer's reader checks it
        try:
            found = list(itertools.islice(_json_list_records(p, text), records))
        except ValueError as err:  # invalid JSON, named by line
            return f"{err} (not {fmt} data)"
    else:
        found = []
        lines = ((no, line) for no, line in enumerate(text.splitlines(), 1) if line.strip())
        for no, line in itertools.islice(lines, records):
            try:
                found.append((no, json.loads(line)))
            except json.JSONDecodeError as err:
                return f"{p}:{no}: not {fmt} data: invalid JSON: {err.msg} (column {err.colno})"
    for no, rec in found:
        try:
            PARSERS[fmt](rec)
        except _Bad as err:
            return f"{p}:{no}: not {fmt} data: {err}"
    return None

"""Readers for the chat data formats users bring: chatML (Hugging Face's conversational shape),
Alpaca, HH-RLHF, preference pairs and RL prompts.

The records come from trainer/data/sources.py: local .jsonl / .json / .parquet / .csv / .arrow
files, directories of such shards, or `save_to_disk` directories, read with `datasets`; a
column mapping (data.columns.*, Columns below) renames a user's columns to the names here.
Every reader returns plain python structures (lists of Message / PreferencePair) and reports a
malformed record as `ValueError("{path}:{line}: what is wrong")` with a 1-based line number
(`{path}: row N` for the columnar formats), so a user can open the file at the bad record.

Formats (one record a row; the Hugging Face / TRL shape each one is in brackets):

    chatml      {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}
                [conversational], or {"prompt": str | [messages], "completion": str | [messages]}
                [prompt-completion]
    alpaca      {"instruction", "input"?, "output"} (classic Alpaca) or
                {"instruction", "instances": [{"input", "output"}, ...]} (the seed-task form:
                one conversation per instance)
    hh_rlhf     {"chosen": str, "rejected": str}, each a whole "\\n\\nHuman: ...\\n\\nAssistant: ..."
                dialogue; the two share everything up to the last Assistant turn
    preference  {"prompt": str | [messages], "chosen": str | [assistant message],
                "rejected": str | [assistant message]} [preference, explicit prompt], or
                {"chosen": [messages], "rejected": [messages]} sharing all but their last
                assistant turn [preference, implicit prompt]
    prompts     {"prompt": str | [messages]} [prompt-only] or {"messages": [messages]}, plus any other fields
                (a reference "answer", a task family ...) that RL reward functions read; a
                "messages" list ending with an assistant turn gives the prompt before it
                (the reply is kept as the field "completion")
    auto        one of the above, detected from the first record's columns (detect_format)

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
from typing import Any, Callable, Iterator, Mapping, Optional

from trainer.data.chat import ASSISTANT, ROLES, Message
from trainer.data.sources import BUILDERS, Source, clean_row, has_text_files, json_records, rows, sources

log = logging.getLogger(__name__)


@dataclass
class PreferencePair:
    """A prompt (ending with a user turn) and two candidate final assistant replies."""

    prompt: list[Message]
    chosen: str
    rejected: str


class _Bad(ValueError):
    """A record problem, raised without location; the reader adds `path:line`."""


# ---- records (trainer/data/sources.py reads them with `datasets`) ---------------------------

Columns = Mapping[str, str]  # data.columns: canonical name -> the user's column name
Record = tuple[Source, int, Any]  # (where it came from, its index there, the row)


def _records(path: str | Path, columns: Optional[Columns] = None) -> Iterator[Record]:
    """Every record of data.path `path`: a file, shards in a directory, a save_to_disk dir."""
    for source in sources(path):
        for index, rec in rows(source, columns or {}):
            yield source, index, rec


def _located(records: Iterator[Record], parse: Callable[[Any], Any]) -> Iterator[tuple[Source, int, Any]]:
    """(source, index, parse(record)) for each record; a _Bad from parse becomes `where: ...`
    (`path:line` for JSON, `path: row N` otherwise)."""
    for source, index, rec in records:
        try:
            yield source, index, parse(rec)
        except _Bad as err:
            raise ValueError(f"{source.where(index)}: {err}") from None


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

def _prompt_completion(obj: dict[str, Any]) -> list[Message]:
    """TRL's prompt-completion shape: the prompt (a string: one user turn, or messages), then
    the completion (a string: one assistant turn, or messages)."""
    prompt = [Message("user", _text(obj, "prompt"))] if isinstance(obj["prompt"], str) \
        else _messages(obj["prompt"], "prompt")
    completion = [Message(ASSISTANT, _text(obj, "completion"))] if isinstance(obj["completion"], str) \
        else _messages(obj["completion"], "completion")
    return prompt + completion


def _parse_chatml(rec: Any) -> list[Message]:
    obj = _obj(rec)
    if "messages" not in obj and "prompt" in obj and "completion" in obj:
        msgs = _prompt_completion(obj)
    elif "messages" not in obj:
        raise _Bad(f"missing key 'messages' (keys: {sorted(obj)})")
    else:
        msgs = _messages(obj["messages"], "messages")
    if not any(m.role == ASSISTANT for m in msgs):
        raise _Bad("the conversation has no assistant turn to train on")
    return msgs


def read_chatml(path: str | Path, columns: Optional[Columns] = None) -> list[list[Message]]:
    """Conversations (the `messages` column) of data.path `path`."""
    return [msgs for _, _, msgs in _located(_records(path, columns), _parse_chatml)]


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


def read_alpaca(path: str | Path, columns: Optional[Columns] = None) -> list[list[Message]]:
    """[user, assistant] conversations of Alpaca records (classic or seed tasks)."""
    return [conv for _, _, convs in _located(_records(path, columns), _parse_alpaca) for conv in convs]


# ---- preference pairs -----------------------------------------------------------------------

def _reply(obj: dict[str, Any], key: str) -> str:
    """A preference reply: a string, or (TRL's conversational form) one assistant message."""
    if not isinstance(obj.get(key), list):
        return _text(obj, key)
    msgs = _messages(obj[key], key)
    if len(msgs) != 1 or msgs[0].role != ASSISTANT:
        raise _Bad(f"{key!r} as a message list must be one assistant turn (the turns before it go in "
                   f"'prompt'); got roles {[m.role for m in msgs]}")
    return msgs[0].content


def _implicit_preference(obj: dict[str, Any]) -> PreferencePair:
    """{"chosen": [messages], "rejected": [messages]}: the prompt is what the two share."""
    chosen, rejected = _messages(obj["chosen"], "chosen"), _messages(obj["rejected"], "rejected")
    for key, msgs in (("chosen", chosen), ("rejected", rejected)):
        if msgs[-1].role != ASSISTANT:
            raise _Bad(f"{key!r} must end with an assistant turn, not {msgs[-1].role!r}")
    if chosen[:-1] != rejected[:-1]:
        raise _Bad("'chosen' and 'rejected' differ before their last assistant turn (the shared "
                   "prompt); give the prompt as a 'prompt' column instead")
    return _pair(chosen[:-1], chosen[-1].content, rejected[-1].content)


def _pair(prompt: list[Message], chosen: str, rejected: str) -> PreferencePair:
    if not prompt or prompt[-1].role != "user":
        raise _Bad(f"the prompt must end with a user turn, not {prompt[-1].role if prompt else 'nothing'!r}")
    if not chosen.strip() or not rejected.strip():
        raise _Bad("'chosen' or 'rejected' is empty")
    if chosen == rejected:
        raise _Bad("'chosen' and 'rejected' are identical")
    return PreferencePair(prompt, chosen, rejected)


def _parse_preference(rec: Any) -> PreferencePair:
    obj = _obj(rec)
    if "prompt" not in obj:
        if isinstance(obj.get("chosen"), list) and isinstance(obj.get("rejected"), list):
            return _implicit_preference(obj)
        raise _Bad(f"missing key 'prompt' (keys: {sorted(obj)})")
    prompt = [Message("user", _text(obj, "prompt"))] if isinstance(obj["prompt"], str) \
        else _messages(obj["prompt"], "prompt")
    if prompt[-1].role != "user":
        raise _Bad(f"the prompt must end with a user turn, not {prompt[-1].role!r}")
    chosen, rejected = _reply(obj, "chosen"), _reply(obj, "rejected")
    if chosen == rejected:
        raise _Bad("'chosen' and 'rejected' are identical")
    return PreferencePair(prompt, chosen, rejected)


def read_preference(path: str | Path, columns: Optional[Columns] = None) -> list[PreferencePair]:
    """Preference pairs (module doc); a string prompt is one user turn."""
    return [pair for _, _, pair in _located(_records(path, columns), _parse_preference)]


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


def read_hh_rlhf_report(path: str | Path, strict: bool = False, columns: Optional[Columns] = None
                        ) -> tuple[list[PreferencePair], dict[str, list[int]]]:
    """(pairs, skipped) of HH-RLHF records; skipped maps a reason to its line numbers (JSON
    files; row numbers otherwise).

    Reasons: "prefix_mismatch", "bad_prompt", "empty_reply", "identical". With strict=True
    the first such record raises `path:line: ...` instead.
    """
    pairs: list[PreferencePair] = []
    skipped: dict[str, list[int]] = {}
    for source, index, got in _located(_records(path, columns), _parse_hh):
        if isinstance(got, PreferencePair):
            pairs.append(got)
        elif strict:
            raise ValueError(f"{source.where(index)}: {got}")
        else:
            line = source.line(index)
            skipped.setdefault(got.reason, []).append(index if line is None else line)
    return pairs, skipped


def read_hh_rlhf(path: str | Path, strict: bool = False, columns: Optional[Columns] = None
                 ) -> list[PreferencePair]:
    """Pairs of HH-RLHF records; unusable records are skipped and logged (see module doc)."""
    pairs, skipped = read_hh_rlhf_report(path, strict, columns)
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


def read_prompts(path: str | Path, columns: Optional[Columns] = None) -> list[PromptItem]:
    """RL prompts with their per-prompt fields (format "prompts")."""
    return [item for _, _, item in _located(_records(path, columns), _parse_prompt_record)]


READERS: dict[str, Callable[..., list[Any]]] = {
    "chatml": read_chatml,
    "alpaca": read_alpaca,
    "hh_rlhf": read_hh_rlhf,
    "preference": read_preference,
}
# Preference data also serves SFT: the prompt followed by the chosen reply.
CONVERSATION_FORMATS: tuple[str, ...] = ("chatml", "alpaca", "hh_rlhf", "preference")
PAIR_FORMATS: tuple[str, ...] = ("hh_rlhf", "preference")


def read_conversations(fmt: str, path: str | Path, columns: Optional[Columns] = None) -> list[list[Message]]:
    """Training conversations of `path` in format `fmt` (pair formats give prompt + chosen)."""
    if fmt not in CONVERSATION_FORMATS:
        raise ValueError(f"data.format={fmt!r} does not hold conversations; "
                         f"use one of {CONVERSATION_FORMATS}")
    if fmt in PAIR_FORMATS:
        return _chosen_conversations(READERS[fmt](path, columns=columns))
    return READERS[fmt](path, columns=columns)


def read_pairs(fmt: str, path: str | Path, columns: Optional[Columns] = None) -> list[PreferencePair]:
    """Preference pairs of `path` in format `fmt`."""
    if fmt not in PAIR_FORMATS:
        raise ValueError(f"data.format={fmt!r} does not hold preference pairs; use one of {PAIR_FORMATS}")
    return READERS[fmt](path, columns=columns)


# ---- text (data.format=text from a data set) -------------------------------------------------

def _parse_text(rec: Any) -> str:
    return _text(_obj(rec), "text")


def read_texts(path: str | Path, columns: Optional[Columns] = None) -> list[str]:
    """The `text` column of data.path (pretraining documents from a data set), one a row."""
    return [text for _, _, text in _located(_records(path, columns), _parse_text)]


# ---- the shape, detected (data.format=auto) -------------------------------------------------

def _shape_of(rec: Any) -> str:
    """The format of one record by its columns (after the column mapping)."""
    obj = _obj(rec)
    if "messages" in obj or ("prompt" in obj and "completion" in obj):
        return "chatml"
    if "chosen" in obj and "rejected" in obj:
        if "prompt" in obj or isinstance(obj["chosen"], list):
            return "preference"
        return "hh_rlhf"
    if "instruction" in obj:
        return "alpaca"
    if "prompt" in obj:
        return "prompts"
    raise _Bad(f"no known shape in its columns {sorted(obj)}: expected 'messages' (conversational), "
               f"'prompt' + 'completion' (prompt-completion), "
               f"'prompt' + 'chosen' + 'rejected' or 'chosen' + 'rejected' (preference), 'prompt' "
               f"(prompt-only) or 'instruction' (Alpaca); map other names with data.columns.*")


def detect_format(path: str | Path, columns: Optional[Columns] = None) -> str:
    """The format (one of PARSERS) of data.path's first record: data.format=auto."""
    source = sources(path)[0]
    for index, rec in rows(source, columns or {}, limit=1):
        try:
            return _shape_of(rec)
        except _Bad as err:
            raise ValueError(f"{source.where(index)}: {err}") from None
    raise ValueError(f"{source.path}: no records")


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


def sniff(fmt: str, path: str | Path, records: int = SNIFF_RECORDS,
          columns: Optional[Columns] = None) -> Optional[str]:
    """The first problem in the head of `fmt` data at `path` ("path:line: what"), or None:
    UTF-8, not empty and, for the record formats, the first `records` records parse as that
    format. A JSON file is read for at most SNIFF_BYTES; the columnar formats and directories
    for their first `records` rows, through `datasets`. So the launcher can check before
    anything starts."""
    p = Path(path)
    if fmt == "text" and not has_text_files(str(p)):
        return _sniff_rows(fmt, p, records, columns or {}, _parse_text)
    if p.is_dir() or BUILDERS.get(p.suffix, "json") != "json":
        return _sniff_rows(fmt, p, records, columns or {}) if fmt in PARSERS else None
    problem, text = _head_text(p)
    if problem or fmt not in PARSERS:
        return problem
    if text.lstrip().startswith("["):
        if p.stat().st_size > SNIFF_BYTES:
            return None  # a JSON list parses only whole: the trainer's reader checks it
        try:
            found = list(itertools.islice(json_records(p, text), records))
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
            PARSERS[fmt](clean_row(rec, columns or {}))
        except _Bad as err:
            return f"{p}:{no}: not {fmt} data: {err}"
    return None


def _sniff_rows(fmt: str, path: Path, records: int, columns: Columns,
                parse: Optional[Callable[[Any], Any]] = None) -> Optional[str]:
    try:
        source = sources(path)[0]
        found = list(rows(source, columns, limit=records))
    except (ValueError, OSError) as err:
        return str(err)
    if not found:
        return f"{source.path}: no records"
    for index, rec in found:
        try:
            (parse or PARSERS[fmt])(rec)
        except _Bad as err:
            return f"{source.where(index)}: not {fmt} data: {err}"
    return None

"""The embedded default corpus: a seeded "assistant world" that needs no download.

The world is a registry of small task families (arithmetic and string tasks). Each family can
sample a task, phrase it as a request (several templates), answer it, recognise its own prompts
again (`gold_answer(prompt)` parses the prompt with the same templates that wrote it), and
score a free-form response (`is_correct`). Pretraining documents mix short narrative prose
with worked examples of the tasks, so a tiny GPT sees both English and the tasks' answers;
later stages (SFT, reward model, PPO, DPO) draw chat requests, right and wrong answers from the
same registry, and the gold scorer gives their `gold_reward`.

Scoring rule (what every answer template must respect): the response's answer is its LAST
candidate of the family's kind -- the last number for numeric tasks, the last anagram of the
word for `reverse`, the last case-insensitive spelling of the word for `uppercase`. So
"12 plus 7 is 19. Happy to help!" is right and "19? No, 20." is wrong.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import Callable, Mapping

Fields = Mapping[str, int | str]

# Task words; none is a word the answer styles use as filler ("Happy to help!" would
# otherwise count as the last spelling of "happy").
WORDS: tuple[str, ...] = (
    "apple", "bread", "river", "stone", "cloud", "green", "honey", "house", "light", "music",
    "night", "ocean", "paper", "plant", "quiet", "smile", "sugar", "table", "water", "world",
    "bird", "book", "cake", "door", "fish", "gold", "hill", "lamp", "moon", "rain",
    "road", "sand", "ship", "star", "tree", "wind", "wolf", "yarn", "cat", "dog",
    "sun", "map", "cup", "egg", "hat", "box", "pen", "key", "bell", "leaf",
    "garden", "window", "silver", "pepper", "butter", "letter", "banana", "rabbit", "candle", "orange",
)
NAMES: tuple[str, ...] = (
    "Ada", "Ben", "Cora", "Dan", "Eva", "Finn", "Gia", "Hugo", "Ivy", "Jon",
    "Kai", "Lena", "Mia", "Noah", "Omar", "Pia", "Rosa", "Sam", "Tara", "Yuki",
)
PLACES: tuple[str, ...] = (
    "market", "library", "park", "harbor", "school", "garden", "bakery", "station", "forest", "beach",
)
# Count nouns whose plural is a plain "s": the arithmetic stories pluralise them.
THINGS: tuple[str, ...] = (
    "apple", "book", "stone", "cup", "coin", "shell", "pencil", "flower", "card", "marble",
)
ANIMALS: tuple[str, ...] = ("cat", "dog", "fox", "owl", "horse", "rabbit", "duck", "goat")
ADJECTIVES: tuple[str, ...] = (
    "bright", "quiet", "old", "new", "small", "busy", "gentle", "round", "shiny", "calm",
)
WEATHER: tuple[str, ...] = ("sunny", "rainy", "windy", "cold", "warm", "grey")
MAX_OPERAND = 20
MAX_COMPARE = 99

# Template field -> the regex that reads it back; {a}/{b} numbers, {w} a word, {c} a letter.
_FIELD_PATTERNS: dict[str, str] = {"a": r"\d+", "b": r"\d+", "w": r"[a-z]+", "c": r"[a-z]"}


def _template_regex(template: str) -> re.Pattern[str]:
    parts = re.split(r"\{(\w)\}", template)
    out = []
    for i, part in enumerate(parts):
        # re.split with one group alternates literal text and field names.
        out.append(f"(?P<{part}>{_FIELD_PATTERNS[part]})" if i % 2 else re.escape(part))
    return re.compile("".join(out))


@dataclass(frozen=True)
class TaskExample:
    """One task instance: `prompt` is the user's request, `answer` the canonical correct one."""

    family: str
    prompt: str
    answer: str
    fields: Fields


@dataclass(frozen=True)
class TaskFamily:
    """A kind of task: how to sample it, phrase it, solve it and read an answer back.

    sample(rng) -> fields; solve(fields) -> answer; explain(fields, answer) -> a sentence
    stating the worked answer (ends with the answer); wrong(fields, rng) -> a plausible wrong
    answer; candidates(fields, response) -> the answer-like tokens of a response, in order.
    """

    name: str
    title: str  # how a worksheet heading names the family
    templates: tuple[str, ...]
    sample: Callable[[random.Random], dict[str, int | str]]
    solve: Callable[[Fields], str]
    explain: Callable[[Fields, str], str]
    wrong: Callable[[Fields, random.Random], str]
    candidates: Callable[[Fields, str], list[str]]
    regexes: tuple[re.Pattern[str], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "regexes", tuple(_template_regex(t) for t in self.templates))

    def make(self, rng: random.Random) -> TaskExample:
        fields = self.sample(rng)
        prompt = rng.choice(self.templates).format(**fields)
        return TaskExample(self.name, prompt, self.solve(fields), fields)

    def parse(self, prompt: str) -> dict[str, int | str] | None:
        """The fields of `prompt` if one of this family's templates wrote it, else None."""
        for regex in self.regexes:
            m = regex.fullmatch(prompt.strip())
            if m:
                return {k: int(v) if k in "ab" else v for k, v in m.groupdict().items()}
        return None


# ---- candidate readers -------------------------------------------------------------------

def _numbers(_: Fields, response: str) -> list[str]:
    return [str(int(n)) for n in re.findall(r"-?\d+", response)]


def _anagrams(f: Fields, response: str) -> list[str]:
    key = sorted(str(f["w"]))
    return [t.lower() for t in re.findall(r"[A-Za-z]+", response) if sorted(t.lower()) == key]


def _spellings(f: Fields, response: str) -> list[str]:
    return [t for t in re.findall(r"[A-Za-z]+", response) if t.lower() == f["w"]]


# ---- the families --------------------------------------------------------------------------

def _near_miss(value: int, rng: random.Random) -> str:
    """An off-by-a-little answer, or (one time in four) an unrelated number: the mistakes a
    tiny model actually makes."""
    if rng.random() < 0.25:
        return str(rng.choice([v for v in range(2 * MAX_OPERAND + 1) if v != value]))
    delta = rng.choice([-2, -1, 1, 2, 10])
    wrong = value + delta if value + delta >= 0 else value + abs(delta)
    return str(wrong)


def _misspelled(word: str, rng: random.Random) -> str:
    """`word` with one letter replaced, doubled or dropped (never `word` itself)."""
    i = rng.randrange(len(word))
    edits = [word[:i] + c + word[i + 1:] for c in "aeioulnrst" if c != word[i]]
    edits += [word[:i] + word[i] + word[i:], word[:i] + word[i + 1:]] if len(word) > 2 else []
    return rng.choice([e for e in edits if e != word])


def _other_word(word: str, rng: random.Random) -> str:
    return rng.choice([w for w in WORDS if w != word])


def _sample_pair(rng: random.Random) -> dict[str, int | str]:
    return {"a": rng.randint(0, MAX_OPERAND), "b": rng.randint(0, MAX_OPERAND)}


def _sample_ordered(rng: random.Random) -> dict[str, int | str]:
    a, b = rng.randint(0, MAX_OPERAND), rng.randint(0, MAX_OPERAND)
    return {"a": max(a, b), "b": min(a, b)}


def _sample_distinct(rng: random.Random) -> dict[str, int | str]:
    a, b = rng.sample(range(1, MAX_COMPARE + 1), 2)
    return {"a": a, "b": b}


def _sample_word(rng: random.Random) -> dict[str, int | str]:
    return {"w": rng.choice(WORDS)}


def _sample_letter(rng: random.Random) -> dict[str, int | str]:
    w = rng.choice(WORDS)
    # Mostly letters that occur, so answers are not dominated by zero.
    c = rng.choice(w) if rng.random() < 0.75 else rng.choice("abcdefghijklmnopqrstuvwxyz")
    return {"w": w, "c": c}


def _wrong_reverse(f: Fields, rng: random.Random) -> str:
    """Two letters swapped or the unreversed word (the answer's kind: an anagram), or a
    misspelled reversal or another word reversed (what tiny models write)."""
    w = str(f["w"])
    kind = rng.random()
    if kind < 0.25:
        return _misspelled(w[::-1], rng)
    if kind < 0.5:
        return _other_word(w, rng)[::-1]
    letters = list(w[::-1])
    i = rng.randrange(len(letters) - 1)
    letters[i], letters[i + 1] = letters[i + 1], letters[i]
    wrong = "".join(letters)
    # Swapping equal letters changes nothing; the unreversed word is then the classic mistake.
    return wrong if wrong != w[::-1] else w if w != w[::-1] else w + w[-1]


def _wrong_upper(f: Fields, rng: random.Random) -> str:
    """The word not (fully) in capitals, or another or a misspelled word in capitals."""
    w = str(f["w"])
    return rng.choice([w, w.capitalize(), w[:-1].upper() + w[-1], _other_word(w, rng).upper(),
                       _misspelled(w, rng).upper()])


def _times(count: str) -> str:
    return "time" if count == "1" else "times"


FAMILIES: tuple[TaskFamily, ...] = (
    TaskFamily(
        name="add",
        title="addition",
        templates=("What is {a} plus {b}?", "Add {a} and {b}.", "Compute {a} + {b}."),
        sample=_sample_pair,
        solve=lambda f: str(int(f["a"]) + int(f["b"])),
        explain=lambda f, ans: f"{f['a']} plus {f['b']} is {ans}.",
        wrong=lambda f, rng: _near_miss(int(f["a"]) + int(f["b"]), rng),
        candidates=_numbers,
    ),
    TaskFamily(
        name="subtract",
        title="subtraction",
        templates=("What is {a} minus {b}?", "Subtract {b} from {a}.", "Compute {a} - {b}."),
        sample=_sample_ordered,
        solve=lambda f: str(int(f["a"]) - int(f["b"])),
        explain=lambda f, ans: f"{f['a']} minus {f['b']} is {ans}.",
        wrong=lambda f, rng: _near_miss(int(f["a"]) - int(f["b"]), rng),
        candidates=_numbers,
    ),
    TaskFamily(
        name="compare",
        title="comparing numbers",
        templates=("Which is larger, {a} or {b}?", "Which number is bigger: {a} or {b}?",
                   "Is {a} or {b} the larger number?"),
        sample=_sample_distinct,
        solve=lambda f: str(max(int(f["a"]), int(f["b"]))),
        explain=lambda f, ans: f"Of {f['a']} and {f['b']}, the larger number is {ans}.",
        wrong=lambda f, rng: (str(min(int(f["a"]), int(f["b"]))) if rng.random() < 0.75 else
                              str(rng.choice([v for v in range(MAX_COMPARE + 1) if v not in (f["a"], f["b"])]))),
        candidates=_numbers,
    ),
    TaskFamily(
        name="reverse",
        title="spelling words backwards",
        templates=("Reverse the word {w}.", "Spell {w} backwards.", "What is {w} written backwards?"),
        sample=_sample_word,
        solve=lambda f: str(f["w"])[::-1],
        explain=lambda f, ans: f"The word {f['w']} spelled backwards is {ans}.",
        wrong=_wrong_reverse,
        candidates=_anagrams,
    ),
    TaskFamily(
        name="uppercase",
        title="capital letters",
        templates=("Write the word {w} in capital letters.", "Convert {w} to uppercase.",
                   "What is {w} in upper case?"),
        sample=_sample_word,
        solve=lambda f: str(f["w"]).upper(),
        explain=lambda f, ans: f"The word {f['w']} in capital letters is {ans}.",
        wrong=_wrong_upper,
        candidates=_spellings,
    ),
    TaskFamily(
        name="count_letter",
        title="counting letters",
        templates=("How many times does the letter {c} appear in {w}?",
                   "Count the letter {c} in the word {w}."),
        sample=_sample_letter,
        solve=lambda f: str(str(f["w"]).count(str(f["c"]))),
        explain=lambda f, ans: f"The letter {f['c']} appears in {f['w']} {ans} {_times(ans)}.",
        wrong=lambda f, rng: _near_miss(str(f["w"]).count(str(f["c"])), rng),
        candidates=_numbers,
    ),
)
# The registry later stages draw from; derived from FAMILIES so there is one list to edit.
TASKS: dict[str, TaskFamily] = {f.name: f for f in FAMILIES}


def sample_task(rng: random.Random, family: str | None = None) -> TaskExample:
    """A task from `family` (by name) or from a uniformly chosen family."""
    if family is not None and family not in TASKS:
        raise ValueError(f"unknown task family {family!r}; known: {sorted(TASKS)}")
    fam = TASKS[family] if family is not None else rng.choice(FAMILIES)
    return fam.make(rng)


def parse_prompt(prompt: str) -> tuple[TaskFamily, dict[str, int | str]]:
    """The family and fields that produced `prompt`; ValueError for a prompt of no family."""
    for fam in FAMILIES:
        fields = fam.parse(prompt)
        if fields is not None:
            return fam, fields
    raise ValueError(f"not a prompt of any task family ({sorted(TASKS)}): {prompt!r}")


def gold_answer(prompt: str) -> str:
    """The correct answer to a task prompt, computed from the prompt text alone."""
    fam, fields = parse_prompt(prompt)
    return fam.solve(fields)


def extract_answer(prompt: str, response: str) -> str | None:
    """The answer a response gives: its last candidate of the family's kind (None if none)."""
    fam, fields = parse_prompt(prompt)
    found = fam.candidates(fields, response)
    return found[-1] if found else None


def is_correct(prompt: str, response: str) -> bool:
    """The gold scorer: does `response` answer the task in `prompt` correctly?"""
    fam, fields = parse_prompt(prompt)
    found = fam.candidates(fields, response)
    if not found:
        return False
    gold = fam.solve(fields)
    # reverse candidates are lower-cased, so compare it case-insensitively; uppercase must match.
    return found[-1] == (gold.lower() if fam.name == "reverse" else gold)


def wrong_answer(example: TaskExample, rng: random.Random) -> str:
    """A plausible but incorrect answer to `example` (for rejected responses)."""
    return TASKS[example.family].wrong(example.fields, rng)


# ---- pretraining documents -----------------------------------------------------------------

_STORY_TEMPLATES: tuple[str, ...] = (
    "{name} walked to the {place} on a {adj} morning.",
    "The {animal} slept near the {place} all afternoon.",
    "{name} found a {adj} {thing} by the {place}.",
    "{name} and {name2} met at the {place} and talked for a while.",
    "It was a {weather} day, so {name} stayed inside and read a book.",
    "A {adj} {animal} watched {name} from the edge of the {place}.",
    "{name} asked {name2} a question, and {name2} answered it carefully.",
    "After lunch, {name} wrote a short letter to {name2}.",
)


def _plural(n: int, thing: str) -> str:
    return f"{n} {thing}" if n == 1 else f"{n} {thing}s"


def _story(rng: random.Random, min_sentences: int = 2, max_sentences: int = 4) -> str:
    """A few narrative sentences on one line: plain English for the model to learn."""
    n1, n2 = rng.sample(NAMES, 2)
    sentences = [
        t.format(name=n1, name2=n2, place=rng.choice(PLACES), adj=rng.choice(ADJECTIVES),
                 weather=rng.choice(WEATHER), animal=rng.choice(ANIMALS), thing=rng.choice(THINGS))
        for t in rng.sample(_STORY_TEMPLATES, rng.randint(min_sentences, max_sentences))
    ]
    return " ".join(sentences)


def _word_problem(rng: random.Random) -> str:
    """Arithmetic inside a story, so numbers in prose connect to the worked examples."""
    n1, n2 = rng.sample(NAMES, 2)
    thing = rng.choice(THINGS)
    a, b = rng.randint(1, MAX_OPERAND), rng.randint(1, MAX_OPERAND)
    if rng.random() < 0.5:
        return (f"{n1} had {_plural(a, thing)}. {n2} gave {n1} {b} more. "
                f"Now {n1} has {a} plus {b}, which is {_plural(a + b, thing)}.")
    a, b = max(a, b), min(a, b)
    return (f"{n1} had {_plural(a, thing)} and gave {b} to {n2}. "
            f"{n1} has {a} minus {b}, which is {_plural(a - b, thing)} left.")


def _worksheet(rng: random.Random) -> str:
    fam = rng.choice(FAMILIES)
    lines = [f"Practice: {fam.title}."]
    for _ in range(rng.randint(2, 5)):
        ex = fam.make(rng)
        lines += [f"Question: {ex.prompt}", f"Answer: {ex.answer}."]
    return "\n".join(lines)


def _notes(rng: random.Random) -> str:
    lines = []
    for _ in range(rng.randint(2, 5)):
        ex = sample_task(rng)
        lines.append(TASKS[ex.family].explain(ex.fields, ex.answer))
    return "\n".join(lines)


def _dialogue(rng: random.Random) -> str:
    lines = []
    for _ in range(rng.randint(1, 3)):
        ex = sample_task(rng)
        lines += [f"User: {ex.prompt}", f"Assistant: {TASKS[ex.family].explain(ex.fields, ex.answer)}"]
    return "\n".join(lines)


_BLOCKS: tuple[Callable[[random.Random], str], ...] = (_story, _word_problem, _worksheet, _notes, _dialogue)
# Mostly tasks: the prose is there for English, the tasks are what later stages measure.
_BLOCK_WEIGHTS: tuple[float, ...] = (1.0, 2.0, 2.0, 2.0, 2.0)


def generate_document(rng: random.Random) -> str:
    """One document: a story opening and one to three blocks of prose or worked examples.

    Lines are separated by single newlines and never blank: text files separate documents
    by blank lines, so a written corpus splits back into exactly these documents.
    """
    kinds = rng.choices(_BLOCKS, weights=_BLOCK_WEIGHTS, k=rng.randint(1, 3))
    blocks = [_story(rng, 1, 2)] + [make(rng) for make in kinds]
    return "\n".join(blocks)


def generate_corpus(num_docs: int, seed: int) -> list[str]:
    """`num_docs` documents; the same (num_docs, seed) always gives the same list.

    Document i depends only on (seed, i), so a larger corpus extends a smaller one.
    """
    if num_docs < 1:
        raise ValueError(f"data.embedded.num_docs={num_docs} must be at least 1")
    # String seeds are hashed with SHA-512 by `random`: stable across runs and Python versions.
    return [generate_document(random.Random(f"chatforge-corpus:{seed}:{i}")) for i in range(num_docs)]

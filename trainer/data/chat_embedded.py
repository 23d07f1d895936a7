"""The embedded assistant world for post-training: chat data drawn from corpus.py's task registry.

SFT conversations, preference pairs and evaluation prompts are seeded and reproducible:
item i of a set comes from its own `random.Random(f"chatforge-chat:{kind}:{seed}:{i}")`, so it
depends only on (kind, seed, i) and a larger set extends a smaller one.

Held-out tasks: a fixed tenth of the task space (decided by a hash of the family and its
fields, not by the seed) never appears in SFT or preference data and is the only source of
eval_prompts, so `gold_reward` on eval prompts measures answers to tasks the post-training
stages did not see, whatever seeds they used. Pretraining documents do not apply this split.

Responses are short (tiny models, 128-256 tokens of context) and phrased in a few styles;
with prefer="correct" the two replies of a pair draw their styles apart, so only correctness
predicts the label.
"""
from __future__ import annotations

import hashlib
import random
from typing import Sequence

from trainer.data.chat import ASSISTANT, Message
from trainer.data.corpus import TASKS, TaskExample, is_correct, parse_prompt, sample_task, wrong_answer
from trainer.data.readers import PreferencePair

SYSTEM_PROMPT = "You are a helpful assistant; answer briefly."
SYSTEM_PROB = 0.3
TWO_TURN_PROB = 0.15
HELDOUT_BUCKETS = 10  # 1 in HELDOUT_BUCKETS tasks is held out for evaluation
# How a reply wraps the answer. The scorer reads the LAST answer-like token, so nothing after
# {explain}/{answer} may look like an answer (corpus.WORDS avoids the filler words).
ANSWER_STYLES: tuple[str, ...] = (
    "{explain}",
    "Sure! {explain}",
    "{explain} Happy to help!",
    "The answer is {answer}.",
)
BRIEF_STYLE = ANSWER_STYLES[-1]  # what data.embedded.prefer=brief prefers
PREFERENCES: tuple[str, ...] = ("correct", "brief")


def _rng(kind: str, seed: int, i: int) -> random.Random:
    # String seeds are hashed with SHA-512 by `random`: stable across runs and versions.
    return random.Random(f"chatforge-chat:{kind}:{seed}:{i}")


def is_heldout(example: TaskExample) -> bool:
    """Whether the task (family and fields, whatever the template) is reserved for evaluation."""
    key = f"{example.family}:{sorted(example.fields.items())}"
    return int(hashlib.sha256(key.encode()).hexdigest(), 16) % HELDOUT_BUCKETS == 0


def _task(rng: random.Random, heldout: bool, families: Sequence[str] = ()) -> TaskExample:
    while True:  # about 1 in 10 (or 9 in 10) draws qualify: a few tries at most
        ex = sample_task(rng, rng.choice(families) if families else None)
        if is_heldout(ex) == heldout:
            return ex


def _reply(ex: TaskExample, answer: str, style: str) -> str:
    explain = TASKS[ex.family].explain(ex.fields, answer)
    return style.format(explain=explain, answer=answer)


def _opening(rng: random.Random) -> list[Message]:
    return [Message("system", SYSTEM_PROMPT)] if rng.random() < SYSTEM_PROB else []


def sft_conversations(n: int, seed: int, families: Sequence[str] = ()) -> list[list[Message]]:
    """`n` conversations with correct answers: [system?] user assistant [user assistant]."""
    out = []
    for i in range(n):
        rng = _rng("sft", seed, i)
        conv = _opening(rng)
        for _ in range(2 if rng.random() < TWO_TURN_PROB else 1):
            ex = _task(rng, heldout=False, families=families)
            conv += [Message("user", ex.prompt),
                     Message(ASSISTANT, _reply(ex, ex.answer, rng.choice(ANSWER_STYLES)))]
        out.append(conv)
    return out


def preference_pairs(n: int, seed: int, flip: float = 0.0, families: Sequence[str] = (),
                     prefer: str = "correct", test: str = "", same_style: float = 0.0) -> list[PreferencePair]:
    """`n` pairs: prompt [system?, user] and two replies.

    prefer="correct": chosen answers correctly, rejected gives a plausible wrong answer; each
    in a style drawn on its own (so style is independent of the label), or with probability
    `same_style` both in the chosen one's style (only the answer differs). prefer="brief": both answer correctly, chosen
    in BRIEF_STYLE, rejected in one of the other styles (only the style differs).
    With probability `flip` (simulated rater noise) chosen and rejected are swapped. The swap
    draw happens for every item, so the same (n, seed) gives the same pairs for any flip,
    only some of them swapped. test="heldout" or "seen": a test set for a reward model, from
    another random stream than the training pairs, on the held-out tasks or on the training
    tasks (see eval_prompts).
    """
    if not 0.0 <= flip <= 1.0:
        raise ValueError(f"flip={flip} must be in [0, 1]")
    if prefer not in PREFERENCES:
        raise ValueError(f"data.embedded.prefer={prefer!r}: must be one of {PREFERENCES}")
    out = []
    for i in range(n):
        rng = _rng(f"pref-{test}" if test else "pref", seed, i)
        prompt = _opening(rng)
        ex = _task(rng, heldout=test == "heldout", families=families)
        prompt.append(Message("user", ex.prompt))
        # The two styles are drawn apart: style says nothing about the label, so a reward model
        # must score the answer, not the phrasing (with one style per pair, each style's reward
        # level is free and best-of-N would pick by style).
        good_style = rng.choice(ANSWER_STYLES)
        good = _reply(ex, ex.answer, good_style)
        bad_answer, bad_style = wrong_answer(ex, rng), rng.choice(ANSWER_STYLES)
        if same_style > 0.0 and rng.random() < same_style:
            bad_style = good_style  # only the answer differs: the sharpest signal
        bad = _reply(ex, bad_answer, bad_style)
        if prefer == "brief":
            good = _reply(ex, ex.answer, BRIEF_STYLE)
            bad = _reply(ex, ex.answer, rng.choice(ANSWER_STYLES[:-1]))
        if rng.random() < flip:
            good, bad = bad, good
        out.append(PreferencePair(prompt, good, bad))
    return out


def _prompts(kind: str, n: int, seed: int, heldout: bool, families: Sequence[str]) -> list[list[Message]]:
    out = []
    for i in range(n):
        rng = _rng(kind, seed, i)
        prompt = _opening(rng)
        prompt.append(Message("user", _task(rng, heldout=heldout, families=families).prompt))
        out.append(prompt)
    return out


def train_prompts(n: int, seed: int, families: Sequence[str] = ()) -> list[list[Message]]:
    """`n` prompts [system?, user] on training (not held-out) tasks: RLHF rollouts."""
    return _prompts("rl", n, seed, False, families)


def is_brief(response_text: str) -> bool:
    """Whether a reply is in BRIEF_STYLE ("The answer is ...")."""
    return response_text.strip().startswith(BRIEF_STYLE.split("{")[0].strip())


EVAL_TASKS: tuple[str, ...] = ("heldout", "seen")


def eval_prompts(n: int, seed: int, families: Sequence[str] = (), tasks: str = "heldout") -> list[list[Message]]:
    """`n` prompts [system?, user] for evaluation, drawn apart from every training set.
    tasks="heldout": on the held-out tasks (see the module doc), which measures generalisation
    to tasks no stage trained on; "seen": on the training tasks (the task space is small, so
    some prompts may repeat training prompts word for word), which measures how well a stage
    learned what it was taught."""
    if tasks not in EVAL_TASKS:
        raise ValueError(f"data.embedded.eval_tasks={tasks!r}: must be one of {EVAL_TASKS}")
    return _prompts("eval" if tasks == "heldout" else "eval-seen", n, seed, tasks == "heldout", families)


def task_family(prompt_messages: Sequence[Message]) -> str:
    """The task family (corpus.TASKS) of the last user turn; ValueError if it is no task."""
    users = [m.content for m in prompt_messages if m.role == "user"]
    if not users:
        raise ValueError("task_family: the prompt has no user turn")
    return parse_prompt(users[-1])[0].name


def gold_reward(prompt_messages: Sequence[Message], response_text: str, prefer: str = "correct") -> float:
    """The true preference that the embedded pairs (data.embedded.prefer) encode, scored:
    "correct": 1.0 if the response correctly answers the last user turn's task, else 0.0;
    "brief": 1.0 if the response is in BRIEF_STYLE, else 0.0.

    ValueError if that turn is not a task of the embedded world (no gold answer exists).
    """
    users = [m.content for m in prompt_messages if m.role == "user"]
    if not users:
        raise ValueError("gold_reward: the prompt has no user turn")
    if prefer == "brief":
        return 1.0 if is_brief(response_text) else 0.0
    return 1.0 if is_correct(users[-1], response_text) else 0.0

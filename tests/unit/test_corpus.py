"""The embedded corpus and its task registry / gold scorer (trainer/data/corpus.py)."""
from __future__ import annotations

import random
import re
from pathlib import Path

import pytest

from trainer.data.preprocess import iter_documents
from trainer.data.corpus import (
    FAMILIES,
    TASKS,
    extract_answer,
    generate_corpus,
    gold_answer,
    is_correct,
    parse_prompt,
    sample_task,
    wrong_answer,
)


def test_same_seed_same_corpus_other_seed_other() -> None:
    a = generate_corpus(50, seed=3)
    assert a == generate_corpus(50, seed=3)
    assert a != generate_corpus(50, seed=4)
    assert len(set(a)) > 45  # documents vary, not one template repeated
    assert generate_corpus(80, seed=3)[:50] == a  # document i depends only on (seed, i)


def test_documents_have_no_blank_lines_and_split_back(tmp_path: Path) -> None:
    docs = generate_corpus(100, seed=0)
    for d in docs:
        assert d and d == d.strip()
        assert all(line.strip() for line in d.split("\n"))
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    assert list(iter_documents([path])) == docs


@pytest.mark.parametrize(
    "prompt, answer",
    [
        ("What is 12 plus 7?", "19"),
        ("Add 0 and 20.", "20"),
        ("Compute 3 + 4.", "7"),
        ("Subtract 3 from 10.", "7"),
        ("What is 15 minus 15?", "0"),
        ("Compute 9 - 2.", "7"),
        ("Which is larger, 12 or 31?", "31"),
        ("Is 88 or 9 the larger number?", "88"),
        ("Reverse the word apple.", "elppa"),
        ("What is moon written backwards?", "noom"),
        ("Convert cat to uppercase.", "CAT"),
        ("Write the word garden in capital letters.", "GARDEN"),
        ("How many times does the letter p appear in apple?", "2"),
        ("Count the letter z in the word banana.", "0"),
    ],
)
def test_gold_answer_known_cases(prompt: str, answer: str) -> None:
    assert gold_answer(prompt) == answer


def test_every_sampled_prompt_parses_back_to_one_family() -> None:
    rng = random.Random(0)
    seen = set()
    for _ in range(600):
        ex = sample_task(rng)
        seen.add(ex.family)
        owners = [f.name for f in FAMILIES if f.parse(ex.prompt) is not None]
        assert owners == [ex.family], ex
        assert gold_answer(ex.prompt) == ex.answer
    assert seen == set(TASKS)


def test_scorer_right_wrong_and_phrasings() -> None:
    rng = random.Random(1)
    for _ in range(300):
        ex = sample_task(rng)
        fam = TASKS[ex.family]
        assert is_correct(ex.prompt, ex.answer)
        assert is_correct(ex.prompt, fam.explain(ex.fields, ex.answer) + " Happy to help!")
        wrong = wrong_answer(ex, rng)
        assert wrong != ex.answer
        assert not is_correct(ex.prompt, wrong), (ex, wrong)
        assert not is_correct(ex.prompt, fam.explain(ex.fields, wrong)), (ex, wrong)
        if extract_answer(ex.prompt, wrong) is not None:  # a candidate answer, the last one: wrong
            assert not is_correct(ex.prompt, f"It is {ex.answer}. No wait, it is {wrong}.")


def test_scorer_reads_the_last_candidate() -> None:
    assert is_correct("What is 12 plus 7?", "12 plus 7 is 19. Happy to help!")
    assert not is_correct("What is 12 plus 7?", "19? No, 20.")
    assert not is_correct("What is 12 plus 7?", "I am not sure.")
    assert extract_answer("What is 12 plus 7?", "I am not sure.") is None
    assert is_correct("Reverse the word stone.", "Stone backwards is Enots.")
    assert not is_correct("Reverse the word stone.", "It is enots, or rather notes.")
    assert not is_correct("Convert cat to uppercase.", "CAT, I mean Cat.")
    assert extract_answer("Convert cat to uppercase.", "Sure: CAT!") == "CAT"


def test_unknown_prompt_and_family_rejected() -> None:
    with pytest.raises(ValueError, match="not a prompt of any task family"):
        gold_answer("What is the capital of France?")
    with pytest.raises(ValueError, match="unknown task family 'divide'"):
        sample_task(random.Random(0), "divide")
    fam, fields = parse_prompt("  Spell cake backwards. ")
    assert (fam.name, fields) == ("reverse", {"w": "cake"})


def test_corpus_worked_examples_are_correct() -> None:
    docs = generate_corpus(300, seed=5)
    qa = [pair for d in docs for pair in re.findall(r"Question: (.+)\nAnswer: (.+)\.", d)]
    chats = [pair for d in docs for pair in re.findall(r"User: (.+)\nAssistant: (.+)", d)]
    assert len(qa) > 100 and len(chats) > 50
    assert {parse_prompt(q)[0].name for q, _ in qa + chats} == set(TASKS)
    for q, a in qa:
        assert gold_answer(q) == a
    for q, a in chats:
        assert is_correct(q, a), (q, a)

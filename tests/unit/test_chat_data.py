"""The chat format and its loss mask (trainer/data/chat.py), SFT packing and padding
(trainer/data/packing.py), the embedded chat data (trainer/data/chat_embedded.py) and the
prompts chat_prepare gives each split."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from chatforge_config.trainer import Config
from trainer.data import chat_prepare
from trainer.data.tokenizer_training import train_tokenizer
from trainer.data.chat import (
    Message,
    prompt_ids,
    render,
    response_ids,
    tokenize_conversation,
    truncate,
    truncate_masked,
)
from trainer.data.chat_embedded import (
    BRIEF_STYLE,
    SYSTEM_PROMPT,
    eval_prompts,
    gold_reward,
    is_brief,
    is_heldout,
    preference_pairs,
    sft_conversations,
    task_family,
    train_prompts,
)
from trainer.data.corpus import TaskExample, generate_corpus, parse_prompt
from trainer.data.packing import (
    ChatSample,
    build_packed,
    build_padded,
    fit_samples,
    pack,
    packed_attention_mask,
)
from trainer.data.readers import read_hh_rlhf
from trainer.data.tokenizer import IM_END, Tokenizer

SEQ = 192


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    texts = generate_corpus(150, seed=0) + [render(c) for c in sft_conversations(50, seed=0)]
    return Tokenizer(train_tokenizer(tmp_path_factory.mktemp("tok") / "chat", 400, texts=texts))


def _conversation() -> list[Message]:
    return [
        Message("system", SYSTEM_PROMPT),
        Message("user", "What is 3 plus 4?"),
        Message("assistant", "3 plus 4 is 7."),
        Message("user", "Spell moon backwards."),
        Message("assistant", "Sure! The word moon spelled backwards is noom."),
    ]


def _runs(values: np.ndarray | list[int]) -> list[tuple[int, int]]:
    """[start, end) of each run of nonzero values."""
    out, start = [], None
    for i, v in enumerate(list(values) + [0]):
        if v and start is None:
            start = i
        elif not v and start is not None:
            out.append((start, i))
            start = None
    return out


def _assistant_texts(conv: list[Message]) -> list[str]:
    return [m.content + IM_END for m in conv if m.role == "assistant"]


def test_render_is_chatml() -> None:
    assert render([Message("user", "hi"), Message("assistant", "hello")]) == (
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>\n")


def test_mask_covers_exactly_the_assistant_turns(tok: Tokenizer) -> None:
    conv = _conversation()
    ids, mask = tokenize_conversation(tok, conv)
    assert len(ids) == len(mask) and set(mask) == {0, 1}
    assert tok.decode(ids) == render(conv)
    assert [tok.decode(ids[a:b]) for a, b in _runs(mask)] == _assistant_texts(conv)
    # Each run ends on <|im_end|> and is followed by the unmasked "\n".
    for _, b in _runs(mask):
        assert ids[b - 1] == tok.im_end_id and tok.decode(ids[b:b + 1]) == "\n"


def test_prompt_and_response_ids_match_training_ids(tok: Tokenizer) -> None:
    conv = _conversation()
    ids, _ = tokenize_conversation(tok, conv)
    joined = prompt_ids(tok, conv[:-1]) + response_ids(tok, conv[-1].content)
    assert joined == ids[:len(joined)]
    assert tok.decode(ids[len(joined):]) == "\n"
    assert tok.decode(prompt_ids(tok, conv[:2])).endswith("<|im_start|>assistant\n")


def test_bad_conversations_are_rejected(tok: Tokenizer) -> None:
    with pytest.raises(ValueError, match="'robot'"):
        tokenize_conversation(tok, [Message("robot", "x"), Message("assistant", "y")])
    with pytest.raises(ValueError, match="assistant turn"):
        tokenize_conversation(tok, [Message("user", "x")])
    with pytest.raises(ValueError, match="'bot'"):
        prompt_ids(tok, [Message("bot", "x")])


@pytest.mark.parametrize("p, r, max_len, kept_p, kept_r", [
    (100, 50, 64, 32, 32),   # both too long: the response keeps max_len // 2
    (10, 100, 64, 10, 54),   # short prompt: the response takes the rest
    (100, 10, 64, 54, 10),   # short response: the prompt takes the rest
    (20, 30, 64, 20, 30),    # fits: unchanged
    (0, 80, 64, 0, 64),
    (40, 40, 65, 33, 32),
])
def test_truncation_rule(p: int, r: int, max_len: int, kept_p: int, kept_r: int) -> None:
    prompt, response = list(range(p)), list(range(1000, 1000 + r))
    new_p, new_r = truncate(prompt, response, max_len)
    assert (len(new_p), len(new_r)) == (kept_p, kept_r)
    assert new_p == prompt[p - kept_p:] and new_r == response[:kept_r]  # prompt end, response start


def test_truncate_masked_slices_ids_and_mask_together(tok: Tokenizer) -> None:
    ids, mask = tokenize_conversation(tok, _conversation())
    positions = list(range(len(ids)))  # unique values: where each kept token came from
    final_start = _runs(mask)[-1][0]
    for max_len in (10, 17, 24, len(ids) - 1):
        kept, kept_mask = truncate_masked(positions, mask, max_len)
        assert len(kept) == len(kept_mask) == max_len
        assert kept_mask == [mask[i] for i in kept]
        prompt_part = [i for i in kept if i < final_start]
        response_part = [i for i in kept if i >= final_start]
        assert prompt_part == list(range(final_start - len(prompt_part), final_start))
        assert response_part == list(range(final_start, final_start + len(response_part)))
        assert len(response_part) >= min(len(ids) - final_start, max_len // 2)


def test_fit_samples_counts() -> None:
    long_ = ChatSample(list(range(30)), [0] * 20 + [1] * 9 + [0])
    short = ChatSample(list(range(8)), [0] * 4 + [1] * 3 + [0])
    no_target = ChatSample(list(range(6)), [0] * 6)
    first_only = ChatSample(list(range(6)), [1] + [0] * 5)  # token 0 is never a label
    samples = [long_, short, no_target, first_only]
    kept, counts = fit_samples(samples, 16, "truncate")
    assert counts == {"kept": 2, "truncated": 1, "dropped": 2}
    assert len(kept[0].ids) == 16 and kept[0].mask == [0] * 8 + [1] * 8  # R = 16 // 2
    assert kept[1] == short
    kept, counts = fit_samples(samples, 16, "drop")
    assert counts == {"kept": 1, "truncated": 0, "dropped": 3} and kept == [short]
    with pytest.raises(ValueError, match="overlong='cut'"):
        fit_samples(samples, 16, "cut")


def test_first_fit_packing_is_seeded_and_within_capacity() -> None:
    rng = np.random.default_rng(0)
    samples = [ChatSample([1] * int(n), [1] * int(n)) for n in rng.integers(1, 40, size=300)]
    packs = pack(samples, 64, seed=3)
    assert sorted(i for p in packs for i in p) == list(range(300))
    assert all(sum(len(samples[i].ids) for i in p) <= 64 for p in packs)
    assert packs == pack(samples, 64, seed=3) and packs != pack(samples, 64, seed=4)
    # Same bins as a plain first-fit scan over the same shuffled order.
    order = np.random.default_rng(3).permutation(300).tolist()
    naive: list[list[int]] = []
    for i in order:
        n = len(samples[i].ids)
        room = [b for b in naive if sum(len(samples[j].ids) for j in b) + n <= 64]
        room[0].append(i) if room else naive.append([i])
    assert packs == naive
    with pytest.raises(ValueError, match="fit_samples first"):
        pack([ChatSample([1] * 65, [1] * 65)], 64, seed=0)


def _samples(tok: Tokenizer, convs: list[list[Message]]) -> list[ChatSample]:
    return [ChatSample(*tokenize_conversation(tok, c)) for c in convs]


def _check_rows(tok: Tokenizer, arrays: dict[str, np.ndarray], rows: list[list[int]],
                samples: list[ChatSample], convs: list[list[Message]]) -> None:
    tokens, loss_mask = arrays["tokens"], arrays["loss_mask"]
    pos, seg = arrays["position_ids"], arrays["segment_ids"]
    n = len(rows)
    assert tokens.shape == (n, SEQ + 1) and tokens.dtype == np.int64
    assert loss_mask.shape == pos.shape == seg.shape == (n, SEQ)
    assert (loss_mask.dtype, pos.dtype, seg.dtype) == (np.float32, np.int64, np.int32)
    assert (tokens[:, SEQ] == tok.pad_id).all()  # a row holds at most SEQ tokens
    for r, row in enumerate(rows):
        # Never predict across a sample boundary or from/into padding.
        same = np.append(seg[r, :-1] == seg[r, 1:], False) & (seg[r] > 0)
        assert not loss_mask[r][~same].any()
        for s, i in enumerate(row, 1):
            where = np.flatnonzero(seg[r] == s)
            assert where.size == len(samples[i].ids) and (tokens[r, where] == samples[i].ids).all()
            assert (pos[r, where] == np.arange(where.size)).all()  # positions restart
            labels = tokens[r, 1:][where]
            texts = [tok.decode(labels[a:b].tolist()) for a, b in _runs(loss_mask[r, where])]
            assert texts == _assistant_texts(convs[i])


def test_packed_and_padded_rows_train_on_assistant_tokens_only(tok: Tokenizer) -> None:
    convs = [_conversation()] + sft_conversations(40, seed=1)
    samples, counts = fit_samples(_samples(tok, convs), SEQ, "truncate")
    assert counts == {"kept": len(convs), "truncated": 0, "dropped": 0}
    packs = pack(samples, SEQ, seed=0)
    assert len(packs) < len(samples) and any(len(p) > 1 for p in packs)
    _check_rows(tok, build_packed(samples, packs, SEQ, tok.pad_id), packs, samples, convs)
    singles = [[i] for i in range(len(samples))]
    _check_rows(tok, build_padded(samples, SEQ, tok.pad_id), singles, samples, convs)


def test_attention_mask_is_block_diagonal_causal() -> None:
    seg = torch.tensor([[1, 1, 1, 2, 2, 3, 0, 0]])
    blocked = packed_attention_mask(seg)
    assert blocked.shape == (1, 1, 8, 8) and blocked.dtype == torch.bool
    for q in range(8):
        for k in range(8):
            same = seg[0, q] == seg[0, k] and seg[0, q] != 0
            allowed = bool(same and k <= q) or (seg[0, q] == 0 and k == q)
            assert bool(blocked[0, 0, q, k]) == (not allowed), (q, k)


def test_packed_attention_equals_attention_per_sample() -> None:
    torch.manual_seed(0)
    lengths = [5, 3, 6]
    seg = torch.tensor([[1] * 5 + [2] * 3 + [3] * 6 + [0] * 2])
    x = torch.randn(1, 1, 16, 8)  # [b, heads, s, d]
    blocked = packed_attention_mask(seg)
    packed = torch.nn.functional.scaled_dot_product_attention(x, x, x, attn_mask=~blocked)
    assert torch.isfinite(packed).all()  # padding rows are not empty
    start = 0
    for n in lengths:
        part = x[:, :, start:start + n]
        alone = torch.nn.functional.scaled_dot_product_attention(part, part, part, is_causal=True)
        torch.testing.assert_close(packed[:, :, start:start + n], alone)
        start += n


def test_real_hh_dialogues_fit_and_pack(tok: Tokenizer, data_dir: Path) -> None:
    pairs = read_hh_rlhf(data_dir / "hh_rlhf_harmless.jsonl")[:150]
    convs = [p.prompt + [Message("assistant", p.chosen)] for p in pairs]
    seq = 256
    samples, counts = fit_samples(_samples(tok, convs), seq, "truncate")
    assert counts["kept"] + counts["dropped"] == 150 and counts["truncated"] > 0
    assert all(len(s.ids) <= seq and any(s.mask[1:]) for s in samples)
    arrays = build_packed(samples, pack(samples, seq, seed=0), seq, tok.pad_id)
    assert arrays["loss_mask"].sum() == sum(sum(s.mask[1:]) for s in samples)


# ---- the embedded chat world ----------------------------------------------------------------

def test_embedded_data_is_deterministic() -> None:
    assert sft_conversations(30, seed=5) == sft_conversations(30, seed=5)
    assert sft_conversations(50, seed=5)[:30] == sft_conversations(30, seed=5)
    assert sft_conversations(30, seed=5) != sft_conversations(30, seed=6)
    assert preference_pairs(30, seed=5) == preference_pairs(30, seed=5)
    assert eval_prompts(30, seed=5) == eval_prompts(30, seed=5)


def test_sft_conversations_are_correct_and_varied(tok: Tokenizer) -> None:
    convs = sft_conversations(400, seed=0)
    with_system = sum(c[0].role == "system" for c in convs)
    two_turn = sum(sum(m.role == "assistant" for m in c) == 2 for c in convs)
    assert 0.2 < with_system / 400 < 0.4 and 0.05 < two_turn / 400 < 0.25
    for c in convs:
        for i, m in enumerate(c):
            if m.role == "assistant":
                assert gold_reward(c[:i], m.content) == 1.0
    # Short enough for tiny models even with this 400-piece tokenizer (mostly single bytes).
    lengths = [len(tokenize_conversation(tok, c)[0]) for c in convs]
    assert np.mean(lengths) < 80 and max(lengths) <= SEQ


def test_preference_pairs_chosen_right_rejected_wrong() -> None:
    pairs = preference_pairs(300, seed=0)
    assert all(p.prompt[-1].role == "user" for p in pairs)
    assert all(gold_reward(p.prompt, p.chosen) == 1.0 for p in pairs)
    assert all(gold_reward(p.prompt, p.rejected) == 0.0 for p in pairs)


def test_flip_swaps_about_that_fraction() -> None:
    clean, noisy = preference_pairs(1000, seed=0), preference_pairs(1000, seed=0, flip=0.2)
    flipped = 0
    for a, b in zip(clean, noisy):
        assert a.prompt == b.prompt
        swapped = (b.chosen, b.rejected) == (a.rejected, a.chosen)
        assert swapped or (b.chosen, b.rejected) == (a.chosen, a.rejected)
        flipped += swapped
    assert 0.16 < flipped / 1000 < 0.24


def test_eval_prompts_are_held_out() -> None:
    evals = eval_prompts(200, seed=0)
    assert all(p[-1].role == "user" for p in evals)
    seen = {m.content for c in sft_conversations(1000, seed=0) for m in c if m.role == "user"}
    seen |= {p.prompt[-1].content for p in preference_pairs(1000, seed=0)}
    assert not seen & {p[-1].content for p in evals}
    assert {gold_reward(p, "nothing") for p in evals} == {0.0}


def test_eval_tasks_seen_draws_training_tasks_apart_from_the_training_sets() -> None:
    seen_tasks = eval_prompts(200, seed=0, tasks="seen")
    assert not any(_heldout(p) for p in seen_tasks)
    assert all(_heldout(p) for p in eval_prompts(50, seed=0))
    assert seen_tasks != eval_prompts(200, seed=1, tasks="seen")
    tests = preference_pairs(50, seed=0, test="seen")
    assert tests != preference_pairs(50, seed=0) and not any(_heldout(p.prompt) for p in tests)
    assert all(_heldout(p.prompt) for p in preference_pairs(50, seed=0, test="heldout"))
    with pytest.raises(ValueError, match="data.embedded.eval_tasks='new'"):
        eval_prompts(1, seed=0, tasks="new")


# ---- data.embedded.prefer and the RLHF prompts -----------------------------------------------

def _heldout(prompt: list[Message]) -> bool:
    """is_heldout of the task that wrote the prompt's last user turn (parsed back from its text)."""
    text = prompt[-1].content
    family, fields = parse_prompt(text)
    return is_heldout(TaskExample(family.name, text, family.solve(fields), fields))


def test_default_preference_is_correctness_and_unchanged() -> None:
    assert preference_pairs(50, seed=3) == preference_pairs(50, seed=3, prefer="correct")
    first = preference_pairs(1, seed=0)[0]  # pinned: prefer= must not move the seeded draws
    assert (first.prompt[-1].content, first.chosen, first.rejected) == (
        "Subtract 9 from 13.", "13 minus 9 is 4.", "The answer is 5.")
    with pytest.raises(ValueError, match="data.embedded.prefer"):
        preference_pairs(3, seed=0, prefer="short")


def test_brief_pairs_differ_only_in_style() -> None:
    correct, brief = preference_pairs(300, seed=0), preference_pairs(300, seed=0, prefer="brief")
    assert [p.prompt for p in brief] == [p.prompt for p in correct]  # same tasks, same seed
    head = BRIEF_STYLE.split("{")[0]
    for p in brief:
        assert p.chosen.startswith(head) and is_brief(p.chosen)
        assert not is_brief(p.rejected)
        assert gold_reward(p.prompt, p.chosen) == gold_reward(p.prompt, p.rejected) == 1.0  # both correct
        assert gold_reward(p.prompt, p.chosen, "brief") == 1.0
        assert gold_reward(p.prompt, p.rejected, "brief") == 0.0
    # The rejected replies use each of the other styles.
    sure = sum(p.rejected.startswith("Sure! ") for p in brief)
    happy = sum(p.rejected.endswith(" Happy to help!") for p in brief)
    assert sure > 50 and happy > 50 and len(brief) - sure - happy > 50
    replies = [m.content for c in sft_conversations(200, seed=0) for m in c if m.role == "assistant"]
    for text in replies + [p.chosen for p in correct]:
        assert gold_reward([Message("user", "x")], text, "brief") == float(is_brief(text))
    assert 0.1 < np.mean([is_brief(t) for t in replies]) < 0.4  # a quarter of SFT replies


def test_train_prompts_are_seeded_training_tasks() -> None:
    prompts = train_prompts(300, seed=0)
    assert len(prompts) == 300 and prompts == train_prompts(300, seed=0)
    assert train_prompts(50, seed=0) == prompts[:50] and train_prompts(50, seed=1) != prompts[:50]
    assert all(p[-1].role == "user" and [m.role for m in p[:-1]] in ([], ["system"]) for p in prompts)
    assert not any(_heldout(p) for p in prompts)
    assert all(_heldout(p) for p in eval_prompts(100, seed=0))  # the check can tell them apart
    adds = train_prompts(40, seed=0, families=["add"])
    assert {parse_prompt(p[-1].content)[0].name for p in adds} == {"add"}


def test_chat_prepare_prompts_train_and_eval_splits() -> None:
    cfg = OmegaConf.structured(Config)
    cfg.data.embedded.num_chats, cfg.data.embedded.num_prompts, cfg.data.embedded.seed = 40, 12, 7
    train = chat_prepare.prompts(cfg, "train")
    assert train == train_prompts(40, seed=7) and not any(map(_heldout, train))
    evals = chat_prepare.prompts(cfg, "eval")
    assert evals == chat_prepare.prompts(cfg) == eval_prompts(12, seed=7) and all(map(_heldout, evals))
    cfg.data.embedded.families = "reverse"
    assert {parse_prompt(p[-1].content)[0].name for p in chat_prepare.prompts(cfg, "train")} == {"reverse"}
    # gold_of follows data.embedded.prefer
    prompt = train[0]
    correct = chat_prepare.gold_of(cfg)
    cfg.data.embedded.prefer = "brief"
    brief = chat_prepare.gold_of(cfg)
    assert brief is not None and correct is not None
    assert brief(prompt, "The answer is nothing.") == 1.0 and correct(prompt, "The answer is nothing.") == 0.0


def test_training_prompts_hold_every_trained_prompt_and_no_heldout_one() -> None:
    emb = OmegaConf.structured(Config).data.embedded
    emb.num_chats, emb.num_pairs, emb.families = 300, 300, "add,reverse"
    keys = chat_prepare.embedded_training_prompts(emb)
    for conv in sft_conversations(300, 0, ["add", "reverse"]):
        last_user = max(i for i, m in enumerate(conv) if m.role == "user")
        assert chat_prepare.prompt_key(conv[:last_user + 1]) in keys
    assert chat_prepare.prompt_key(preference_pairs(300, 0, 0.0, ["add", "reverse"])[7].prompt) in keys
    # Held-out tasks are in no training set; the small task space of "reverse" (60 words x 3
    # phrasings) makes most of its seen-task evaluation prompts training prompts.
    heldout = eval_prompts(200, 0, ["add", "reverse"], "heldout")
    assert not any(chat_prepare.prompt_key(p) in keys for p in heldout)
    seen = eval_prompts(200, 0, ["reverse"], "seen")
    assert sum(chat_prepare.prompt_key(p) in keys for p in seen) > 100
    assert {task_family(p) for p in heldout} == {"add", "reverse"}


def test_same_style_pairs_differ_only_in_the_answer() -> None:
    def style(text: str) -> tuple[bool, bool, bool]:
        return text.startswith("Sure!"), text.endswith("Happy to help!"), text.startswith("The answer is")

    assert preference_pairs(200, 0, 0.2) == preference_pairs(200, 0, 0.2, same_style=0.0)
    apart = preference_pairs(100, 0, 0.0)
    assert sum(style(p.chosen) != style(p.rejected) for p in apart) > 50
    for pair in preference_pairs(100, 0, 0.0, same_style=1.0):
        assert gold_reward(pair.prompt, pair.chosen) == 1.0 and gold_reward(pair.prompt, pair.rejected) == 0.0
        assert style(pair.chosen) == style(pair.rejected)

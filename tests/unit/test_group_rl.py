"""The RL pipeline's pure parts: advantage estimators against their formulas written out on
hand-made groups, the loss options (aggregation, asymmetric clip, sequence ratio, KL
estimators), the reward sources and their errors, prompts with fields, and the launcher's
refusals of bad RL settings."""
from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from chatforge_config.trainer import ADVANTAGE_ESTIMATORS
from launcher.cli import preflight
from trainer.advantages import ESTIMATORS, AdvantageSettings, add_advantages
from trainer.data.chat import Message
from trainer.data.readers import read_prompts
from trainer.losses import aggregate, group_advantages, kl_estimate, ppo_policy_loss
from trainer.rewards import RewardError, RewardFunction, RunningMoments, Samples, build_source, checked, metric_keys

# ---- advantage estimators -------------------------------------------------------------------


def test_group_estimators_match_their_formulas_on_hand_made_groups() -> None:
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])  # two groups of G = 4
    g1, g2 = [1.0, 0.0, 0.0, 1.0], [2.0, 2.0, 2.0, 2.0]
    mean1 = 0.5
    std1 = math.sqrt(sum((x - mean1) ** 2 for x in g1) / 3)  # unbiased: n - 1
    grpo = group_advantages(r, 4, "grpo")
    assert grpo[:4].tolist() == pytest.approx([(x - mean1) / (std1 + 1e-4) for x in g1], rel=1e-6)
    assert grpo[4:].tolist() == [0.0] * 4  # equal rewards: no signal
    assert group_advantages(r, 4, "dr_grpo").tolist() == pytest.approx([x - mean1 for x in g1] + [0.0] * 4)
    loo = [x - (sum(g1) - x) / 3 for x in g1] + [x - (sum(g2) - x) / 3 for x in g2]
    assert group_advantages(r, 4, "rloo").tolist() == pytest.approx(loo)
    with pytest.raises(ValueError, match="n_samples_per_prompt=1"):
        group_advantages(r, 1, "grpo")


def _rollout(score: list[float], mask_rows: list[list[int]], logp: float = 0.0, ref: float = 0.0) -> Any:
    mask = torch.tensor(mask_rows, dtype=torch.float32)
    return SimpleNamespace(score=torch.tensor(score), mask=mask, logp=torch.full_like(mask, logp) * mask,
                           ref_logp=torch.full_like(mask, ref) * mask, values=torch.zeros_like(mask))


def _settings(estimator: str, beta: float = 0.0, in_reward: bool = True, group: int = 2) -> AdvantageSettings:
    return AdvantageSettings(estimator, beta, in_reward, "k1", 1.0, 0.95, True, group)


def test_reinforce_pp_returns_to_go_with_kl_then_global_whitening() -> None:
    # Two responses (one group of 2): rows of 3 and 2 tokens after a 1-token prompt column.
    r = _rollout([1.0, 0.0], [[0, 1, 1, 1], [0, 1, 1, 0]], logp=-1.0, ref=-1.5)
    add_advantages(r, _settings("reinforce_pp", beta=0.1), lambda t: t)
    k1 = 0.5  # log pi - log pi_ref per token
    # per-token rewards -0.05, score at the last token; returns-to-go (gamma 1)
    g = [[0, 3 * -0.1 * k1 + 1.0, 2 * -0.1 * k1 + 1.0, -0.1 * k1 + 1.0], [0, 2 * -0.1 * k1, -0.1 * k1, 0]]
    assert r.returns.tolist() == [pytest.approx(row) for row in g]
    values = [x for row, m in zip(g, r.mask.tolist()) for x, k in zip(row, m) if k]
    mean = sum(values) / len(values)
    std = math.sqrt(sum((x - mean) ** 2 for x in values) / len(values))
    expected = [[(x - mean) / std if k else 0.0 for x, k in zip(row, m)] for row, m in zip(g, r.mask.tolist())]
    assert r.advantages.tolist() == [pytest.approx(row, abs=1e-5) for row in expected]
    # the baseline variant centres the scores within the group first: 1, 0 -> 0.5, -0.5
    b = _rollout([1.0, 0.0], [[0, 1, 1, 1], [0, 1, 1, 0]], logp=-1.0, ref=-1.5)
    add_advantages(b, _settings("reinforce_pp_baseline", beta=0.1), lambda t: t)
    assert b.returns[0, 3].item() == pytest.approx(-0.05 + 0.5) and b.returns[1, 2].item() == pytest.approx(-0.55)


def test_group_estimator_with_kl_in_the_reward_and_as_a_loss() -> None:
    r = _rollout([1.0, 1.0], [[1, 1, 0], [1, 0, 0]], logp=-1.0, ref=-2.0)  # k1 = 1 per token
    add_advantages(r, _settings("dr_grpo", beta=0.5, in_reward=True), lambda t: t)
    # totals 1 - 0.5 * 2 = 0 and 1 - 0.5 * 1 = 0.5 -> centred -0.25, 0.25 on each response token
    assert r.advantages.tolist() == [[-0.25, -0.25, 0.0], [0.25, 0.0, 0.0]]
    q = _rollout([1.0, 1.0], [[1, 1, 0], [1, 0, 0]], logp=-1.0, ref=-2.0)
    add_advantages(q, _settings("dr_grpo", beta=0.5, in_reward=False), lambda t: t)
    assert q.advantages.abs().sum() == 0  # the KL is the loss's business, not the reward's


def test_every_configured_estimator_is_registered() -> None:
    assert tuple(ESTIMATORS) == ADVANTAGE_ESTIMATORS


# ---- loss options -------------------------------------------------------------------------------


def test_aggregations() -> None:
    loss = torch.tensor([[1.0, 2.0, 3.0, 0.0], [4.0, 0.0, 0.0, 0.0], [9.0, 9.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]])  # row 3: masked out entirely
    total, count = aggregate(loss, mask, "token_mean")
    assert (total.item(), count.item()) == (10.0, 4.0)
    total, count = aggregate(loss, mask, "seq_mean_token_mean")
    assert (total.item(), count.item()) == (2.0 + 4.0, 2.0)
    total, count = aggregate(loss, mask, "seq_mean_token_sum_norm", max_len=8)
    assert (total.item(), count.item()) == (10.0 / 8, 2.0)


def test_asymmetric_clip_and_sequence_ratio() -> None:
    old = torch.zeros(1, 2)
    mask = torch.ones(1, 2)
    adv = torch.ones(1, 2)
    logp = torch.log(torch.tensor([[1.5, 1.1]]))  # token ratios 1.5 and 1.1
    total, _, m = ppo_policy_loss(logp, old, adv, mask, clip=0.2, clip_high=0.28)
    assert total.item() == pytest.approx(-(1.28 + 1.1))  # 1.5 clipped at 1 + clip_high
    assert m["clip_fraction"][0].item() == 1.0
    total, _, _ = ppo_policy_loss(logp, old, adv, mask, clip=0.2)
    assert total.item() == pytest.approx(-(1.2 + 1.1))
    # GSPO: every token takes the length-normalised sequence ratio sqrt(1.5 x 1.1)
    seq = math.sqrt(1.5 * 1.1)
    total, _, _ = ppo_policy_loss(logp, old, adv, mask, clip=0.3, ratio_level="sequence")
    assert total.item() == pytest.approx(-2 * seq)
    # the gradient flows through the sequence ratio into both tokens equally
    lp = logp.clone().requires_grad_(True)
    ppo_policy_loss(lp, old, adv, mask, clip=0.3, ratio_level="sequence")[0].backward()
    assert lp.grad[0, 0].item() == pytest.approx(lp.grad[0, 1].item())


def test_kl_estimators() -> None:
    logp, ref = torch.tensor([-1.0]), torch.tensor([-1.5])
    d = -0.5
    assert kl_estimate(logp, ref, "k1").item() == pytest.approx(0.5)
    assert kl_estimate(logp, ref, "k2").item() == pytest.approx(0.125)
    assert kl_estimate(logp, ref, "k3").item() == pytest.approx(math.exp(d) - d - 1)


# ---- reward sources -----------------------------------------------------------------------------


def _samples(texts: list[str], meta: list[dict[str, Any]] | None = None) -> Samples:
    prompts = [[Message("user", f"q{i}")] for i in range(len(texts))]
    return Samples(prompts, texts, [[1]] * len(texts), [[2]] * len(texts), [True, False, True][:len(texts)],
                   meta or [{} for _ in texts])


def fixed_reward(prompts: list[str], completions: list[str], **columns: Any) -> list[float]:
    """A user callable (used by name: tests.unit.test_group_rl:fixed_reward)."""
    return [float(len(c)) + (1.0 if columns["finished"][i] else 0.0) for i, c in enumerate(completions)]


def test_sources_weights_and_per_source_scores() -> None:
    specs = ["eos", "regex:^The answer", "tests.unit.test_group_rl:fixed_reward"]
    fn = RewardFunction(specs, [1.0, 2.0, 0.5], [build_source(s, None, None) for s in specs])
    total, parts = fn(_samples(["The answer is 4.", "no", "The answer"]))
    assert parts["reward_eos"].tolist() == [1.0, 0.0, 1.0]
    assert parts["reward_regex"].tolist() == [1.0, 0.0, 1.0]
    assert parts["reward_fixed_reward"].tolist() == [17.0, 2.0, 11.0]
    assert total.tolist() == pytest.approx([1 + 2 + 8.5, 1.0, 1 + 2 + 5.5])
    assert metric_keys(["regex:a", "regex:b", "rm"]) == ["regex", "regex_2", "rm"]


def test_math_source_reads_the_answer_field() -> None:
    fn = build_source("math", None, None)
    got = fn(_samples(["so the result is \\boxed{7}", "it is 8", "0.5"],
                      [{"answer": "7"}, {"answer": "7"}, {"answer": "\\frac{1}{2}"}]))
    assert list(got) == [1.0, 0.0, 1.0]
    with pytest.raises(RewardError, match="sample 1 has fields"):
        fn(_samples(["7", "7"], [{"answer": "7"}, {"solution": "7"}]))


@pytest.mark.parametrize("values,match", [
    ([1.0, float("nan")], "for sample 4: not finite"),
    ([1.0], "returned 1 values for 2 samples"),
    ([1.0, "high"], "'high' \\(str\\) for sample 4: not a number"),
    (0.5, "expected a sequence of 2 numbers"),
])
def test_bad_values_name_the_source_the_sample_and_the_value(values: Any, match: str) -> None:
    with pytest.raises(RewardError, match=f"pkg.mod:fn .*{match}"):
        checked("pkg.mod:fn", values, 2, offset=3)


def test_a_raising_callable_is_named() -> None:
    def boom(prompts: list[str], completions: list[str], **_: Any) -> list[float]:
        raise KeyError("answer")

    fn = RewardFunction(["mine:boom"], [], [lambda s: boom([], s.texts)])
    with pytest.raises(RewardError, match="mine:boom raised KeyError: 'answer' \\(samples 8..9\\)"):
        fn(_samples(["a", "b"]), offset=8)
    with pytest.raises(RewardError, match="cannot import 'no_such_module_xyz:f'"):
        build_source("no_such_module_xyz:f", None, None)
    with pytest.raises(RewardError, match="gold .*data=embedded"):
        build_source("gold", None, None)
    with pytest.raises(RewardError, match="ppo.reward_weights"):
        RewardFunction(["eos", "gold"], [1.0], [])


def test_normalisation_and_clipping() -> None:
    fn = RewardFunction(["eos"], [], [lambda s: s.finished], norm="batch", clip=0.9)
    out = fn.post(torch.tensor([0.0, 1.0, 2.0, 3.0], dtype=torch.float64), lambda t: t)
    z = (torch.tensor([0.0, 1.0, 2.0, 3.0]) - 1.5) / math.sqrt(1.25)
    assert out.tolist() == pytest.approx(z.clamp(-0.9, 0.9).tolist(), abs=1e-6)
    run = RewardFunction(["eos"], [], [lambda s: s.finished], norm="running")
    run.post(torch.tensor([0.0, 2.0], dtype=torch.float64), lambda t: t)
    run.post(torch.tensor([4.0, 6.0], dtype=torch.float64), lambda t: t)
    assert run.running.mean == pytest.approx(3.0) and run.running.std == pytest.approx(math.sqrt(5.0))
    restored = RunningMoments()
    restored.load_state_dict(run.running.state_dict())
    assert restored == run.running


# ---- prompts with fields ----------------------------------------------------------------------


def test_prompts_file_carries_its_fields(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "What is 2+2?", "answer": "4", "level": 1}\n'
                    '{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},'
                    ' {"role": "assistant", "content": "Hello"}], "id": 7}\n')
    items = read_prompts(path)
    assert items[0] == ([Message("user", "What is 2+2?")], {"answer": "4", "level": 1})
    assert [m.role for m in items[1][0]] == ["system", "user"] and items[1][1] == {"id": 7, "completion": "Hello"}
    path.write_text('{"prompt": "ok"}\n{"question": "no prompt"}\n')
    with pytest.raises(ValueError, match=r"p.jsonl:2: needs \"prompt\" or \"messages\""):
        read_prompts(path)


# ---- the launcher refuses bad RL settings before anything starts --------------------------------


@pytest.mark.parametrize("overrides,key", [
    (["stage=grpo", "ppo.n_samples_per_prompt=1"], "ppo.n_samples_per_prompt"),
    (["stage=rloo", "ppo.reward_funcs=[no_such_pkg_q.mod:score]"], "ppo.reward_funcs"),
    (["stage=grpo", "ppo.reward_funcs=[tests.unit.test_group_rl:not_there]"], "ppo.reward_funcs"),
    (["stage=grpo", "ppo.reward_funcs=[gold,eos]", "ppo.reward_weights=[1.0]"], "ppo.reward_weights"),
    (["stage=grpo", "ppo.clip_low=0.3", "ppo.clip_high=0.2"], "ppo.clip_high"),
    (["stage=grpo", "ppo.advantage_estimator=vtrace"], "ppo.advantage_estimator"),
    (["stage=grpo", "ppo.loss_agg=mean"], "ppo.loss_agg"),
    (["stage=grpo", "ppo.reward_funcs=[rm]"], "ppo.reward"),
    (["stage=grpo", "ppo.rollout_batch=6"], "ppo.rollout_batch"),  # 6 x 4 responses: not minibatches of 16
    (["stage=grpo", "data=chatml", "data.path={file}", "ppo.reward_funcs=[gold]"], "ppo.reward_funcs"),
    (["stage=a2c", "ppo.advantage_estimator=grpo", "ppo.n_samples_per_prompt=2"], "ppo.advantage_estimator"),
    (["stage=ppo", "ppo.dynamic_sampling=true"], "ppo.dynamic_sampling"),
    (["stage=grpo", 'ppo.reward_funcs=["regex:("]'], "ppo.reward_funcs"),
])
def test_bad_rl_settings_are_rejected_naming_the_key(overrides: list[str], key: str, tmp_path: Path) -> None:
    (tmp_path / "f").write_text("{}\n")
    base = [f"ckpt.load={tmp_path}", "ppo.reward_funcs=[gold]", f"run.dir={tmp_path / 'run'}"]
    _, errors = preflight(base + [o.replace("{file}", str(tmp_path / "f")) for o in overrides], multirun=False)
    assert any(line.startswith(f"{key}=") for line in errors), errors
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("stage", ["grpo", "dr_grpo", "rloo", "reinforce_pp"])
def test_the_presets_validate(stage: str, tmp_path: Path) -> None:
    _, errors = preflight([f"stage={stage}", f"ckpt.load={tmp_path}", f"run.dir={tmp_path / 'run'}",
                           "ppo.reward_funcs=[gold,eos,tests.unit.test_group_rl:fixed_reward]"], multirun=False)
    assert errors == []

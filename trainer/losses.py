"""Losses as pure tensor functions. Each returns what Megatron's pipeline schedule expects
from a loss function with `calculate_per_token_loss=True`: a summed loss, the number of
tokens (or samples) it sums over, and metrics as `[sum, count]` pairs that the engine
reduces over microbatches and data-parallel ranks."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from chatforge_config.trainer import KL_ESTIMATORS, LOSS_AGGREGATIONS

LossTerms = tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]


def masked_token_loss(per_token_loss: torch.Tensor, loss_mask: Optional[torch.Tensor] = None) -> LossTerms:
    """Next-token cross-entropy summed over the tokens the mask keeps.

    per_token_loss: [b, s] float, -log p(x_{t+1} | x_{<=t}) per position (Megatron's
        `compute_language_model_loss` output).
    loss_mask: [b, s] {0, 1}; None keeps every token (pretraining).
    Returns (sum_t m_t * l_t, sum_t m_t, {"loss": [sum, count]}): the schedule divides the
    global sum by the global count, so the loss is the token-weighted mean
    L = sum_t m_t l_t / sum_t m_t over the whole global batch.
    """
    losses = per_token_loss.float()
    if loss_mask is None:
        total = losses.sum()
        count = torch.tensor(losses.numel(), dtype=torch.int, device=losses.device)
    else:
        mask = loss_mask.to(losses.dtype)
        total = (losses * mask).sum()
        count = mask.sum().to(torch.int)
    pair = torch.stack([total.detach(), count.detach().to(total.dtype)])
    return total, count, {"loss": pair}


def outputs_only(output: torch.Tensor, **values: torch.Tensor) -> LossTerms:
    """For Engine.forward_outputs: no loss (a zero that keeps the schedule's contract), the
    per-sample `values` as the third element (any shapes; not [sum, count] pairs)."""
    return output.float().sum() * 0.0, torch.tensor(1, dtype=torch.int), values


def _pair(total: torch.Tensor, count: torch.Tensor | float) -> torch.Tensor:
    count = torch.as_tensor(count, dtype=total.dtype, device=total.device)
    return torch.stack([total.detach(), count.detach()])


def read_reward(values: torch.Tensor, response_mask: torch.Tensor, reduce: str = "last") -> torch.Tensor:
    """One reward per sequence from a scalar head.

    values: [b, s] float, the head's output at every input position.
    response_mask: [b, s] {0, 1}, 1 on the response's tokens (aligned with the inputs).
    reduce: "last" reads r = v_T at the response's last token T (InstructGPT); "mean" takes
        r = sum_t m_t v_t / sum_t m_t.
    Returns [b]. A row without response tokens gets the value at its last position.
    """
    mask = response_mask.to(values.dtype)
    if reduce == "mean":
        return (values * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
    if reduce != "last":
        raise ValueError(f"rm.reduce={reduce!r}: must be last or mean")
    positions = torch.arange(values.shape[-1], device=values.device).expand_as(values)
    last = torch.where(mask > 0, positions, torch.zeros_like(positions)).amax(-1)
    return values.gather(-1, last.unsqueeze(-1)).squeeze(-1)


def pairwise_reward_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: float = 0.0) -> LossTerms:
    """Bradley-Terry reward-model loss (InstructGPT eq. 1; Llama-2's margin variant).

    chosen, rejected: [n] rewards r(x, y_w), r(x, y_l) of n pairs.
    L = -(1/n) sum_i log sigmoid(r_w,i - r_l,i - margin).
    Returns (summed loss, n, metrics): loss, accuracy (r_w > r_l), margin (r_w - r_l),
    reward_chosen, reward_rejected -- each as [sum, count].
    """
    diff = chosen.float() - rejected.float()
    total = -F.logsigmoid(diff - margin).sum()
    n = diff.numel()
    return total, torch.tensor(n, dtype=torch.int, device=diff.device), {
        "loss": _pair(total, n),
        "accuracy": _pair((diff > 0).float().sum(), n),
        "margin": _pair(diff.sum(), n),
        "reward_chosen": _pair(chosen.float().sum(), n),
        "reward_rejected": _pair(rejected.float().sum(), n),
    }


def sequence_logprobs(per_token_nll: torch.Tensor, label_mask: torch.Tensor) -> torch.Tensor:
    """log pi(y | x) = sum over response labels of log p(y_t | y_<t, x).

    per_token_nll: [b, s] -log p of each label (the LM's per-token loss).
    label_mask: [b, s] {0, 1}, 1 where the label is a response token.
    Returns [b].
    """
    return -(per_token_nll.float() * label_mask.to(torch.float32)).sum(-1)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float, kind: str = "sigmoid",
             label_smoothing: float = 0.0) -> LossTerms:
    """Direct preference optimisation over n pairs (all arguments [n] sequence log-probs).

    h = (log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l)).
    sigmoid (DPO, Rafailov et al. 2023 eq. 7; with label smoothing eps, the conservative
        cDPO of Mitchell 2023): L = -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h).
    ipo (Azar et al. 2023 eq. 17): L = (h - 1 / (2 beta))^2.
    Metrics: loss; accuracy = share of pairs whose implicit reward beta*(log pi - log ref) is
    higher for the chosen response; margin = mean beta h; logp_chosen / logp_rejected = mean
    policy log-probs; kl = mean over both responses of log pi - log ref (the sequence-level
    log-ratio on the preference data: how far the policy moved from the reference).
    """
    chosen_ratio = policy_chosen.float() - ref_chosen.float()
    rejected_ratio = policy_rejected.float() - ref_rejected.float()
    h = chosen_ratio - rejected_ratio
    if kind == "sigmoid":
        losses = -(1.0 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif kind == "ipo":
        losses = (h - 1.0 / (2.0 * beta)) ** 2
    else:
        raise ValueError(f"dpo.loss={kind!r}: must be sigmoid or ipo")
    total = losses.sum()
    n = h.numel()
    return total, torch.tensor(n, dtype=torch.int, device=h.device), {
        "loss": _pair(total, n),
        "accuracy": _pair((h > 0).float().sum(), n),
        "margin": _pair(beta * h.sum(), n),
        "logp_chosen": _pair(policy_chosen.float().sum(), n),
        "logp_rejected": _pair(policy_rejected.float().sum(), n),
        "kl": _pair((chosen_ratio + rejected_ratio).sum() / 2.0, n),
    }


# ---- RLHF: rewards, advantages, policy and value losses (PPO, A2C) ---------------------------

def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token estimators of KL(pi || pi_ref) from samples of pi (Schulman 2020, "Approximating
    KL divergence"). logp, ref_logp: [b, t] log-probs of the sampled tokens; with
    d = log pi_ref - log pi:
    k1 = -d (unbiased, high variance; can be negative), k2 = d^2 / 2 (biased, low variance),
    k3 = exp(d) - d - 1 (unbiased, low variance, >= 0: GRPO's KL loss, DeepSeekMath eq. 4).
    Returns [b, t]."""
    d = ref_logp - logp
    if kind == "k1":
        return -d
    if kind == "k2":
        return 0.5 * d * d
    if kind == "k3":
        return torch.exp(d) - d - 1.0
    raise ValueError(f"ppo.kl_estimator={kind!r}: must be one of {KL_ESTIMATORS}")


def kl_penalty_rewards(score: torch.Tensor, logp: torch.Tensor, ref_logp: torch.Tensor,
                       mask: torch.Tensor, beta: float, estimator: str = "k1") -> torch.Tensor:
    """Per-token rewards of a response (Ziegler et al. 2019; InstructGPT eq. 2).

    score: [b] reward of each whole response (reward model, verifier, rules...).
    logp, ref_logp: [b, t] log pi(a_t | s_t) and log pi_ref(a_t | s_t) of the response tokens.
    mask: [b, t] {0, 1}, 1 on the response's tokens (rows may end at different t).
    r_t = -beta k(log pi, log pi_ref)_t (k = kl_estimate's `estimator`; k1 = the log-ratio),
    plus `score` at each row's last token.
    Returns [b, t] (0 where mask is 0).
    """
    mask = mask.to(logp.dtype)
    rewards = -beta * kl_estimate(logp, ref_logp, estimator) * mask
    last = (mask * torch.arange(mask.shape[1], device=mask.device)).argmax(-1)
    return rewards.scatter_add(1, last.unsqueeze(1), score.to(rewards.dtype).unsqueeze(1))


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, eq. 16).

    rewards, values: [b, t]; mask: [b, t] {0, 1} (1 on response tokens: one contiguous run per
        row, which may start after a prompt).
    delta_t = r_t + gamma V_{t+1} - V_t, with V = 0 after a row's last token (the episode ends);
    A_t = sum_l (gamma lam)^l delta_{t+l};  returns R_t = A_t + V_t.
    Returns (advantages, returns), both [b, t] and 0 where mask is 0.
    """
    mask = mask.to(values.dtype)
    values = values * mask
    advantages = torch.zeros_like(values)
    running = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        next_value = values[:, t + 1] if t + 1 < values.shape[1] else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * mask[:, t]
        advantages[:, t] = running
    return advantages, (advantages + values) * mask


def masked_moments(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[count, sum, sum of squares] (float64) of the masked entries of values [b, t]: add
    them over data-parallel ranks to whiten over the whole rollout."""
    m = mask.to(torch.float64)
    v = values.to(torch.float64) * m
    return torch.stack([m.sum(), v.sum(), (v * v).sum()])


def whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8,
           moments: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(x - mean) / std over the masked entries (mean kept if not shift_mean); 0 elsewhere.
    values, mask: [b, t]. The variance is the biased one (the mean of squares).
    `moments`: masked_moments summed over several ranks (default: this batch's own)."""
    if moments is None:
        moments = masked_moments(values, mask)
    count = moments[0].clamp(min=1.0)
    mean = moments[1] / count
    var = (moments[2] / count - mean * mean).clamp(min=0.0)
    mean, var = mean.to(values.dtype), var.to(values.dtype)
    out = (values - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask.to(values.dtype)


# ---- group RL (GRPO, Dr. GRPO, RLOO, REINFORCE++): advantages without a critic ---------------

GROUP_ESTIMATORS: tuple[str, ...] = ("grpo", "dr_grpo", "rloo")


def group_advantages(scores: torch.Tensor, group_size: int, kind: str, eps: float = 1e-4) -> torch.Tensor:
    """One advantage per response from the rewards of its group (several samples of one prompt).

    scores: [N] rewards, N = groups x G with the G responses of a prompt consecutive.
    grpo (Shao et al. 2024, DeepSeekMath sec. 4.1.2): A_i = (r_i - mean_g) / (std_g + eps), std the
        unbiased (n - 1) one, eps = 1e-4 (as TRL); a group whose rewards are all equal gets 0.
    dr_grpo (Liu et al. 2025, "Understanding R1-Zero-like training", eq. 3): A_i = r_i - mean_g
        (no std scaling: questions of low reward spread are not up-weighted).
    rloo (Ahmadian et al. 2024, eq. 9): A_i = r_i - 1/(G-1) sum_{j != i} r_j, the leave-one-out
        baseline (unbiased: r_i is not in its own baseline) = G/(G-1) (r_i - mean_g).
    Returns [N] (float32)."""
    if group_size < 2:
        raise ValueError(f"ppo.n_samples_per_prompt={group_size}: ppo.advantage_estimator={kind} compares "
                         "the samples of a prompt: needs >= 2")
    r = scores.double().view(-1, group_size)
    mean = r.mean(-1, keepdim=True)
    if kind == "grpo":
        out = (r - mean) / (r.std(-1, keepdim=True) + eps)
    elif kind == "dr_grpo":
        out = r - mean
    elif kind == "rloo":
        out = r - (r.sum(-1, keepdim=True) - r) / (group_size - 1)
    else:
        raise ValueError(f"ppo.advantage_estimator={kind!r}: not a group estimator {GROUP_ESTIMATORS}")
    return out.view(-1).float()


def group_centered(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """r_i - mean of its group ([N] -> [N]): REINFORCE++-baseline's reward shaping (Hu 2025,
    sec. 3), before the KL penalty and the global whitening."""
    r = scores.double().view(-1, group_size)
    return (r - r.mean(-1, keepdim=True)).view(-1).to(scores.dtype)


# ---- policy losses ------------------------------------------------------------------------------

def aggregate(per_token: torch.Tensor, mask: torch.Tensor, mode: str = "token_mean",
              max_len: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """How a per-token loss [b, t] becomes (sum, count) for the engine, which divides the
    global sum by the global count (so the loss is a mean over the whole minibatch):
    token_mean: sum_i sum_t m l / sum_i sum_t m (every token weighs the same; DAPO, OpenRLHF);
    seq_mean_token_mean: sum_i (sum_t m l / |y_i|) / #rows (every response weighs the same;
        the GRPO paper's 1/G sum_i 1/|o_i| sum_t);
    seq_mean_token_sum_norm: sum_i sum_t m l / max_len / #rows (Dr. GRPO: a constant
        normaliser, no length bias).
    Rows whose mask is all 0 (e.g. masked overlong responses) count in neither."""
    mask = mask.to(per_token.dtype)
    tokens = mask.sum(-1)
    if mode == "token_mean":
        return (per_token * mask).sum(), tokens.sum()
    rows = (tokens > 0).to(per_token.dtype).sum()
    if mode == "seq_mean_token_mean":
        return ((per_token * mask).sum(-1) / tokens.clamp(min=1.0)).sum(), rows
    if mode == "seq_mean_token_sum_norm":
        return (per_token * mask).sum() / float(max_len), rows
    raise ValueError(f"ppo.loss_agg={mode!r}: must be one of {LOSS_AGGREGATIONS}")


def ppo_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                    mask: torch.Tensor, clip: float, clip_high: Optional[float] = None,
                    ratio_level: str = "token", agg: str = "token_mean", max_len: int = 1) -> LossTerms:
    """PPO's clipped surrogate (Schulman et al. 2017, eq. 7) with the options of the group
    methods.

    logp, old_logp, advantages, mask: [b, t].
    ratio_level="token": ratio_t = exp(logp_t - old_logp_t) (PPO, GRPO);
        "sequence" (GSPO, Zheng et al. 2025, eq. 7): every token of row i takes
        s_i = exp(sum_t m (logp - old_logp) / |y_i|), the length-normalised sequence ratio.
    l_t = max(-A_t ratio_t, -A_t clip(ratio_t, 1 - clip, 1 + clip_high)); clip_high defaults to
        clip (DAPO's clip-higher sets it larger: eq. 10).
    The sum and count follow `aggregate(l, mask, agg, max_len)`.
    Metrics (per token): loss, clip_fraction (share of tokens where the clipped term is taken),
    approx_kl (mean of (r - 1) - log r with the token ratio r: Schulman's k3 of KL(old || new)).
    """
    mask = mask.to(logp.dtype)
    token_log_ratio = logp - old_logp
    log_ratio = token_log_ratio
    if ratio_level == "sequence":
        seq = (token_log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
        log_ratio = seq.unsqueeze(-1).expand_as(logp)
    elif ratio_level != "token":
        raise ValueError(f"ppo.ratio_level={ratio_level!r}: must be token or sequence")
    ratio = torch.exp(log_ratio)
    high = clip if clip_high is None else clip_high
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + high)
    total, count = aggregate(torch.maximum(unclipped, clipped), mask, agg, max_len)
    tokens = mask.sum()
    token_ratio = torch.exp(token_log_ratio)
    return total, count.to(torch.int), {
        "loss": _pair(total, count),
        "clip_fraction": _pair(((clipped > unclipped).to(mask.dtype) * mask).sum(), tokens),
        "approx_kl": _pair((((token_ratio - 1.0) - token_log_ratio) * mask).sum(), tokens),
    }


def a2c_policy_loss(logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                    agg: str = "token_mean", max_len: int = 1) -> LossTerms:
    """Advantage actor-critic policy loss (Mnih et al. 2016): l_t = -A_t log pi(a_t|s_t), one
    on-policy update per rollout, no ratio and no clipping; summed and counted by
    `aggregate(l, mask, agg, max_len)` (token_mean: over sum_t m_t tokens).
    logp, advantages, mask: [b, t]."""
    mask = mask.to(logp.dtype)
    total, count = aggregate(-(advantages.detach() * logp), mask, agg, max_len)
    return total, count.to(torch.int), {"loss": _pair(total, count)}


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
               mask: torch.Tensor, clip: Optional[float]) -> LossTerms:
    """Critic loss, summed over response tokens: 0.5 (V - R)^2, or PPO's clipped form
    0.5 max((V - R)^2, (clip(V, V_old - c, V_old + c) - R)^2) when `clip` is set.
    values, old_values, returns, mask: [b, t]. Metric: loss (the same number)."""
    mask = mask.to(values.dtype)
    err = (values - returns) ** 2
    if clip is not None:
        clipped = old_values + torch.clamp(values - old_values, -clip, clip)
        err = torch.maximum(err, (clipped - returns) ** 2)
    total = 0.5 * (err * mask).sum()
    count = mask.sum()
    return total, count.to(torch.int), {"loss": _pair(total, count)}

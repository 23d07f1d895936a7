"""The RL stages: PPO, A2C, GRPO, Dr. GRPO, RLOO, REINFORCE++ (one pipeline, docs/rlhf.md).

One iteration (one `train_step` of the shared loop; train.steps counts iterations):
1. rollout: ppo.rollout_batch prompts (over all DP ranks), each sampled
   ppo.n_samples_per_prompt times with the actor's KV cache (sampling.*); a prompt's group
   stays on one DP rank. DAPO's dynamic sampling (ppo.dynamic_sampling) drops groups whose
   rewards are all equal and samples more prompts until the rollout is full;
2. score: the weighted reward sources (trainer/rewards.py: reward model, verifier, rules,
   user callables), then one forward of the actor, the reference and the critic (where they
   exist) over the responses (trainer/rollout.py);
3. advantages: the estimator ppo.advantage_estimator names (trainer/advantages.py): gae
   against the critic, or a critic-free one (grpo, dr_grpo, rloo, reinforce_pp[_baseline]);
4. update: ppo.epochs passes over the rollout in minibatches of train.global_batch responses
   (one actor step and, with a critic, one critic step each) with the clipped surrogate and
   the loss options (asymmetric clip, per-sequence ratio, aggregation, KL as a loss term,
   entropy bonus, PPO-ptx). A2C makes one step on the whole rollout with the plain
   advantage actor-critic loss.

Models: actor from ckpt.load (an SFT run); reference from ckpt.load unless ppo.kl_coef=0
(with LoRA: the actor's own base); the reward model of ppo.reward when a source is "rm";
the critic (gae only) from the reward model or the SFT policy with a new scalar head
(ppo.critic_init). All use this run's TP/PP layout. Checkpoints hold the actor as "model"
(so chat, best-of-N and later stages load an RL run like any policy) and the critic as
"critic", with the optimizers, the prompt position, the KL controller and the running reward
moments; the frozen models are rebuilt from their sources on resume.
"""
from __future__ import annotations

import json
import time
from typing import Any, Optional

import numpy as np
import torch
from omegaconf import OmegaConf

from chatforge_config.trainer import CRITIC_ESTIMATORS
from parallel.engine import Engine, StepResult
from parallel.lora import WithoutAdapters
from trainer.advantages import AdvantageSettings, add_advantages
from trainer.batches import split_rows
from trainer.checkpointing import load_weights
from trainer.data.chat import Message, prompt_ids
from trainer.data.chat_prepare import gold_of, prepare_chat_data, prepare_rl_prompts
from trainer.data.gpt_dataset import ArrayDataset, SampleLoader
from trainer.data.indexed import atomic_write
from trainer.data.readers import PromptItem
from trainer.data.tokenizer import Tokenizer
from trainer.generation import sampling_config
from trainer.rewards import RewardFunction, Samples, build_source, group_spread
from trainer.rollout import KLController, PromptSampler, Rollout, RolloutMaker, dp_sum, rollout_metrics
from trainer.runtime import RunContext
from trainer.stages.base import Stage
from trainer.stages.reward import Scorer
from trainer.stages.rl_steps import PolicyLoss, actor_step, critic_step

Batch = dict[str, torch.Tensor]
Collected = tuple[list[int], list[list[int]], list[bool], torch.Tensor, dict[str, torch.Tensor]]


class PPOStage(Stage):
    """Every RL stage; the method is the config (conf/stage/<name>.yaml presets ppo.*). Only
    A2C's update differs (A2CStage)."""

    name = "ppo"
    clipped = True  # PPO-style clipped surrogate and minibatches (A2C: one plain step)

    def __init__(self, ctx: RunContext) -> None:
        super().__init__(ctx)
        cfg, topo = ctx.cfg, ctx.topo
        ppo = cfg.ppo
        self.name = str(cfg.stage.name)
        if str(cfg.model.head) != "lm":
            raise ValueError(f"model.head={cfg.model.head}: stage={self.name} trains a language model (lm)")
        if not cfg.ckpt.load:
            raise ValueError(f"stage={self.name} needs ckpt.load (the SFT policy)")
        tok_path, train, evals = prepare_rl_prompts(ctx)
        self.tok = tok = Tokenizer(tok_path)
        self.sampling = sampling_config(cfg)
        self.group = int(ppo.n_samples_per_prompt)
        self.train_items, self.train_ids = self._fit(train, "training")
        self.eval_items, self.eval_ids = self._fit(evals, "evaluation")
        self.gold = gold_of(cfg)
        responses = int(ppo.rollout_batch) * self.group
        self.updates_per_iteration = (int(ppo.epochs) * responses // int(cfg.train.global_batch)
                                      if self.clipped else 1)
        total = int(cfg.train.steps) * self.updates_per_iteration
        seed = int(cfg.seed)
        self.actor = Engine(cfg.model, cfg.parallel, topo, vocab_size=tok.vocab_size, seed=seed,
                            optim=cfg.optim, total_steps=total, lora=cfg.lora)
        self.reference = self._build_reference()
        specs = [str(x) for x in ppo.reward_funcs]
        self.scorer: Optional[Scorer] = None
        if "rm" in specs or str(ppo.critic_init) == "reward" and self._has_critic:
            if not ppo.reward:
                raise ValueError(f"stage={self.name} needs ppo.reward (a reward model run) for "
                                 f"ppo.reward_funcs={specs} / ppo.critic_init={ppo.critic_init}")
            self.scorer = Scorer(ctx, str(ppo.reward), tok, key="ppo.reward", micro_batch=int(cfg.train.micro_batch))
        model_score = self.scorer if "rm" in specs else None
        self.reward = RewardFunction(specs, [float(w) for w in ppo.reward_weights],
                                     [build_source(spec, model_score, self.gold) for spec in specs],
                                     str(ppo.reward_norm), float(ppo.reward_clip))
        self.critic = self._build_critic(total) if self._has_critic else None
        self.rollouts = RolloutMaker(ctx, tok, self.actor, self.reference, self.critic, self.sampling,
                                     full_rows=float(ppo.ptx_coef) > 0 and topo.pp > 1)
        self.prompts = PromptSampler(len(self.train_ids), seed)
        self.kl = KLController(float(ppo.kl_coef), float(ppo.kl_target), int(ppo.kl_horizon))
        self.evaluations = 0
        self.ptx: Optional[SampleLoader] = None
        if float(ppo.ptx_coef) > 0:
            _, sft_train, _ = prepare_chat_data(ctx, "sft")
            self.ptx = SampleLoader(ArrayDataset(sft_train, seed=seed, what="PPO-ptx SFT sequences"),
                                    cfg.train.global_batch, cfg.train.micro_batch, topo.dp_rank, topo.dp)

    @property
    def _has_critic(self) -> bool:
        return str(self.cfg.ppo.advantage_estimator) in CRITIC_ESTIMATORS

    # -- construction ---------------------------------------------------------------------
    def _fit(self, items: list[PromptItem], what: str) -> tuple[list[PromptItem], list[list[int]]]:
        """Prompts whose tokens leave room for sampling.max_new_tokens in model.seq_length;
        the others are dropped (counted in the log)."""
        room = int(self.cfg.model.seq_length) - int(self.sampling.max_new_tokens)
        kept = [(item, ids) for item in items if len(ids := prompt_ids(self.tok, item[0])) <= room]
        if self.ctx.is_main and len(kept) < len(items):
            print(f"[chatforge] {self.name}: dropped {len(items) - len(kept)} of {len(items)} {what} prompts "
                  f"longer than model.seq_length - sampling.max_new_tokens = {room} tokens", flush=True)
        if not kept:
            raise ValueError(f"data: no {what} prompt fits model.seq_length={self.cfg.model.seq_length} with "
                             f"sampling.max_new_tokens={self.sampling.max_new_tokens}")
        return [item for item, _ in kept], [ids for _, ids in kept]

    def _build_reference(self) -> Any:
        """The frozen SFT policy for the KL term; None when ppo.kl_coef is 0 (no KL at all)."""
        cfg = self.cfg
        if float(cfg.ppo.kl_coef) == 0:
            return None
        if self.actor.lora is not None:
            return WithoutAdapters(self.actor)  # LoRA: the actor's frozen base
        reference = Engine(cfg.model, cfg.parallel, self.ctx.topo, vocab_size=self.tok.vocab_size, seed=int(cfg.seed))
        load_weights(str(cfg.ckpt.load), {"reference": reference}, cfg.model, sources={"reference": "model"})
        return reference

    def _build_critic(self, total_steps: int) -> Engine:
        cfg = self.cfg
        optim = OmegaConf.merge(cfg.optim, {"lr": float(cfg.ppo.critic_lr) or float(cfg.optim.lr)})
        from_reward = str(cfg.ppo.critic_init) == "reward"
        assert self.scorer is not None or not from_reward
        model = self.scorer.model if self.scorer is not None and from_reward else cfg.model
        model = OmegaConf.merge(model, {"head": "scalar"})  # a logprob reward model is an LM
        # With LoRA the critic trains adapters and its scalar head too (docs/lora.md).
        critic = Engine(model, cfg.parallel, self.ctx.topo, vocab_size=self.tok.vocab_size, seed=int(cfg.seed),
                        optim=optim, total_steps=total_steps, lora=cfg.lora)
        if (self.ctx.run_dir / "checkpoints" / "latest").is_file():
            return critic  # resuming: the run's own checkpoint holds (or names the base of) the critic
        # From an LM (the SFT policy, or a logprob reward model) the scalar head starts fresh.
        load_weights(str(cfg.ppo.reward if from_reward else cfg.ckpt.load), {"critic": critic}, model,
                     sources={"critic": "model"})
        return critic

    # -- the Stage interface --------------------------------------------------------------
    @property
    def tokens_per_step(self) -> int:
        return int(self.cfg.ppo.rollout_batch) * self.group * int(self.cfg.model.seq_length)

    def engines(self) -> dict[str, Engine]:
        return {"model": self.actor} if self.critic is None else {"model": self.actor, "critic": self.critic}

    def load_sources(self) -> dict[str, str]:
        return {"model": "model"}  # only the actor comes from ckpt.load; the critic: see above

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"prompts": self.prompts.state_dict(), "kl": self.kl.state_dict(),
                                 "reward": self.reward.state_dict()}
        if self.ptx is not None:
            state["ptx"] = self.ptx.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.prompts.load_state_dict(state["prompts"])
        self.kl.load_state_dict(state["kl"])
        self.reward.load_state_dict(state.get("reward", {}))
        if self.ptx is not None and "ptx" in state:
            self.ptx.load_state_dict(state["ptx"])

    # -- rollout: sample, score -------------------------------------------------------------
    def _my_share(self, indices: list[int]) -> list[int]:
        per_rank = len(indices) // self.ctx.topo.dp
        return indices[self.ctx.topo.dp_rank * per_rank:(self.ctx.topo.dp_rank + 1) * per_rank]

    def _seed(self, *parts: int) -> int:
        return int(np.random.SeedSequence([int(self.cfg.seed), *parts]).generate_state(1)[0])

    def _dp_sum(self, values: torch.Tensor) -> torch.Tensor:
        return dp_sum(values, self.ctx.topo.dp_group)

    def _samples(self, items: list[PromptItem], ids: list[list[int]], responses: list[list[int]],
                 finished: list[bool]) -> Samples:
        return Samples([p for p, _ in items], [self.tok.response_text(r) for r in responses], ids, responses,
                       finished, [meta for _, meta in items])

    def _gold(self, prompts: list[list[Message]], responses: list[list[int]]) -> Optional[list[float]]:
        if self.gold is None:
            return None
        return [self.gold(p, self.tok.response_text(r)) for p, r in zip(prompts, responses)]

    def sample_round(self, step: int, round_: int, mine: list[int]) -> Collected:
        """Round `round_` of iteration `step` on this rank: every prompt of `mine` sampled
        n_samples_per_prompt times and scored (reward before normalisation). Draws depend on
        (seed, step, round, row in the whole rollout), not on the DP layout."""
        rows = [i for i in mine for _ in range(self.group)]
        ids = [self.train_ids[i] for i in rows]
        seed = self._seed(1, step, 0) if round_ == 0 else self._seed(1, step, 0, round_)
        offset = self.ctx.topo.dp_rank * len(rows)
        responses, finished = self.rollouts.sample(ids, seed, offset)
        samples = self._samples([self.train_items[i] for i in rows], ids, responses, finished)
        score, parts = self.reward(samples, offset)
        cut = 1.0 - torch.tensor(finished, dtype=torch.float64)
        return rows, responses, finished, score - float(self.cfg.ppo.missing_eos_penalty) * cut, parts

    def collect(self, step: int) -> tuple[Collected, dict[str, float]]:
        """This rank's rows of the iteration's rollout (rollout_batch / DP groups) and the
        dynamic-sampling counts. Every rank takes every round's prompts from the stream (the
        position stays one number); ranks loop in step (an all-reduce per round)."""
        ppo = self.cfg.ppo
        need, g = int(ppo.rollout_batch) // self.ctx.topo.dp, self.group
        dynamic = bool(ppo.dynamic_sampling)
        kept: list[Collected] = []
        spare: list[Collected] = []
        counts = torch.zeros(3, dtype=torch.float64)  # sampled groups, dropped groups, rounds
        for round_ in range(int(ppo.max_sampling_rounds) if dynamic else 1):
            mine = self._my_share(self.prompts.take(int(ppo.rollout_batch)))
            if len(kept) < need:
                found = self.sample_round(step, round_, mine)
                useful = group_spread(found[3], g) if dynamic else np.ones(len(mine), dtype=bool)
                for k in range(len(mine)):
                    (kept if useful[k] else spare).append(_rows_of(found, slice(k * g, (k + 1) * g)))
                counts += torch.tensor([len(mine), float((~useful).sum()), 1.0], dtype=torch.float64)
            if not dynamic or self._dp_sum(torch.tensor([float(len(kept) < need)], dtype=torch.float64)).item() == 0:
                break
        filled = max(need - len(kept), 0)
        chosen = kept[:need] + spare[:filled]
        totals = self._dp_sum(torch.cat([counts, torch.tensor([float(filled)], dtype=torch.float64)])).tolist()
        stats = {}
        if dynamic:
            stats = {"dropped_groups": totals[1] / max(totals[0], 1.0), "sampling_rounds": totals[2] / self.ctx.topo.dp,
                     "filled_groups": totals[3] / float(ppo.rollout_batch)}
        return _join(chosen), stats

    def make_rollout(self, step: int) -> tuple[Rollout, dict[str, float]]:
        """Sample and score the iteration's rollout (collect), then the forwards of actor,
        reference and critic (score_rollout)."""
        started = time.perf_counter()
        collected, stats = self.collect(step)
        done = time.perf_counter()
        rollout = self.score_rollout(collected)
        rollout.seconds = {"generation_s": done - started, "forward_s": time.perf_counter() - done}
        return rollout, stats

    def score_rollout(self, collected: Collected) -> Rollout:
        """The rollout of collected rows: the reward post-processed over the whole rollout
        (ppo.reward_norm, reward_clip), the log-probs of actor and reference, the values."""
        rows, responses, finished, score, parts = collected
        reward = self.reward.post(score, self._dp_sum)
        ids = [self.train_ids[i] for i in rows]
        rollout = self.rollouts.score(ids, responses, finished, (reward, parts))
        rollout.prompt_index, rollout.group_size = rows, self.group
        rollout.raw_score = score.float()  # logged as "reward": before normalisation and clipping
        if bool(self.cfg.ppo.overlong_mask):
            rollout.loss_rows = torch.tensor(finished, dtype=torch.float32)
        return rollout

    def advantage_settings(self) -> AdvantageSettings:
        ppo = self.cfg.ppo
        return AdvantageSettings(str(ppo.advantage_estimator), self.kl.beta, str(ppo.kl_in) == "reward",
                                 str(ppo.kl_estimator), float(ppo.gamma), float(ppo.lam),
                                 bool(ppo.whiten_advantages), self.group)

    # -- one iteration ----------------------------------------------------------------------
    def train_step(self, step: int) -> StepResult:
        ppo = self.cfg.ppo
        rollout, stats = self.make_rollout(step)
        add_advantages(rollout, self.advantage_settings(), self._dp_sum)
        gold = self._gold([self.train_items[i][0] for i in rollout.prompt_index], rollout.responses)
        metrics = rollout_metrics(rollout, self.ctx.topo.dp_group, gold)
        metrics.update(stats)
        metrics["kl_coef"] = self.kl.beta  # the beta this rollout used
        started = time.perf_counter()
        result = self._update(rollout, step)
        seconds = {**rollout.seconds, "train_s": time.perf_counter() - started}
        self.kl.update(metrics["kl"], int(ppo.rollout_batch) * self.group)
        metrics.update(result.metrics)
        total = sum(seconds.values())
        result.metrics = metrics
        result.extra.update(seconds)
        result.extra["generation_share"] = seconds["generation_s"] / max(total, 1e-9)
        result.extra["consumed_prompts"] = self.prompts.consumed
        return result

    def _update(self, rollout: Rollout, step: int) -> StepResult:
        """The optimizer steps of one iteration; metrics averaged over them."""
        cfg, ppo = self.cfg, self.cfg.ppo
        n = len(rollout.responses)
        per_step = int(cfg.train.global_batch) // self.ctx.topo.dp if self.clipped else n
        epochs = int(ppo.epochs) if self.clipped else 1
        micro = int(cfg.train.micro_batch)
        clip = float(ppo.value_clip) if self.clipped and float(ppo.value_clip) > 0 else None
        device, vocab, group = self.ctx.device, self.tok.vocab_size, self.ctx.topo.tp_group
        loss = PolicyLoss.of(cfg, self.clipped, self.kl.beta)
        totals: dict[str, float] = {}
        last: Optional[StepResult] = None
        steps = 0
        # ppo.freeze_actor_steps: the critic learns the SFT policy's values first.
        train_actor = step >= int(ppo.freeze_actor_steps)  # step counts from 0
        for epoch in range(epochs):
            order = np.random.default_rng(self._seed(2, step, epoch)).permutation(n)
            for k in range(0, n, per_step):
                microbatches = split_rows(rollout.rows(order[k:k + per_step]), micro)
                values: dict[str, float] = {}
                if train_actor:
                    actor_batches = microbatches + self._ptx_microbatches(microbatches, loss)
                    last = self.actor.train_step(actor_batches, lambda b, m: actor_step(
                        b, m, device, vocab, group, loss), seq_length=rollout.seq_length)
                    values = {**last.metrics, "grad_norm": last.grad_norm}
                if self.critic is not None:
                    critic = self.critic.train_step(microbatches, lambda b, m: critic_step(b, m, device, clip),
                                                    seq_length=rollout.seq_length)
                    values.update({**critic.metrics, "grad_norm_critic": critic.grad_norm})
                for key, value in values.items():
                    totals[key] = totals.get(key, 0.0) + value
                steps += 1
        metrics = {k: v / steps for k, v in totals.items() if k != "grad_norm"}
        if last is None:  # the actor is frozen this iteration: no actor step, learning rate 0
            return StepResult(metrics=metrics, grad_norm=0.0, lr=0.0, skipped=False)
        if self.ptx is None:
            metrics.pop("ptx_loss", None)
        if loss.kl_beta == 0:
            metrics.pop("kl_loss", None)
        metrics["entropy_train"] = metrics.pop("entropy_bonus")
        if not self.clipped:  # no ratio: always 0
            metrics.pop("clip_fraction", None)
            metrics.pop("approx_kl", None)
        return StepResult(metrics=metrics, grad_norm=totals["grad_norm"] / steps, lr=last.lr,
                          skipped=last.skipped)

    def _ptx_microbatches(self, microbatches: list[Batch], loss: PolicyLoss) -> list[Batch]:
        """PPO-ptx: the next SFT batch, scaled so that its mean token loss enters the step's
        loss with weight ptx_coef next to the mean policy loss (whatever its aggregation)."""
        if self.ptx is None:
            return []
        ptx = self.ptx.next_batch()
        counts = self._dp_sum(torch.tensor([sum(loss.count(b["response_mask"][:, 1:]) for b in microbatches),
                                            sum(float(b["loss_mask"].sum()) for b in ptx)], dtype=torch.float64))
        scale = torch.tensor([float(counts[0] / max(counts[1], 1.0))])
        # "tokens" first: the engine reads the microbatch size from the first tensor.
        return [{"tokens": b["tokens"], **{k: v for k, v in b.items() if k != "tokens"}, "ptx_scale": scale}
                for b in ptx]

    # -- evaluation ---------------------------------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        """The policy on the held-out prompts, one sample each with a fixed seed (every
        evaluation samples the same way): eval_reward (the weighted sources, before
        normalisation), eval_kl, eval_response_length, eval_gold_reward."""
        topo = self.ctx.topo
        # A contiguous share per DP rank, its draws keyed by the row: the same responses in
        # any layout (when sampling.batch divides the share).
        per = -(-len(self.eval_ids) // topo.dp)
        mine = list(range(topo.dp_rank * per, min(len(self.eval_ids), (topo.dp_rank + 1) * per)))
        prompts = [self.eval_ids[i] for i in mine]
        items = [self.eval_items[i] for i in mine]
        responses, finished = self.rollouts.sample(prompts, self._seed(3, 0), offset=topo.dp_rank * per)
        score, parts = self.reward(self._samples(items, prompts, responses, finished))
        rollout = self.rollouts.score(prompts, responses, finished, (score.float(), parts))
        gold = self._gold([p for p, _ in items], responses)
        metrics = rollout_metrics(rollout, topo.dp_group, gold)
        self._write_samples(items, responses, rollout.score.tolist(), gold)
        self.evaluations += 1
        keys = ("reward", "kl", "response_length", "gold_reward")
        return {f"eval_{k}": metrics[k] for k in keys if k in metrics}

    def _write_samples(self, items: list[PromptItem], responses: list[list[int]], scores: list[float],
                       gold: Optional[list[float]]) -> None:
        """Rank 0's evaluation responses with their scores, one file per evaluation
        (<run.dir>/samples/eval_NNN.jsonl), to read what the policy learned (and whether it
        games the reward model)."""
        if not self.ctx.is_main:
            return
        directory = self.ctx.run_dir / "samples"
        directory.mkdir(parents=True, exist_ok=True)
        lines = []
        for k, ((prompt, _), response) in enumerate(zip(items, responses)):
            lines.append(json.dumps({
                "prompt": prompt[-1].content, "response": self.tok.decode(response),
                "reward": scores[k], "gold": gold[k] if gold else None}))
        atomic_write(directory / f"eval_{self.evaluations:03d}.jsonl", ("\n".join(lines) + "\n").encode("utf-8"))


def _rows_of(found: Collected, part: slice) -> Collected:
    rows, responses, finished, score, parts = found
    return rows[part], responses[part], finished[part], score[part], {k: v[part] for k, v in parts.items()}


def _join(pieces: list[Collected]) -> Collected:
    keys = sorted(pieces[0][4]) if pieces else []
    return ([r for p in pieces for r in p[0]], [r for p in pieces for r in p[1]], [f for p in pieces for f in p[2]],
            torch.cat([p[3] for p in pieces]) if pieces else torch.zeros(0, dtype=torch.float64),
            {k: torch.cat([p[4][k] for p in pieces]) for k in keys})


class A2CStage(PPOStage):
    name = "a2c"
    clipped = False

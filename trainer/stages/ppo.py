"""RLHF: PPO and A2C against a reward model with a KL penalty to the SFT policy.

One iteration (one `train_step` of the shared loop; train.steps counts iterations):
1. rollout: ppo.rollout_batch prompts (over all DP ranks) -> responses sampled from the
   actor with the KV cache (sampling.*) -> log pi, log pi_ref, V and the reward-model score
   of every response (trainer/rollout.py) -> per-token rewards with the KL penalty ->
   GAE advantages (whitened) and returns;
2. update: PPO makes ppo.epochs passes over the rollout in minibatches of train.global_batch
   sequences (one optimizer step of the actor and one of the critic each): clipped
   surrogate, clipped value loss. A2C makes one step on the whole rollout with the plain
   advantage actor-critic loss. Both may add an entropy bonus and PPO-ptx (the SFT loss on
   the data's conversations, ppo.ptx_coef).

Models: actor and reference from ckpt.load (an SFT run; ppo.* needs one), the reward model
from ppo.reward at its own model config, the critic from the reward model or from the SFT
policy with a new scalar head (ppo.critic_init). All four use this run's TP/PP layout.
Checkpoints hold the actor as "model" (so chat, best-of-N and later stages load a PPO run
like any policy) and the critic as "critic", with both optimizers, the prompt position
and the KL controller; the frozen models are rebuilt from their sources on resume.
"""
from __future__ import annotations

import json
import time
from typing import Any, Optional

import numpy as np
import torch
from omegaconf import OmegaConf

from parallel.engine import Engine, StepResult
from parallel.lora import WithoutAdapters
from trainer.batches import packed_inputs, split_rows
from trainer.checkpointing import load_weights
from trainer.data.chat import Message, prompt_ids
from trainer.data.chat_prepare import gold_of, prepare_chat_data, prepare_rl_prompts
from trainer.data.gpt_dataset import ArrayDataset, SampleLoader
from trainer.data.indexed import atomic_write
from trainer.data.tokenizer import Tokenizer
from trainer.generation import sampling_config
from trainer.losses import a2c_policy_loss, masked_token_loss, ppo_policy_loss, value_loss
from trainer.rollout import (KLController, PromptSampler, Rollout, RolloutMaker, add_advantages, critic_forward,
                             dp_sum, label_mask, policy_forward, rollout_metrics)
from trainer.runtime import RunContext
from trainer.stages.base import Stage
from trainer.stages.reward import Scorer

Batch = dict[str, torch.Tensor]
POLICY_METRICS = ("policy_loss", "clip_fraction", "approx_kl", "entropy_bonus", "ptx_loss")


def _zero() -> torch.Tensor:
    return torch.zeros(2, dtype=torch.float32)


def actor_step(batch: Batch, model: torch.nn.Module, device: torch.device, vocab_size: int, tp_group: Any,
               algorithm: str, hp: Any) -> Any:
    """Megatron forward_step of the actor. A rollout microbatch gives the PPO (clipped) or
    A2C policy loss minus entropy_coef x entropy, summed over response tokens (the engine
    divides by the minibatch's response tokens). A PPO-ptx microbatch (SFT rows, with
    "ptx_scale" = (policy tokens) / (ptx tokens) of the minibatch) adds ptx_coef x its token
    loss at that scale and counts no tokens, so the step minimises
    mean policy loss + ptx_coef x mean SFT loss."""
    if "loss_mask" in batch:
        x = packed_inputs(batch, device)
        per_token = model(x["input_ids"], x["position_ids"], x["attention_mask"], labels=x["labels"])
        mask = batch["loss_mask"].to(device)
        scale = float(batch["ptx_scale"][0]) * float(hp.ptx_coef)

        def ptx_loss(output: torch.Tensor) -> Any:
            total, _, metrics = masked_token_loss(output, mask)
            found = {name: _zero().to(total.device) for name in POLICY_METRICS}
            found["ptx_loss"] = metrics["loss"]
            return total * scale, torch.zeros((), dtype=torch.int, device=total.device), found
        return per_token, ptx_loss

    logits, to_logp = policy_forward(batch, model, device, vocab_size, tp_group)
    mask = label_mask(batch, device).float()
    advantages = batch["advantages"].to(device)

    def loss_fn(output: torch.Tensor) -> Any:
        logp, entropy = to_logp(output)
        if algorithm == "ppo":
            total, count, metrics = ppo_policy_loss(logp, batch["old_logp"].to(device), advantages, mask,
                                                    float(hp.clip))
        else:
            total, count, metrics = a2c_policy_loss(logp, advantages, mask)
        bonus = (entropy * mask).sum()
        found = {name: _zero().to(total.device) for name in POLICY_METRICS}
        found.update({k: v for k, v in metrics.items() if k != "loss"})
        found["policy_loss"] = metrics["loss"]
        found["entropy_bonus"] = torch.stack([bonus.detach(), mask.sum()])
        return total - float(hp.entropy_coef) * bonus, count, found

    return logits, loss_fn


def critic_step(batch: Batch, model: torch.nn.Module, device: torch.device, clip: Optional[float]) -> Any:
    """Megatron forward_step of the critic: the (clipped) value loss over response tokens."""
    values = critic_forward(batch, model, device)
    mask = label_mask(batch, device).float()

    def loss_fn(output: torch.Tensor) -> Any:
        total, count, metrics = value_loss(output.squeeze(-1).float(), batch["old_values"].to(device),
                                           batch["returns"].to(device), mask, clip)
        return total, count, {"value_loss": metrics["loss"]}

    return values, loss_fn


class PPOStage(Stage):
    name = "ppo"
    algorithm = "ppo"

    def __init__(self, ctx: RunContext) -> None:
        super().__init__(ctx)
        cfg, topo = ctx.cfg, ctx.topo
        ppo = cfg.ppo
        if str(cfg.model.head) != "lm":
            raise ValueError(f"model.head={cfg.model.head}: stage={self.name} trains a language model (lm)")
        if not cfg.ckpt.load or not ppo.reward:
            raise ValueError(f"stage={self.name} needs ckpt.load (the SFT policy) and ppo.reward (a reward model)")
        tok_path, train, evals = prepare_rl_prompts(ctx)
        self.tok = tok = Tokenizer(tok_path)
        self.sampling = sampling_config(cfg)
        self.train_prompts, self.train_ids = self._fit(train, "training")
        self.eval_prompts, self.eval_ids = self._fit(evals, "evaluation")
        self.gold = gold_of(cfg)
        self.updates_per_iteration = (int(ppo.epochs) * int(ppo.rollout_batch) // int(cfg.train.global_batch)
                                      if self.algorithm == "ppo" else 1)
        total = int(cfg.train.steps) * self.updates_per_iteration
        seed = int(cfg.seed)
        self.actor = Engine(cfg.model, cfg.parallel, topo, vocab_size=tok.vocab_size, seed=seed,
                            optim=cfg.optim, total_steps=total, lora=cfg.lora)
        self.reference: Any = WithoutAdapters(self.actor)  # LoRA: the actor's frozen base
        if self.actor.lora is None:
            self.reference = Engine(cfg.model, cfg.parallel, topo, vocab_size=tok.vocab_size, seed=seed)
            load_weights(str(cfg.ckpt.load), {"reference": self.reference}, cfg.model, sources={"reference": "model"})
        self.scorer = Scorer(ctx, str(ppo.reward), tok, key="ppo.reward", micro_batch=int(cfg.train.micro_batch))
        self.critic = self._build_critic(total)
        self.rollouts = RolloutMaker(ctx, tok, self.actor, self.reference, self.critic, self.scorer, self.sampling,
                                     full_rows=float(ppo.ptx_coef) > 0 and topo.pp > 1)
        self.prompts = PromptSampler(len(self.train_ids), seed)
        self.kl = KLController(float(ppo.kl_coef), float(ppo.kl_target), int(ppo.kl_horizon))
        self.evaluations = 0
        self.ptx: Optional[SampleLoader] = None
        if float(ppo.ptx_coef) > 0:
            _, sft_train, _ = prepare_chat_data(ctx, "sft")
            self.ptx = SampleLoader(ArrayDataset(sft_train, seed=seed, what="PPO-ptx SFT sequences"),
                                    cfg.train.global_batch, cfg.train.micro_batch, topo.dp_rank, topo.dp)

    # -- construction ---------------------------------------------------------------------
    def _fit(self, prompts: list[list[Message]], what: str) -> tuple[list[list[Message]], list[list[int]]]:
        """Prompts whose tokens leave room for sampling.max_new_tokens in model.seq_length;
        the others are dropped (counted in the log)."""
        room = int(self.cfg.model.seq_length) - int(self.sampling.max_new_tokens)
        kept = [(p, ids) for p in prompts if len(ids := prompt_ids(self.tok, p)) <= room]
        if self.ctx.is_main and len(kept) < len(prompts):
            print(f"[chatforge] {self.name}: dropped {len(prompts) - len(kept)} of {len(prompts)} {what} prompts "
                  f"longer than model.seq_length - sampling.max_new_tokens = {room} tokens", flush=True)
        if not kept:
            raise ValueError(f"data: no {what} prompt fits model.seq_length={self.cfg.model.seq_length} with "
                             f"sampling.max_new_tokens={self.sampling.max_new_tokens}")
        return [p for p, _ in kept], [ids for _, ids in kept]

    def _build_critic(self, total_steps: int) -> Engine:
        cfg = self.cfg
        optim = OmegaConf.merge(cfg.optim, {"lr": float(cfg.ppo.critic_lr) or float(cfg.optim.lr)})
        from_reward = str(cfg.ppo.critic_init) == "reward"
        model = self.scorer.model if from_reward else OmegaConf.merge(cfg.model, {"head": "scalar"})
        # With LoRA the critic trains adapters and its scalar head too (docs/lora.md).
        critic = Engine(model, cfg.parallel, self.ctx.topo, vocab_size=self.tok.vocab_size, seed=int(cfg.seed),
                        optim=optim, total_steps=total_steps, lora=cfg.lora)
        if (self.ctx.run_dir / "checkpoints" / "latest").is_file():
            return critic  # resuming: the run's own checkpoint holds (or names the base of) the critic
        if from_reward:
            load_weights(str(cfg.ppo.reward), {"critic": critic}, model, sources={"critic": "model"})
        else:
            load_weights(str(cfg.ckpt.load), {"critic": critic}, model, sources={"critic": "model"},
                         keep_init=("output_layer.",))
        return critic

    # -- the Stage interface --------------------------------------------------------------
    @property
    def tokens_per_step(self) -> int:
        return int(self.cfg.ppo.rollout_batch) * int(self.cfg.model.seq_length)

    def engines(self) -> dict[str, Engine]:
        return {"model": self.actor, "critic": self.critic}

    def load_sources(self) -> dict[str, str]:
        return {"model": "model"}  # only the actor comes from ckpt.load; the critic: see above

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"prompts": self.prompts.state_dict(), "kl": self.kl.state_dict()}
        if self.ptx is not None:
            state["ptx"] = self.ptx.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.prompts.load_state_dict(state["prompts"])
        self.kl.load_state_dict(state["kl"])
        if self.ptx is not None and "ptx" in state:
            self.ptx.load_state_dict(state["ptx"])

    # -- one iteration ----------------------------------------------------------------------
    def _my_share(self, indices: list[int]) -> list[int]:
        per_rank = len(indices) // self.ctx.topo.dp
        return indices[self.ctx.topo.dp_rank * per_rank:(self.ctx.topo.dp_rank + 1) * per_rank]

    def _seed(self, *parts: int) -> int:
        return int(np.random.SeedSequence([int(self.cfg.seed), *parts]).generate_state(1)[0])

    def _gold(self, prompts: list[list[Message]], responses: list[list[int]]) -> Optional[list[float]]:
        if self.gold is None:
            return None
        return [self.gold(p, self.tok.response_text(r)) for p, r in zip(prompts, responses)]

    def train_step(self, step: int) -> StepResult:
        ppo, topo = self.cfg.ppo, self.ctx.topo
        index = self._my_share(self.prompts.take(int(ppo.rollout_batch)))
        rollout = self.rollouts.make(index, [self.train_ids[i] for i in index],
                                     self._seed(1, step, topo.dp_rank), float(ppo.missing_eos_penalty))
        add_advantages(rollout, self.kl.beta, float(ppo.gamma), float(ppo.lam), bool(ppo.whiten_advantages),
                       topo.dp_group)
        gold = self._gold([self.train_prompts[i] for i in index], rollout.responses)
        metrics = rollout_metrics(rollout, topo.dp_group, gold)
        metrics["kl_coef"] = self.kl.beta  # the beta this rollout's rewards used
        started = time.perf_counter()
        result = self._update(rollout, step)
        seconds = {**rollout.seconds, "train_s": time.perf_counter() - started}
        self.kl.update(metrics["kl"], int(ppo.rollout_batch))
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
        per_step = n if self.algorithm == "a2c" else int(cfg.train.global_batch) // self.ctx.topo.dp
        epochs = 1 if self.algorithm == "a2c" else int(ppo.epochs)
        micro = int(cfg.train.micro_batch)
        clip = float(ppo.value_clip) if self.algorithm == "ppo" and float(ppo.value_clip) > 0 else None
        device, vocab, group = self.ctx.device, self.tok.vocab_size, self.ctx.topo.tp_group
        totals: dict[str, float] = {}
        last: Optional[StepResult] = None
        steps = 0
        for epoch in range(epochs):
            order = np.random.default_rng(self._seed(2, step, epoch)).permutation(n)
            for k in range(0, n, per_step):
                microbatches = split_rows(rollout.rows(order[k:k + per_step]), micro)
                actor_batches = microbatches + self._ptx_microbatches(microbatches)
                last = self.actor.train_step(actor_batches, lambda b, m: actor_step(
                    b, m, device, vocab, group, self.algorithm, ppo), seq_length=rollout.seq_length)
                critic = self.critic.train_step(microbatches, lambda b, m: critic_step(b, m, device, clip),
                                                seq_length=rollout.seq_length)
                values = {**last.metrics, **critic.metrics, "grad_norm_critic": critic.grad_norm,
                          "grad_norm": last.grad_norm}
                for key, value in values.items():
                    totals[key] = totals.get(key, 0.0) + value
                steps += 1
        assert last is not None
        metrics = {k: v / steps for k, v in totals.items() if k != "grad_norm"}
        if self.ptx is None:
            metrics.pop("ptx_loss", None)
        metrics["entropy_train"] = metrics.pop("entropy_bonus")
        if self.algorithm == "a2c":  # no ratio: always 0
            metrics.pop("clip_fraction", None)
            metrics.pop("approx_kl", None)
        return StepResult(metrics=metrics, grad_norm=totals["grad_norm"] / steps, lr=last.lr,
                          skipped=last.skipped)

    def _ptx_microbatches(self, microbatches: list[Batch]) -> list[Batch]:
        """PPO-ptx: the next SFT batch, scaled so that its mean token loss enters the step's
        loss with weight ptx_coef next to the mean policy loss."""
        if self.ptx is None:
            return []
        ptx = self.ptx.next_batch()
        group = self.ctx.topo.dp_group
        counts = dp_sum(torch.tensor([sum(float(b["response_mask"][:, 1:].sum()) for b in microbatches),
                                      sum(float(b["loss_mask"].sum()) for b in ptx)], dtype=torch.float64), group)
        scale = torch.tensor([float(counts[0] / max(counts[1], 1.0))])
        # "tokens" first: the engine reads the microbatch size from the first tensor.
        return [{"tokens": b["tokens"], **{k: v for k, v in b.items() if k != "tokens"}, "ptx_scale": scale}
                for b in ptx]

    # -- evaluation ---------------------------------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        """The policy on the held-out prompts (a fixed seed: every evaluation samples the
        same way): eval_reward, eval_kl, eval_response_length, eval_gold_reward."""
        topo = self.ctx.topo
        mine = list(range(topo.dp_rank, len(self.eval_ids), topo.dp))
        prompts = [self.eval_ids[i] for i in mine]
        responses, finished = self.rollouts.sample(prompts, self._seed(3, topo.dp_rank))
        rollout = self.rollouts.score(prompts, responses, finished)
        gold = self._gold([self.eval_prompts[i] for i in mine], responses)
        metrics = rollout_metrics(rollout, topo.dp_group, gold)
        self._write_samples(mine, responses, rollout.score.tolist(), gold)
        self.evaluations += 1
        keys = ("reward", "kl", "response_length", "gold_reward")
        return {f"eval_{k}": metrics[k] for k in keys if k in metrics}

    def _write_samples(self, mine: list[int], responses: list[list[int]], scores: list[float],
                       gold: Optional[list[float]]) -> None:
        """Rank 0's evaluation responses with their scores, one file per evaluation
        (<run.dir>/samples/eval_NNN.jsonl), to read what the policy learned (and whether it
        games the reward model)."""
        if not self.ctx.is_main:
            return
        directory = self.ctx.run_dir / "samples"
        directory.mkdir(parents=True, exist_ok=True)
        lines = []
        for k, (i, response) in enumerate(zip(mine, responses)):
            lines.append(json.dumps({
                "prompt": self.eval_prompts[i][-1].content, "response": self.tok.decode(response),
                "reward": scores[k], "gold": gold[k] if gold else None}))
        atomic_write(directory / f"eval_{self.evaluations:03d}.jsonl", ("\n".join(lines) + "\n").encode("utf-8"))


class A2CStage(PPOStage):
    name = "a2c"
    algorithm = "a2c"

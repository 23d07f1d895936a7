"""Best-of-N sampling and rejection-sampling fine-tuning.

best_of_n: for every prompt, sample `best_of_n.n` responses from the policy (ckpt.load),
score each with the reward model (best_of_n.reward), and write every response, its score
and the winner to `<run.dir>/best_of_n.jsonl` (plus the gold reward when the prompts come
from the embedded world) and a summary to `<run.dir>/best_of_n.json`. No training.

rejection_sampling: the same, then SFT of the policy on the prompts with their winning
responses (Llama 2's rejection-sampling fine-tuning; Touvron et al. 2023, sec. 3.2.3). The
two steps are chained in one job: a rerun finds best_of_n.json and goes straight to SFT.
"""
from __future__ import annotations

import gc
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch.distributed as dist

from parallel.engine import Engine
from trainer.data.chat import Message, prompt_ids
from trainer.data.chat_prepare import gold_of, prepare_prompts
from trainer.data.indexed import atomic_write
from trainer.data.tokenizer import Tokenizer
from trainer.generation import generate, sampling_config
from trainer.runtime import RunContext
from trainer.stages.reward import Scorer, frozen_from
from trainer.stages.sft import SFTStage

RESULTS, SUMMARY = "best_of_n.jsonl", "best_of_n.json"


def _sample_prompts(ctx: RunContext, tok: Tokenizer, policy: Engine, scorer: Scorer,
                    prompts: list[list[Message]]) -> list[dict[str, Any]]:
    """This DP rank's share of the prompts -> one record per prompt."""
    cfg, topo = ctx.cfg, ctx.topo
    n, per_batch = int(cfg.best_of_n.n), int(cfg.sampling.batch)
    sampling = sampling_config(cfg)
    gold = gold_of(cfg)
    mine = list(range(topo.dp_rank, len(prompts), topo.dp))
    records = []
    started = time.perf_counter()
    for b, k in enumerate(range(0, len(mine), per_batch)):
        chunk = mine[k:k + per_batch]
        ids = [prompt_ids(tok, prompts[i]) for i in chunk for _ in range(n)]
        seed = int(cfg.seed) * 1_000_003 + topo.dp_rank * 10_007 + b
        gen = generate(policy, ids, sampling, stop_ids={tok.end_of_turn_id, tok.eod_id}, pad_id=tok.pad_id, seed=seed)
        scores = scorer(ids, gen.tokens)
        for j, i in enumerate(chunk):
            rows = range(j * n, (j + 1) * n)
            texts = [tok.response_text(gen.tokens[r]) for r in rows]
            got = [scores[r] for r in rows]
            best = int(np.argmax(got))
            records.append({
                "index": i, "prompt": [m.__dict__ for m in prompts[i]], "responses": texts,
                "scores": got, "best": best, "best_response": texts[best],
                "gold": [gold(prompts[i], t) if gold else None for t in texts],
            })
        if ctx.is_main:
            done = min(k + per_batch, len(mine))
            print(f"[chatforge] best-of-{n}: {done}/{len(mine)} prompts on rank 0 "
                  f"({time.perf_counter() - started:.1f}s)", flush=True)
    return records


def _summary(records: list[dict[str, Any]], n: int) -> dict[str, Any]:
    scores = np.array([r["scores"] for r in records], dtype=np.float64)
    summary: dict[str, Any] = {"prompts": len(records), "n": n,
                               "reward_mean": float(scores.mean()), "reward_best": float(scores.max(1).mean())}
    if records and records[0]["gold"][0] is not None:
        gold = np.array([r["gold"] for r in records], dtype=np.float64)
        # The first sample is what plain sampling would give; best-of-N picks by the RM.
        summary["gold_reward_sample"] = float(gold[:, 0].mean())
        summary["gold_reward"] = float(gold[np.arange(len(records)), [r["best"] for r in records]].mean())
    return summary


def run_best_of_n(ctx: RunContext, split: str = "eval") -> dict[str, Any]:
    """Sample, score, write the results (rank 0); collective. Reuses finished results.
    split: the embedded world's held-out prompts ("eval": best-of-N as a way to answer them)
    or its training tasks ("train": rejection sampling trains on the winners)."""
    cfg, run_dir = ctx.cfg, ctx.run_dir
    summary_path = run_dir / SUMMARY
    tok_path, prompts = prepare_prompts(ctx, int(cfg.best_of_n.num_prompts), split)
    if summary_path.is_file():
        return json.loads(summary_path.read_text())
    tok = Tokenizer(tok_path)
    policy = frozen_from(ctx, str(cfg.ckpt.load), cfg.model, tok.vocab_size)
    scorer = Scorer(ctx, str(cfg.best_of_n.reward), tok)
    records = _sample_prompts(ctx, tok, policy, scorer, prompts)
    parts: list[Any] = [records]
    if ctx.topo.dp > 1:
        parts = [None] * ctx.topo.dp
        dist.all_gather_object(parts, records, group=ctx.topo.dp_group)
    records = sorted((r for part in parts for r in part), key=lambda r: r["index"])
    summary = _summary(records, int(cfg.best_of_n.n))
    if ctx.is_main:
        lines = "".join(json.dumps(r) + "\n" for r in records)
        atomic_write(run_dir / RESULTS, lines.encode("utf-8"))
        # Written last: its presence means the results are complete.
        atomic_write(summary_path, (json.dumps(summary, indent=1) + "\n").encode("utf-8"))
        print(f"[chatforge] best-of-{cfg.best_of_n.n}: {json.dumps(summary)} -> {run_dir / RESULTS}", flush=True)
    ctx.barrier()
    del policy, scorer
    gc.collect()
    return summary


def winners(run_dir: Path) -> list[list[Message]]:
    """The prompts with their best responses, as conversations for SFT."""
    convs = []
    for line in (run_dir / RESULTS).read_text().splitlines():
        record = json.loads(line)
        prompt = [Message(m["role"], m["content"]) for m in record["prompt"]]
        convs.append([*prompt, Message("assistant", record["best_response"])])
    return convs


class BestOfNJob:
    """Not a training stage: runs once (trainer/__main__ calls run())."""

    name = "best_of_n"

    def __init__(self, ctx: RunContext) -> None:
        self.ctx = ctx

    def run(self) -> int:
        summary = run_best_of_n(self.ctx)
        if self.ctx.is_main:
            with open(self.ctx.run_dir / "metrics.jsonl", "w") as out:
                out.write(json.dumps({"step": 0, **summary}) + "\n")
        return 0


class RejectionSamplingStage(SFTStage):
    """Best-of-N, then SFT on the winners (ckpt.load is both the sampler and the start)."""

    name = "rejection_sampling"

    def __init__(self, ctx: RunContext) -> None:
        run_best_of_n(ctx, split="train")  # never the held-out prompts it is evaluated on
        super().__init__(ctx, conversations=winners(ctx.run_dir))

"""stage=eval: every policy of a recipe on the same held-out prompts, judged by the gold scorer.

For each run in eval.models (named by its directory), one response per held-out prompt
(data.embedded.num_prompts; sampling.*, one seed for every model, so two models differ only
by their weights): a policy run (pretrain, SFT, DPO, PPO, A2C, rejection sampling) is
sampled; a best_of_n run is read (its winners, drawn from the baseline on the same prompts).
Per model:
    gold_reward     the embedded world's gold score (data.embedded.prefer) of the response
    accuracy        the task answered correctly (corpus.is_correct), whatever the preference
    win_rate        against the baseline's response to the same prompt, judged by the gold
                    score: win 1, tie 1/2, loss 0
    kl              to the baseline, per response: sum over its tokens of log pi - log pi_base
                    (a Monte Carlo estimate of KL(pi || pi_base) at temperature 1); for
                    best-of-N the analytic log N - (N-1)/N (Stiennon et al. 2020)
    response_length tokens, the end-of-turn token included
    reward          the reward model's mean score (eval.reward)
and the reward model's accuracy on held-out pairs: pairs on held-out tasks with clean labels
(embedded), or the reward model run's own held-out split (a user's file).
Results: <run.dir>/eval.json, every response in <run.dir>/samples/<model>.jsonl, one metrics
record; then the report (trainer/report.py).
"""
from __future__ import annotations

import gc
import json
import math
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from parallel.config import ModelConfig
from parallel.engine import Engine
from trainer.batches import join_outputs, pair_collate, split_rows
from trainer.checkpointing import CheckpointError, resolve_load_path, source_model, tokenizer_of
from trainer.config import SamplingConfig
from trainer.data.chat import Message, prompt_ids
from trainer.data.chat_prepare import gold_of, heldout_pairs, longest_row, pair_arrays, prepare_prompts, response_rows
from trainer.data.corpus import is_correct
from trainer.data.indexed import atomic_write
from trainer.data.tokenizer import Tokenizer
from trainer.generation import sampling_config
from trainer.losses import outputs_only
from trainer.rollout import policy_logprobs, sample_responses
from trainer.runtime import RunContext
from trainer.stages.best_of_n import RESULTS as BON_RESULTS, SUMMARY as BON_SUMMARY
from trainer.stages.reward import Scorer, frozen_from, reward_values, rewards_of

RESULTS = "eval.json"
Gold = Callable[[list[Message], str], float]


def run_paths(value: str) -> list[Path]:
    return [Path(p.strip()) for p in str(value).split(",") if p.strip()]


def policy_from(ctx: RunContext, path: Path, key: str, tok: Tokenizer) -> Engine:
    """A forward-only policy with the model config and weights of the run at `path`."""
    directory = resolve_load_path(path)
    model = OmegaConf.merge(OmegaConf.structured(ModelConfig), source_model(directory))
    if model.head != "lm":
        raise CheckpointError(f"{key}: {path} has model.head={model.head}, not a policy")
    if tokenizer_of(directory).read_bytes() != Path(tok.path).read_bytes():
        raise CheckpointError(f"{key}: {path} was trained with another tokenizer than {tok.path}")
    return frozen_from(ctx, str(directory), model, tok.vocab_size)


class _Responses:
    """This rank's share of the prompts and the responses of one model to them."""

    def __init__(self, ids: list[list[int]], responses: list[list[int]], texts: list[str]) -> None:
        self.ids, self.responses, self.texts = ids, responses, texts


class EvalJob:
    """Not a training stage: runs once (trainer/__main__ calls run())."""

    name = "eval"

    def __init__(self, ctx: RunContext) -> None:
        self.ctx, self.cfg = ctx, ctx.cfg
        if not self.cfg.tokenizer.path:
            # The models' own tokenizer (they must share one): the baseline's, else the first's.
            first = str(self.cfg.eval.baseline) or str(run_paths(self.cfg.eval.models)[0])
            self.cfg.tokenizer.path = str(tokenizer_of(resolve_load_path(Path(first))))
        tok_path, self.prompts = prepare_prompts(ctx)
        self.tok = Tokenizer(tok_path)
        topo = ctx.topo
        self.mine = list(range(topo.dp_rank, len(self.prompts), topo.dp))
        self.ids = [prompt_ids(self.tok, self.prompts[i]) for i in self.mine]
        self.gold: Optional[Gold] = gold_of(self.cfg)
        self.sampling: SamplingConfig = sampling_config(self.cfg)
        self.micro = int(self.cfg.train.micro_batch)
        self.seq = int(self.cfg.model.seq_length)

    # ---- responses ---------------------------------------------------------------------

    def _decode(self, tokens: list[int]) -> str:
        return self.tok.response_text(tokens)

    def sample(self, policy: Engine) -> _Responses:
        seed = int(self.cfg.seed) * 1_000_003 + self.ctx.topo.dp_rank
        responses, _ = sample_responses(policy, self.tok, self.ids, self.sampling, seed)
        return _Responses(self.ids, responses, [self._decode(r) for r in responses])

    def read_best_of_n(self, path: Path) -> tuple[_Responses, int]:
        """The winners of a best_of_n run, which must have sampled these same prompts."""
        records = [json.loads(line) for line in (path / BON_RESULTS).read_text().splitlines()]
        by_index = {int(r["index"]): r for r in records}
        texts = []
        for i in self.mine:
            record = by_index.get(i)
            asked = [Message(m["role"], m["content"]) for m in record["prompt"]] if record else None
            if asked != self.prompts[i]:
                raise ValueError(f"eval.models: {path} answered other prompts than this evaluation's "
                                 f"(prompt {i}); run both on the same data settings")
            texts.append(record["best_response"])
        responses = [self.tok.encode(t) + [self.tok.im_end_id] for t in texts]
        n = int(json.loads((path / BON_SUMMARY).read_text())["n"])
        return _Responses(self.ids, responses, texts), n

    # ---- measures ----------------------------------------------------------------------

    def logprob_sums(self, engine: Engine, got: _Responses) -> np.ndarray:
        """Per response, the sum of log pi over its tokens."""
        seq = longest_row(got.ids, got.responses, self.seq)
        rows = response_rows(got.ids, got.responses, seq, self.tok.pad_id)
        logp = policy_logprobs(self.ctx, engine, rows, self.tok.vocab_size, self.micro)["logp"]
        return (logp * rows["response_mask"][:, 1:]).sum(1).double().numpy()

    def per_response(self, got: _Responses, baseline: Optional[_Responses]) -> dict[str, list[float]]:
        prompts = [self.prompts[i] for i in self.mine]
        users = [[m.content for m in p if m.role == "user"][-1] for p in prompts]
        out: dict[str, list[float]] = {"response_length": [float(len(r)) for r in got.responses]}
        if self.gold:  # the embedded world: a gold answer for every prompt
            out["accuracy"] = [float(is_correct(u, t)) for u, t in zip(users, got.texts)]
            out["gold_reward"] = [self.gold(p, t) for p, t in zip(prompts, got.texts)]
            if baseline is not None:
                base = [self.gold(p, t) for p, t in zip(prompts, baseline.texts)]
                out["win_rate"] = [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(out["gold_reward"], base)]
        return out

    def rm_accuracy(self, scorer: Scorer) -> float:
        """Accuracy of the reward model on held-out pairs (this rank's share, then DP-averaged)."""
        cfg = self.cfg
        if str(cfg.data.format) == "embedded":
            pairs = heldout_pairs(cfg, int(cfg.data.embedded.num_prompts))
            arrays, _ = pair_arrays(OmegaConf.merge(cfg, {"model": scorer.model}), self.tok, pairs)
        else:
            with np.load(Path(str(cfg.eval.reward)) / "data" / "pairs_eval.npz") as data:
                arrays = {k: data[k] for k in data.files}
        n = len(arrays["tokens"])
        mine = list(range(self.ctx.topo.dp_rank, n, self.ctx.topo.dp))
        batch = pair_collate([{k: v[i] for k, v in arrays.items()} for i in mine])
        seq = batch["tokens"].shape[1] - 1

        def step(b: dict[str, torch.Tensor], model: torch.nn.Module) -> Any:
            values = reward_values(b, model, self.ctx.device)
            return values, lambda output: outputs_only(output, reward=rewards_of(output, b, scorer.reduce))

        outputs = scorer.engine.forward_outputs(split_rows(batch, 2 * self.micro), step, seq_length=seq)
        reward = join_outputs(outputs, 2 * len(mine))["reward"]
        right = float((reward[0::2] > reward[1::2]).float().sum())
        return self._dp_sum([right, float(len(mine))], lambda r, c: r / max(c, 1.0))

    def _dp_sum(self, values: list[float], finish: Callable[..., float]) -> float:
        tensor = torch.tensor(values, dtype=torch.float64)
        if self.ctx.topo.dp > 1:
            from parallel.engine import all_reduce_host

            tensor = all_reduce_host(tensor, self.ctx.topo.dp_group)
        return finish(*tensor.tolist())

    # ---- the job -------------------------------------------------------------------------

    def _gather(self, items: list[Any]) -> list[Any]:
        """Every rank's items in prompt order (rank r holds prompts r, r + dp, ...)."""
        dp = self.ctx.topo.dp
        if dp == 1:
            return items
        parts: list[Any] = [None] * dp
        dist.all_gather_object(parts, items, group=self.ctx.topo.dp_group)
        return [parts[i % dp][i // dp] for i in range(len(self.prompts))]

    def evaluate_model(self, path: Path, baseline_engine: Optional[Engine], baseline: Optional[_Responses],
                       scorer: Optional[Scorer]) -> tuple[dict[str, float], _Responses]:
        kl: Optional[list[float]] = None
        if str(OmegaConf.load(path / "config.yaml").stage.name) == "best_of_n":
            got, n = self.read_best_of_n(path)
            kl = [math.log(n) - (n - 1) / n] * len(got.responses)
        else:
            policy = policy_from(self.ctx, path, "eval.models", self.tok)
            got = self.sample(policy)
            if baseline_engine is not None:
                kl = list(self.logprob_sums(policy, got) - self.logprob_sums(baseline_engine, got))
            del policy
            gc.collect()
        values = self.per_response(got, baseline)
        if kl is not None:
            values["kl"] = kl
        if scorer is not None:
            values["reward"] = scorer(got.ids, got.responses)
        summary = {}
        for key, per in values.items():
            summary[key] = self._dp_sum([float(np.sum(per)), float(len(per))], lambda s, c: s / max(c, 1.0))
        rows = self._gather([{"prompt": [m.__dict__ for m in self.prompts[i]], "response": t,
                              **{k: v[j] for k, v in values.items()}}
                             for j, (i, t) in enumerate(zip(self.mine, got.texts))])
        if self.ctx.is_main:
            lines = "".join(json.dumps(r) + "\n" for r in rows)
            (self.ctx.run_dir / "samples").mkdir(parents=True, exist_ok=True)
            atomic_write(self.ctx.run_dir / "samples" / f"{path.name}.jsonl", lines.encode("utf-8"))
        return summary, got

    def run(self) -> int:
        cfg, ctx = self.cfg, self.ctx
        models = run_paths(cfg.eval.models)
        base_path = Path(str(cfg.eval.baseline)) if cfg.eval.baseline else None
        baseline_engine = policy_from(ctx, base_path, "eval.baseline", self.tok) if base_path else None
        baseline = self.sample(baseline_engine) if baseline_engine is not None else None
        scorer = Scorer(ctx, str(cfg.eval.reward), self.tok, key="eval.reward",
                        micro_batch=self.micro) if cfg.eval.reward else None
        results: dict[str, Any] = {"prompts": len(self.prompts), "baseline": base_path.name if base_path else None,
                                   "sampling": OmegaConf.to_container(cfg.sampling), "models": {}}
        for path in models:
            summary, _ = self.evaluate_model(path, baseline_engine, baseline, scorer)
            results["models"][path.name] = summary
            if ctx.is_main:
                shown = " ".join(f"{k}={v:.3f}" for k, v in summary.items())
                print(f"[chatforge] eval {path.name}: {shown}", flush=True)
        if scorer is not None:
            results["rm_accuracy"] = self.rm_accuracy(scorer)
        if ctx.is_main:
            self.write(results)
        ctx.barrier()
        return 0

    def write(self, results: dict[str, Any]) -> None:
        from trainer.report import write_report

        run_dir = self.ctx.run_dir
        atomic_write(run_dir / RESULTS, (json.dumps(results, indent=1) + "\n").encode("utf-8"))
        record: dict[str, Any] = {"step": 0}
        for name, summary in results["models"].items():
            record.update({f"{key}/{name}": value for key, value in summary.items()})
        if "rm_accuracy" in results:
            record["rm_accuracy"] = results["rm_accuracy"]
        with open(run_dir / "metrics.jsonl", "w") as out:
            out.write(json.dumps(record) + "\n")
        report = Path(str(self.cfg.eval.report)) if self.cfg.eval.report else run_dir / "report.md"
        runs = run_paths(self.cfg.eval.models) + run_paths(self.cfg.eval.runs)
        write_report(report, results, runs)
        print(f"[chatforge] eval: {run_dir / RESULTS}; report: {report}", flush=True)

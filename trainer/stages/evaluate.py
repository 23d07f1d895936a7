"""stage=eval: every policy of a recipe on the same evaluation prompts, judged by the gold scorer.

Prompts: data.embedded.num_prompts are drawn; with eval.decontaminate those that are word for
word a training prompt of the embedded world (trainer/data/chat_prepare.py
embedded_training_prompts, for the data settings of every run named) are removed, and the
results say how many, per task family. For each run in eval.models (named by its
directory): a policy run (pretrain, SFT, DPO, PPO, A2C, rejection sampling ...) is sampled
(sampling.*, one seed for every model, so two models differ only by their weights) and
decoded greedily; a best_of_n run is read (its winners, drawn from the baseline on the same
prompts). Per response:
    gold_reward     the embedded world's gold score (data.embedded.prefer) of the response
    accuracy        pass@1 of the sampled response: the task answered correctly
                    (corpus.is_correct), whatever the preference
    greedy_accuracy pass@1 of the greedy response (policies only)
    win_rate        against the baseline's response to the same prompt, judged by the gold
                    score: win 1, tie 1/2, loss 0
    kl              to the baseline, per response: sum over its tokens of log pi - log pi_base
                    (a Monte Carlo estimate of KL(pi || pi_base) at temperature 1); for
                    best-of-N the analytic log N - (N-1)/N (Stiennon et al. 2020)
    response_length tokens, the end-of-turn token included
    reward          the reward model's score (eval.reward)
The baseline also gets its oracle pass@k (eval.pass_k samples per prompt: right if any is),
the ceiling of what picking among its samples can reach. Means are given over all prompts and
per task family; every difference to the baseline with a paired bootstrap 95% confidence
interval over prompts (trainer/eval_stats.py, eval.bootstrap resamples, seeded). The reward
model's accuracy is measured on held-out pairs: on the embedded world eval.rm_pairs pairs
with clean labels from their own stream (also per family), else the RM run's held-out split.

Results: <run.dir>/eval.json (machine-readable; the keys are listed in docs/recipe.md),
every response in <run.dir>/samples/<model>.jsonl, one metrics record; then the report
(trainer/report.py).
"""
from __future__ import annotations

import dataclasses
import gc
import json
import math
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from chatforge_config.parallel import ModelConfig
from chatforge_config.trainer import SamplingConfig
from parallel.engine import Engine
from trainer.batches import join_outputs, pair_collate, split_rows
from trainer.checkpoint_files import CheckpointError, resolve_load_path
from trainer.checkpointing import source_model
from trainer.data.chat import Message, prompt_ids, response_ids
from trainer.data.chat_embedded import task_family
from trainer.data.chat_prepare import (embedded_training_prompts, gold_of, heldout_pairs, longest_row, pair_arrays,
                                       prepare_prompts, prompt_key, response_rows)
from trainer.data.corpus import is_correct
from trainer.data.indexed import atomic_write
from trainer.data.tokenizer import Tokenizer, tokenizer_of
from trainer.eval_stats import compare, pass_at_k, summarize
from trainer.generation import sampling_config
from trainer.losses import outputs_only
from trainer.rollout import policy_logprobs, sample_responses
from trainer.runtime import RunContext
from trainer.stages.best_of_n import RESULTS as BON_RESULTS, SUMMARY as BON_SUMMARY
from trainer.stages.reward import Scorer, frozen_from

RESULTS = "eval.json"
Gold = Callable[[list[Message], str], float]
Values = dict[str, list[float]]
# Sampling seeds of the baseline's extra draws for pass@k lie this far apart.
DRAW_STRIDE = 2 ** 32


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


def training_prompt_keys(cfg: Any, runs: list[Path]) -> set[Any]:
    """The embedded world's training prompts for the data settings of this run and of every
    run named (their config.yaml), each distinct setting generated once."""
    settings = {OmegaConf.to_yaml(cfg.data.embedded): cfg.data.embedded}
    for run in runs:
        path = run / "config.yaml"
        if path.is_file():
            other = OmegaConf.load(path)
            if str(OmegaConf.select(other, "data.format", default="")) == "embedded":
                emb = OmegaConf.merge(cfg.data.embedded, other.data.embedded)
                settings.setdefault(OmegaConf.to_yaml(emb), emb)
    keys: set[Any] = set()
    for emb in settings.values():
        keys |= embedded_training_prompts(emb)
    return keys


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
        tok_path, drawn = prepare_prompts(ctx)
        self.tok = Tokenizer(tok_path)
        self.gold: Optional[Gold] = gold_of(self.cfg)
        # index[j]: the position among the drawn prompts of evaluated prompt j (best-of-N's key).
        self.index = list(range(len(drawn)))
        self.removed: dict[str, int] = {}
        self.seen: Optional[set[Any]] = None  # the training prompts, once decontaminated against
        if self.gold is not None and bool(self.cfg.eval.decontaminate):
            self.index, self.removed = self._decontaminate(drawn)
        self.drawn = len(drawn)
        self.prompts = [drawn[i] for i in self.index]
        if not self.prompts:
            raise ValueError(f"eval.decontaminate: all {len(drawn)} evaluation prompts are training prompts; "
                             "raise data.embedded.num_prompts or set eval.decontaminate=false")
        self.families = [task_family(p) for p in self.prompts] if self.gold is not None else []
        topo = ctx.topo
        self.mine = list(range(topo.dp_rank, len(self.prompts), topo.dp))
        self.ids = [prompt_ids(self.tok, self.prompts[i]) for i in self.mine]
        self.sampling: SamplingConfig = sampling_config(self.cfg)
        self.micro = int(self.cfg.train.micro_batch)
        self.seq = int(self.cfg.model.seq_length)

    def _decontaminate(self, drawn: list[list[Message]]) -> tuple[list[int], dict[str, int]]:
        """(positions of the drawn prompts that no training set holds, removed per family)."""
        cfg = self.cfg
        runs = [p for key in ("models", "baseline", "reward", "runs") for p in run_paths(cfg.eval[key])]
        seen = self.seen = training_prompt_keys(cfg, runs)
        kept, removed = [], {}
        for i, prompt in enumerate(drawn):
            if prompt_key(prompt) in seen:
                family = task_family(prompt)
                removed[family] = removed.get(family, 0) + 1
            else:
                kept.append(i)
        return kept, removed

    # ---- responses ---------------------------------------------------------------------

    def sample(self, policy: Engine, draw: int = 0, greedy: bool = False) -> _Responses:
        """One response per prompt of this rank: draw d of the sampling seed, or greedy."""
        seed = int(self.cfg.seed) * 1_000_003 + self.ctx.topo.dp_rank + draw * DRAW_STRIDE
        sampling = dataclasses.replace(self.sampling, temperature=0.0) if greedy else self.sampling
        responses, _ = sample_responses(policy, self.tok, self.ids, sampling, seed)
        return _Responses(self.ids, responses, [self.tok.response_text(r) for r in responses])

    def read_best_of_n(self, path: Path) -> tuple[_Responses, int]:
        """The winners of a best_of_n run, which must have sampled these same prompts."""
        records = [json.loads(line) for line in (path / BON_RESULTS).read_text().splitlines()]
        by_index = {int(r["index"]): r for r in records}
        texts = []
        for i in self.mine:
            record = by_index.get(self.index[i])
            asked = [Message(m["role"], m["content"]) for m in record["prompt"]] if record else None
            if asked != self.prompts[i]:
                raise ValueError(f"eval.models: {path} answered other prompts than this evaluation's "
                                 f"(prompt {self.index[i]}); run both on the same data settings")
            texts.append(record["best_response"])
        responses = [response_ids(self.tok, t) for t in texts]
        n = int(json.loads((path / BON_SUMMARY).read_text())["n"])
        return _Responses(self.ids, responses, texts), n

    # ---- measures ----------------------------------------------------------------------

    def logprob_sums(self, engine: Engine, got: _Responses) -> np.ndarray:
        """Per response, the sum of log pi over its tokens."""
        seq = longest_row(got.ids, got.responses, self.seq)
        rows = response_rows(got.ids, got.responses, seq, self.tok.pad_id)
        logp = policy_logprobs(self.ctx, engine, rows, self.tok.vocab_size, self.micro)["logp"]
        return (logp * rows["response_mask"][:, 1:]).sum(1).double().numpy()

    def _users(self) -> list[str]:
        return [[m.content for m in self.prompts[i] if m.role == "user"][-1] for i in self.mine]

    def correct(self, got: _Responses) -> list[float]:
        """Per response of this rank: 1.0 if it answers its task correctly."""
        return [float(is_correct(u, t)) for u, t in zip(self._users(), got.texts)]

    def per_response(self, got: _Responses, baseline: Optional[_Responses]) -> Values:
        prompts = [self.prompts[i] for i in self.mine]
        out: Values = {"response_length": [float(len(r)) for r in got.responses]}
        if self.gold:  # the embedded world: a gold answer for every prompt
            out["accuracy"] = self.correct(got)
            out["gold_reward"] = [self.gold(p, t) for p, t in zip(prompts, got.texts)]
            if baseline is not None:
                base = [self.gold(p, t) for p, t in zip(prompts, baseline.texts)]
                out["win_rate"] = [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(out["gold_reward"], base)]
        return out

    def pass_k(self, baseline_engine: Engine, first: _Responses) -> list[float]:
        """The baseline's oracle pass@k per prompt (all prompts, in order): eval.pass_k
        samples, the first being `first` (the sample every method is compared on)."""
        k = int(self.cfg.eval.pass_k)
        draws = [self.correct(first)] + [self.correct(self.sample(baseline_engine, draw=d)) for d in range(1, k)]
        return self._gather(pass_at_k(list(zip(*draws)), k))

    def rm_accuracy(self, scorer: Scorer) -> dict[str, Any]:
        """The reward model on held-out pairs: {"rm_accuracy", "rm_pairs"} and, on the embedded
        world, "rm_accuracy_by_family" ({family: {"accuracy", "pairs"}}) and, when the prompts
        were decontaminated, "rm_accuracy_unseen" / "rm_pairs_unseen" (the pairs whose prompt
        is no training prompt)."""
        cfg = self.cfg
        families: list[str] = []
        unseen: list[bool] = []
        if str(cfg.data.format) == "embedded":
            rm_cfg = OmegaConf.merge(cfg, {"model": scorer.model})
            pairs = heldout_pairs(cfg, int(cfg.eval.rm_pairs) or int(cfg.data.embedded.num_prompts))
            pairs = [p for p in pairs if pair_arrays(rm_cfg, self.tok, [p])[0]]  # those that fit
            arrays, _ = pair_arrays(rm_cfg, self.tok, pairs)
            families = [task_family(p.prompt) for p in pairs]
            if self.seen is not None:
                unseen = [prompt_key(p.prompt) not in self.seen for p in pairs]
        else:
            with np.load(Path(str(cfg.eval.reward)) / "data" / "pairs_eval.npz") as data:
                arrays = {k: data[k] for k in data.files}
        n = len(arrays["tokens"])
        mine = list(range(self.ctx.topo.dp_rank, n, self.ctx.topo.dp))
        batch = pair_collate([{k: v[i] for k, v in arrays.items()} for i in mine])
        seq = batch["tokens"].shape[1] - 1

        outputs = scorer.engine.forward_outputs(split_rows(batch, 2 * self.micro), scorer.step, seq_length=seq)
        reward = join_outputs(outputs, 2 * len(mine))["reward"]
        right = self._gather([float(x) for x in (reward[0::2] > reward[1::2]).tolist()], n)
        out: dict[str, Any] = {"rm_accuracy": float(np.mean(right)), "rm_pairs": n}
        if any(unseen):
            # Where the policies are evaluated: pairs whose prompt no stage trained on. The
            # clean pairs are drawn from the training tasks, so most repeat a training prompt.
            out["rm_accuracy_unseen"] = float(np.mean([r for r, u in zip(right, unseen) if u]))
            out["rm_pairs_unseen"] = int(sum(unseen))
        if families:
            out["rm_accuracy_by_family"] = summarize({"accuracy": right}, families)[1]
            for fam, entry in out["rm_accuracy_by_family"].items():
                entry["pairs"] = entry.pop("prompts")
        return out

    # ---- the job -------------------------------------------------------------------------

    def _gather(self, items: list[Any], total: int = -1) -> list[Any]:
        """Every rank's items in order (rank r holds items r, r + dp, ...; `total` of them,
        default one per prompt)."""
        dp = self.ctx.topo.dp
        if dp == 1:
            return items
        parts: list[Any] = [None] * dp
        dist.all_gather_object(parts, items, group=self.ctx.topo.dp_group)
        return [parts[i % dp][i // dp] for i in range(len(self.prompts) if total < 0 else total)]

    def evaluate_model(self, path: Path, baseline_engine: Optional[Engine], baseline: Optional[_Responses],
                       scorer: Optional[Scorer]) -> tuple[Values, _Responses]:
        """Every prompt's values for the run at `path` (all ranks get all of them)."""
        kl: Optional[list[float]] = None
        greedy: Optional[_Responses] = None
        if str(OmegaConf.load(path / "config.yaml").stage.name) == "best_of_n":
            got, n = self.read_best_of_n(path)
            kl = [math.log(n) - (n - 1) / n] * len(got.responses)
        else:
            policy = policy_from(self.ctx, path, "eval.models", self.tok)
            got = self.sample(policy)
            greedy = self.sample(policy, greedy=True) if self.gold else None
            if baseline_engine is not None:
                kl = list(self.logprob_sums(policy, got) - self.logprob_sums(baseline_engine, got))
            del policy
            gc.collect()
        values = self.per_response(got, baseline)
        if greedy is not None:
            values["greedy_accuracy"] = self.correct(greedy)
        if kl is not None:
            values["kl"] = [float(x) for x in kl]
        if scorer is not None:
            values["reward"] = scorer(got.ids, got.responses)
        rows = self._gather([{"prompt": [m.__dict__ for m in self.prompts[i]], "response": t,
                              **{k: v[j] for k, v in values.items()}}
                             for j, (i, t) in enumerate(zip(self.mine, got.texts))])
        if self.ctx.is_main:
            lines = "".join(json.dumps(r) + "\n" for r in rows)
            (self.ctx.run_dir / "samples").mkdir(parents=True, exist_ok=True)
            atomic_write(self.ctx.run_dir / "samples" / f"{path.name}.jsonl", lines.encode("utf-8"))
        return {k: [float(r[k]) for r in rows] for k in values}, got

    def _header(self, base_path: Optional[Path]) -> dict[str, Any]:
        cfg = self.cfg
        counts: dict[str, int] = {}
        for family in self.families:
            counts[family] = counts.get(family, 0) + 1
        return {"prompts": len(self.prompts), "drawn": self.drawn,
                "removed": {"total": sum(self.removed.values()), "by_family": dict(sorted(self.removed.items()))},
                "families": counts, "baseline": base_path.name if base_path else None,
                "sampling": OmegaConf.to_container(cfg.sampling),
                "bootstrap": {"resamples": int(cfg.eval.bootstrap), "seed": int(cfg.seed), "level": 0.95},
                "models": {}, "by_family": {}, "vs_baseline": {}}

    def run(self) -> int:
        cfg, ctx = self.cfg, self.ctx
        models = run_paths(cfg.eval.models)
        base_path = Path(str(cfg.eval.baseline)) if cfg.eval.baseline else None
        baseline_engine = policy_from(ctx, base_path, "eval.baseline", self.tok) if base_path else None
        baseline = self.sample(baseline_engine) if baseline_engine is not None else None
        scorer = Scorer(ctx, str(cfg.eval.reward), self.tok, key="eval.reward",
                        micro_batch=self.micro) if cfg.eval.reward else None
        results = self._header(base_path)
        if baseline_engine is not None and baseline is not None and self.gold is not None:
            per_prompt = self.pass_k(baseline_engine, baseline)
            overall, by_family = summarize({"pass_k": per_prompt}, self.families)
            results["pass_k"] = {"k": int(cfg.eval.pass_k), "model": results["baseline"], "all": overall["pass_k"],
                                 "by_family": {f: v["pass_k"] for f, v in by_family.items()}}
        resamples, seed = int(cfg.eval.bootstrap), int(cfg.seed)
        every: dict[str, Values] = {}
        for path in models:
            every[path.name], _ = self.evaluate_model(path, baseline_engine, baseline, scorer)
            summary, by_family = summarize(every[path.name], self.families, resamples, seed)
            results["models"][path.name], results["by_family"][path.name] = summary, by_family
            if ctx.is_main:
                shown = " ".join(f"{k}={v:.3f}" for k, v in summary.items() if isinstance(v, float))
                print(f"[chatforge] eval {path.name}: {shown}", flush=True)
        base_values = every.get(base_path.name) if base_path is not None else None
        for name, values in every.items():
            if base_values is not None and values is not base_values:
                results["vs_baseline"][name] = compare(values, base_values, self.families, resamples, seed)
        if scorer is not None:
            results.update(self.rm_accuracy(scorer))
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
            record.update({f"{key}/{name}": value for key, value in summary.items() if not key.endswith("_ci")})
        if "rm_accuracy" in results:
            record["rm_accuracy"] = results["rm_accuracy"]
        with open(run_dir / "metrics.jsonl", "w") as out:
            out.write(json.dumps(record) + "\n")
        report = Path(str(self.cfg.eval.report)) if self.cfg.eval.report else run_dir / "report.md"
        runs = run_paths(self.cfg.eval.models) + run_paths(self.cfg.eval.runs)
        write_report(report, results, runs)
        print(f"[chatforge] eval: {run_dir / RESULTS}; report: {report}", flush=True)

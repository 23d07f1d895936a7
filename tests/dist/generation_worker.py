"""Generate with tiny random models at several layouts in ONE set of processes and write
what every rank got: `python -m tests.dist.generation_worker OUT_DIR LAYOUT [LAYOUT ...]`,
LAYOUT one of dp (TP1 on every rank: DP replicas), tp2, pp2, tp2pp2. Run with the launcher's local
spawner, one process per rank; the groups are rebuilt between layouts (megatron's globals
are per process, which is why this runs in fresh processes at all).

Writes OUT_DIR/<layout>_rank<r>.json: {case: {"tokens", "finished", "logprobs"} or error}.
"""
from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

VOCAB = 300
SEED = 11
MAX_NEW = 20
# Different lengths, one of a single token: exercises left padding and per-row positions.
PROMPTS = [[17, 250, 31, 8, 99], [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16], [42],
           [120, 7, 33, 260, 91, 14, 5, 77, 180]]
SAMPLED = {"temperature": 0.8, "top_k": 20, "top_p": 0.9}
FAMILIES: dict[str, dict[str, Any]] = {
    "gpt": {},
    # LLaMA's choices: rotary positions, RMSNorm, SwiGLU, no biases, untied, GQA.
    "llama": {"position_embedding": "rope", "normalization": "RMSNorm", "activation": "swiglu",
              "add_bias": False, "tie_embeddings": False, "num_query_groups": 2},
}
# Sequence parallelism is not here: megatron's local spec needs apex's LayerNorm for it.
LAYOUTS = {"dp": {}, "tp2": {"tp": 2}, "pp2": {"pp": 2}, "tp2pp2": {"tp": 2, "pp": 2}}


def _run_cases(engine: Any, prompts: list[list[int]], full: bool) -> dict[str, Any]:
    from trainer.generation import SamplingConfig, generate

    def gen(stop: set[int], plist: list[list[int]] = prompts, **kw: Any) -> dict[str, Any]:
        sampling = SamplingConfig(**{"max_new_tokens": MAX_NEW, "temperature": 0.0, **kw})
        return asdict(generate(engine, plist, sampling, stop, pad_id=0, seed=1234, vocab_size=VOCAB))

    out: dict[str, Any] = {
        "greedy_cache": gen(set()),
        "greedy_nocache": gen(set(), use_cache=False),
        "sampled_cache": gen(set(), **SAMPLED),
        "sampled_nocache": gen(set(), use_cache=False, **SAMPLED),
    }
    if not full:
        return out
    greedy = out["greedy_cache"]["tokens"]
    stop = {greedy[1][0], greedy[2][3]}  # row 1 stops at once, row 2 (at the latest) at its 4th
    out["stop_ids"] = sorted(stop)
    out["stopped"] = gen(stop)
    out["singles"] = [gen(set(), [p]) for p in prompts]
    try:
        gen(set(), max_new_tokens=128 - 12 + 1)
        out["too_long"] = "no error"
    except ValueError as exc:
        out["too_long"] = str(exc)
    return out


def _sequence_parallel_flags(module: torch.nn.Module) -> dict[str, bool]:
    flags = {name: bool(m.sequence_parallel) for name, m in module.named_modules()
             if hasattr(m, "sequence_parallel")}
    return {**flags, "config": bool(module.config.sequence_parallel)}


def main(out_dir: str, *layouts: str) -> None:
    torch.set_num_threads(1)
    from chatforge_config.parallel import ModelConfig, ParallelConfig
    from parallel import cpu_compat
    from parallel.dist import init_distributed, local_env, shutdown
    from parallel.groups import destroy_groups, init_groups

    init_distributed(local_env())
    cpu_compat.apply()
    from parallel.engine import Engine

    for layout in layouts:
        results: dict[str, Any] = {}
        for family, overrides in FAMILIES.items():
            model_cfg = ModelConfig(**overrides)
            parallel_cfg = ParallelConfig(**LAYOUTS[layout])
            topo = init_groups(model_cfg, parallel_cfg, seed=SEED)
            engine = Engine(model_cfg, parallel_cfg, topo, vocab_size=VOCAB, seed=SEED)
            # DP replicas generate independently: the second one gets a different batch.
            prompts = PROMPTS if topo.dp_rank == 0 else PROMPTS[:2]
            before = _sequence_parallel_flags(engine.module)
            results[family] = _run_cases(engine, prompts,
                                         full=family == "gpt" and layout == "dp" and topo.dp_rank == 0)
            results[family]["dp_rank"] = topo.dp_rank
            # Generation may turn sequence parallelism off; the flags must be as before afterwards.
            results[family]["sp_restored"] = _sequence_parallel_flags(engine.module) == before
            destroy_groups()
        rank = torch.distributed.get_rank()
        Path(out_dir, f"{layout}_rank{rank}.json").write_text(json.dumps(results))
    shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])

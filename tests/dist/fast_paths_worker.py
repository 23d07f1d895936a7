"""One rank: parallel.layers' fast paths (GradFreeLinear, skip_tp1_regions) give bit for bit
what megatron's own paths (parallel.layers.megatron_paths) give, in generation and in a
training step at TP1. Run by tests/dist/test_fast_paths.py; prints OK on success."""
from __future__ import annotations

import torch

from chatforge_config.parallel import ModelConfig, OptimConfig, ParallelConfig
from parallel import cpu_compat
from parallel.dist import init_distributed, local_env, shutdown
from parallel.groups import init_groups


def main() -> None:
    torch.set_num_threads(1)
    init_distributed(local_env())
    cpu_compat.apply()
    from parallel.engine import Engine
    from parallel.layers import GradFreeLinear, megatron_paths
    from trainer.generation import SamplingConfig, generate
    from trainer.stages.pretrain import lm_forward

    model = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=48)
    topo = init_groups(model, ParallelConfig(), 1)
    gen = torch.Generator().manual_seed(3)
    # Prompts of different lengths: left padding, explicit masks in every decode step.
    prompts = [torch.randint(5, 200, (n,), generator=gen).tolist() for n in (5, 9, 12)]
    frozen = Engine(model, ParallelConfig(), topo, vocab_size=200, seed=1)
    assert any(isinstance(m.__dict__.get("_forward_impl"), GradFreeLinear) for m in frozen.module.modules())
    for temperature in (0.0, 1.0):
        sampling = SamplingConfig(max_new_tokens=12, temperature=temperature, use_cache=True)
        ours = generate(frozen, prompts, sampling, stop_ids=set(), pad_id=0, seed=5, vocab_size=200)
        with megatron_paths(frozen.module):
            theirs = generate(frozen, prompts, sampling, stop_ids=set(), pad_id=0, seed=5, vocab_size=200)
        assert ours.tokens == theirs.tokens, (temperature, ours.tokens, theirs.tokens)
        assert ours.logprobs == theirs.logprobs, temperature  # bit for bit, not approximately

    batch = [{"tokens": torch.randint(0, 200, (2, 49), generator=gen)} for _ in range(2)]
    results = []
    for fast in (True, False):
        engine = Engine(model, ParallelConfig(), topo, vocab_size=200, seed=1, optim=OptimConfig(warmup_steps=0))
        step = lambda b, m: lm_forward(b, m, torch.device("cpu"))  # noqa: E731
        if fast:
            losses = [engine.train_step(batch, step) for _ in range(2)]
        else:
            with megatron_paths(engine.module):
                losses = [engine.train_step(batch, step) for _ in range(2)]
        weights = torch.cat([p.detach().flatten() for p in engine.module.parameters()])
        results.append(([(r.loss, r.grad_norm) for r in losses], weights))
    assert results[0][0] == results[1][0], results
    assert torch.equal(results[0][1], results[1][1])
    shutdown()
    print("OK")


if __name__ == "__main__":
    main()

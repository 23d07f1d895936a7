"""One rank: parallel.layers' fast paths (GradFreeLinear, skip_tp1_regions) give bit for bit
what megatron's own paths (parallel.layers.megatron_paths) give in generation, and with
TP1TrainingLinear the same training steps at TP1 (to fp32 rounding). Run by
tests/dist/test_fast_paths.py; prints OK on success."""
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
    from parallel.layers import GradFreeLinear, TP1TrainingLinear, megatron_paths
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
        fast_linears = [m for m in engine.module.modules() if isinstance(m.__dict__.get("forward"), TP1TrainingLinear)]
        assert len(fast_linears) == 4 * model.num_layers + 1, fast_linears  # qkv, proj, fc1, fc2; output
        step = lambda b, m: lm_forward(b, m, torch.device("cpu"))  # noqa: E731
        if fast:
            losses = [engine.train_step(batch, step) for _ in range(2)]
        else:
            with megatron_paths(engine.module):
                assert not any(isinstance(m.__dict__.get("forward"), TP1TrainingLinear) for m in fast_linears)
                losses = [engine.train_step(batch, step) for _ in range(2)]
            assert all(isinstance(m.__dict__.get("forward"), TP1TrainingLinear) for m in fast_linears)
        weights = torch.cat([p.detach().flatten() for p in engine.module.parameters()])
        results.append(([(r.loss, r.grad_norm) for r in losses], weights))
    # Training goes through TP1TrainingLinear (addmm, bias folded into the GEMM) instead of
    # megatron's matmul + add. On this machine's MKL the two round alike (bit for bit), but a
    # BLAS that splits the K dimension adds the bias into its first partial sum, so the last
    # bit may differ: compared at fp32 resolution. A linear whose gradient missed megatron's
    # DDP buffers (main_grad) would not move under Adam: a gap of ~lr (1e-4), far outside.
    (fast_stats, fast_weights), (slow_stats, slow_weights) = results
    for (fast_loss, fast_norm), (slow_loss, slow_norm) in zip(fast_stats, slow_stats):
        assert abs(fast_loss - slow_loss) <= 1e-6 * abs(slow_loss), results
        assert abs(fast_norm - slow_norm) <= 1e-5 * abs(slow_norm), results
    torch.testing.assert_close(fast_weights, slow_weights, rtol=0, atol=1e-7)
    shutdown()
    print("OK")


if __name__ == "__main__":
    main()

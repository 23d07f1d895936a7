"""One rank: KV-cache generation (torch.inference_mode steps) with a rotary-position model,
then training steps of the same engine. Megatron memoises RoPE tables (an lru_cache on
RotaryEmbedding.forward); one made during generation is an inference tensor, which training
may not save for backward, so parallel.inference drops them when generation ends. Checks that
nothing of the generation is left in that cache and that two training steps then run and
lower the loss on a repeated batch; and that prompts of one length (no pad slot, so no mask
in the decode steps) give the cache the tokens of the recomputation. Run by tests/dist/test_generation.py; prints OK."""
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
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    from parallel.engine import Engine
    from trainer.generation import SamplingConfig, generate
    from trainer.stages.pretrain import lm_forward

    model = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=48,
                        position_embedding="rope")
    topo = init_groups(model, ParallelConfig(), 1)
    engine = Engine(model, ParallelConfig(), topo, vocab_size=200, seed=1, optim=OptimConfig(warmup_steps=0, lr=1e-2))
    gen = torch.Generator().manual_seed(3)
    batch = [{"tokens": torch.randint(0, 200, (2, 49), generator=gen)}]
    step = lambda b, m: lm_forward(b, m, torch.device("cpu"))  # noqa: E731
    losses = [engine.train_step(batch, step).loss]  # RoPE tables made (and cached) in training
    prompts = [torch.randint(5, 200, (n,), generator=gen).tolist() for n in (5, 9)]
    out = generate(engine, prompts, SamplingConfig(max_new_tokens=8, temperature=0.0), stop_ids=set(),
                   pad_id=0, seed=5, vocab_size=200)
    assert all(len(t) == 8 for t in out.tokens), out.tokens
    cached = RotaryEmbedding.forward.cache_info().currsize
    assert cached == 0, f"{cached} RoPE tables from generation left in megatron's cache"
    # Prompts of one length have no pad slot: the decode steps then run without a mask.
    even = [torch.randint(5, 200, (7,), generator=gen).tolist() for _ in range(3)]
    runs = [generate(engine, even, SamplingConfig(max_new_tokens=8, temperature=0.0, use_cache=c), stop_ids=set(),
                     pad_id=0, seed=5, vocab_size=200) for c in (True, False)]
    assert runs[0].tokens == runs[1].tokens, [r.tokens for r in runs]
    losses += [engine.train_step(batch, step).loss for _ in range(2)]
    assert losses[2] < losses[0], losses
    shutdown()
    print("OK")


if __name__ == "__main__":
    main()

"""Load a checkpoint's weights at this process group's layout and write the logits of a
fixed batch (full vocabulary) to a file: `python -m tests.dist.logits_worker CONFIG CKPT OUT`.
Run with the launcher's local spawner, one process per rank."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch


def main(config_path: str, checkpoint: str, out: str) -> None:
    from trainer import runtime

    cfg = runtime.load_config(config_path)
    ctx = runtime.start(cfg)
    from parallel.checkpoint import load_engines
    from parallel.engine import Engine
    from trainer.batches import lm_inputs
    from trainer.data.tokenizer import Tokenizer

    vocab = Tokenizer(Path(checkpoint).parents[1] / "tokenizer" / "tokenizer.model").vocab_size
    engine = Engine(cfg.model, cfg.parallel, ctx.topo, vocab_size=vocab, seed=999)  # frozen
    load_engines({"model": engine}, Path(checkpoint) / "shards", with_optimizer=False)
    seq = int(cfg.model.seq_length)
    tokens = (torch.arange(2 * (seq + 1)).view(2, seq + 1) * 7 + 3) % vocab
    captured: list[torch.Tensor] = []

    def step(batch: dict[str, torch.Tensor], model: torch.nn.Module) -> Any:
        x = lm_inputs(batch["tokens"], ctx.device)
        logits = model(x["input_ids"], x["position_ids"], x["attention_mask"],
                       runtime_gather_output=True)

        def loss_fn(output: torch.Tensor) -> Any:
            captured.append(output.detach().float().cpu())
            zero = output.float().sum() * 0
            return zero, torch.tensor(1, dtype=torch.int), {"loss": torch.stack([zero.detach(), torch.tensor(1.0)])}

        return logits, loss_fn

    engine.eval_step([{"tokens": tokens}], step)
    if captured and ctx.topo.tp_rank == 0 and ctx.topo.dp_rank == 0:
        torch.save(captured[0], out)
    runtime.close(ctx)


if __name__ == "__main__":
    main(*sys.argv[1:4])

"""Pretraining tokens/s of our Megatron engine versus a plain PyTorch GPT loop (not a test).

    python -m tools.bench.pretrain_throughput [--layers 4 --hidden 256 --heads 8 --seq 256
        --micro-batch 4 --global-batch 16 --pairs 7 --steps-per-block 3 --threads 1
        --data corpus|random --vocab 1024 --out FILE.json]

Both trainers live in ONE process and train the same GPT on the same token batches:
  ours   parallel.engine.Engine (megatron GPTModel, DDP buffers, megatron optimizer, the
         no-pipelining schedule) driven by trainer.stages.pretrain.lm_forward;
  plain  a nanoGPT-style module (learned positions, pre-LayerNorm, GELU MLP 4h, biases, tied
         embeddings, F.scaled_dot_product_attention(is_causal=True)), gradient accumulation
         over the same micro batches, torch.optim.AdamW (the class megatron falls back to
         without apex/TE, with its defaults), clip_grad_norm_(1.0).
The plain model starts from a copy of our initial weights, so both see the same losses (the
report prints both: a check that they do the same work). Blocks alternate ours/plain; each
pair's ratio is ours/plain tokens/s, and the median over pairs is the headline, which
cancels slow drifts of the machine (thermal, other load) better than one long run each.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

WEIGHT_DECAY, LR, BETAS, EPS, CLIP = 0.1, 3e-4, (0.9, 0.95), 1e-8, 1.0


@dataclass
class Shape:
    layers: int
    hidden: int
    heads: int
    seq: int
    micro_batch: int
    global_batch: int
    vocab: int  # the padded vocabulary both models use

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch * self.seq


# -- data -------------------------------------------------------------------------------
def corpus_tokens(vocab: int, num_docs: int, seed: int) -> tuple[torch.Tensor, int]:
    """The embedded corpus, tokenized by a tokenizer trained with tools.tokenizer; documents
    joined by EOD into one stream (as the pretraining data is). -> (stream, tokenizer vocab)."""
    from trainer.data.tokenizer_training import train_tokenizer
    from trainer.data.corpus import generate_corpus
    from trainer.data.tokenizer import Tokenizer

    docs = generate_corpus(num_docs, seed)
    with tempfile.TemporaryDirectory() as tmp:
        tok = Tokenizer(train_tokenizer(Path(tmp) / "tok", vocab, texts=docs, num_threads=1, seed=seed))
        stream: list[int] = []
        for ids in tok.encode_batch(docs):
            stream.extend(ids)
            stream.append(tok.eod_id)
        return torch.tensor(stream, dtype=torch.long), tok.vocab_size


def make_batches(args: argparse.Namespace, count: int) -> tuple[list[torch.Tensor], int, str]:
    """`count` global batches [global_batch, seq+1] -> (batches, tokenizer vocab, description)."""
    window = args.seq + 1
    need = count * args.global_batch * window
    if args.data == "random":
        gen = torch.Generator().manual_seed(args.seed)
        stream = torch.randint(0, args.vocab, (need,), generator=gen)
        vocab, what = args.vocab, f"uniform random tokens in [0, {args.vocab})"
    else:
        num_docs = args.docs
        stream, vocab = corpus_tokens(args.vocab, num_docs, args.seed)
        what = (f"embedded corpus (generate_corpus({num_docs}, seed={args.seed})), sentencepiece "
                f"BPE vocab {vocab} trained by tools.tokenizer, {stream.numel()} tokens")
        if stream.numel() < need:  # cycle: throughput does not care, the check prints it
            stream = stream.repeat(need // stream.numel() + 1)
    windows = stream[:need].view(count, args.global_batch, window)
    return list(windows), vocab, what


def micro_batches(batch: torch.Tensor, micro: int) -> list[torch.Tensor]:
    return [batch[i:i + micro] for i in range(0, batch.shape[0], micro)]


# -- the plain reference --------------------------------------------------------------------
class Block(nn.Module):
    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln_1 = nn.LayerNorm(hidden, eps=1e-5)
        self.c_attn = nn.Linear(hidden, 3 * hidden)
        self.attn_proj = nn.Linear(hidden, hidden)
        self.ln_2 = nn.LayerNorm(hidden, eps=1e-5)
        self.c_fc = nn.Linear(hidden, 4 * hidden)
        self.mlp_proj = nn.Linear(4 * hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, h = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(h, dim=2)
        q, k, v = (z.view(b, t, self.heads, h // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.attn_proj(y.transpose(1, 2).reshape(b, t, h))
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x))))


class PlainGPT(nn.Module):
    """nanoGPT's GPT-2 (batch-first, tied head without bias)."""

    def __init__(self, shape: Shape) -> None:
        super().__init__()
        self.wte = nn.Embedding(shape.vocab, shape.hidden)
        self.wpe = nn.Embedding(shape.seq, shape.hidden)
        self.blocks = nn.ModuleList(Block(shape.hidden, shape.heads) for _ in range(shape.layers))
        self.ln_f = nn.LayerNorm(shape.hidden, eps=1e-5)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """-> summed next-token cross-entropy over the micro batch."""
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.blocks:
            x = block(x)
        logits = F.linear(self.ln_f(x), self.wte.weight)
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum")


class PlainTrainer:
    def __init__(self, shape: Shape) -> None:
        self.shape = shape
        self.model = PlainGPT(shape)
        params = [p for p in self.model.parameters() if p.requires_grad]
        # Megatron's default groups: no weight decay on biases and norm weights (1-D).
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": WEIGHT_DECAY},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        self.optimizer = torch.optim.AdamW(groups, lr=LR, betas=BETAS, eps=EPS)

    def step(self, batch: torch.Tensor) -> float:
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        total = batch.shape[0] * (batch.shape[1] - 1)
        loss_sum = 0.0
        for micro in micro_batches(batch, self.shape.micro_batch):
            loss = self.model(micro[:, :-1], micro[:, 1:]) / total
            loss.backward()
            loss_sum += float(loss.detach())
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), CLIP)
        self.optimizer.step()
        return loss_sum


# -- ours -----------------------------------------------------------------------------------
class OursTrainer:
    def __init__(self, shape: Shape, tokenizer_vocab: int, seed: int) -> None:
        from chatforge_config.parallel import ModelConfig, OptimConfig, ParallelConfig
        from parallel import cpu_compat
        from parallel.dist import init_distributed, local_env
        from parallel.groups import init_groups
        from trainer.stages.pretrain import lm_forward

        self.lm_forward = lm_forward
        init_distributed(local_env())
        cpu_compat.apply()
        from parallel.engine import Engine

        self.shape = shape
        model = ModelConfig(name="bench", num_layers=shape.layers, hidden_size=shape.hidden,
                            num_attention_heads=shape.heads, seq_length=shape.seq)
        parallel = ParallelConfig()
        topo = init_groups(model, parallel, seed)
        # Constant LR without warm-up: the plain loop applies the same update from step 1.
        optim = OptimConfig(name="adamw", lr=LR, min_lr=LR, weight_decay=WEIGHT_DECAY,
                            beta1=BETAS[0], beta2=BETAS[1], eps=EPS, clip_grad=CLIP,
                            warmup_steps=0, decay="constant")
        self.engine = Engine(model, parallel, topo, vocab_size=tokenizer_vocab, seed=seed,
                             optim=optim, total_steps=10**6)
        self.device = torch.device("cpu")

    def gpt(self) -> nn.Module:
        return self.engine.model[0].module  # under megatron's DDP wrapper

    def step(self, batch: torch.Tensor) -> float:
        def step_fn(micro: dict[str, torch.Tensor], model: nn.Module) -> Any:
            return self.lm_forward(micro, model, self.device)

        mbs = [{"tokens": m} for m in micro_batches(batch, self.shape.micro_batch)]
        return self.engine.train_step(mbs, step_fn).loss


@torch.no_grad()
def copy_weights(ours: nn.Module, plain: PlainGPT, heads: int) -> None:
    """Load our initial weights into the plain model. Megatron's fused QKV interleaves the
    heads ([head][q|k|v][head_dim] rows); nanoGPT's is [q|k|v][head][head_dim]."""
    src = dict(ours.named_parameters())

    def qkv(t: torch.Tensor) -> torch.Tensor:
        rows = t.shape[0] // 3
        return t.reshape(heads, 3, rows // heads, *t.shape[1:]).transpose(0, 1).reshape(t.shape)

    names = {"wte.weight": "embedding.word_embeddings.weight",
             "wpe.weight": "embedding.position_embeddings.weight",
             "ln_f.weight": "decoder.final_layernorm.weight",
             "ln_f.bias": "decoder.final_layernorm.bias"}
    ours_of = {"ln_1": "input_layernorm", "c_attn": "self_attention.linear_qkv",
               "attn_proj": "self_attention.linear_proj", "ln_2": "pre_mlp_layernorm",
               "c_fc": "mlp.linear_fc1", "mlp_proj": "mlp.linear_fc2"}
    for i in range(len(plain.blocks)):
        for mine, theirs in ours_of.items():
            for leaf in ("weight", "bias"):
                names[f"blocks.{i}.{mine}.{leaf}"] = f"decoder.layers.{i}.{theirs}.{leaf}"
    for name, param in plain.named_parameters():
        value = src[names[name]]
        param.copy_(qkv(value) if ".c_attn." in name else value)


# -- measuring ------------------------------------------------------------------------------
Step = Callable[[torch.Tensor], float]


@dataclass
class BlockResult:
    pair: int
    who: str
    steps: int
    seconds: float
    tokens_per_s: float
    cpu_seconds: float  # process CPU time: all threads, excludes time other processes took
    loss: float  # the last step's loss


def run_block(step: Step, batches: Sequence[torch.Tensor]) -> tuple[float, float, float]:
    """-> (wall seconds, process CPU seconds, last loss). Each step ends in a host float (the
    loss), so the clocks stop after the work, not after its launch."""
    loss = float("nan")
    start, cpu_start = time.perf_counter(), time.process_time()
    for batch in batches:
        loss = step(batch)
    return time.perf_counter() - start, time.process_time() - cpu_start, loss


def measure(trainers: dict[str, Step], batches: list[torch.Tensor], args: argparse.Namespace,
            tokens_per_step: int) -> list[BlockResult]:
    """Warm-up, then `pairs` x (ours block, plain block); in a pair both get the same batches."""
    for who, step in trainers.items():
        seconds, _, loss = run_block(step, batches[:args.warmup])
        print(f"warm-up {who:>5}: {args.warmup} steps {seconds:6.2f}s loss {loss:.4f}", flush=True)
    results: list[BlockResult] = []
    n = args.steps_per_block
    for pair in range(args.pairs):
        chunk = batches[args.warmup + pair * n: args.warmup + (pair + 1) * n]
        for who, step in trainers.items():
            seconds, cpu, loss = run_block(step, chunk)
            tps = n * tokens_per_step / seconds
            results.append(BlockResult(pair + 1, who, n, seconds, tps, cpu, loss))
            print(f"pair {pair + 1}/{args.pairs} {who:>5}: {n} steps {seconds:6.2f}s "
                  f"(cpu {cpu:6.2f}s) {tps:8.0f} tokens/s loss {loss:.4f}", flush=True)
    return results


def summarize(results: list[BlockResult]) -> dict[str, Any]:
    ours = [r for r in results if r.who == "ours"]
    plain = [r for r in results if r.who == "plain"]
    ratios = [a.tokens_per_s / b.tokens_per_s for a, b in zip(ours, plain)]
    # The same ratio from CPU time: on a shared machine it shows what other load did to wall.
    cpu_ratios = [b.cpu_seconds / a.cpu_seconds for a, b in zip(ours, plain)]
    return {
        "pair_ratios": ratios,
        "median_ratio": statistics.median(ratios),
        "cpu_time_pair_ratios": cpu_ratios,
        "median_cpu_time_ratio": statistics.median(cpu_ratios),
        "ours_tokens_per_s_median": statistics.median(r.tokens_per_s for r in ours),
        "plain_tokens_per_s_median": statistics.median(r.tokens_per_s for r in plain),
        "max_loss_gap": max(abs(a.loss - b.loss) for a, b in zip(ours, plain)),
    }


def model_flops_per_token(shape: Shape, params: int) -> float:
    """The MFU convention: 6N + 12*L*H*Q*T per token (N parameters incl. the tied embedding,
    L layers, H heads, Q head dim, T sequence length); causal masking is not discounted."""
    return 6.0 * params + 12.0 * shape.layers * shape.hidden * shape.seq


# -- command line ---------------------------------------------------------------------------
def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tools.bench.pretrain_throughput",
                                description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--global-batch", type=int, default=16)
    p.add_argument("--pairs", type=int, default=7)
    p.add_argument("--steps-per-block", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2, help="steps per trainer before timing")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    p.add_argument("--data", choices=("corpus", "random"), default="corpus")
    p.add_argument("--vocab", type=int, default=1024, help="tokenizer vocabulary (corpus) or id range (random)")
    p.add_argument("--docs", type=int, default=2000, help="corpus documents (--data corpus)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    if args.global_batch % args.micro_batch:
        p.error(f"--global-batch={args.global_batch} must be a multiple of --micro-batch={args.micro_batch}")
    if args.hidden % args.heads:
        p.error(f"--hidden={args.hidden} must be a multiple of --heads={args.heads}")
    return args


def build(args: argparse.Namespace) -> tuple[Shape, OursTrainer, PlainTrainer, list[torch.Tensor], str]:
    count = args.warmup + args.pairs * args.steps_per_block
    batches, tok_vocab, data = make_batches(args, count)
    # vocab=0 until the engine has padded the tokenizer's vocabulary.
    ours = OursTrainer(Shape(args.layers, args.hidden, args.heads, args.seq, args.micro_batch,
                             args.global_batch, vocab=0), tok_vocab, args.seed)
    padded = ours.gpt().vocab_size  # megatron's padded vocabulary: the plain model uses it too
    shape = Shape(args.layers, args.hidden, args.heads, args.seq, args.micro_batch,
                  args.global_batch, vocab=padded)
    ours.shape = shape
    plain = PlainTrainer(shape)
    copy_weights(ours.gpt(), plain.model, args.heads)
    return shape, ours, plain, batches, data


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    shape, ours, plain, batches, data = build(args)
    params = sum(p.numel() for p in plain.model.parameters())
    assert params == ours.engine.parameter_count(), "the two models differ in size"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); shape {asdict(shape)}; "
          f"{params / 1e6:.2f}M parameters; data: {data}", flush=True)
    results = measure({"ours": ours.step, "plain": plain.step}, batches, args, shape.tokens_per_step)
    summary = summarize(results)
    flops = model_flops_per_token(shape, params)
    for who in ("ours", "plain"):
        tps = summary[f"{who}_tokens_per_s_median"]
        print(f"{who:>5}: median {tps:8.0f} tokens/s = {tps * flops / 1e9:6.1f} GFLOP/s (6N+12LHQT)")
    print("pair ratios (ours/plain): " + " ".join(f"{r:.3f}" for r in summary["pair_ratios"]))
    print(f"median ratio ours/plain: {summary['median_ratio']:.3f} (from CPU time: "
          f"{summary['median_cpu_time_ratio']:.3f}); "
          f"largest loss gap between the two at a block end: {summary['max_loss_gap']:.2e}")
    report = {"command": " ".join(["python -m tools.bench.pretrain_throughput", *(argv or sys.argv[1:])]),
              "torch": torch.__version__, "threads": torch.get_num_threads(), "shape": asdict(shape),
              "parameters": params, "flops_per_token": flops, "data": data,
              "plain_attention": "F.scaled_dot_product_attention(is_causal=True)",
              "blocks": [asdict(r) for r in results], **summary}
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()

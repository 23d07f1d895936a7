"""`chatforge plan`: rank layout, memory per device, step time and cost, from the config alone.

Torch-free arithmetic. The rank order is Megatron-core's default 'tp-cp-ep-dp-pp' (see
megatron.core.parallel_state.RankGenerator; cp = ep = 1 here): TP varies fastest, then DP,
then PP, so global_rank = tp_rank + tp * dp_rank + tp * dp * pp_rank. SLURM's block
distribution puts ranks [n * procs_per_node, (n + 1) * procs_per_node) on node n, so TP
groups stay inside a node whenever tp divides procs_per_node.

Memory follows "Transformer Math 101" (EleutherAI, 2023) for weights, gradients and
optimizer states, and Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large
Transformer Models", eq. 1-4) for activations. Not included: the CUDA context and allocator
fragmentation (typically 1-3 GB per GPU), communication buffers.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from omegaconf import OmegaConf

from chatforge_config.parallel import ffn_size, lora_targets

GB = 1e9


@dataclass(frozen=True)
class Layout:
    world: int
    tp: int
    pp: int
    dp: int
    procs_per_node: int

    def rank(self, tp_rank: int, dp_rank: int, pp_rank: int) -> int:
        return tp_rank + self.tp * dp_rank + self.tp * self.dp * pp_rank

    def node(self, rank: int) -> int:
        return rank // self.procs_per_node

    def tp_groups(self) -> list[list[int]]:
        return [[self.rank(t, d, p) for t in range(self.tp)]
                for p in range(self.pp) for d in range(self.dp)]

    def dp_groups(self) -> list[list[int]]:
        return [[self.rank(t, d, p) for d in range(self.dp)]
                for p in range(self.pp) for t in range(self.tp)]

    def pp_groups(self) -> list[list[int]]:
        return [[self.rank(t, d, p) for p in range(self.pp)]
                for d in range(self.dp) for t in range(self.tp)]


def layout_of(cfg: Any) -> Layout:
    ppn = int(cfg.cluster.procs_per_node)
    world = int(cfg.cluster.nodes) * ppn
    tp, pp = int(cfg.parallel.tp), int(cfg.parallel.pp)
    return Layout(world, tp, pp, world // (tp * pp), ppn)


def padded_vocab(cfg: Any) -> int:
    multiple = int(cfg.model.make_vocab_size_divisible_by)
    return -(-int(cfg.tokenizer.vocab_size) // multiple) * multiple


@dataclass(frozen=True)
class Params:
    per_layer: int  # one transformer layer, whole (before TP)
    layer_norms: int  # of those, replicated over TP (norm weights/biases)
    embedding: int  # word (+ learned position) embedding, first stage
    output: int  # untied output layer + final norm, last stage


def count_params(cfg: Any) -> tuple[Params, int]:
    """Parameter counts of the GPT in cfg.model, and the total."""
    m = cfg.model
    h, layers, heads = int(m.hidden_size), int(m.num_layers), int(m.num_attention_heads)
    groups = int(m.num_query_groups or heads)
    kv = h * groups // heads
    ffn = ffn_size(m)
    bias = bool(m.add_bias)
    qkv = h * (h + 2 * kv) + (h + 2 * kv if bias else 0)
    proj = h * h + (h if bias else 0)
    fc1_out = 2 * ffn if m.activation == "swiglu" else ffn
    mlp = h * fc1_out + ffn * h + ((fc1_out + h) if bias else 0)
    norm = 2 * h if m.normalization == "LayerNorm" else h
    per_layer = qkv + proj + mlp + 2 * norm
    vocab = padded_vocab(cfg)
    embedding = vocab * h + (int(m.seq_length) * h if m.position_embedding == "learned" else 0)
    output = norm + (0 if m.tie_embeddings else vocab * h)
    total = layers * per_layer + embedding + output
    return Params(per_layer, 2 * norm, embedding, output), total


def params_per_device(cfg: Any) -> int:
    """Parameters held by the busiest rank: a TP shard of its stage's layers, plus the
    embedding on the first stage or the output layer on the last (tied embeddings keep a copy
    on the last stage when pp > 1, as Megatron does)."""
    p, _ = count_params(cfg)
    m = cfg.model
    tp, pp = int(cfg.parallel.tp), int(cfg.parallel.pp)
    layers = int(m.num_layers) // pp * ((p.per_layer - p.layer_norms) // tp + p.layer_norms)
    word = padded_vocab(cfg) * int(m.hidden_size)
    first = word // tp + (p.embedding - word)  # word embedding split over TP, positions not
    final_norm = p.output - (0 if m.tie_embeddings else word)
    untied_or_copy = word // tp if (not m.tie_embeddings or pp > 1) else 0
    last = final_norm + untied_or_copy
    return layers + (first + last if pp == 1 else max(first, last))


def lora_params_per_device(cfg: Any) -> int:
    """Adapter parameters per model on the busiest rank (0 without LoRA): r x (in + out) per
    targeted layer, the factor split like the layer's weight divided by TP (docs/lora.md)."""
    rank = int(cfg.lora.rank)
    if rank <= 0:
        return 0
    m = cfg.model
    h, heads, tp = int(m.hidden_size), int(m.num_attention_heads), int(cfg.parallel.tp)
    kv = h * int(m.num_query_groups or heads) // heads
    ffn = ffn_size(m)
    # target -> (in, out, column-parallel: B split over TP; else row-parallel: A split)
    shapes = {"linear_qkv": (h, h + 2 * kv, True), "linear_proj": (h, h, False),
              "linear_fc1": (h, 2 * ffn if m.activation == "swiglu" else ffn, True),
              "linear_fc2": (ffn, h, False)}
    per_layer = 0
    for target in lora_targets(cfg.lora):
        fan_in, fan_out, column = shapes[target]
        per_layer += rank * (fan_in + fan_out // tp if column else fan_in // tp + fan_out)
    return int(m.num_layers) // int(cfg.parallel.pp) * per_layer


def lora_activation_bytes_per_layer(cfg: Any) -> float:
    """What adapters add to a layer's activations per microbatch: u = A x (r per token) for
    B's gradient, and with lora.dropout a dropped copy of x with its mask. Their x is the
    layer input the base keeps anyway."""
    rank = int(cfg.lora.rank)
    if rank <= 0:
        return 0.0
    m, tp = cfg.model, int(cfg.parallel.tp)
    tokens = int(m.seq_length) * int(cfg.train.micro_batch)
    scale = 2.0 if cfg.parallel.precision == "fp32" else 1.0
    ffn, h = ffn_size(m), int(m.hidden_size)
    inputs = {"linear_qkv": h, "linear_proj": h // tp, "linear_fc1": h, "linear_fc2": ffn // tp}
    total = 0.0
    for target in lora_targets(cfg.lora):
        total += scale * 2 * tokens * rank
        if float(cfg.lora.dropout) > 0:
            total += (scale * 2 + 1) * tokens * inputs[target]
    return total


def bytes_per_param(precision: str, distributed: bool, dp: int) -> dict[str, float]:
    """Weights, gradients and optimizer states per parameter (AdamW).

    fp32: 4 + 4 + 8 (Adam m, v). bf16 as Megatron does it: bf16 weights (2), fp32 main
    gradients (4), fp32 master weights + m + v (12). The distributed optimizer (ZeRO-1)
    shards the optimizer states over DP."""
    weights, grads, optim = (4.0, 4.0, 8.0) if precision == "fp32" else (2.0, 4.0, 12.0)
    return {"weights": weights, "grads": grads, "optimizer": optim / dp if distributed else optim}


def activation_bytes_per_layer(cfg: Any, recompute: str) -> float:
    """Korthikanti et al. 2022 per layer and microbatch, 16-bit activations:
    no recompute s*b*h*(10 + 24/t + 5*a*s/(h*t)) (sequence parallel: 34/t + 5as/(ht)),
    selective drops the 5as/(ht) attention term, full keeps only the layer input 2sbh.
    The MLP share of the 24 (16) scales with ffn/4h, x1.5 for SwiGLU (gate and up kept);
    fp32 doubles everything."""
    m, par = cfg.model, cfg.parallel
    s, b, h = int(m.seq_length), int(cfg.train.micro_batch), int(m.hidden_size)
    a, t = int(m.num_attention_heads), int(par.tp)
    sp = bool(par.sequence_parallel) and t > 1
    scale = 2.0 if par.precision == "fp32" else 1.0
    if recompute == "full":
        return scale * 2 * s * b * h / (t if sp else 1)
    mlp = 16 * ffn_size(m) / (4 * h) * (1.5 if m.activation == "swiglu" else 1.0)
    split = 8 + mlp
    per = (10 + split) / t if sp else 10 + split / t
    if recompute != "selective":
        per += 5 * a * s / (h * t)
    return scale * s * b * h * per


@dataclass(frozen=True)
class Memory:
    weights: float  # weights, grads and optimizer: of every trained model (PPO's actor + critic)
    grads: float
    optimizer: float
    activations: dict[str, float]  # recompute mode -> bytes
    logits: float
    recompute: str  # the configured mode
    frozen: float = 0.0  # weights of forward-only models (DPO's reference, best-of-N's)
    trained_models: int = 1  # models with grads and optimizer states (PPO/A2C: 2)
    # Parameters with grads and optimizer states on the busiest rank (all of them but LoRA's base).
    trainable_params: int = 0

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer + self.activations[self.recompute] \
            + self.logits + self.frozen


def memory_per_device(cfg: Any) -> Memory:
    """Per the stage: pairs double the rows of a microbatch (activations, logits), frozen
    models add their weights, each extra trained model (the PPO/A2C critic, assumed the size
    of the policy, with its own optimizer; the critic-free estimators have none) its weights,
    grads and optimizer states, and a
    stage that does not train (best_of_n) holds no grads, optimizer states or training
    activations. PPO/A2C train one row (a sampled response) per prompt; the rows of one
    optimizer step, which set the microbatches in flight, are train.global_batch (PPO) or
    the whole ppo.rollout_batch (A2C), plus train.global_batch SFT rows with PPO-ptx. Actor
    and critic step one after the other, so activations count once (the critic's scalar
    head has no vocabulary logits). The rollout's KV cache is not counted.

    LoRA (lora.rank > 0): every trained model holds its base weights and adapters, but grads
    and optimizer states only for the adapters (and a scalar head); DPO's and PPO's reference
    is the policy's frozen base, not a model of its own (LORA_SHARED_REFERENCE).
    Full recomputation keeps the input of every block of parallel.recompute_num_layers layers
    and rebuilds one block at a time."""
    from trainer.stages import LORA_SHARED_REFERENCE, NO_TRAINING, RL_STAGES, ROWS_PER_SAMPLE, model_counts

    stage = str(cfg.stage.name)
    frozen_count, extra_trained = model_counts(cfg)
    trained = 1 + extra_trained
    rows = ROWS_PER_SAMPLE.get(stage, 1)
    if rows > 1:
        cfg = OmegaConf.merge(cfg, {"train": {"micro_batch": int(cfg.train.micro_batch) * rows}})
    lay = layout_of(cfg)
    n = params_per_device(cfg)
    per = bytes_per_param(str(cfg.parallel.precision),
                          bool(cfg.parallel.distributed_optimizer), lay.dp)
    lora = lora_params_per_device(cfg) if stage not in NO_TRAINING else 0
    shared = lora and stage in LORA_SHARED_REFERENCE and (stage not in RL_STAGES or float(cfg.ppo.kl_coef) > 0)
    frozen_models = frozen_count - (1 if shared else 0)
    frozen = frozen_models * n * per["weights"]
    if stage in NO_TRAINING:
        none = {mode: 0.0 for mode in ("none", "selective", "full")}
        return Memory(0.0, 0.0, 0.0, none, 0.0, str(cfg.parallel.recompute), frozen)
    step_rows = gb = int(cfg.train.global_batch)
    if stage in RL_STAGES:
        step_rows = (int(cfg.ppo.rollout_batch) * int(cfg.ppo.n_samples_per_prompt) if stage == "a2c" else gb) \
            + (gb if float(cfg.ppo.ptx_coef) > 0 else 0)
    micro = max(1, step_rows // (int(cfg.train.micro_batch) * lay.dp))
    # 1F1B: the first stage holds min(pp, microbatches) microbatches of its layers in flight.
    stage_layers, flights = int(cfg.model.num_layers) // lay.pp, min(lay.pp, micro)
    adapters = lora_activation_bytes_per_layer(cfg)
    acts = {mode: stage_layers * flights * (activation_bytes_per_layer(cfg, mode) + adapters)
            for mode in ("none", "selective")}
    block = min(max(int(cfg.parallel.recompute_num_layers), 1), stage_layers)
    blocks = -(-stage_layers // block)
    acts["full"] = blocks * flights * activation_bytes_per_layer(cfg, "full") \
        + block * (activation_bytes_per_layer(cfg, "none") + adapters)
    s, b = int(cfg.model.seq_length), int(cfg.train.micro_batch)
    logits = 4.0 * s * b * padded_vocab(cfg) / lay.tp  # fp32 logits for the loss, last stage
    # A trained scalar head (the reward model's, the PPO critic's) is h + 1 parameters.
    heads = (cfg.model.head == "scalar") + extra_trained
    trainable = trained * lora + heads * (int(cfg.model.hidden_size) + 1) if lora else trained * n
    weights = trained * (n + lora) * per["weights"]
    return Memory(weights, trainable * per["grads"], trainable * per["optimizer"], acts,
                  logits, str(cfg.parallel.recompute), frozen, trained, trainable)


@dataclass(frozen=True)
class Cost:
    devices: int
    tokens_per_step: int
    flops_per_step: float
    step_s: float
    total_h: float
    device_hours: float
    price: float


def cost_estimate(cfg: Any) -> Cost:
    """Model FLOPs 6N + 12*L*h*s per token (Kaplan et al. 2020 with attention), divided by
    peak x MFU over every device; recomputation costs extra FLOPs that MFU does not count."""
    _, total = count_params(cfg)
    m = cfg.model
    tokens = int(cfg.train.global_batch) * int(m.seq_length)
    per_token = 6 * total + 12 * int(m.num_layers) * int(m.hidden_size) * int(m.seq_length)
    flops = per_token * tokens
    devices = layout_of(cfg).world
    step_s = flops / (devices * float(cfg.cluster.peak_tflops) * 1e12 * float(cfg.cluster.mfu))
    total_s = step_s * int(cfg.train.steps)
    hours = total_s * devices / 3600
    return Cost(devices, tokens, flops, step_s, total_s / 3600, hours,
                hours * float(cfg.cluster.price_per_gpu_hour))


def _groups_text(name: str, groups: list[list[int]], lay: Layout) -> list[str]:
    lines = [f"  {name} groups ({len(groups)} x {len(groups[0])}):"]
    shown = groups if len(groups) <= 8 else groups[:4] + groups[-2:]
    for index, group in enumerate(shown):
        nodes = sorted({lay.node(r) for r in group})
        where = f"node {nodes[0]}" if len(nodes) == 1 else "nodes " + ",".join(map(str, nodes))
        lines.append(f"    {group}  ({where})")
        if len(groups) > 8 and index == 3:
            lines.append(f"    ... {len(groups) - 6} more")
    return lines


def format_plan(cfg: Any) -> str:
    """The layout, memory and cost section of `chatforge plan` for one point."""
    lay = layout_of(cfg)
    lines = [f"layout: world {lay.world} = {cfg.cluster.nodes} node(s) x "
             f"{lay.procs_per_node}; tp {lay.tp} x pp {lay.pp} x dp {lay.dp} "
             f"(Megatron order tp-dp-pp: TP fastest)"]
    for name, groups in (("TP", lay.tp_groups()), ("DP", lay.dp_groups()), ("PP", lay.pp_groups())):
        lines += _groups_text(name, groups, lay)
    _, total = count_params(cfg)
    mem = memory_per_device(cfg)
    lines.append(f"memory per device ({total / 1e6:,.1f}M params, {params_per_device(cfg) / 1e6:,.1f}M "
                 f"on the busiest rank, {cfg.parallel.precision}, distributed optimizer "
                 f"{'on' if cfg.parallel.distributed_optimizer else 'off'}):")
    if mem.trained_models > 1:
        lines.append(f"  {mem.trained_models} trained models (the policy and, as large, a critic): "
                     f"weights, grads and optimizer count each")
    if int(cfg.lora.rank) > 0 and mem.trainable_params:
        lines.append(f"  LoRA rank {cfg.lora.rank} on {cfg.lora.targets}: {mem.trainable_params / 1e6:,.2f}M "
                     f"trainable params on the busiest rank; grads and optimizer states count only these")
    lines.append(f"  weights {mem.weights / GB:8.2f} GB   grads {mem.grads / GB:8.2f} GB   "
                 f"optimizer {mem.optimizer / GB:8.2f} GB   logits {mem.logits / GB:6.2f} GB"
                 + (f"   frozen models {mem.frozen / GB:8.2f} GB" if mem.frozen else ""))
    for mode, size in mem.activations.items():
        mark = "  <- parallel.recompute" if mode == mem.recompute else ""
        lines.append(f"  activations, recompute={mode:<9} {size / GB:8.2f} GB{mark}")
    fits = "fits" if mem.total <= float(cfg.cluster.gpu_memory_gb) * GB else "DOES NOT FIT"
    lines.append(f"  total {mem.total / GB:.2f} GB of cluster.gpu_memory_gb="
                 f"{cfg.cluster.gpu_memory_gb} ({fits}; CUDA context and fragmentation not counted)")
    c = cost_estimate(cfg)
    lines.append(f"time: {c.tokens_per_step:,} tokens/step, {c.flops_per_step:.3g} FLOPs/step; at "
                 f"cluster.mfu={cfg.cluster.mfu} of cluster.peak_tflops={cfg.cluster.peak_tflops} "
                 f"per device: {c.step_s:.3g} s/step, {c.total_h:.3g} h for {cfg.train.steps} steps")
    lines.append(f"cost: {c.device_hours:,.2f} device-hours x {cfg.cluster.price_per_gpu_hour}/h "
                 f"(cluster.price_per_gpu_hour) = {c.price:,.2f}")
    return "\n".join(lines)

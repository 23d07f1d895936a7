"""Engine: one model with its DDP wrapper, optimizer, LR schedule and pipeline schedule.

Stages reach the engine only through a step function shaped like Megatron's
forward_step_func: `step_fn(batch, model) -> (output, loss_fn)`, where
`loss_fn(output) -> (loss_sum, num_tokens, metrics)` and every metric is a tensor
`[sum, count]`. The engine reduces metrics over microbatches and data-parallel ranks and
reports `sum / count` on every rank (the values live on the last pipeline stage).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

import torch
import torch.distributed as dist
from megatron.core import tensor_parallel
from megatron.core.distributed import DistributedDataParallel as DDP
from megatron.core.distributed import DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer.module import param_is_not_shared

from chatforge_config.parallel import LoRAConfig, ModelConfig, OptimConfig, ParallelConfig
from parallel.groups import Topology
from parallel.guard import NonFinite, check_world, local_grads_bad, local_loss_bad, poison
from parallel.lora import freeze_base, lora_active
from parallel.model import build_model

LossFn = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]]
StepFn = Callable[[dict[str, torch.Tensor], torch.nn.Module], tuple[torch.Tensor, LossFn]]


@dataclass
class StepResult:
    metrics: dict[str, float]
    grad_norm: float = float("nan")
    lr: float = float("nan")
    skipped: bool = False
    num_tokens: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def loss(self) -> float:
        return self.metrics.get("loss", float("nan"))


class Engine:
    """A model (this rank's pipeline stage) that can train or only run forward.

    A frozen engine (`optim=None`) has no optimizer or DDP buffers: reference and reward
    models in DPO/PPO cost forward memory only. With `lora` (rank > 0) only the adapters
    (and a scalar head) train: the base gets no grad buffer and no optimizer state."""

    def __init__(self, model_cfg: ModelConfig, parallel_cfg: ParallelConfig, topo: Topology,
                 vocab_size: int, seed: int, optim: Optional[OptimConfig] = None,
                 total_steps: int = 1, lora: Optional[LoRAConfig] = None) -> None:
        self.model_cfg, self.parallel_cfg, self.topo = model_cfg, parallel_cfg, topo
        self.vocab_size = vocab_size  # the tokenizer's; the model's rows are padded beyond it
        self.lora = lora if lora_active(lora) else None
        if self.lora is not None and optim is None:
            raise ValueError("lora.rank > 0 on a frozen engine: adapters are for training (give optim)")
        # Where a LoRA engine's frozen base came from: set by the checkpoint loader and
        # written into the run's checkpoints, which hold only what trains (trainer/checkpointing.py).
        self.lora_base: Optional[dict[str, Any]] = None
        module = build_model(model_cfg, parallel_cfg, topo, vocab_size, seed, lora=self.lora)
        if self.lora is not None:
            freeze_base(module, train_head=model_cfg.head == "scalar")
        # The bare GPTModel: checkpoints use its keys (the DDP wrapper adds "module.").
        self.module = module
        self.config = module.config
        self.trainable = optim is not None
        self.optimizer: Any = None
        self.scheduler: Optional[OptimizerParamScheduler] = None
        if self.trainable:
            assert optim is not None
            module = self._wrap_ddp(module)
            self.optimizer = get_megatron_optimizer(self._optimizer_config(optim), [module])
            self.scheduler = _scheduler(self.optimizer, optim, total_steps)
            self._hook_schedule(module)
        else:
            for param in module.parameters():
                param.requires_grad_(False)
        self.model: list[torch.nn.Module] = [module]
        self._forward_backward = get_forward_backward_func()
        # The non-finite guard's record (parallel/guard.py): updates skipped so far, and what
        # the last one saw. The loop reads them; every rank holds the same values.
        self.skipped_updates = 0
        self.last_nonfinite: Optional[NonFinite] = None
        # Fault injection (train.fault.*, set by the loop): while true, this rank's gradients
        # are replaced by NaN after the backward pass of every train_step.
        self.fault_nan_grad = False

    # -- construction -------------------------------------------------------------------
    def _wrap_ddp(self, module: torch.nn.Module) -> DDP:
        bucket = getattr(self.parallel_cfg, "ddp_bucket_size", None)  # configs from before the key lack it
        if bucket is not None and int(bucket) < 1:
            raise ValueError(f"parallel.ddp_bucket_size={bucket}: must be >= 1 (parameters) or null")
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            bucket_size=None if bucket is None else int(bucket),
            overlap_grad_reduce=self.parallel_cfg.overlap_grad_reduce,
            overlap_param_gather=self.parallel_cfg.overlap_param_gather,
            use_distributed_optimizer=self.parallel_cfg.distributed_optimizer,
            # Summed, then divided by the global token count in finalize_model_grads.
            average_in_collective=False,
        )
        return DDP(config=self.config, ddp_config=ddp_config, module=module)

    def _optimizer_config(self, optim: OptimConfig) -> OptimizerConfig:
        bf16 = self.parallel_cfg.precision == "bf16"
        return OptimizerConfig(
            optimizer="adam",
            lr=optim.lr,
            min_lr=optim.min_lr,
            weight_decay=optim.weight_decay,
            adam_beta1=optim.beta1,
            adam_beta2=optim.beta2,
            adam_eps=optim.eps,
            decoupled_weight_decay=optim.name == "adamw",
            clip_grad=optim.clip_grad,
            bf16=bf16,
            params_dtype=torch.bfloat16 if bf16 else torch.float32,
            use_distributed_optimizer=self.parallel_cfg.distributed_optimizer,
            overlap_param_gather=self.parallel_cfg.overlap_param_gather,
        )

    def _hook_schedule(self, module: DDP) -> None:
        """What Megatron-LM's training loop wires into the config for the schedule."""
        self.config.finalize_model_grads_func = finalize_model_grads
        self.config.grad_scale_func = self.optimizer.scale_loss
        self.config.no_sync_func = module.no_sync
        if self.parallel_cfg.overlap_grad_reduce:
            self.config.grad_sync_func = module.start_grad_sync
        if self.parallel_cfg.overlap_param_gather and self.parallel_cfg.distributed_optimizer:
            self.config.param_sync_func = module.start_param_sync

    # -- running ------------------------------------------------------------------------
    def _run(self, microbatches: list[dict[str, torch.Tensor]], step_fn: StepFn,
             forward_only: bool, seq_length: Optional[int]) -> list[dict[str, torch.Tensor]]:
        def forward_step(data_iterator: Iterable, model: torch.nn.Module) -> Any:
            return step_fn(next(data_iterator), model)

        # The pipeline's p2p buffers are [seq_length, micro_batch, hidden].
        first = next(iter(microbatches[0].values()))
        return self._forward_backward(
            forward_step_func=forward_step,
            data_iterator=iter(microbatches),
            model=self.model,
            num_microbatches=len(microbatches),
            seq_length=seq_length or self.model_cfg.seq_length,
            micro_batch_size=first.shape[0],
            forward_only=forward_only,
        )

    def train_step(self, microbatches: list[dict[str, torch.Tensor]], step_fn: StepFn,
                   seq_length: Optional[int] = None) -> StepResult:
        """One optimizer step over this rank's microbatches of a global batch.
        `seq_length`: the model's input length (default model.seq_length)."""
        if not self.trainable:
            raise RuntimeError("train_step on a frozen engine (built without optim)")
        for chunk in self.model:
            chunk.train()
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        stored = self._run(microbatches, step_fn, forward_only=False, seq_length=seq_length)
        lr = float(self.optimizer.param_groups[0]["lr"])  # the rate this step applies
        if self.fault_nan_grad:
            poison(self._grad_buffers())
        # Before the optimizer touches anything: a skipped update changes no parameter, no
        # optimizer moment, no step count and no LR schedule, on any rank.
        nonfinite = check_world(local_loss_bad(stored), local_grads_bad(self._grad_buffers()))
        if nonfinite is not None:
            self.skipped_updates += 1
            self.last_nonfinite = nonfinite
            return StepResult(metrics=self.reduce_metrics(stored), lr=lr, skipped=True)
        ok, grad_norm, _ = self.optimizer.step()
        if ok:
            self.scheduler.step(increment=1)
        metrics = self.reduce_metrics(stored)
        return StepResult(
            metrics=metrics,
            grad_norm=float(grad_norm) if grad_norm is not None else float("nan"),
            lr=lr,
            skipped=not ok,
        )

    def _grad_buffers(self) -> list[torch.Tensor]:
        """This rank's gradients: the DDP wrapper's contiguous grad buffers (reduced over DP
        by the schedule's finalize_model_grads), one tensor per dtype."""
        ddp = self.model[0]
        return [buffer.grad_data for buffer in ddp.buffers + ddp.expert_parallel_buffers]

    @torch.no_grad()
    def eval_step(self, microbatches: list[dict[str, torch.Tensor]], step_fn: StepFn,
                  seq_length: Optional[int] = None) -> dict[str, float]:
        for chunk in self.model:
            chunk.eval()
        stored = self._run(microbatches, step_fn, forward_only=True, seq_length=seq_length)
        return self.reduce_metrics(stored)

    @torch.no_grad()
    def forward_outputs(self, microbatches: list[dict[str, torch.Tensor]], step_fn: StepFn,
                        seq_length: Optional[int] = None) -> list[dict[str, torch.Tensor]]:
        """Forward only, for per-sample results (reference log-probs, rewards): here the
        third element of `loss_fn`'s return holds tensors of any shape, not [sum, count]
        pairs. Returns them per microbatch, on the host, on every rank of the pipeline."""
        for chunk in self.model:
            chunk.eval()
        stored = self._run(microbatches, step_fn, forward_only=True, seq_length=seq_length)
        outputs: list[dict[str, torch.Tensor]] = []
        if self.topo.is_last_stage:
            outputs = [{k: v.detach().to("cpu") for k, v in item.items()} for item in stored]
        if self.topo.pp > 1:
            box = [outputs]
            dist.broadcast_object_list(box, src=self.topo.last_stage_global_rank, group=self.topo.pp_group)
            outputs = box[0]
        return outputs

    def reduce_metrics(self, stored: list[dict[str, torch.Tensor]]) -> dict[str, float]:
        """Sum [sum, count] pairs over microbatches and DP ranks of the last stage, then
        share the result with every pipeline stage (so rank 0 can log it)."""
        names = sorted(stored[0]) if stored else []
        result: dict[str, float] = {}
        if self.topo.is_last_stage:
            totals = torch.zeros(len(names), 2, dtype=torch.float64)
            for item in stored:
                for i, name in enumerate(names):
                    totals[i] += item[name].detach().to("cpu", torch.float64).view(2)
            totals = all_reduce_host(totals, self.topo.dp_group)
            result = {n: float(totals[i, 0] / max(totals[i, 1], 1e-12)) for i, n in enumerate(names)}
        if self.topo.pp > 1:
            box = [result]
            dist.broadcast_object_list(box, src=self.topo.last_stage_global_rank, group=self.topo.pp_group)
            result = box[0]
        return result

    def parameter_count(self, trainable_only: bool = False) -> int:
        """Parameters of the whole model (all TP/PP shards), counted once; collective.
        `trainable_only`: those the optimizer updates (with LoRA: adapters, scalar head)."""
        local = sum(p.numel() for p in self.model[0].parameters()
                    if param_is_not_shared(p) and tensor_parallel.param_is_not_tensor_parallel_duplicate(p)
                    and (p.requires_grad or not trainable_only))
        total = torch.tensor([local], dtype=torch.float64)
        if dist.get_world_size() > 1:
            total = all_reduce_host(total, None) / self.topo.dp
        return int(total.item())


def all_reduce_host(tensor: torch.Tensor, group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    """All-reduce (sum) a small host tensor over `group` (None: the world); NCCL needs it on
    the GPU. Returns the reduced tensor on the host."""
    if dist.get_world_size(group) == 1:
        return tensor
    if torch.cuda.is_available():
        on_device = tensor.cuda()
        dist.all_reduce(on_device, group=group)
        return on_device.cpu()
    dist.all_reduce(tensor, group=group)
    return tensor


def _scheduler(optimizer: Any, optim: OptimConfig, total_steps: int) -> OptimizerParamScheduler:
    decay_steps = optim.decay_steps or total_steps
    warmup = min(optim.warmup_steps, max(decay_steps - 1, 0))
    style = {"cosine": "cosine", "linear": "linear", "constant": "constant"}[optim.decay]
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if warmup > 0 else optim.lr,
        max_lr=optim.lr,
        min_lr=optim.min_lr if optim.decay != "constant" else optim.lr,
        lr_warmup_steps=warmup,
        lr_decay_steps=max(decay_steps, warmup + 1),
        lr_decay_style=style,
        start_wd=optim.weight_decay,
        end_wd=optim.weight_decay,
        wd_incr_steps=max(decay_steps, 1),
        wd_incr_style="constant",
    )

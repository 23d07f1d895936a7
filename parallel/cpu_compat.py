"""Make megatron-core 0.16.1 run on CPU with gloo. Active only when CUDA is absent.

Megatron assumes a CUDA device in many places that our CPU code paths reach. Rather than
patch torch globally, each megatron module listed in `_PROXIED_MODULES` sees a proxy in
place of its module-level `torch` name: the proxy maps `device="cuda"` (or a CUDA index)
to the CPU in tensor factories, and its `torch.cuda` answers `current_device()` with the
CPU device and makes `synchronize()` a no-op. Everything else is the real torch.

The call sites each entry serves (megatron-core 0.16.1):
- pipeline_parallel.schedules: `torch.zeros([], device="cuda")` for the token count in
  every forward_backward_* function.
- pipeline_parallel.p2p_communication: `torch.empty(..., device=torch.cuda.current_device())`
  for the receive buffers between pipeline stages.
- optimizer.optimizer: `found_inf`, `_scale_one`, `_dummy_overflow_buf` tensors on "cuda"
  in the optimizer constructors; the fp32-parameter check `param.type() ==
  'torch.cuda.FloatTensor'` (see `_cuda_type_names`).
- optimizer.clip_grads: the total-norm tensor on "cuda" and the fp32 grad type assert.
- optimizer.distrib_optimizer: the fp32 shard check on `model_param.type()`.
- distributed.param_and_grad_buffer / distributed_data_parallel: buffer allocation on
  `torch.cuda.current_device()`.
- models.common.embeddings.rotary_pos_embedding: `inv_freq` built on the current device.
- transformer.transformer_block / attention / utils: attention helpers that allocate on
  the current CUDA device.
- tensor_parallel.random: the model-parallel RNG tracker keeps "CUDA" generator states;
  on CPU it tracks CPU generator states instead (`_get/_set_cuda_rng_state`, `add`).
- dist_checkpointing.strategies.*: `torch.cuda.synchronize()` in the save path; the
  save-failure flag all-reduced on `torch.cuda.current_device()` (state_dict_saver).
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import types
from typing import Any, Callable, Iterator

import torch

_PROXIED_MODULES = (
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.pipeline_parallel.p2p_communication",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.distrib_optimizer",
    "megatron.core.optimizer.grad_scaler",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.distributed.distributed_data_parallel",
    "megatron.core.distributed.finalize_model_grads",
    "megatron.core.models.common.embeddings.rotary_pos_embedding",
    "megatron.core.models.common.embeddings.language_model_embedding",
    "megatron.core.models.gpt.gpt_model",
    "megatron.core.transformer.transformer_block",
    "megatron.core.transformer.attention",
    "megatron.core.transformer.dot_product_attention",
    "megatron.core.transformer.utils",
    "megatron.core.tensor_parallel.layers",
    "megatron.core.tensor_parallel.mappings",
    "megatron.core.tensor_parallel.cross_entropy",
    "megatron.core.tensor_parallel.random",
    "megatron.core.utils",
    "megatron.core.dist_checkpointing.strategies.filesystem_async",
    "megatron.core.dist_checkpointing.strategies.async_utils",
    "megatron.core.dist_checkpointing.strategies.fully_parallel",
    "megatron.core.dist_checkpointing.strategies.torch",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
    "megatron.core.dist_checkpointing.exchange_utils",
    "megatron.core.dist_checkpointing.tensor_aware_state_dict",
)

# Functions whose fp32 check is `tensor.type() == 'torch.cuda.FloatTensor'`; they run with
# `_cuda_type_names` active so a CPU float tensor passes the check. The optimizer module
# imported the function by name, so its reference is the one that matters.
_TYPE_CHECKED_FUNCTIONS = (
    ("megatron.core.optimizer.clip_grads", "clip_grad_by_total_norm_fp32"),
    ("megatron.core.optimizer.optimizer", "clip_grad_by_total_norm_fp32"),
)
_TYPE_CHECKED_METHODS = (
    ("megatron.core.optimizer.optimizer", "Float16OptimizerWithFloat16Params", "__init__"),
    ("megatron.core.optimizer.distrib_optimizer", "DistributedOptimizer",
     "_build_model_and_main_param_groups"),
    # Saving the distributed optimizer's state gathers DP shards with `send_tensor.cuda()`
    # unless gloo process groups are used for it.
    ("megatron.core.optimizer.distrib_optimizer", "DistributedOptimizer",
     "get_parameter_state_dp_zero"),
    # Tied embeddings at PP>1: `weight.data = weight.data.cuda()` before the all-reduce that
    # copies the first stage's embedding into the last stage's output layer.
    ("megatron.core.models.common.language_module.language_module", "LanguageModule",
     "setup_embeddings_and_output_layer"),
)

_APPLIED = False


def needs_cpu_compat() -> bool:
    """The one decision: patch only when no CUDA device is usable."""
    return not torch.cuda.is_available()


def _to_cpu_device(device: Any) -> Any:
    if isinstance(device, int):
        return torch.device("cpu")
    if isinstance(device, str) and device.startswith("cuda"):
        return torch.device("cpu")
    if isinstance(device, torch.device) and device.type == "cuda":
        return torch.device("cpu")
    return device


def _cpu_factory(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        if "device" in kwargs:
            kwargs["device"] = _to_cpu_device(kwargs["device"])
        return fn(*args, **kwargs)

    return wrapped


class _CudaShim(types.ModuleType):
    """`torch.cuda` as seen by a proxied megatron module on a CPU-only machine."""

    def __init__(self) -> None:
        super().__init__("torch.cuda")

    def __getattr__(self, name: str) -> Any:
        return getattr(torch.cuda, name)

    @staticmethod
    def current_device() -> torch.device:
        return torch.device("cpu")

    @staticmethod
    def synchronize(*_: Any, **__: Any) -> None:
        return None

    @staticmethod
    def get_rng_state(*_: Any, **__: Any) -> torch.Tensor:
        return torch.get_rng_state()

    @staticmethod
    def set_rng_state(state: torch.Tensor, *_: Any, **__: Any) -> None:
        torch.set_rng_state(state)

    @staticmethod
    def manual_seed(seed: int) -> None:
        torch.manual_seed(seed)


_FACTORIES = ("zeros", "ones", "empty", "full", "tensor", "arange", "randn", "rand",
              "zeros_like", "ones_like", "empty_like", "as_tensor")


class _TorchProxy(types.ModuleType):
    """The real torch, except that CUDA devices in tensor factories mean the CPU."""

    def __init__(self) -> None:
        super().__init__("torch")
        self.cuda = _CudaShim()
        for name in _FACTORIES:
            setattr(self, name, _cpu_factory(getattr(torch, name)))

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


@contextlib.contextmanager
def _cuda_type_names() -> Iterator[None]:
    """While active, `Tensor.type()` (no argument) names CPU tensors like CUDA ones, which
    is what megatron's fp32 checks compare against, and `Tensor.cuda()` leaves a CPU tensor
    where it is. Scoped to the few megatron functions listed above."""
    original = torch.Tensor.type
    original_cuda = torch.Tensor.cuda

    def stay_on_cpu(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self

    def cuda_named_type(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        name = original(self, *args, **kwargs)
        if not args and not kwargs and isinstance(name, str) and self.device.type == "cpu":
            return name.replace("torch.", "torch.cuda.", 1)
        return name

    torch.Tensor.type = cuda_named_type  # type: ignore[method-assign]
    torch.Tensor.cuda = stay_on_cpu  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.Tensor.type = original  # type: ignore[method-assign]
        torch.Tensor.cuda = original_cuda  # type: ignore[method-assign]


def _with_cuda_type_names(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        with _cuda_type_names():
            return fn(*args, **kwargs)

    wrapped.__chatforge_cpu_compat__ = True  # type: ignore[attr-defined]
    return wrapped


def _patch_rng_tracker() -> None:
    """tensor_parallel.random keeps per-name "CUDA" RNG states and swaps them in `fork()`;
    on CPU the device generator *is* the CPU generator, so track CPU states."""
    random = importlib.import_module("megatron.core.tensor_parallel.random")

    def get_state(*_: Any, clone: bool = False, **__: Any) -> torch.Tensor:
        return torch.get_rng_state()

    def set_state(new_state: torch.Tensor, *_: Any, **__: Any) -> None:
        torch.set_rng_state(new_state)

    random._get_cuda_rng_state = get_state
    random._set_cuda_rng_state = set_state


def apply() -> bool:
    """Install the patches if CUDA is absent. Idempotent. Returns whether they are active."""
    global _APPLIED
    if not needs_cpu_compat():
        return False
    if _APPLIED:
        return True
    proxy = _TorchProxy()
    for name in _PROXIED_MODULES:
        module = importlib.import_module(name)
        if getattr(module, "torch", None) is torch:
            module.torch = proxy
    for module_name, fn_name in _TYPE_CHECKED_FUNCTIONS:
        module = importlib.import_module(module_name)
        setattr(module, fn_name, _with_cuda_type_names(getattr(module, fn_name)))
    for module_name, cls_name, meth_name in _TYPE_CHECKED_METHODS:
        cls = getattr(importlib.import_module(module_name), cls_name)
        raw = cls.__dict__[meth_name]
        if isinstance(raw, (staticmethod, classmethod)):
            setattr(cls, meth_name, type(raw)(_with_cuda_type_names(raw.__func__)))
        else:
            setattr(cls, meth_name, _with_cuda_type_names(raw))
    _patch_rng_tracker()
    _APPLIED = True
    return True


def is_applied() -> bool:
    return _APPLIED

"""Sharded save/load of engines (model + optimizer) with megatron's dist_checkpointing.

The torch_dist backend stores every tensor by its global key with its global shape, so a
checkpoint saved at one TP/PP/DP layout loads at another. The distributed optimizer is
saved in its `fully_reshardable` form (canonical per-parameter state) for the same reason.

The commit protocol (temporary directory, manifest, rename, `latest`) lives in
trainer/checkpointing.py; this module moves tensors, and holds the other megatron pieces
that protocol uses (the model-parallel RNG tracker's states, the async writer's queue and
helper process), so that parallel/ stays the only importer of megatron.
"""
from __future__ import annotations

import functools
import gc
import inspect
import multiprocessing
import os
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.managers import SyncManager
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from megatron.core import dist_checkpointing, tensor_parallel
from megatron.core.dist_checkpointing.strategies import filesystem_async
from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue, AsyncRequest
from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy
from megatron.core.dist_checkpointing.utils import add_prefix_for_sharding
from megatron.core.optimizer import distrib_optimizer

from chatforge_config.parallel import LoRAConfig
from parallel.engine import Engine
from parallel.lora import is_adapter_key, merge_adapters, swapped_adapters
from parallel.shard_hash import HashingWriter, write_sidecar

# Reshardable across TP, PP and DP (see module docstring).
_OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}


def _install_no_apex_step_fix() -> None:
    """Without apex/Transformer Engine the inner optimizer is torch's Adam(W), whose state
    holds a per-parameter `step` next to exp_avg/exp_avg_sq. Megatron 0.16.1 saves `step` in
    the param groups, and `_set_main_param_and_optimizer_states` then demands a loaded tensor
    for every state key, `step` included (KeyError: 'step'). Load the tensors that exist and
    keep the `step` that `load_state_dict` already restored from the param groups."""
    cls = distrib_optimizer.DistributedOptimizer
    original = cls._set_main_param_and_optimizer_states
    if getattr(original, "__chatforge_fix__", False):
        return

    @functools.wraps(original)
    def set_states(self: Any, model_param: torch.nn.Parameter, tensors: dict[str, torch.Tensor]) -> None:
        group_index, group_order = self.model_param_group_index_map[model_param]
        main_param = self.optimizer.param_groups[group_index]["params"][group_order]
        state = self.optimizer.state[main_param]
        kept = {key: state.pop(key) for key in list(state) if key not in tensors and key == "step"}
        try:
            original(self, model_param, tensors)
        finally:
            state.update(kept)

    set_states.__chatforge_fix__ = True  # type: ignore[attr-defined]
    cls._set_main_param_and_optimizer_states = set_states


if not distrib_optimizer.HAVE_APEX_OR_TE:
    _install_no_apex_step_fix()


def ensure_optimizer_state(engine: Engine) -> None:
    """Give every parameter its Adam state (zeros, step 0) before a load or a save at step 0.
    Megatron's `state_dict()` reads `step` from that state; a fresh torch optimizer has none
    (this is the `assert len(steps) == 1` failure without apex)."""
    inner = engine.optimizer.optimizer
    for group in inner.param_groups:
        for param in group["params"]:
            state = inner.state[param]
            if len(state) == 0:
                state["exp_avg"] = torch.zeros_like(param.data)
                state["exp_avg_sq"] = torch.zeros_like(param.data)
                state["step"] = torch.tensor(0.0)


def _unshare_steps(engine: Engine) -> None:
    """Megatron's DistributedOptimizer.load_state_dict gives every parameter the *same*
    `step` tensor; torch's Adam increments each parameter's step in place, so a shared
    tensor advances once per parameter per step and the bias correction goes wrong after
    a resume. Give each parameter its own copy."""
    inner = engine.optimizer.optimizer
    for state in inner.state.values():
        if isinstance(state.get("step"), torch.Tensor):
            state["step"] = state["step"].clone()


def model_part(engine: Engine, with_optimizer: bool) -> str:
    """Which model tensors a save or load moves: a LoRA engine saves and resumes only what
    trains (its adapters and a scalar head: "trained"); from a full checkpoint it loads all but
    its adapters ("base"), which keep their init."""
    if engine.lora is None:
        return "all"
    return "trained" if with_optimizer else "base"


def model_state(engine: Engine, part: str) -> dict[str, Any]:
    """The engine's sharded model state: "all", "trained" or "base" (see model_part)."""
    state = engine.module.sharded_state_dict()
    if part == "trained":
        names = {name for name, param in engine.module.named_parameters() if param.requires_grad}
        return {key: value for key, value in state.items() if key in names}
    if part == "base":
        return {key: value for key, value in state.items() if not is_adapter_key(key)}
    return state


def sharded_state(engine: Engine, name: str, with_optimizer: bool, is_loading: bool,
                  part: str = "all") -> dict[str, Any]:
    """The engine's sharded state with every checkpoint key prefixed by `name.`, so several
    engines (actor, critic, ...) share one checkpoint without key collisions."""
    model_sd = model_state(engine, part)
    state: dict[str, Any] = {"model": model_sd}
    if with_optimizer and engine.trainable:
        ensure_optimizer_state(engine)
        state["optimizer"] = engine.optimizer.sharded_state_dict(
            model_sd, is_loading=is_loading, metadata=_OPTIMIZER_METADATA)
    add_prefix_for_sharding(state, f"{name}.")
    return state


class SaveStructure:
    """What the repeated saves of one set of engines reuse, as Megatron-LM does with
    --ckpt-assume-constant-structure: one torch_dist strategy whose save plans and global
    metadata are cached (megatron re-checks that each new local plan matches before reusing
    them), and the cross-rank sharding-integrity check on the first save only. Together about
    a third of what an async save blocks training for at 200 MB (tools/bench/checkpoint_io.py).
    Valid while the engines' tensors keep their keys and shapes: a run's engines do."""

    def __init__(self) -> None:
        self.strategy = TorchDistSaveShardedStrategy("torch_dist", 1, cached_metadata=True)
        self.validated = False


def save_engines(engines: dict[str, Engine], directory: Path, async_save: bool = False,
                 structure: Optional[SaveStructure] = None) -> Optional[AsyncRequest]:
    """Write all engines' shards (model and optimizer) into `directory` in one collective
    save; every rank calls it. With `async_save` the tensor writes happen in the background:
    the returned request must be scheduled, and the files are complete only after it ran.
    `structure`: pass the same one to every save of these engines (see SaveStructure)."""
    state = {name: sharded_state(engine, name, with_optimizer=True, is_loading=False,
                                 part=model_part(engine, with_optimizer=True))
             for name, engine in engines.items()}
    structure = structure or SaveStructure()
    # Always megatron's async form: a synchronous save then runs the same request here and
    # now. Either way the shards go through _write_buckets (one pass, hashed while written).
    request = _with_hashed_writes(dist_checkpointing.save(
        state, str(directory), sharded_strategy=structure.strategy,
        validate_access_integrity=not structure.validated, async_sharded_save=True))
    structure.validated = True
    if async_save:
        return request
    request.execute_sync()
    return None


def _with_hashed_writes(request: AsyncRequest) -> AsyncRequest:
    """The request with megatron's shard writer (`write_preloaded_data_multiproc`: it forks
    one process per shard file, also for a synchronous save, about half of a 200 MB save on
    CPU) replaced by `_write_buckets`, which takes the same arguments. A request megatron
    built some other way (multi-storage client, nothing to write) is left as it is."""
    fn = request.async_fn
    writer = filesystem_async.FileSystemWriterAsync.write_preloaded_data_multiproc
    if not isinstance(fn, functools.partial) or fn.func is not writer or len(fn.args) != 2 or fn.args[1]:
        return request
    return request._replace(async_fn=functools.partial(_write_buckets, fn.args[0]))


def _write_buckets(transform_list: list[Any], rank: int, write_buckets: list[Any], results_queue: Any) -> None:
    """Write each bucket (one shard file) in a thread of this process, and put what
    megatron's writer puts on `results_queue`: {bucket index: [WriteResult]} or the
    exception. Runs in the training process for a synchronous save, in megatron's forked
    async caller for an async one."""
    from torch.utils.serialization import config as serialization_config

    results: Any
    collecting = gc.isenabled()
    gc.disable()  # as megatron's writer: a forked child must not collect its parent's CUDA tensors
    # torch.save's zip writer computes a CRC32 of every record: another pass over the bytes
    # (about half of torch.save's time at 100 MB), which our digest of the whole file makes
    # redundant; torch.load does not need it.
    computing_zip_crc = serialization_config.save.compute_crc32
    serialization_config.save.compute_crc32 = False
    try:
        with ThreadPoolExecutor(max_workers=max(1, len(write_buckets))) as pool:
            futures = [pool.submit(_write_bucket, transform_list, bucket) for bucket in write_buckets]
            results = {index: future.result() for index, future in enumerate(futures)}
    except Exception as exc:  # noqa: BLE001 - handed to megatron's finalize, which raises it
        results = exc
    finally:
        serialization_config.save.compute_crc32 = computing_zip_crc
        if collecting:
            gc.enable()
    results_queue.put(results)


def _write_bucket(transform_list: list[Any], bucket: Any) -> list[Any]:
    """One shard file as megatron's `write_preloaded_data` writes it (torch's `_write_item`
    per item, then fsync), through a HashingWriter; its size and digest go to a sidecar."""
    from torch.distributed.checkpoint.filesystem import _write_item

    file_name, storage_key, (bytes_data, tensor_data) = bucket
    extra: dict[str, Any] = {}
    if "serialization_format" in inspect.signature(_write_item).parameters:
        from torch.distributed.checkpoint.filesystem import SerializationFormat

        extra["serialization_format"] = SerializationFormat.TORCH_SAVE
    with open(file_name, "wb") as raw:
        stream = HashingWriter(raw)
        found = [_write_item(*transform_list, stream, data, item, storage_key, **extra)
                 for item, data in [*bytes_data, *tensor_data]]
        raw.flush()
        os.fsync(raw.fileno())
    write_sidecar(Path(file_name), stream.entry)
    return found


def _drop_keys(state: dict[str, Any], prefixes: tuple[str, ...]) -> list[str]:
    """Remove model entries whose key starts with one of `prefixes`; return their names."""
    dropped = [key for key in state if key.startswith(prefixes)]
    for key in dropped:
        del state[key]
    return dropped


def load_engines(engines: dict[str, Engine], directory: Path, with_optimizer: bool,
                 sources: Optional[dict[str, str]] = None, keep_init: tuple[str, ...] = ()) -> None:
    """Load engines from `directory` at whatever layout this run has. `sources` maps an
    engine to the name it was saved under (e.g. a PPO actor from an SFT "model").
    `keep_init`: model key prefixes (e.g. "output_layer.") not loaded, keeping their
    initial values (a scalar head on an LM checkpoint); weights-only loads only. A LoRA
    engine moves only part of its model (model_part); what it leaves out keeps its values."""
    if keep_init and with_optimizer:
        raise ValueError("keep_init needs a weights-only load (the optimizer state would not match)")
    sources = sources or {}
    state = {}
    left: dict[str, set[str]] = {}
    for name, engine in engines.items():
        source = sources.get(name, name)
        part = model_part(engine, with_optimizer)
        if keep_init:
            model_sd = model_state(engine, part)
            skipped = _drop_keys(model_sd, keep_init)
            state[name] = {"model": model_sd}
            add_prefix_for_sharding(state[name], f"{source}.")
        else:
            skipped = []
            state[name] = sharded_state(engine, source, with_optimizer, is_loading=True, part=part)
        if skipped or part != "all":
            left[name] = set(engine.module.state_dict()) - set(state[name]["model"]) | set(skipped)
    loaded = dist_checkpointing.load(state, str(directory))
    for name, engine in engines.items():
        result = engine.module.load_state_dict(loaded[name]["model"], strict=name not in left)
        if name in left:
            unexpected = [k for k in result.missing_keys if k not in left[name]]
            if unexpected or result.unexpected_keys:
                raise RuntimeError(f"load of {name!r}: missing {unexpected}, unexpected {result.unexpected_keys}")
        # `loaded` also holds the checkpoint's common (non-tensor) state, so an "optimizer"
        # entry can be there even when only the weights were asked for.
        if with_optimizer and engine.trainable:
            engine.optimizer.load_state_dict(loaded[name]["optimizer"])
            _unshare_steps(engine)
        elif engine.trainable and hasattr(engine.optimizer, "reload_model_params"):
            # Mixed-precision optimizers keep fp32 copies of the weights: refresh them.
            engine.optimizer.reload_model_params()


def merge_saved_adapters(engine: Engine, directory: Path, source: str, lora: LoRAConfig,
                         keep_init: tuple[str, ...] = ()) -> int:
    """Fold the adapters that a LoRA checkpoint in `directory` saved for engine `source`
    into `engine`'s weights, and load the other tensors it trained (a scalar head) as they
    are; `engine`'s own adapters, if any, are set aside meanwhile and keep their values.
    Keys under `keep_init` stay as they are. Collective. Returns the layers merged."""
    saved = set(dist_checkpointing.load_tensors_metadata(str(directory)))
    module = engine.module
    with swapped_adapters(module, lora):
        wanted = {key: value for key, value in module.sharded_state_dict().items()
                  if f"{source}.{value.key}" in saved and not key.startswith(keep_init)}
        # Nested as a save nests it: the checkpoint's common state merges in beside "model".
        state = {source: {"model": wanted}}
        add_prefix_for_sharding(state[source], f"{source}.")
        loaded = dist_checkpointing.load(state, str(directory))
        result = module.load_state_dict(loaded[source]["model"], strict=False)
        if result.unexpected_keys:
            raise RuntimeError(f"adapters of {source!r}: unexpected {result.unexpected_keys}")
        merged = merge_adapters(module)
    if engine.trainable and engine.lora is None and hasattr(engine.optimizer, "reload_model_params"):
        engine.optimizer.reload_model_params()  # mixed precision: refresh the fp32 copies
    return merged


# -- what the trainer's checkpoints need from megatron besides the shards ------------------
def rng_tracker_states() -> dict[str, Any]:
    """The model-parallel RNG tracker's named generator states (dropout inside TP regions),
    saved with each rank's other RNG states so that a resume draws the same numbers."""
    return tensor_parallel.get_cuda_rng_tracker().get_states()


def set_rng_tracker_states(states: dict[str, Any]) -> None:
    tensor_parallel.get_cuda_rng_tracker().set_states(states)


def async_calls_queue() -> AsyncCallsQueue:
    """The queue that runs async saves' requests (save_engines(async_save=True)) and their
    finalize functions (the trainer's commit)."""
    return AsyncCallsQueue()


def start_writer_service(initializer: Callable[[], None], method: str = "spawn",
                         replace: bool = False) -> Optional[SyncManager]:
    """Megatron's torch_dist writer collects results through a multiprocessing Manager that
    it starts (spawn) on the first save, about 2-5 s. Start it here instead, calling
    `initializer` in the helper process first (the trainer's makes it ignore stop signals);
    a no-op once started unless `replace` (a new helper whatever ran before: the kill test
    forks one per trial, `method="fork"`, torch being imported already). Returns the new
    helper's manager (None when nothing was started)."""
    if filesystem_async._results_queue is not None and not replace:
        return None
    manager = SyncManager(ctx=multiprocessing.get_context(method))
    manager.start(initializer=initializer)
    # The queue proxy keeps its manager alive; megatron only looks up the queue.
    filesystem_async._results_queue = manager.Queue()
    return manager

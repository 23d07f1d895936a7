"""Checkpoints that resume exactly and are never loaded half-written.

Layout: <run.dir>/checkpoints/step_NNNNNN/ holds
    shards/            every engine's model + optimizer shards (parallel.checkpoint)
    train_state.pt     step, stage state (data position), LR schedulers, layout
    rng/rank_NNNNN.pt  each rank's RNG states (python, numpy, torch, megatron tracker)
    config.yaml        the resolved config that wrote it
    lora.json          LoRA runs only: the checkpoint each engine's frozen base came from
                       (shards/ then hold only what trains; trainer/lora_checkpoint.py)
    tokenizer.model    the run's tokenizer (a checkpoint is usable on its own);
                       tokenizer.json for a Hugging Face tokenizer
    manifest.json      size and XXH3-64 digest of every file above, written last
and <run.dir>/checkpoints/latest names the newest complete one.

Commit protocol: everything is written into `.tmp_step_NNNNNN/`; each rank describes (size,
digest; shards hashed while written, parallel/shard_hash.py) the files it wrote; all ranks agree (a collective) that their part is done; rank 0
writes the manifest, renames the directory into place and then rewrites `latest`
atomically (temp file, fsync, rename, fsync of the directory). A directory without its
manifest, or any `.tmp_*` directory, is never loaded.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from parallel.dist import gather_lists, rank_and_world
from trainer.checkpoint_files import (MANIFEST, STEP_DIR, CheckpointError, atomic_write_text, describe,
                                     files_of_rank, fsync_dir, resolve_load_path, step_dir_name, verify)
from trainer.data.tokenizer import copy_tokenizer
from trainer.lora_checkpoint import LORA_FILE, load_checkpoint, lora_records_of
from trainer.runtime import RunContext


def _torch_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        torch.save(obj, handle)
        handle.flush()
        os.fsync(handle.fileno())


# numpy's Mersenne Twister state (a uint32 array, in each rank's RNG file) is the only thing
# besides tensors and python scalars our state files hold; torch's weights-only unpickler
# refuses every other global, so a checkpoint from elsewhere cannot run code when loaded.
_NUMPY_CORE = getattr(np, "_core", None) or np.core
SAFE_GLOBALS = [_NUMPY_CORE.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def load_state_file(path: Path) -> Any:
    """A train_state.pt or rng/rank_N.pt, loaded with weights_only=True."""
    import pickle

    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, weights_only=True)
    except pickle.UnpicklingError as err:
        lines = [line.strip() for line in str(err).splitlines() if "global" in line.lower()]
        why = (lines[-1] if lines else str(err).splitlines()[0]).removeprefix("WeightsUnpickler error: ")
        raise CheckpointError(f"{path}: refused by torch's weights-only loader, it holds more than "
                              f"tensors and numbers (a file from elsewhere?): {why}") from None


# -- RNG --------------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    from parallel.checkpoint import rng_tracker_states

    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state(), "tracker": rng_tracker_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    from parallel.checkpoint import set_rng_tracker_states

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    set_rng_tracker_states(state["tracker"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


@dataclass
class Resume:
    directory: Path
    step: int
    full_state: bool
    # From ckpt.load (another run, maybe another stage) rather than this run's own.
    foreign: bool = False


def _start_writer_service() -> None:
    """Start the checkpoint writer's helper process now, in the background, so that it
    overlaps model building instead of stalling the first save (parallel.checkpoint.
    start_writer_service); it ignores SIGTERM/SIGUSR1: SLURM sends those to every process of
    the job step, and a helper killed by them breaks the save they ask for."""
    from parallel.checkpoint import start_writer_service
    from trainer.signals import ignore_stop_signals

    start_writer_service(ignore_stop_signals)


# Retired checkpoint directories being deleted (Checkpointer._apply_retention).
TRASH_PREFIX = ".trash_"


class Checkpointer:
    """Saves and finds checkpoints of one run; every method is collective (all ranks)."""

    def __init__(self, ctx: RunContext) -> None:
        self.ctx = ctx
        self.cfg = ctx.cfg.ckpt
        self.root = ctx.run_dir / "checkpoints"
        self.last_saved_step: Optional[int] = None
        self._queue: Any = None
        self._warm = threading.Thread(target=_start_writer_service, daemon=True)
        self._warm.start()
        self._deleting: Optional[threading.Thread] = None
        self._structure: Any = None  # parallel.checkpoint.SaveStructure, made at the first save
        self._config_yaml: Optional[str] = None
        if ctx.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            # A save killed before its commit, or old checkpoints whose deletion was cut short.
            for stale in [*self.root.glob(".tmp_step_*"), *self.root.glob(TRASH_PREFIX + "*")]:
                shutil.rmtree(stale, ignore_errors=True)
        ctx.barrier()

    # -- discovery ------------------------------------------------------------------------
    def complete_steps(self) -> list[int]:
        steps = []
        for path in self.root.iterdir() if self.root.is_dir() else []:
            match = STEP_DIR.match(path.name)
            if match and (path / MANIFEST).is_file():
                steps.append(int(match.group(1)))
        return sorted(steps)

    def latest(self) -> Optional[Path]:
        """The directory `latest` names, or None for a fresh run. Garbage in `latest` is an
        error naming the file, never a silent restart from scratch."""
        pointer = self.root / "latest"
        if not pointer.exists():
            return None
        name = pointer.read_text().strip()
        if not STEP_DIR.match(name) or not (self.root / name).is_dir():
            raise CheckpointError(f"{pointer}: names {name!r}, which is not a checkpoint directory "
                                  f"in {self.root}")
        return self.root / name

    def choose(self, directory: Path) -> Path:
        """`directory` if it verifies; else (with ckpt.fallback) the newest older complete
        checkpoint that does; else an error naming the bad files."""
        problems = gather_lists(verify(directory, *rank_and_world()))
        if not problems:
            return directory
        if self.cfg.fallback:
            step = int(STEP_DIR.match(directory.name).group(1))  # type: ignore[union-attr]
            for older in reversed([s for s in self.complete_steps() if s < step]):
                candidate = self.root / step_dir_name(older)
                if not gather_lists(verify(candidate, *rank_and_world())):
                    if self.ctx.is_main:
                        print(f"[chatforge] checkpoint {directory} is damaged ({problems[0]}); "
                              f"falling back to {candidate} (ckpt.fallback=true)", flush=True)
                    return candidate
        raise CheckpointError("damaged checkpoint: " + "; ".join(problems[:5]) +
                              ("" if self.cfg.fallback else " (set ckpt.fallback=true to use the "
                               "previous complete checkpoint)"))

    # -- saving ---------------------------------------------------------------------------
    def save(self, step: int, engines: dict[str, Any], stage_state: dict[str, Any]) -> None:
        """Write and commit the checkpoint of `step` (async: commit when the writes end)."""
        from parallel.checkpoint import SaveStructure, save_engines

        if self._structure is None:
            self._structure = SaveStructure()
        self._warm.join()
        self.wait()
        if step == self.last_saved_step or (self.root / step_dir_name(step) / MANIFEST).exists():
            return
        tmp = self.root / f".tmp_{step_dir_name(step)}"
        if self.ctx.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            (tmp / "shards").mkdir(parents=True)
        self.ctx.barrier()
        request = save_engines(engines, tmp / "shards", async_save=bool(self.cfg.async_save),
                               structure=self._structure)
        self._write_states(tmp, step, engines, stage_state)
        commit: Callable[[], None] = lambda: self._commit(tmp, step)
        if request is None:
            commit()
            return
        from parallel.checkpoint import async_calls_queue

        request.add_finalize_fn(commit)
        if self._queue is None:
            self._queue = async_calls_queue()
        self._queue.schedule_async_request(request)
        self.last_saved_step = step

    def _write_states(self, tmp: Path, step: int, engines: dict[str, Any], stage_state: dict[str, Any]) -> None:
        topo = self.ctx.topo
        _torch_save(rng_state(), tmp / "rng" / f"rank_{dist.get_rank():05d}.pt")
        if self.ctx.is_main:
            train_state = {
                "step": step,
                "stage": stage_state,
                "schedulers": {name: e.scheduler.state_dict() for name, e in engines.items()
                               if e.scheduler is not None},
                "layout": {"world": topo.world_size, "tp": topo.tp, "pp": topo.pp, "dp": topo.dp},
            }
            _torch_save(train_state, tmp / "train_state.pt")
            if self._config_yaml is None:
                # Rendered once per run: a stage sets what it derives (e.g. tokenizer.path) at
                # its start, and the YAML dump was a fifth of what an async save blocks.
                self._config_yaml = OmegaConf.to_yaml(self.ctx.cfg, resolve=True)
            (tmp / "config.yaml").write_text(self._config_yaml)
            records = lora_records_of(engines)
            if records:  # LoRA engines saved only what trains: where their bases are
                (tmp / LORA_FILE).write_text(json.dumps(records, indent=1, sort_keys=True))
            tokenizer = getattr(self.ctx, "tokenizer_path", None)
            if tokenizer is not None and Path(tokenizer).is_file():
                copy_tokenizer(Path(tokenizer), tmp)  # with its chat template, if it has one

    def _commit(self, tmp: Path, step: int) -> None:
        rank, world = dist.get_rank(), dist.get_world_size()
        self.ctx.barrier()  # every rank's files exist before anyone lists them
        described = describe(tmp, files_of_rank(tmp, rank, world))
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, described)  # the agreement: all parts are done
        if self.ctx.is_main:
            files = {k: v for part in gathered for k, v in part.items()}
            manifest = {"step": step, "files": files}
            atomic_write_text(tmp / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True))
            final = self.root / step_dir_name(step)
            shutil.rmtree(final, ignore_errors=True)  # an uncommitted leftover of this step
            os.replace(tmp, final)
            fsync_dir(self.root)
            atomic_write_text(self.root / "latest", final.name + "\n")
            self._apply_retention(step)
        self.last_saved_step = step
        self.ctx.barrier()

    def _apply_retention(self, newest: int) -> None:
        """Retire the checkpoints that ckpt.keep / ckpt.keep_every do not keep: each is renamed
        out of the step_* namespace at once (an atomic rename: from then on no resume can pick
        it) and deleted in a background thread, so that freeing the disk (about a quarter of a
        200 MB save) does not hold up training. A deletion cut short leaves a .trash_* that the
        next start removes."""
        self._join_deleting()
        steps = self.complete_steps()
        keep = retained(steps, newest, int(self.cfg.keep), int(self.cfg.keep_every))
        retired = []
        for step in steps:
            if step not in keep:
                trash = self.root / (TRASH_PREFIX + step_dir_name(step))
                os.replace(self.root / step_dir_name(step), trash)
                retired.append(trash)
        if retired:
            fsync_dir(self.root)
            self._deleting = threading.Thread(
                target=lambda: [shutil.rmtree(path, ignore_errors=True) for path in retired], daemon=True)
            self._deleting.start()

    def _join_deleting(self) -> None:
        if self._deleting is not None:
            self._deleting.join()
            self._deleting = None

    def poll(self) -> None:
        """Commit async saves that have finished (non-blocking; collective)."""
        if self._queue is not None:
            self._queue.maybe_finalize_async_calls(blocking=False)

    def wait(self) -> None:
        """Block until pending async saves are written and committed; a failure in the
        background is raised here."""
        if self._queue is not None:
            self._queue.maybe_finalize_async_calls(blocking=True)

    def close(self, clean: bool = True) -> None:
        """After a clean run, wait for pending saves. Always join the writer-service warm-up:
        a Manager half-started when the interpreter exits leaves a child that exit joins
        forever."""
        self._warm.join()
        if clean:
            self.wait()
        self._join_deleting()
        if self._queue is not None:
            self._queue.close(abort=not clean)
            self._queue = None

    # -- loading --------------------------------------------------------------------------
    def find_resume(self) -> Optional[Resume]:
        """This run's own `latest` (full state), else `ckpt.load` (weights or full state)."""
        own = self.latest()
        if own is not None:
            chosen = self.choose(own)
            return Resume(chosen, _step_of(chosen), full_state=True)
        if self.cfg.load:
            chosen = self.choose(resolve_load_path(Path(self.cfg.load)))
            return Resume(chosen, _step_of(chosen), full_state=self.cfg.load_state == "full",
                          foreign=True)
        return None

    def load(self, resume: Resume, engines: dict[str, Any], stage: Any) -> int:
        """Restore engines (and, for a full-state resume, everything else); return the step
        to continue from."""
        sources: dict[str, str] = {}
        keep_init: tuple[str, ...] = ()
        if resume.foreign:
            source = source_model(resume.directory)
            problems = model_mismatch(source, self.ctx.cfg.model)
            if problems:
                raise CheckpointError(f"ckpt.load={resume.directory}: the checkpoint's model differs "
                                      f"from this run's: {'; '.join(problems)}")
            sources = stage.load_sources()
            if sources:
                # Only the engines named there come from ckpt.load (a PPO critic does not).
                engines = {name: engines[name] for name in sources}
            if str(source.get("head", "lm")) != str(self.ctx.cfg.model.head):
                # LM -> scalar head (a reward model or critic from SFT): the new head starts
                # from its own (zero) init; everything below it is loaded.
                keep_init = ("output_layer.",)
        load_checkpoint(engines, resume.directory, with_optimizer=resume.full_state,
                        sources=sources, keep_init=keep_init)
        if not resume.full_state:
            return 0
        state = load_state_file(resume.directory / "train_state.pt")
        for name, scheduler_state in state["schedulers"].items():
            engines[name].scheduler.load_state_dict(scheduler_state)
        stage.load_state_dict(state["stage"])
        self._restore_rng(resume.directory, state["layout"])
        self.last_saved_step = state["step"]
        return int(state["step"])

    def _restore_rng(self, directory: Path, layout: dict[str, int]) -> None:
        topo = self.ctx.topo
        same = layout == {"world": topo.world_size, "tp": topo.tp, "pp": topo.pp, "dp": topo.dp}
        path = directory / "rng" / f"rank_{dist.get_rank():05d}.pt"
        if same and path.is_file():
            set_rng_state(load_state_file(path))
        elif self.ctx.is_main:
            print(f"[chatforge] layout changed since the checkpoint ({layout}); RNG streams "
                  "restart from the seed", flush=True)


# Model fields that decide tensor shapes: a checkpoint loads only into the same values.
SHAPE_KEYS: tuple[str, ...] = (
    "num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size",
    "position_embedding", "normalization", "activation", "add_bias", "make_vocab_size_divisible_by",
)


def source_model(step_dir: Path) -> dict[str, Any]:
    """The model section of the config that wrote the checkpoint in `step_dir`."""
    path = step_dir / "config.yaml"
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; cannot tell which model wrote {step_dir}")
    return dict(OmegaConf.to_container(OmegaConf.load(path).model, resolve=True))  # type: ignore[arg-type]


def model_mismatch(source: dict[str, Any], model: Any) -> list[str]:
    """`model.<key>: checkpoint has A, this run has B` for every shape-deciding difference."""
    keys = list(SHAPE_KEYS)
    if str(model.position_embedding) == "learned":
        keys.append("seq_length")  # the position table has seq_length rows
    if str(source.get("head", "lm")) == "lm" == str(model.head):
        keys.append("tie_embeddings")
    return [f"model.{key}: checkpoint has {source.get(key)!r}, this run has {model[key]!r}"
            for key in keys if source.get(key) != model[key]]




def retained(steps: list[int], newest: int, keep_last: int, keep_every: int) -> set[int]:
    """Which complete checkpoints survive: the newest `keep_last` (at least one), every step
    divisible by `keep_every` (if > 0), and always the one just written."""
    keep = set(sorted(steps)[-max(keep_last, 1):]) | {newest}
    if keep_every > 0:
        keep |= {s for s in steps if s % keep_every == 0}
    return keep


def _step_of(directory: Path) -> int:
    match = STEP_DIR.match(directory.name)
    if not match:
        raise CheckpointError(f"{directory}: not a step_NNNNNN checkpoint directory")
    return int(match.group(1))




def load_weights(path: str | Path, engines: dict[str, Any], model: Any, sources: Optional[dict[str, str]] = None,
                 keep_init: tuple[str, ...] = ()) -> Path:
    """Weights of a finished run's checkpoint (a run dir, its checkpoints/ dir or a step dir)
    into engines built with `model` (frozen references, reward models, generation
    policies, a critic); collective. The checkpoint is verified first. `keep_init`: model
    key prefixes left at their initial values; a scalar head loaded from an LM checkpoint
    always keeps its own (zero) init. Returns its step directory."""
    directory = resolve_load_path(Path(path))
    problems = gather_lists(verify(directory, *rank_and_world()))
    if problems:
        raise CheckpointError("damaged checkpoint: " + "; ".join(problems[:5]))
    source = source_model(directory)
    mismatch = model_mismatch(source, model)
    if mismatch:
        raise CheckpointError(f"{directory}: the checkpoint's model differs: {'; '.join(mismatch)}")
    if str(model.head) == "scalar" and str(source.get("head", "lm")) != "scalar":
        keep_init = (*keep_init, "output_layer.")  # an LM's body under a new scalar head (a critic)
    load_checkpoint(engines, directory, with_optimizer=False, sources=sources, keep_init=keep_init)
    return directory


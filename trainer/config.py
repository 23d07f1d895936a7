"""Schemas owned by the trainer and the root config that ties every group together.

Torch-free: the launcher composes and validates with these. Every default is written here
once; YAML files under conf/ only hold values that differ from these defaults.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from launcher.config import ClusterConfig
from parallel.config import ModelConfig, OptimConfig, ParallelConfig


@dataclass
class StageConfig:
    name: str = "pretrain"


@dataclass
class TokenizerConfig:
    # An existing sentencepiece .model; empty: train one on the stage's data into
    # <run.dir>/tokenizer/ (rank 0, before training).
    path: str = ""
    model_type: str = "bpe"  # bpe | unigram
    vocab_size: int = 512
    character_coverage: float = 1.0
    # Sentences sampled for training the tokenizer (sentencepiece's input_sentence_size).
    max_sentences: int = 200000


@dataclass
class EmbeddedDataConfig:
    """The generated "assistant world" corpus: no download, seeded, sizes here."""

    num_docs: int = 4000
    seed: int = 0


@dataclass
class DataConfig:
    name: str = "embedded"
    # embedded: generate the corpus; text: plain text file(s) at `path`.
    format: str = "embedded"
    # A user's file (or comma-separated files) for format=text.
    path: str = ""
    # Fraction of documents held out for evaluation.
    eval_fraction: float = 0.05
    # Seeds the train/eval document split; apart from `seed` so a seed sweep evaluates on
    # the same held-out documents.
    split_seed: int = 0
    embedded: EmbeddedDataConfig = field(default_factory=EmbeddedDataConfig)


@dataclass
class TrainConfig:
    steps: int = 100
    global_batch: int = 8
    micro_batch: int = 2
    eval_every: int = 50
    eval_batches: int = 4
    log_every: int = 1
    # Stop (after saving) once this many minutes have passed; 0 disables the limit.
    max_minutes: float = 0.0
    # Stop (after saving) when the step count is a multiple of this, as Megatron-LM's
    # --exit-interval; rerunning the command continues. 0 disables it.
    exit_interval: int = 0


@dataclass
class CkptConfig:
    # Save every N steps; 0 saves only at the end of the run (and on a stop signal).
    every: int = 0
    # Start a new run from another run's checkpoint: a run dir, its checkpoints/ dir or one
    # step_NNNNNN dir. Ignored once this run has a checkpoint of its own (then it resumes).
    load: str = ""
    # What ckpt.load restores: weights only, or the full state (optimizer, LR schedule,
    # data position, step).
    load_state: str = "weights"  # weights | full
    # Keep the newest `keep` checkpoints, plus every step divisible by keep_every (0: none).
    keep: int = 2
    keep_every: int = 0
    # Write shards in the background while training goes on.
    async_save: bool = False
    # If the newest checkpoint is damaged, load the previous complete one instead of failing.
    fallback: bool = False


@dataclass
class RunConfig:
    dir: str = "runs/default"


@dataclass
class WandbConfig:
    project: str = "chatforge"
    entity: Optional[str] = None
    # offline unless the user configured an account (WANDB_API_KEY or `wandb login`).
    mode: str = "auto"  # auto | offline | online


@dataclass
class Config:
    stage: StageConfig = field(default_factory=StageConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    ckpt: CkptConfig = field(default_factory=CkptConfig)
    run: RunConfig = field(default_factory=RunConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    seed: int = 1234
    logger: str = "wandb"  # wandb | none

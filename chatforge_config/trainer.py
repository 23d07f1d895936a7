"""Schemas owned by the trainer and the root config that ties every group together.

Standard library only (chatforge_config/__init__.py says why): the launcher composes and
validates with these. Every default is written here once; YAML files under conf/ only hold
values that differ from these defaults.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from chatforge_config.launcher import ClusterConfig, RecipeConfig
from chatforge_config.parallel import LoRAConfig, ModelConfig, OptimConfig, ParallelConfig


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
    """The generated "assistant world": no download, seeded, sizes here. One world feeds
    every stage: documents (pretrain), conversations (SFT), preference pairs (RM, DPO) and
    prompts (best-of-N, rejection sampling)."""

    num_docs: int = 4000
    num_chats: int = 2000
    num_pairs: int = 2000
    num_prompts: int = 64
    # Simulated rater noise: the fraction of preference pairs whose labels are swapped.
    flip: float = 0.0
    # Task families of the chat data, comma-separated (trainer/data/corpus.py: add,
    # subtract, compare, reverse, uppercase, count_letter); empty: all of them.
    families: str = ""
    # What the preference pairs prefer: "correct" (chosen answers correctly, rejected gives a
    # plausible wrong answer, styles drawn apart) or "brief" (both correct; chosen in the
    # brief style "The answer is X.", which only a quarter of the SFT replies use: a property
    # an RLHF policy can learn to show more often).
    prefer: str = "correct"
    # prefer=correct: the fraction of pairs whose two replies share one style (only the
    # answer differs); the others draw their styles apart (style says nothing of the label).
    same_style: float = 0.0
    # What the evaluation prompts ask (best-of-N, PPO/A2C evaluation, stage=eval): "heldout"
    # tasks no training set contains (generalisation), or "seen": tasks of the training space
    # in prompts drawn apart from the training data (what was learned; the default recipe's).
    eval_tasks: str = "heldout"
    seed: int = 0


@dataclass
class DataColumnsConfig:
    """A user's column names for the canonical ones the readers use (trainer/data/readers.py):
    e.g. data.columns.messages=conversation reads a `conversation` column as `messages`."""

    messages: str = "messages"
    prompt: str = "prompt"
    completion: str = "completion"
    chosen: str = "chosen"
    rejected: str = "rejected"
    text: str = "text"


@dataclass
class DataConfig:
    name: str = "embedded"
    # embedded: the generated world (every stage); text: plain text (pretrain);
    # chatml | alpaca: conversations (SFT, rejection sampling; prompts for best-of-N);
    # hh_rlhf | preference: preference pairs (reward model, DPO; their chosen dialogues also
    # feed SFT and their prompts best-of-N); prompts: RL prompts; auto: the shape of the first
    # record (docs/data.md).
    format: str = "embedded"
    # A user's local data: a file (.jsonl/.json/.parquet/.csv/.arrow), a directory of such
    # shards or a `save_to_disk` directory (trainer/data/sources.py); comma-separated text
    # files for format=text. Never a hub name: chatforge does not download.
    path: str = ""
    # Column names of data.path, when they are not the canonical ones.
    columns: DataColumnsConfig = field(default_factory=DataColumnsConfig)
    # Chat stages: pack several conversations into one sequence (attention and loss never
    # cross a conversation boundary) or pad each to model.seq_length.
    packing: bool = True
    # A sample longer than model.seq_length: truncate (keep the prompt's end and the
    # response's start) or drop it. Either way it is counted in the stage's log.
    overlong: str = "truncate"  # truncate | drop
    # Fraction of documents held out for evaluation.
    eval_fraction: float = 0.05
    # Seeds the train/eval document split; apart from `seed` so a seed sweep evaluates on
    # the same held-out documents.
    split_seed: int = 0
    embedded: EmbeddedDataConfig = field(default_factory=EmbeddedDataConfig)


@dataclass
class FaultConfig:
    """Fault injection, to test the non-finite guard (off by default): the gradients of
    rank `nan_grad_rank` are NaN at steps nan_grad_step .. nan_grad_step + nan_grad_steps - 1
    (1-based, as logged)."""

    nan_grad_step: int = 0  # 0: off
    nan_grad_rank: int = 0
    nan_grad_steps: int = 1
    # Crash drill for the watchdog and sweeps (trainer/faults.py): "raise@N": rank
    # `crash_rank` raises a RuntimeError after step N; "kill@N": it kills itself with SIGKILL
    # after step N (as the kernel's out-of-memory killer would). Fires once per run dir, as a
    # transient fault would, so rerunning the command completes. "" or "none": off.
    crash: str = ""
    crash_rank: int = 0


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
    # The non-finite guard skips (on every rank) an update whose loss or gradients hold a
    # NaN/Inf on any rank; this many consecutive skipped steps stop the run, unsaved, with
    # exit code 76 (trainer/exitcodes.py). docs/checkpoints.md.
    max_bad_steps: int = 3
    # The watchdog (launcher/watchdog.py) stops every rank of the job, exit code 77, when a
    # rank's heartbeat (written after each step, before each evaluation and save) has not moved for this
    # many seconds once the job's first heartbeat came; sized for GPU steps, evaluations and
    # saves of large models. 0 disables it. docs/launcher.md.
    hang_timeout: float = 1800.0
    fault: FaultConfig = field(default_factory=FaultConfig)


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
class RewardModelConfig:
    """The reward model stage (stage=rm)."""

    # What the reward is read from. value: a scalar head replaces the LM head (InstructGPT;
    # model.head=scalar). logprob: the LM head is kept (model.head=lm) and
    # r(x, y) = beta * log pi(y | x) over the response's tokens, trained with the same pairwise
    # loss: the reward starts from what the SFT policy already knows about right answers
    # instead of a zero-initialised head (docs/recipe.md: 0.89 on clean held-out pairs before
    # any training, against 0.67 for a trained scalar head).
    score: str = "value"  # value | logprob
    # value: last (the value at the response's last token) | mean (over response tokens);
    # logprob: sum (log pi(y | x)) | mean (per response token, SimPO's length normalisation).
    reduce: str = "last"
    # logprob: the reward's scale (the pairwise loss sees beta times the log-prob difference).
    beta: float = 0.1
    # Loss -log sigmoid(r_chosen - r_rejected - margin).
    margin: float = 0.0


@dataclass
class DPOConfig:
    """Direct preference optimisation (stage=dpo) against a frozen reference (ckpt.load)."""

    beta: float = 0.1
    loss: str = "sigmoid"  # sigmoid (DPO) | ipo
    # Conservative DPO: the probability that a preference label is wrong (sigmoid loss only).
    label_smoothing: float = 0.0
    # Compute the reference log-probs of every pair once before training (the reference then
    # costs nothing per step) instead of one reference forward per step.
    precompute_ref: bool = True


@dataclass
class SamplingConfig:
    """How responses are sampled (best-of-N, rejection sampling, chat, PPO and A2C rollouts)."""

    max_new_tokens: int = 64
    temperature: float = 1.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    use_cache: bool = True
    # Prompts per generation batch on each data-parallel rank.
    batch: int = 8


@dataclass
class BestOfNConfig:
    """best_of_n and rejection_sampling: N samples per prompt from the policy (ckpt.load),
    scored by a reward model checkpoint; the best one wins."""

    n: int = 4
    # The reward model: a run dir, its checkpoints/ dir or a step dir (required).
    reward: str = ""
    # Prompts taken from the data (0: all of them).
    num_prompts: int = 0


# The RL pipeline's named parts (docs/rlhf.md). Torch-free: the launcher checks values against
# these; trainer/advantages.py registers one estimator per name (a test holds them equal).
ADVANTAGE_ESTIMATORS: tuple[str, ...] = ("gae", "grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline")
CRITIC_ESTIMATORS: tuple[str, ...] = ("gae",)  # the others build no critic
# Estimators that compare the samples of one prompt: ppo.n_samples_per_prompt >= 2.
GROUP_ESTIMATORS: tuple[str, ...] = ("grpo", "dr_grpo", "rloo", "reinforce_pp_baseline")
LOSS_AGGREGATIONS: tuple[str, ...] = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")
KL_ESTIMATORS: tuple[str, ...] = ("k1", "k2", "k3")
# Reward sources named by a word (trainer/rewards.py); others are regex:<pattern> or module:function.
NAMED_REWARD_SOURCES: tuple[str, ...] = ("rm", "gold", "eos", "math")


@dataclass
class PPOConfig:
    """Every RL stage (stage=ppo, a2c, grpo, dr_grpo, rloo, reinforce_pp; the group keeps the
    name `ppo` it had first). One pipeline: rollout (n samples per prompt) -> score (a
    weighted list of reward sources) -> advantages (an estimator by name) -> loss (clip,
    aggregation, KL placement). A stage's conf/stage/<name>.yaml is a preset of these keys.
    train.steps counts iterations (one rollout and its updates each); train.global_batch is
    the sequences per optimizer step."""

    # The reward model: a run dir, its checkpoints/ dir or a step dir (needed when
    # reward_funcs names "rm").
    reward: str = ""
    # Reward sources, summed with reward_weights (empty: all 1.0); each is logged as
    # reward_<name>: "rm" (the reward model above), "gold" (the embedded world's verifier),
    # "eos" (1 if the response ended with a stop token), "regex:<pattern>" (1 if the response
    # matches), "math" (math-verify against the prompt's "answer" field), or
    # "package.module:function" (a user callable: docs/rlhf.md gives its signature).
    reward_funcs: list[str] = field(default_factory=lambda: ["rm"])
    reward_weights: list[float] = field(default_factory=list)
    # Post-processing of the weighted sum: normalise ("batch": over this rollout, "running":
    # running moments kept in the checkpoint; "none"), then clip to [-reward_clip, reward_clip]
    # (0: off).
    reward_norm: str = "none"
    reward_clip: float = 0.0
    # How advantages are estimated: gae (with the critic: PPO, A2C), grpo, dr_grpo, rloo,
    # reinforce_pp, reinforce_pp_baseline (no critic is built).
    advantage_estimator: str = "gae"
    # Responses sampled per prompt (the group size); a group is generated, scored and
    # advantaged together on one data-parallel rank.
    n_samples_per_prompt: int = 1
    # Where the critic starts: "reward" (the reward model, as InstructGPT) or "policy" (the
    # SFT checkpoint with a fresh zero-initialised scalar head).
    critic_init: str = "reward"
    # The critic's learning rate (0: optim.lr); it shares optim's other settings.
    critic_lr: float = 0.0
    # The first N iterations train the critic only (the actor stays the SFT policy), so that a
    # critic with a fresh head predicts something before its advantages move the actor
    # (OpenRLHF's --freezing_actor_steps). Needs a critic (ppo.advantage_estimator=gae).
    freeze_actor_steps: int = 0
    # Prompts per iteration over all data-parallel ranks (each sampled n_samples_per_prompt times).
    rollout_batch: int = 16
    # Passes over each rollout, each split into (responses / train.global_batch) minibatches
    # (one optimizer step each). A2C makes one update on the whole rollout.
    epochs: int = 2
    clip: float = 0.2  # PPO ratio clip epsilon
    # Asymmetric clipping: ratio clipped to [1 - clip_low, 1 + clip_high] (null: ppo.clip;
    # DAPO's clip-higher: clip_high=0.28).
    clip_low: Optional[float] = None
    clip_high: Optional[float] = None
    # The importance ratio per token (PPO, GRPO) or per sequence (GSPO: length-normalised).
    ratio_level: str = "token"
    # How the per-token policy loss is averaged: token_mean | seq_mean_token_mean |
    # seq_mean_token_sum_norm (Dr. GRPO; normalised by sampling.max_new_tokens).
    loss_agg: str = "token_mean"
    value_clip: float = 0.2  # PPO value clip (0: off); A2C never clips
    # KL to the reference, coefficient beta: in the reward (per token, as PPO) or as a loss
    # term (GRPO), with the estimator k1 | k2 | k3. kl_coef=0 with kl_in=loss (or no KL at
    # all): no reference model is built. Adaptive when kl_target > 0 (Ziegler et al. 2019:
    # beta moves so that the sequence KL approaches kl_target).
    kl_coef: float = 0.05
    kl_in: str = "reward"
    kl_estimator: str = "k1"
    kl_target: float = 0.0
    kl_horizon: int = 10000
    gamma: float = 1.0
    lam: float = 0.95
    whiten_advantages: bool = True
    # Entropy bonus: minus entropy_coef x the mean per-token entropy is added to the policy loss.
    entropy_coef: float = 0.0
    # PPO-ptx (InstructGPT eq. 2): ptx_coef x the SFT loss on the data's conversations.
    ptx_coef: float = 0.0
    # Subtracted from the reward of a response cut by sampling.max_new_tokens.
    missing_eos_penalty: float = 0.0
    # Overlong responses (cut by sampling.max_new_tokens) take no part in the loss (DAPO).
    overlong_mask: bool = False
    # DAPO's dynamic sampling: drop groups whose rewards are all equal (no signal) and sample
    # more prompts until the rollout is full, at most max_sampling_rounds rounds (then it is
    # filled with dropped groups; both counts are logged).
    dynamic_sampling: bool = False
    max_sampling_rounds: int = 4


@dataclass
class EvalConfig:
    """stage=eval: the recipe's evaluation of several policies on the held-out prompts
    (data.embedded.num_prompts of them; one sampled response each, sampling.*, the same seed
    for every model), judged by the embedded world's gold scorer. docs/recipe.md."""

    # The run dirs to evaluate, comma-separated; each is named by its directory's name. A
    # policy run (pretrain, SFT, DPO, PPO ...) is sampled; a best_of_n run is read (its
    # winners on the same prompts).
    models: str = ""
    # The SFT run: KL is measured to it, and win rates are against its responses.
    baseline: str = ""
    # A reward model run: its accuracy on held-out pairs and its mean score per model.
    reward: str = ""
    # Where the report goes (report.md, its PNG plots beside it); empty: <run.dir>/report.md.
    # Its plots read the metrics of every run named here (and of `runs`).
    report: str = ""
    # More run dirs whose training curves the report plots (e.g. the reward model's).
    runs: str = ""
    # The oracle pass@k of the baseline (the ceiling): k samples per prompt, right if any is.
    pass_k: int = 8
    # Resamples of the paired bootstrap that gives every difference to the baseline its 95%
    # confidence interval over prompts (seeded with `seed`).
    bootstrap: int = 2000
    # Drop the evaluation prompts that are word for word a training prompt of the embedded
    # world (SFT, preference pairs, RL / rejection-sampling prompts of any run evaluated).
    decontaminate: bool = True
    # Held-out pairs (clean labels) for the reward model's accuracy; 0: data.embedded.num_prompts.
    rm_pairs: int = 0


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
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    ckpt: CkptConfig = field(default_factory=CkptConfig)
    run: RunConfig = field(default_factory=RunConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    rm: RewardModelConfig = field(default_factory=RewardModelConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    best_of_n: BestOfNConfig = field(default_factory=BestOfNConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    recipe: RecipeConfig = field(default_factory=RecipeConfig)
    seed: int = 1234
    logger: str = "wandb"  # wandb | none

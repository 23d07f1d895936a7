"""Hugging Face import and export (tools/hf_import.py, tools/hf_export.py) against
transformers itself, on tiny random GPT-2 and Llama (GQA) models made here (no download):

- import, then logits through chatforge at TP1, TP2 and PP2 equal transformers' forward;
- import -> export gives back the original tensors (GPT-2: all of them, its tokenizer has
  the chat pieces; Llama: its tokenizer gains them, so two embedding rows are new);
- a short SFT run (GPT-2) and reward-model run (Llama) from the imports through the real
  trainer, exported: transformers loads them with no missing or unexpected weight, gives the
  same logits / rewards as chatforge, and its tokenizer and chat template give chatforge's ids;
- the GPT-2 model's own chat template is kept by the import, trained with and exported;
- lm-eval-harness evaluates the exported SFT model on the repo's local task (tools/hf_eval.py).

Everything expensive runs once in the module fixture `work`; `python -m tests.dist.test_hf
SPEC` is the worker that computes chatforge's outputs in two gloo processes."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import REPO, spawn_trainer

pytestmark = pytest.mark.dist

TOL = 1e-4
SEQ = 24
CHAT = ["<|im_start|>", "<|im_end|>"]
# The GPT-2 model's own chat template (Qwen-style ChatML with a default system prompt, so it
# renders differently from chatforge's ChatML): kept by the import, trained with, exported.
TEMPLATE = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
            "{{ '<|im_start|>system\\nYou are helpful.<|im_end|>\\n' }}{% endif %}"
            "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
            "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


# ---- tiny Hugging Face models ---------------------------------------------------------------

def _lines() -> list[str]:
    from trainer.data.corpus import generate_corpus

    return [line for doc in generate_corpus(60, 0) for line in doc.splitlines() if line.strip()]


def _gpt2_tokenizer(lines: list[str]) -> Any:
    """A byte-level BPE as GPT-2's, trained here; it already has the chat pieces."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>", *CHAT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(lines, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    fast.chat_template = TEMPLATE
    return fast


def _llama_spm(lines: list[str]) -> bytes:
    """A sentencepiece model with Llama's settings (<unk> <s> </s>, byte fallback, dummy
    prefix, no pad) and no chat pieces."""
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=buf, vocab_size=400, model_type="bpe", byte_fallback=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False, split_digits=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2, num_threads=1)
    return buf.getvalue()


def _scramble(model: torch.nn.Module, seed: int) -> None:
    """Weights large enough that every mapping error shows in the logits (transformers'
    0.02 init makes logits ~0.1: a swapped head could hide under the tolerance)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            norm_weight = ("norm" in name or ".ln_" in name) and name.endswith("weight")
            p.copy_(1.0 + 0.2 * noise if norm_weight else 0.15 * noise)


def make_models(root: Path) -> dict[str, Path]:
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    lines = _lines()
    tok = _gpt2_tokenizer(lines)
    eod = tok.convert_tokens_to_ids("<|endoftext|>")
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=64, n_layer=2, n_head=4,
                                      bos_token_id=eod, eos_token_id=eod))
    _scramble(gpt2, 0)
    gpt2.save_pretrained(root / "gpt2")
    tok.save_pretrained(root / "gpt2")
    spm = _llama_spm(lines)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=400, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                         rope_theta=5000.0, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2))
    _scramble(llama, 1)
    llama.save_pretrained(root / "llama")
    (root / "llama" / "tokenizer.model").write_bytes(spm)
    return {"gpt2": root / "gpt2", "llama": root / "llama"}


def tokens(vocab: int, seed: int, avoid: int = -1) -> torch.Tensor:
    """[2, SEQ] random ids below `vocab`, none equal to `avoid`."""
    ids = torch.randint(0, vocab, (2, SEQ), generator=torch.Generator().manual_seed(seed))
    return ids.masked_fill(ids == avoid, 5)


@torch.no_grad()
def hf_outputs(directory: Path, ids: torch.Tensor) -> torch.Tensor:
    """transformers' logits [b, s, V] (a causal LM) or scores [b] (sequence classification)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(directory)
    if config.architectures[0].endswith("ForSequenceClassification"):
        return AutoModelForSequenceClassification.from_pretrained(directory).eval()(ids).logits[:, 0]
    return AutoModelForCausalLM.from_pretrained(directory).eval()(ids).logits


# ---- the chatforge side: a worker in two gloo processes --------------------------------------

def worker(spec_path: str) -> None:
    """For each case {ckpt, tp, pp, tokens, out}: the checkpoint at that layout, full logits
    (or scalar values) of the tokens, saved by one rank of the last pipeline stage."""
    from chatforge_config.parallel import ParallelConfig
    from parallel.engine import Engine
    from trainer import runtime
    from trainer.batches import lm_inputs
    from trainer.checkpoint_files import resolve_load_path
    from trainer.checkpointing import load_weights
    from trainer.data.tokenizer import tokenizer_of
    from trainer.data.tokenizer import Tokenizer

    ctx = None
    for case in json.loads(Path(spec_path).read_text()):
        step_dir = resolve_load_path(Path(case["ckpt"]))
        cfg = runtime.load_config(step_dir / "config.yaml")
        cfg.parallel = ParallelConfig(tp=case["tp"], pp=case["pp"])
        cfg.cluster.procs_per_node = 2
        ctx = runtime.start(cfg)  # again per case: new TP/PP groups, the same process group
        engine = Engine(cfg.model, cfg.parallel, ctx.topo, vocab_size=Tokenizer(tokenizer_of(step_dir)).vocab_size,
                        seed=999)
        load_weights(step_dir, {"model": engine}, cfg.model)
        ids = torch.load(case["tokens"])
        captured: list[torch.Tensor] = []

        def step(batch: dict[str, torch.Tensor], model: torch.nn.Module) -> Any:
            x = lm_inputs(batch["tokens"], ctx.device)
            out = model(x["input_ids"], x["position_ids"], x["attention_mask"], runtime_gather_output=True)

            def loss_fn(output: torch.Tensor) -> Any:
                captured.append(output.detach().float().cpu())
                zero = output.float().sum() * 0
                return zero, torch.tensor(1, dtype=torch.int), {"loss": torch.stack([zero.detach(), torch.tensor(1.0)])}

            return out, loss_fn

        # lm_inputs takes S+1 tokens (inputs and labels): append a dummy label column.
        engine.eval_step([{"tokens": torch.cat([ids, ids[:, :1]], dim=1)}], step, seq_length=ids.shape[1])
        if captured and ctx.topo.tp_rank == 0 and ctx.topo.dp_rank == 0:
            torch.save(captured[0], case["out"])
    if ctx is not None:
        runtime.close(ctx)


def run_worker(root: Path, cases: list[dict[str, Any]]) -> None:
    from launcher.local import run_local

    spec = root / "cases.json"
    spec.write_text(json.dumps(cases))
    code = run_local([sys.executable, "-m", "tests.dist.test_hf", str(spec)], 2, root / "worker",
                     env_extra={"PYTHONPATH": str(REPO)}, threads=1)
    assert code == 0, f"worker failed ({code}); see {root / 'worker' / 'logs'}"


# ---- the pipeline, once -----------------------------------------------------------------------

def _python(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def _wait(*procs: subprocess.Popen) -> None:
    for proc in procs:
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out[-3000:]


def _stage(imported: Path, overrides: dict[str, Any]) -> dict[str, Any]:
    import yaml

    model = yaml.safe_load((imported / "config.yaml").read_text())["model"]
    config: dict[str, Any] = {
        "logger": "none", "seed": 3, "ckpt": {"load": str(imported)},
        "train": {"steps": 2, "global_batch": 4, "micro_batch": 2, "eval_every": 0},
        "optim": {"lr": 3e-3, "warmup_steps": 0},
        "data": {"embedded": {"num_chats": 40, "num_pairs": 40}},
        "model": model,
    }
    for key, value in overrides.items():
        config[key] = {**config.get(key, {}), **value} if isinstance(value, dict) else value
    return config


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("hf")
    hf = make_models(root / "hf")
    vocab = {"gpt2": 320, "llama": 400}
    refs = {}
    for arch, directory in hf.items():
        torch.save(tokens(vocab[arch], 0), root / f"{arch}_tokens.pt")
        refs[arch] = hf_outputs(directory, tokens(vocab[arch], 0))
    imported = {arch: root / f"{arch}_run" for arch in hf}
    _wait(*[_python("-m", "tools.hf_import", str(hf[a]), str(imported[a])) for a in hf])
    runs = {"sft": (root / "sft", _stage(imported["gpt2"], {"stage": {"name": "sft"}})),
            "rm": (root / "rm", _stage(imported["llama"], {"stage": {"name": "rm"}, "model": {"head": "scalar"}}))}
    with ThreadPoolExecutor(2) as pool:
        codes = list(pool.map(lambda item: spawn_trainer(item[0], item[1]), runs.values()))
    assert codes == [0, 0], f"trainer failed: {codes}; see {root}/sft/logs, {root}/rm/logs"
    exported = {name: root / f"{name}_hf" for name in ("gpt2", "llama", "sft", "rm")}
    sources = {"gpt2": imported["gpt2"], "llama": imported["llama"], "sft": root / "sft", "rm": root / "rm"}
    # One export through the command line; three in one process (start-up paid once).
    script = "; ".join(f"export_hf(Path({str(sources[n])!r}), Path({str(exported[n])!r}))" for n in ("llama", "sft", "rm"))
    _wait(_python("-m", "tools.hf_export", str(sources["gpt2"]), str(exported["gpt2"])),
          _python("-c", f"from pathlib import Path; from tools.hf_export import export_hf; {script}"))
    torch.save(tokens(320, 1), root / "sft_tokens.pt")
    # The reward model's tokenizer has no pad piece: pad is EOD (2), which transformers'
    # sequence classifier would skip when it looks for the last token; none in the rows.
    torch.save(tokens(402, 2, avoid=2), root / "rm_tokens.pt")
    cases = [{"ckpt": str(imported["gpt2"]), "tp": tp, "pp": 1, "tokens": str(root / "gpt2_tokens.pt"),
              "out": str(root / f"gpt2_tp{tp}.pt")} for tp in (1, 2)]
    cases += [{"ckpt": str(imported["llama"]), "tp": tp, "pp": pp, "tokens": str(root / "llama_tokens.pt"),
               "out": str(root / f"llama_tp{tp}pp{pp}.pt")} for tp, pp in ((1, 1), (2, 1), (1, 2))]
    cases += [{"ckpt": str(root / name), "tp": 2, "pp": 1, "tokens": str(root / f"{name}_tokens.pt"),
               "out": str(root / f"{name}_tp2.pt")} for name in ("sft", "rm")]
    run_worker(root, cases)
    return {"root": root, "hf": hf, "refs": refs, "imported": imported, "exported": exported, "runs": runs}


# ---- the checks ---------------------------------------------------------------------------------

@pytest.mark.parametrize("arch,layout", [("gpt2", "tp1"), ("gpt2", "tp2"), ("llama", "tp1pp1"),
                                         ("llama", "tp2pp1"), ("llama", "tp1pp2")])
def test_imported_logits_equal_transformers(work: dict[str, Any], arch: str, layout: str) -> None:
    ref = work["refs"][arch]
    ours = torch.load(work["root"] / f"{arch}_{layout}.pt")
    assert ours.shape[:2] == ref.shape[:2] and ours.shape[-1] % 128 == 0  # the padded vocabulary
    diff = (ours[..., :ref.shape[-1]] - ref).abs().max().item()
    assert ref.abs().max() > 2.0  # logits big enough that a mapping error would show
    assert diff < TOL, f"{arch} {layout}: max |chatforge - transformers| = {diff:.2e}"


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(directory / "model.safetensors"))


def test_round_trip_gives_the_original_tensors(work: dict[str, Any]) -> None:
    original, back = _tensors(work["hf"]["gpt2"]), _tensors(work["exported"]["gpt2"])
    assert sorted(original) == sorted(back)
    assert all(torch.equal(original[k], back[k]) for k in original)
    config = json.loads((work["exported"]["gpt2"] / "config.json").read_text())
    assert (config["n_positions"], config["activation_function"], config["vocab_size"]) == (64, "gelu_new", 320)


def test_round_trip_grows_only_the_chat_rows(work: dict[str, Any]) -> None:
    original, back = _tensors(work["hf"]["llama"]), _tensors(work["exported"]["llama"])
    assert sorted(original) == sorted(back)
    rows = ("model.embed_tokens.weight", "lm_head.weight")
    assert all(torch.equal(original[k], back[k]) for k in original if k not in rows)
    for key in rows:  # 400 original rows, then <|im_start|>, <|im_end|> at the mean row
        assert back[key].shape == (402, 64) and torch.equal(back[key][:400], original[key])
        assert torch.allclose(back[key][400:], original[key].mean(0).expand(2, -1), atol=1e-6)
    config = json.loads((work["exported"]["llama"] / "config.json").read_text())
    assert config["num_key_value_heads"] == 2 and config["rope_parameters"]["rope_theta"] == 5000.0


def _load_quietly(directory: Path, cls_name: str) -> tuple[Any, dict[str, Any], list[str]]:
    """The model, transformers' loading info and every warning its logger printed."""
    import logging

    import transformers

    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    handler = Keep(level=logging.WARNING)
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        model, info = getattr(transformers, cls_name).from_pretrained(directory, output_loading_info=True)
    finally:
        logger.removeHandler(handler)
    return model.eval(), info, lines


def test_trained_sft_export_loads_and_matches(work: dict[str, Any]) -> None:
    model, info, warnings = _load_quietly(work["exported"]["sft"], "AutoModelForCausalLM")
    assert type(model).__name__ == "GPT2LMHeadModel"
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
    assert not [w for w in warnings if "weight" in w.lower() or "initialized" in w], warnings
    ids = torch.load(work["root"] / "sft_tokens.pt")
    with torch.no_grad():
        theirs = model(ids).logits
    ours = torch.load(work["root"] / "sft_tp2.pt")[..., :320]
    assert not torch.equal(_tensors(work["exported"]["sft"])["transformer.h.0.mlp.c_fc.weight"],
                           _tensors(work["hf"]["gpt2"])["transformer.h.0.mlp.c_fc.weight"])  # it trained
    assert (ours - theirs).abs().max().item() < TOL


def test_reward_model_export_scores_like_chatforge(work: dict[str, Any]) -> None:
    model, info, warnings = _load_quietly(work["exported"]["rm"], "AutoModelForSequenceClassification")
    assert type(model).__name__ == "LlamaForSequenceClassification" and model.config.num_labels == 1
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
    assert not [w for w in warnings if "weight" in w.lower() or "initialized" in w], warnings
    ids = torch.load(work["root"] / "rm_tokens.pt")
    assert not (ids == model.config.pad_token_id).any()  # so transformers scores the last token
    with torch.no_grad():
        scores = model(ids).logits[:, 0]
    bias = model.config.chatforge_score_bias
    values = torch.load(work["root"] / "rm_tp2.pt")  # chatforge's [b, s, 1] at TP2
    # score + bias = chatforge's value at the last token (the pairwise loss leaves the
    # bias at its zero init: it cancels between chosen and rejected).
    assert values[:, -1, 0].abs().max() > 0.01  # the head trained away from its zero init
    assert (scores + bias - values[:, -1, 0]).abs().max().item() < TOL


@pytest.mark.parametrize("name", ["sft", "llama"])
def test_exported_tokenizer_and_chat_template_give_chatforge_ids(work: dict[str, Any], name: str) -> None:
    from transformers import AutoTokenizer

    from trainer.data.chat import Message, prompt_ids
    from trainer.data.tokenizer import Tokenizer, find_tokenizer

    directory = work["exported"][name]
    theirs = AutoTokenizer.from_pretrained(directory)
    ours = Tokenizer(find_tokenizer(directory))
    chat = [Message("system", "Be brief."), Message("user", "What is 12 plus 7?")]
    expected = prompt_ids(ours, chat)
    got = theirs.apply_chat_template([{"role": m.role, "content": m.content} for m in chat],
                                     add_generation_prompt=True, tokenize=True)
    got = list(got["input_ids"] if isinstance(got, dict) or hasattr(got, "keys") else got)
    assert got == expected
    text = "Ada has 3 apples.\nShe eats one."
    assert theirs.encode(text, add_special_tokens=False) == ours.encode(text)
    assert theirs.eos_token_id == ours.eod_id


def test_an_imported_chat_template_is_trained_with_and_exported(work: dict[str, Any]) -> None:
    from transformers import AutoTokenizer

    from trainer.data.chat import Message, prompt_ids
    from trainer.data.tokenizer import Tokenizer, find_tokenizer

    imported = Tokenizer(find_tokenizer(work["imported"]["gpt2"] / "tokenizer"))
    trained = Tokenizer(find_tokenizer(work["root"] / "sft" / "tokenizer"))
    assert imported.chat_template is not None and trained.chat_template is not None
    assert trained.chat_template.config.template == TEMPLATE
    exported = work["exported"]["sft"]
    assert json.loads((exported / "tokenizer_config.json").read_text())["chat_template"] == TEMPLATE
    chat = [Message("user", "What is 12 plus 7?")]  # no system turn: the template adds its own
    theirs = AutoTokenizer.from_pretrained(exported).apply_chat_template(
        [{"role": "user", "content": chat[0].content}], add_generation_prompt=True, tokenize=False)
    assert theirs.startswith("<|im_start|>system\nYou are helpful.")
    assert prompt_ids(trained, chat) == trained.encode(theirs)


def test_lm_eval_benchmarks_an_exported_model(work: dict[str, Any], tmp_path: Path) -> None:
    """lm-eval-harness on the exported SFT model, the repo's local task, offline."""
    pytest.importorskip("lm_eval")  # tools/setup.sh installs it (the `lm-eval` extra)
    out = tmp_path / "results.json"
    proc = subprocess.run([sys.executable, "-m", "tools.hf_eval", str(work["exported"]["sft"]),
                           "--limit", "8", "--batch-size", "4", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())
    acc = results["results"]["chatforge_tasks"]["acc,none"]
    assert 0.0 <= acc <= 1.0 and results["n-samples"]["chatforge_tasks"]["effective"] == 8
    assert "[hf_eval] chatforge_tasks: acc=" in proc.stdout


if __name__ == "__main__":
    worker(sys.argv[1])

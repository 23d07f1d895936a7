"""A model's own chat template (trainer/data/chat_template.py) through trainer/data/chat.py: the
ids are transformers' apply_chat_template ids, the loss mask covers exactly each assistant
turn's reply and end-of-turn token, and prompts are the training context token for token; on
a Llama-2-style and a ChatML-style template with tiny tokenizers built here (no download)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from trainer.data.chat import Message, prompt_ids, response_ids, tokenize_conversation
from trainer.data.chat_template import TEMPLATE_FILE
from trainer.data.tokenizer import Tokenizer, copy_tokenizer

# Meta's Llama-2-chat template, as its tokenizer_config.json ships it.
LLAMA2 = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}")
# Qwen-style ChatML with a default system prompt.
CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are helpful.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")

STYLES = {
    "llama2": (LLAMA2, ["<unk>", "<s>", "</s>"], {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"},
               "</s>"),
    "chatml": (CHATML, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
               {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}, "<|im_end|>"),
}
CONV = [Message("system", "Answer briefly."), Message("user", "What is 2+2?"), Message("assistant", "It is 4."),
        Message("user", "And 3 + 3?"), Message("assistant", "6, of course.")]


def _tokenizer_dir(root: Path, style: str) -> Path:
    """A tiny byte-level BPE tokenizer.json with the style's special tokens and a
    tokenizer_config.json holding its chat template, as save_pretrained writes them."""
    from tokenizers import Tokenizer as Rust
    from tokenizers import decoders, models, pre_tokenizers, trainers

    template, specials, names, _ = STYLES[style]
    tok = Rust(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = ["What is two plus two? It is four. Answer briefly, of course.", "INST SYS system user assistant"] * 20
    tok.train_from_iterator(text, trainers.BpeTrainer(
        vocab_size=320, special_tokens=specials, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    root.mkdir(parents=True, exist_ok=True)
    tok.save(str(root / "tokenizer.json"))
    added = {str(tok.token_to_id(s)): {"content": s, "special": True} for s in specials}
    (root / TEMPLATE_FILE).write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "chat_template": template,
        "added_tokens_decoder": added, **names}))
    return root / "tokenizer.json"


@pytest.fixture(scope="module", params=sorted(STYLES))
def styled(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Tokenizer]:
    style = str(request.param)
    return style, Tokenizer(_tokenizer_dir(tmp_path_factory.mktemp(style), style))


def _transformers(tok: Tokenizer) -> object:
    from transformers import PreTrainedTokenizerFast

    config = json.loads((tok.path.parent / TEMPLATE_FILE).read_text())
    return PreTrainedTokenizerFast(tokenizer_file=str(tok.path), chat_template=config["chat_template"],
                                   **{k: config[k] for k in ("bos_token", "eos_token") if k in config})


def test_ids_are_apply_chat_template_ids(styled: tuple[str, Tokenizer]) -> None:
    _, tok = styled
    hf = _transformers(tok)
    chat = [{"role": m.role, "content": m.content} for m in CONV]
    ids, _ = tokenize_conversation(tok, CONV)
    assert ids == list(hf.apply_chat_template(chat, tokenize=True, return_dict=False))  # type: ignore[attr-defined]
    assert prompt_ids(tok, CONV[:4]) == list(hf.apply_chat_template(  # type: ignore[attr-defined]
        chat[:4], tokenize=True, add_generation_prompt=True, return_dict=False))


def test_the_mask_is_each_reply_and_its_end_of_turn(styled: tuple[str, Tokenizer]) -> None:
    style, tok = styled
    end = STYLES[style][3]
    ids, mask = tokenize_conversation(tok, CONV)
    assert len(ids) == len(mask)
    runs, current = [], []
    for t, m in zip(ids, mask):
        if m:
            current.append(t)
        elif current:
            runs.append(current)
            current = []
    runs += [current] if current else []
    decoded = [tok._tok.decode(run, skip_special_tokens=False) for run in runs]  # type: ignore[attr-defined]
    lead = " " if style == "llama2" else ""  # Llama 2 writes " reply </s>" after [/INST]
    tail = " " + end if style == "llama2" else end
    assert decoded == [f"{lead}It is 4.{tail}", f"{lead}6, of course.{tail}"]
    assert tok.end_of_turn_id == tok.piece_id(end)


def test_prompts_are_the_training_context(styled: tuple[str, Tokenizer]) -> None:
    _, tok = styled
    ids, mask = tokenize_conversation(tok, CONV)
    prompt = prompt_ids(tok, CONV[:4])
    reply = response_ids(tok, CONV[4].content)
    assert ids[:len(prompt)] == prompt and ids[len(prompt):len(prompt) + len(reply)] == reply
    assert mask[len(prompt):len(prompt) + len(reply)] == [1] * len(reply) and reply[-1] == tok.end_of_turn_id
    assert tok.response_text(reply).strip() == "6, of course."


def test_a_template_that_rewrites_earlier_turns_is_refused(tmp_path: Path) -> None:
    path = _tokenizer_dir(tmp_path / "t", "chatml")
    config = json.loads((tmp_path / "t" / TEMPLATE_FILE).read_text())
    # Renders only the last assistant turn: earlier turns change when one more is added.
    config["chat_template"] = CHATML.replace("{% for message in messages %}",
                                             "{% for message in messages %}{% if message['role'] != 'assistant' or loop.last %}") \
        .replace("{% endfor %}", "{% endif %}{% endfor %}")
    (tmp_path / "t" / TEMPLATE_FILE).write_text(json.dumps(config))
    with pytest.raises(ValueError, match="not prefix-consistent"):
        tokenize_conversation(Tokenizer(path), CONV)


def test_the_template_travels_with_the_tokenizer(tmp_path: Path) -> None:
    path = _tokenizer_dir(tmp_path / "src", "llama2")
    copied = copy_tokenizer(path, tmp_path / "run" / "tokenizer")
    assert (copied.parent / TEMPLATE_FILE).read_bytes() == (path.parent / TEMPLATE_FILE).read_bytes()
    assert tokenize_conversation(Tokenizer(copied), CONV) == tokenize_conversation(Tokenizer(path), CONV)


def test_no_template_is_chatml(tmp_path: Path) -> None:
    """chatforge's own tokenizers (no tokenizer_config.json) keep ChatML."""
    path = _tokenizer_dir(tmp_path / "t", "chatml")
    (tmp_path / "t" / TEMPLATE_FILE).unlink()
    tok = Tokenizer(path)
    assert tok.chat_template is None and tok.end_of_turn_id == tok.im_end_id
    ids, _ = tokenize_conversation(tok, CONV[1:3])
    assert ids[0] == tok.im_start_id  # no default system prompt: ChatML as chat.py renders it


def test_a_template_as_save_pretrained_writes_it(tmp_path: Path) -> None:
    """transformers' save_pretrained puts the template in chat_template.jinja: read from there,
    and copied with the tokenizer."""
    source = Tokenizer(_tokenizer_dir(tmp_path / "t", "llama2"))
    hf = _transformers(source)
    hf.save_pretrained(str(tmp_path / "saved"))  # type: ignore[attr-defined]
    assert (tmp_path / "saved" / "chat_template.jinja").is_file()
    tok = Tokenizer(tmp_path / "saved" / "tokenizer.json")
    chat = [{"role": m.role, "content": m.content} for m in CONV]
    assert tokenize_conversation(tok, CONV)[0] == list(hf.apply_chat_template(  # type: ignore[attr-defined]
        chat, tokenize=True, return_dict=False))
    copied = copy_tokenizer(tok.path, tmp_path / "run")
    assert (tmp_path / "run" / "chat_template.jinja").is_file() and Tokenizer(copied).chat_template is not None

"""Train a sentencepiece tokenizer with the chat format's special tokens.

    python -m tools.tokenizer --input FILE [FILE ...] --out PREFIX --vocab-size N \
        [--model-type bpe|unigram]

writes PREFIX.model (and PREFIX.vocab) and prints the .model path. The training itself is
trainer/data/tokenizer_training.py (the trainer trains a run's tokenizer with it too).
"""
from __future__ import annotations

import argparse
from typing import Sequence

from trainer.data.tokenizer_training import MODEL_TYPES, train_tokenizer


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tools.tokenizer", description=__doc__.split("\n")[0])
    parser.add_argument("--input", nargs="+", required=True, help="plain text file(s)")
    parser.add_argument("--out", required=True, help="output prefix: writes PREFIX.model")
    parser.add_argument("--vocab-size", type=int, required=True)
    parser.add_argument("--model-type", choices=MODEL_TYPES, default="bpe")
    parser.add_argument("--character-coverage", type=float, default=1.0)
    parser.add_argument("--max-sentences", type=int, default=200_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    path = train_tokenizer(
        args.out, args.vocab_size, files=args.input, model_type=args.model_type,
        character_coverage=args.character_coverage, max_sentences=args.max_sentences, seed=args.seed,
    )
    print(path)


if __name__ == "__main__":
    main()

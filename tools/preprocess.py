"""Tokenize plain text files into an indexed token file for pretraining.

    python -m tools.preprocess --input F [F ...] --tokenizer M.model --out PREFIX

A document is a paragraph: lines up to the next blank (or whitespace-only) line; each ends
with the EOD token. Writes PREFIX.{bin,idx.npy,json} (trainer/data/indexed.py) and prints
the stats. The work is trainer/data/preprocess.py (data.format=text runs use it too).
"""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from typing import Sequence

from trainer.data.preprocess import preprocess_text


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tools.preprocess", description=__doc__.split("\n")[0])
    parser.add_argument("--input", nargs="+", required=True, help="plain text file(s)")
    parser.add_argument("--tokenizer", required=True, help="sentencepiece .model")
    parser.add_argument("--out", required=True, help="output prefix: writes PREFIX.bin/.idx.npy/.json")
    args = parser.parse_args(argv)
    stats = preprocess_text(args.input, args.tokenizer, args.out)
    print(json.dumps(asdict(stats)))


if __name__ == "__main__":
    main()

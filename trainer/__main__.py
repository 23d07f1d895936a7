"""`python -m trainer <run-dir>/config.yaml`: parse -> build -> run -> close."""
from __future__ import annotations

import sys

from trainer import runtime
from trainer.loop import run
from trainer.stages import build_stage


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m trainer <run-dir>/config.yaml", file=sys.stderr)
        return 2
    cfg = runtime.load_config(argv[0])
    ctx = runtime.start(cfg)
    try:
        stage = build_stage(ctx)
        code = run(ctx, stage)
    finally:
        runtime.close(ctx)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

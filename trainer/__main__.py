"""`python -m trainer <run-dir>/config.yaml`: parse -> build -> run -> close.

Imports happen inside main(): megatron's checkpoint writer starts a helper process with
multiprocessing's spawn method, which re-imports this module; keeping it light makes the
first checkpoint save about 5 s faster."""
from __future__ import annotations

import sys


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m trainer <run-dir>/config.yaml", file=sys.stderr)
        return 2
    from trainer import runtime
    from trainer.checkpoint_files import CheckpointError
    from trainer.loop import run
    from trainer.rewards import RewardError
    from trainer.stages import build_stage

    cfg = runtime.load_config(argv[0])
    ctx = runtime.start(cfg)
    try:
        stage = build_stage(ctx)
        if hasattr(stage, "run"):  # a job without training steps (best_of_n, eval)
            code = int(stage.run())
            if code == 0:
                runtime.mark_done(ctx, stage.name, 0)
            return code
        return run(ctx, stage)
    except (CheckpointError, RewardError) as exc:
        # A damaged or missing checkpoint, or a reward function that failed, is the user's to
        # fix: one clear line, no traceback (nothing was saved after the last checkpoint).
        print(f"chatforge: error: {exc}", file=sys.stderr, flush=True)
        return 2
    finally:
        runtime.close(ctx)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

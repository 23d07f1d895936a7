"""Exit codes of `python -m trainer` that the launcher acts on. Torch-free."""

EXIT_OK = 0
# Stopped by SIGTERM/SIGUSR1 after saving a checkpoint: requeue the job and it resumes
# (EX_TEMPFAIL from sysexits.h: "try again later").
EXIT_REQUEUE = 75
# Stopped by the non-finite guard: train.max_bad_steps consecutive steps had a NaN/Inf loss or
# gradient. Nothing was saved after the last good step; requeueing would only repeat it.
EXIT_NONFINITE = 76
# Stopped by the launcher's watchdog: a rank made no progress (no heartbeat) for
# train.hang_timeout seconds. Every rank was stopped; the last complete checkpoint resumes.
EXIT_HANG = 77

# What the launchers say about a rank that exited with one of these codes.
MEANING = {EXIT_NONFINITE: "stopped by the non-finite guard (train.max_bad_steps consecutive "
                           "NaN/Inf steps; nothing saved after the last good step)",
           EXIT_HANG: "stopped by the watchdog (a rank made no progress for train.hang_timeout "
                      "seconds; the last complete checkpoint resumes)"}

# Written into the run directory (atomically, by rank 0) when a run reaches its end:
# train.steps done, or a job without steps finished. A recipe skips a step that has it.
DONE_FILE = "done.json"

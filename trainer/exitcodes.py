"""Exit codes of `python -m trainer` that the launcher acts on. Torch-free."""

EXIT_OK = 0
# Stopped by SIGTERM/SIGUSR1 after saving a checkpoint: requeue the job and it resumes
# (EX_TEMPFAIL from sysexits.h: "try again later").
EXIT_REQUEUE = 75

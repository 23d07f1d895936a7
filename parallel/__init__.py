"""The only package that imports megatron.core.

Submodules import torch and megatron lazily (import them directly, e.g.
`from parallel.engine import Engine`); this package itself stays torch-free so that
importing one light submodule stays light. Its config schema is chatforge_config.parallel.
"""

import warnings as _warnings

# Megatron warns at import, on every rank, that it falls back from apex/Transformer Engine
# to plain torch. Those fallbacks are how chatforge runs on CPU, so the warnings are noise.
for _pattern in (".*Transformer Engine and Apex are not installed.*",
                 ".*Apex is not installed.*", ".*full scope is deprecated.*",
                 ".*CUDA_DEVICE_MAX_CONNECTIONS.*"):
    _warnings.filterwarnings("ignore", message=_pattern)

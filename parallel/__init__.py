"""The only package that imports megatron.core.

Submodules import torch and megatron lazily (import them directly, e.g.
`from parallel.engine import Engine`); this package itself stays torch-free so that the
launcher can read `parallel.config`.
"""

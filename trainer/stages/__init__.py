"""Stages: each differs only in data, step_fn, loss and the engines it holds."""

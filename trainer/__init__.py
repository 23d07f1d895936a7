"""The one training loop, the stages, losses and data. `python -m trainer <config.yaml>`."""

"""The config schema: every group's dataclasses, the floor every other package stands on.

One module per owner: `launcher` (cluster, recipe), `parallel` (model, layout, optimizer,
LoRA) and `trainer` (stages, data, training, the RL and evaluation groups, and the root
`Config` that ties every group together: the trainer reads the whole resolved file).

The schema lives below launcher/, trainer/ and parallel/ rather than with any of them because
all three read it: the launcher composes and validates with it, the trainer loads the
resolved config onto it, parallel builds models from it. So it imports nothing of ours and
nothing but the standard library (no torch: the launcher must stay torch-free); the layer
contracts in pyproject.toml ([tool.importlinter]) hold it to that.
"""

"""Register the structured root schema with Hydra so that conf/ only holds values.

conf/config.yaml starts its defaults list with `base_config`: Hydra then merges every
YAML value onto the typed dataclasses, so a misspelled key or a wrong type fails at
composition instead of deep inside the trainer.
"""
from __future__ import annotations

from pathlib import Path

from hydra.core.config_store import ConfigStore

from chatforge_config.trainer import Config

SCHEMA_NAME = "base_config"

# conf/ ships next to the launcher package (a sibling in the source tree and in site-packages,
# see pyproject's package-data), so an absolute path works for editable and wheel installs.
CONF_DIR: Path = Path(__file__).resolve().parent.parent / "conf"


def register_schema() -> None:
    """Store the root schema under SCHEMA_NAME; storing twice just replaces the node."""
    ConfigStore.instance().store(name=SCHEMA_NAME, node=Config)

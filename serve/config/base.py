"""The base of every config section: unknown keys are refused, so a misspelt option fails at deploy."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def absolute_local_path(value: str) -> str:
    """A model source or cache directory as every replica reads it: relative and `~` paths pinned where they are
    given (replicas do not share the driver's working directory); hub ids and s3:// prefixes as they are."""
    if value.startswith((".", "~")) or (os.sep in value and not value.startswith("s3://")):
        path = Path(value).expanduser()
        if value.startswith((".", "~")) or path.exists():
            return str(path.resolve())
    return value

"""The base of every config section: unknown keys are refused, so a misspelt option fails at deploy."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")

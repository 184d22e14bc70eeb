"""The project's strict pydantic base models: a key a model does not define is
refused when the input is loaded, so a typo is an error naming it, never a
setting silently ignored. Every validated model of every layer derives from one
of these two."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Strict(BaseModel):
    """A model that refuses unknown keys."""

    model_config = ConfigDict(extra="forbid")


class FrozenStrict(Strict):
    """A Strict model whose instances cannot be changed once validated."""

    model_config = ConfigDict(extra="forbid", frozen=True)

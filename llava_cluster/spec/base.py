"""The base of every spec section: an unknown key is refused (a typo must not silently fall back to a
default), and a value assigned after loading is validated like a loaded one."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

"""How a config section says a value is wrong: `check(ok, key, msg)` inside its `validate()`.

A section knows only its own keys ("weight", not "data.sources.0.weight"); the walker in
aimv2.config.load adds the path, so one section type serves under any parent and the message
still names the full dotted key a user types.
"""

from __future__ import annotations

from aimv2.errors import UserError


class InvalidValue(UserError):
    """A value of a section is wrong; `key` is relative to the section ("" for the section itself)."""

    def __init__(self, key: str, msg: str):
        super().__init__(f"config key '{key}': {msg}" if key else msg)
        self.key, self.msg = key, msg


def check(ok: bool, key: str, msg: str) -> None:
    """Raise InvalidValue(key, msg) unless `ok`."""
    if not ok:
        raise InvalidValue(key, msg)

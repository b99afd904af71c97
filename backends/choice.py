"""``Choice``: a string enum for option names, defined once: members equal their strings
(``Strategy.ritz == "ritz"``); an unknown name raises ``ValueError`` listing the valid ones
(the Hydra schema uses the same enums, so a bad value fails at composition)."""

from __future__ import annotations

from enum import StrEnum
from typing import Any


class Choice(StrEnum):
    @classmethod
    def _missing_(cls, value: Any) -> Any:
        raise ValueError(f"unknown {cls.__name__} {value!r}; valid names are {', '.join(cls)}")

"""``Choice``: a string enum for option names (strategies, stop rules, backends, ...).

Members equal their strings (``Strategy.ritz == "ritz"``), so a name is defined once and
compared, printed and stored as text; an unknown name raises ``ValueError`` listing the
valid ones.  The Hydra schema uses the same enums, so a bad value fails at composition.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any


class Choice(StrEnum):
    @classmethod
    def _missing_(cls, value: Any) -> Any:
        raise ValueError(f"unknown {cls.__name__} {value!r}; valid names are {', '.join(cls)}")

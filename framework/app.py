"""The ``hyperkrylov`` console command."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    """Entry point; the Hydra experiment runner replaces this as it lands."""
    print("hyperkrylov: recycled Krylov hypergradients for bilevel learning")
    return 0


if __name__ == "__main__":
    sys.exit(main())

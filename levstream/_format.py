"""Plain-text output shared by the command line and the demo: aligned tables and byte counts."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["format_bytes", "print_table"]


def print_table(rows: Sequence[tuple[str, str]]) -> None:
    """Print ``(label, value)`` pairs as two aligned columns.

    Examples
    --------
    >>> print_table([("n", "10"), ("dim", "64")])
      n    10
      dim  64
    """
    width = max(len(label) for label, _ in rows)
    for label, value in rows:
        print(f"  {label:<{width}}  {value}")


def format_bytes(nbytes: float) -> str:
    """``nbytes`` in B, kB, MB or GB (powers of 1000).

    Examples
    --------
    >>> format_bytes(512), format_bytes(1_234_567)
    ('512 B', '1.2 MB')
    """
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:,.1f} {unit}"
    return f"{nbytes:,.0f} B"

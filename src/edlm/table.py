"""One renderer for every results table: the CLI's aligned text and the reports' markdown from the same rows.

A column's header says how it aligns: ``"<name"`` left (names, dtypes, text), ``"name"`` right (numbers). Cells
are what the caller formatted (``f"{x:.2f}"``) or any value, shown with ``str``; ``None`` shows as ``n/a``.

    >>> t = Table("batch", "<system", "tokens/s")
    >>> t.add(1, "ar", "42.0").add(1, "dlm", "81.5")
    >>> print(t.text())
    batch system tokens/s
        1 ar         42.0
        1 dlm        81.5
"""

from __future__ import annotations

from typing import Any


class Table:
    def __init__(self, *headers: str) -> None:
        self.left = [h.startswith("<") for h in headers]
        self.headers = [h.removeprefix("<") for h in headers]
        self.rows: list[list[str]] = []

    def add(self, *cells: Any) -> Table:
        if len(cells) != len(self.headers):
            raise ValueError(f"a row of {len(cells)} cells for {len(self.headers)} columns ({self.headers})")
        self.rows.append(["n/a" if c is None else str(c) for c in cells])
        return self

    def text(self) -> str:
        """Aligned columns, one space apart (the CLI)."""
        rows = [self.headers, *self.rows]
        widths = [max(len(r[i]) for r in rows) for i in range(len(self.headers))]
        return "\n".join(" ".join(c.ljust(w) if left else c.rjust(w) for c, w, left in zip(r, widths, self.left))
                         .rstrip() for r in rows)

    def markdown(self) -> str:
        """A markdown table (the reports)."""
        rule = ["---" if left else "---:" for left in self.left]
        return "\n".join("| " + " | ".join(r) + " |" for r in (self.headers, rule, *self.rows))


def pct(x: float | None, spec: str = ".1f") -> str | None:
    """A fraction as a percentage (``0.5`` -> ``50.0%``); None stays None."""
    return None if x is None else f"{100 * x:{spec}}%"

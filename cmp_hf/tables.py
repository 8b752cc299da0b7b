"""Result tables as the benchmarks and ``recipes/report.py`` publish them: Markdown to read, CSV to reuse."""

from __future__ import annotations

import csv
from pathlib import Path


def publish(markdown: str, rows: list[dict], out: str | None) -> None:
    """Print the Markdown; with ``out``, also write ``<out>.md`` and the rows as ``<out>.csv``."""
    print(markdown)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(f"{out}.md").write_text(markdown)
        with open(f"{out}.csv", "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)

"""Result tables as the benchmarks and ``recipes/report.py`` publish them: Markdown to read, CSV to reuse."""

from __future__ import annotations

import csv
import io

from .atomic import write_text


def publish(markdown: str, rows: list[dict], out: str | None) -> None:
    """Print the Markdown; with ``out``, also write ``<out>.md`` and the rows as ``<out>.csv``."""
    print(markdown)
    if out:
        write_text(f"{out}.md", markdown)
        table = io.StringIO(newline="")
        writer = csv.DictWriter(table, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
        write_text(f"{out}.csv", table.getvalue())

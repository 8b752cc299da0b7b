"""The paper's tables from a folder of finished runs (prompt, run.json, metrics.json), optionally pushed to the Hub.

    python recipes/report.py runs --out runs/report [--push_to_hub user/cmp-hf-results]

Few-shot (a column per dataset, plus the average), base-to-novel (base, novel and harmonic mean of accuracy, ECE,
ACE and MCE per dataset and on average, CoCoOp's convention) and ImageNet -> V2 / Sketch / A / R, each with the
methods as rows per learner and mean +- std over seeds (n seeds): ``cmp_hf.paper_tables``. ``--out`` writes
``<out>.md`` and the long-format ``<out>.csv``; ``--push_to_hub`` uploads both to a Hub dataset repo with a card.
Runs that were started but did not finish (failed, still running or killed) are listed first, with their state and
last error line as ``recipes/sweep.py --status`` gives them: their cells are missing or have fewer seeds.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from cmp_hf.hub import HubError, push_results
from cmp_hf.paper_tables import load_runs, paper_tables, publish, unfinished_note, unfinished_runs


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs_dir")
    parser.add_argument("--out", default=None, help="write <out>.md and <out>.csv")
    parser.add_argument("--push_to_hub", default=None, metavar="REPO", help="Hub dataset repo for the CSV + tables")
    parser.add_argument("--private", action="store_true", default=None)
    args = parser.parse_args(argv)
    runs, unfinished = load_runs(args.runs_dir), unfinished_runs(args.runs_dir)
    if not runs:
        note = f"\n\n{unfinished_note(unfinished)}" if unfinished else ""
        raise SystemExit(f"No runs with metrics.json and run.json under {args.runs_dir}.{note}")
    markdown, rows = paper_tables(runs)
    if unfinished:  # said first, and kept with the tables wherever they go
        markdown = f"{unfinished_note(unfinished)}\n\n{markdown}"
    with tempfile.TemporaryDirectory() as scratch:
        out = args.out or os.path.join(scratch, "report")
        publish(markdown, rows, out)
        if args.push_to_hub:
            try:
                url = push_results(Path(f"{out}.csv"), Path(f"{out}.md"), args.push_to_hub, private=args.private)
            except HubError as error:
                raise SystemExit(f"error: {error}") from error
            print(f"pushed {len(rows)} rows and the tables to {url}")
    return markdown


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Measure the ten notebooks' offline variants for docs/techniques.md.

Each offline recipe runs once, at its own budget, through ``peftlab compare`` (one process
per recipe, so each peak memory is its own): trainable parameters and share, peak memory of
the training loop (RSS on a CPU), training time, wall time and the main metric. Finished
runs are kept and skipped on a re-run (compare's own resume).

    python scripts/measure_notebooks.py [--out runs/measure] [--only 1,2]

Prints a Markdown table and writes it, with the date, machine and library versions, to
OUT/techniques.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/measure")
    parser.add_argument("--only", default="", help="comma-separated notebook numbers")
    args = parser.parse_args()
    from peftlab.catalog import NOTEBOOKS, workflows

    only = {int(n) for n in args.only.split(",") if n}
    out = Path(args.out)
    rows = []
    for number, (full, offline) in workflows().items():
        if only and number not in only:
            continue
        method = offline.raw()["method"]["name"]
        target = out / offline.name
        command = [sys.executable, "-m", "peftlab", "compare", f"recipe:{offline.name}", "--methods", method,
                   "-o", str(target)]
        print("$", " ".join(command[1:]), flush=True)
        subprocess.run(command, check=False, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        results = target / "results.json"
        if not results.is_file():
            print(f"notebook {number}: no results", file=sys.stderr)
            continue
        row = json.loads(results.read_text())["rows"][0]
        rows.append((number, NOTEBOOKS[number], offline.name, row))
    import peft
    import torch
    import transformers

    import peftlab

    lines = [f"Measured {datetime.now(timezone.utc):%Y-%m-%d} on {os.cpu_count()} CPU cores "
             f"({platform.machine()}), torch {torch.__version__}, transformers {transformers.__version__}, "
             f"peft {peft.__version__}, peftlab {peftlab.__version__}.", "",
             "| # | offline recipe | trainable | share | peak memory (train) | training time | metric |",
             "|---|---|---|---|---|---|---|"]
    for number, _, name, row in rows:
        if row["status"] != "ok":
            lines.append(f"| {number} | `{name}` | failed: {row['error'][:80]} | | | | |")
            continue
        lines.append(f"| {number} | `{name}` | {row['trainable_params']:,} | {100 * row['trainable_share']:.3g}% | "
                     f"{row['peak_memory_mb'] / 1024:.2f} GB | {row['train_seconds']:.0f} s "
                     f"({row['steps']} steps) | {row['main_metric']} {row['main_value']:.4f} |")
    text = "\n".join(lines)
    print(text)
    out.mkdir(parents=True, exist_ok=True)
    (out / "techniques.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

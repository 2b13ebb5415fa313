"""``peftlab compare``: every technique on the user's model, data and budget, side by side.

    plan.py     the runs: techniques x learning rates x seeds, each a full RunConfig
    runner.py   trains them through train(), one row per run, kept across failures and re-runs
    measure.py  peak memory, throughput and loss curve, measured around train()
    display.py  the progress display across runs
    report.py   results.csv / .md and the self-contained report.html
    plots.py    the report's figures
"""

from peftlab.comparison.plan import DEFAULT_LEARNING_RATES, parse_method_overrides
from peftlab.comparison.runner import CompareResult, compare

__all__ = ["DEFAULT_LEARNING_RATES", "CompareResult", "compare", "parse_method_overrides"]

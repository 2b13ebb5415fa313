"""Calibrate the default learning rates: sweep each technique's rate on an offline comparison recipe.

    python scripts/calibrate_defaults.py [--recipe recipe:minilm-rotten-tomatoes] [--methods a,b,...]
                                         [--factors 1,3,10] [--seeds 42,0] [-o runs/calibrate-minilm]
    python scripts/calibrate_defaults.py -o runs/calibrate-minilm --report-only

For every factor it runs ``peftlab compare`` on the recipe with each method's learning rate set to
its registered default x the factor (one comparison folder per factor, so finished runs are kept:
run it again with more factors or seeds and only the new runs train). Then it reads every run
under the output folder and prints, per method, the mean score over seeds at each rate, the
majority-class baseline the comparisons recorded (classification; "beats" is reckoned as the
comparison's verdict reckons it), and the chosen rate: the best
mean, and the smallest rate within one point of it (a faster rate that is no better is not
chosen); the default itself stays unless the best rate beats it by more than the comparison's margin (two
standard errors of the default's score on the evaluation rows: one seed on 100 rows cannot tell 0.75 from
0.77). ``--report-only`` skips training. The table and the chosen rates are written to
``calibration.json`` and ``calibration.md`` in the output folder (docs/techniques.md quotes them).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
from pathlib import Path


def majority(out: Path) -> dict | None:
    """The majority-class baseline the comparisons recorded (results.json), or None (not classification)."""
    for results in sorted(out.glob("x*/results.json")):
        found = (json.loads(results.read_text()).get("baselines") or {}).get("majority")
        if found:
            return found
    return None


def run_factor(config, methods: list[str], factor: float, seeds: list[int], out: Path) -> None:
    from peftlab import compare
    from peftlab.comparison.plan import default_learning_rate

    overrides = {m: [f"training.learning_rate={default_learning_rate(m, config.task) * factor:.3g}"] for m in methods}
    compare(config, methods=methods, seeds=seeds, method_overrides=overrides, out_dir=out / f"x{factor:g}")


def collect(out: Path) -> tuple[dict[str, dict[float, list[float]]], dict[str, float]]:
    """(method -> learning rate -> main metric per finished seed, method -> the default rate swept from), over every
    factor folder (``x<factor>``: the rate over the factor is the default the sweep started from, whatever the
    registry says now)."""
    scores: dict[str, dict[float, list[float]]] = {}
    swept_from: dict[str, float] = {}
    for results in sorted(out.glob("x*/results.json")):
        factor = float(results.parent.name[1:])
        for row in json.loads(results.read_text())["rows"]:
            if row.get("status") == "ok" and row.get("main_value") is not None:
                lr = float(row["learning_rate"])
                scores.setdefault(row["method"], {}).setdefault(lr, []).append(float(row["main_value"]))
                swept_from.setdefault(row["method"], float(f"{lr / factor:.3g}"))
    return scores, swept_from


def choose(rates: dict[float, list[float]], default: float | None = None, keep_margin: float = 0.0,
           tolerance: float = 0.01) -> float:
    """The smallest rate within ``tolerance`` of the best mean; but the default itself unless the best beats it by
    more than ``keep_margin`` (the comparison's margin: a default moves only on clear evidence)."""
    means = {lr: statistics.fmean(v) for lr, v in rates.items()}
    best = max(means.values())
    current = next((lr for lr in means if default is not None and math.isclose(lr, default, rel_tol=1e-6)), None)
    if current is not None and best - means[current] <= keep_margin:
        return current
    return min(lr for lr, mean in means.items() if mean >= best - tolerance)


def report(out: Path) -> dict:
    from peftlab.comparison.baselines import beats, margin

    scores, defaults = collect(out)
    if not scores:
        raise SystemExit(f"no finished runs under {out}/x*/results.json: run the sweep first (without --report-only)")
    reference = majority(out)
    baseline = reference["value"] if reference else None
    factors = sorted({round(lr / defaults[m], 3) for m, per in scores.items() for lr in per})
    lines = ["| method | default rate | " + " | ".join(f"x{f:g}" for f in factors) + " | chosen rate | beats majority |",
             "|---|---|" + "---|" * len(factors) + "---|---|"]
    chosen = {}
    for method, per in scores.items():
        current = statistics.fmean(next((v for lr, v in per.items() if math.isclose(lr, defaults[method], rel_tol=1e-6)),
                                        [baseline or 0.0]))
        pick = choose(per, defaults[method], margin(reference["metric"], current, reference.get("samples"))
                      if reference else 0.0)
        mean = statistics.fmean(per[pick])
        chosen[method] = {"learning_rate": pick, "score": mean, "seeds": len(per[pick]),
                          "beats_majority": None if reference is None else beats(
                              mean, baseline, reference["metric"],
                              margin(reference["metric"], baseline, reference.get("samples")))}
        by_factor = {round(lr / defaults[method], 3): v for lr, v in per.items()}
        cells = [f"{statistics.fmean(by_factor[f]):.3f}" + (f" ({len(by_factor[f])} seeds)" if len(by_factor[f]) > 1
                                                            else "") if f in by_factor else "" for f in factors]
        verdict = "" if baseline is None else ("yes" if chosen[method]["beats_majority"] else "**no**")
        lines.append(f"| `{method}` | {defaults[method]:g} | " + " | ".join(cells) + f" | {pick:g} | {verdict} |")
    table = "\n".join(lines)
    summary = {"baseline_majority": baseline, "defaults": {m: defaults[m] for m in scores}, "chosen": chosen,
               "scores": {m: {f"{lr:g}": v for lr, v in per.items()} for m, per in scores.items()}}
    (out / "calibration.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "calibration.md").write_text(table + "\n")
    print(table)
    if baseline is not None:
        print(f"majority-class baseline on the evaluation split: {baseline:.3f}")
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="recipe:minilm-rotten-tomatoes")
    parser.add_argument("--methods", help="comma-separated (default: every technique that fits the task)")
    parser.add_argument("--factors", default="1,3,10", help="multiples of each method's default rate")
    parser.add_argument("--seeds", default="42", help="comma-separated seeds")
    parser.add_argument("--set", action="append", default=[], help="recipe overrides, key=value")
    parser.add_argument("-o", "--out", type=Path, default=Path("runs/calibrate"))
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from peftlab import load_config
    from peftlab.comparison.plan import methods_for

    config = load_config(args.recipe, args.set)
    methods = methods_for(config, args.methods.split(",") if args.methods else None)
    seeds = [int(s) for s in args.seeds.split(",")]
    if not args.report_only:
        for factor in (float(f) for f in args.factors.split(",")):
            print(f"--- factor x{factor:g}: {len(methods)} methods x {len(seeds)} seed(s)", flush=True)
            run_factor(config, methods, factor, seeds, args.out)
    report(args.out)


if __name__ == "__main__":
    sys.exit(main())

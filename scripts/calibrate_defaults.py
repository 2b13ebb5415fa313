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
chosen). ``--report-only`` skips training. The table and the chosen rates are written to
``calibration.json`` and ``calibration.md`` in the output folder (docs/techniques.md quotes them).
"""

from __future__ import annotations

import argparse
import json
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


def collect(out: Path) -> dict[str, dict[float, list[float]]]:
    """method -> learning rate -> main metric per finished seed, over every factor folder."""
    scores: dict[str, dict[float, list[float]]] = {}
    for results in sorted(out.glob("x*/results.json")):
        for row in json.loads(results.read_text())["rows"]:
            if row.get("status") == "ok" and row.get("main_value") is not None:
                scores.setdefault(row["method"], {}).setdefault(float(row["learning_rate"]), []).append(
                    float(row["main_value"]))
    return scores


def choose(rates: dict[float, list[float]], tolerance: float = 0.01) -> float:
    means = {lr: statistics.fmean(v) for lr, v in rates.items()}
    best = max(means.values())
    return min(lr for lr, mean in means.items() if mean >= best - tolerance)


def report(out: Path, defaults: dict[str, float]) -> dict:
    from peftlab.comparison.baselines import beats, margin

    scores = collect(out)
    reference = majority(out)
    baseline = reference["value"] if reference else None
    factors = sorted({round(lr / defaults[m], 3) for m, per in scores.items() for lr in per})
    lines = ["| method | default rate | " + " | ".join(f"x{f:g}" for f in factors) + " | chosen rate | beats majority |",
             "|---|---|" + "---|" * len(factors) + "---|---|"]
    chosen = {}
    for method, per in scores.items():
        pick = choose(per)
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
    from peftlab.comparison.plan import default_learning_rates, methods_for

    config = load_config(args.recipe, args.set)
    defaults = default_learning_rates(config.task)  # read before the registry changes: the rates swept from
    methods = methods_for(config, args.methods.split(",") if args.methods else None)
    seeds = [int(s) for s in args.seeds.split(",")]
    if not args.report_only:
        for factor in (float(f) for f in args.factors.split(",")):
            print(f"--- factor x{factor:g}: {len(methods)} methods x {len(seeds)} seed(s)", flush=True)
            run_factor(config, methods, factor, seeds, args.out)
    report(args.out, defaults)


if __name__ == "__main__":
    sys.exit(main())

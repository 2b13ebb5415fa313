"""The verdict a comparison opens with (report and terminal): did the methods learn more than a model that
learned nothing, did their runs converge, the likely cause when not, and the command to run next.

The rules (what "beats" and "the loss fell" mean) are in :mod:`peftlab.comparison.baselines`. The likely
causes, in the order they are checked:

- too few training examples for the classes: each run saw fewer than ``EXAMPLES_PER_CLASS`` (50)
  examples per class (steps x batch size x accumulation / classes);
- the training loss did not fall by 10%: too few steps, or a learning rate too low for the budget;
- it rose (or was not finite): a learning rate too high;
- the eval loss is no lower than that of predicting the training label shares (the majority baseline's
  loss): the model learned how common each label is, not the task.

The next command is the comparison's own (as typed, when the CLI passed it) for the methods concerned, with
a step budget 4x as large (at least 50 examples per class, and at least what the calibration found those methods
need: their registry budget hints) and, without a sweep yet, ``--lr-sweep 3``, into
a folder of its own.
"""

from __future__ import annotations

import math
import re
import shlex
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from peftlab.comparison.baselines import EXAMPLES_PER_CLASS, LOSS_DROP, margin_rule
from peftlab.comparison.summary import Group, Summary
from peftlab.methods import METHODS

STEP_FACTOR = 4  # the next command's budget: this many times the steps
PRIOR_LOSS = 0.97  # an eval loss above 97% of the label shares' loss: nothing learned beyond the shares


@dataclass
class Verdict:
    level: str  # "ok" or "warning"
    headline: str
    causes: list[str] = field(default_factory=list)  # the likely causes, or what else to know
    command: str | None = None  # the command to run next

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def lines(self) -> list[str]:
        return ([self.headline] + [f"- {cause}" for cause in self.causes]
                + ([f"next: {self.command}"] if self.command else []))


def _names(groups: list[Group], sweep: bool) -> str:
    names = [g.label(sweep) for g in groups]
    return ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")


def _nice(steps: float) -> int:
    """Rounded up to two significant digits: 132 -> 140."""
    scale = 10 ** max(0, int(math.log10(max(steps, 1))) - 1)
    return int(math.ceil(steps / scale) * scale)


def _not_falling(groups: list[Group]) -> list[Group]:
    return [g for g in groups if "fell" not in g.loss_trends()]


def _rising(groups: list[Group]) -> list[Group]:
    return [g for g in groups if "rose" in g.loss_trends()]


def _budget(summary: Summary, header: dict[str, Any], groups: list[Group]) -> dict[str, Any]:
    training = header["base_config"]["training"]
    steps = max((row.get("steps") or 0 for g in groups for row in g.ok), default=0)
    batch = training["batch_size"] * training["gradient_accumulation_steps"]
    classes = (summary.baselines.get("majority") or {}).get("classes")
    needed = math.ceil(EXAMPLES_PER_CLASS * classes / batch) if classes else 0
    task = header["base_config"].get("task")
    hinted = [hint.steps_at(batch) for g in groups if (hint := _hint(g.method, task)) and hint.short_of(steps, batch)]
    return {"task": task, "steps": steps, "batch": batch, "seen": steps * batch,
            "classes": classes,
            "per_class": steps * batch / classes if classes else None,
            "next_steps": _nice(max(STEP_FACTOR * max(steps, 1), needed, *(s for s in hinted if s)))}


def _hint(method: str, task: str | None):
    spec = METHODS.get(method)
    return spec.budget_hints.get(task) if spec is not None and task else None


def _causes(summary: Summary, groups: list[Group], budget: dict[str, Any]) -> list[str]:
    sweep, causes = summary.sweep, []
    if budget["classes"] and budget["per_class"] < EXAMPLES_PER_CLASS:
        causes.append(f"too few steps for {budget['classes']} classes: each run saw {budget['steps']:,} "
                      f"step{'s' if budget['steps'] != 1 else ''} x batch "
                      f"{budget['batch']} = {budget['seen']:,} training examples, about {budget['per_class']:.0f} per "
                      f"class (fewer than {EXAMPLES_PER_CLASS})")
    rising = _rising(groups)
    flat = [g for g in _not_falling(groups) if g not in rising]
    if flat:
        causes.append(f"the training loss fell by less than {LOSS_DROP:.0%} in {_names(flat, sweep)}: too few steps, "
                      "or a learning rate too low for this budget")
    if rising:
        causes.append(f"the training loss rose in {_names(rising, sweep)}: a learning rate too high")
    prior = ((summary.baselines.get("majority") or {}).get("metrics") or {}).get("loss")
    if prior:
        stuck = [g for g in groups if (g.mean_metric("loss") or 0) >= PRIOR_LOSS * prior]
        if stuck:
            causes.append(f"the eval loss of {_names(stuck, sweep)} is no lower than that of predicting the training "
                          f"label shares ({prior:.4f}): they learned how common each label is, not the task")
    if not causes:
        causes.append("the training loss fell, but not far enough in this budget: more steps, or another learning "
                      "rate")
    for method in dict.fromkeys(g.method for g in groups):  # what the calibration found (methods.budget_hints)
        hint = _hint(method, budget["task"])
        if hint:
            causes.append(f"{method}: {hint}" + (f" (these runs: {budget['steps']:,} step{'s' if budget['steps'] != 1 else ''} of batch "
                                                 f"{budget['batch']})"
                                                 if hint.short_of(budget["steps"], budget["batch"]) else ""))
    return causes


def next_command(header: dict[str, Any], methods: list[str] | None, max_steps: int, sweep: bool) -> str:
    """The comparison's command (as typed, where the CLI passed it) for ``methods``, with ``max_steps`` steps,
    ``--lr-sweep 3`` unless it swept already, into a folder of its own."""
    typed = list(header.get("command") or [])
    out = str(header.get("out_dir") or "runs/compare")
    replaced = {"--methods": methods is not None, "--lr-sweep": not sweep, "--out": True, "-o": True}
    kept, i = [], 0
    while i < len(typed):
        token = typed[i]
        name, eq, value = token.partition("=")
        takes_value = name in replaced or name in {"--set", "-s"}
        given = value if eq else (typed[i + 1] if takes_value and i + 1 < len(typed) else "")
        step = 1 if eq or not takes_value else 2
        if name in {"--out", "-o"}:
            out = given
        if replaced.get(name) or (name in {"--set", "-s"} and given.split("=", 1)[0].strip() == "training.max_steps"):
            i += step
            continue
        kept.extend(typed[i:i + step])
        i += step
    if not kept:
        kept = ["peftlab", "compare", "RECIPE.yaml"]
    extra = (["--methods", ",".join(methods)] if methods is not None else []) \
        + ["--set", f"training.max_steps={max_steps}"] + ([] if sweep else ["--lr-sweep", "3"])
    folder = Path(out)
    name = re.sub(r"-\d+steps$", "", folder.name) + f"-{max_steps}steps"
    return shlex.join(kept + extra + ["-o", str(folder.with_name(name))])


def verdict(summary: Summary, header: dict[str, Any]) -> Verdict | None:
    """What the comparison says, in a few lines; None when it has nothing to read (no finished run). With a
    learning-rate sweep each method is judged by its best rate (the table marks every rate)."""
    groups = [g for g in summary.groups if g.ok and (g.best_lr or not summary.sweep)]  # a sweep: each method's best
    if not groups:
        return None
    ref, metric, sweep = summary.reference, summary.main_metric, summary.sweep
    budget = _budget(summary, header, groups)
    not_falling = _not_falling(groups)
    swept = header.get("lr_sweep", 1) > 1

    def command(concerned: list[Group]) -> str:
        methods = list(dict.fromkeys(g.method for g in concerned))
        every = list(dict.fromkeys(g.method for g in groups))
        return next_command(header, None if methods == every else methods, budget["next_steps"], swept)

    if ref is None:
        if not not_falling:
            return None
        return Verdict("warning", f"The training loss of {_names(not_falling, sweep)} did not fall by "
                                  f"{LOSS_DROP:.0%}: those runs did not converge (no baseline for {metric} to "
                                  "compare them with).", _causes(summary, not_falling, budget), command(not_falling))
    rows = int(ref.get("samples") or 0)
    by = f"{ref['margin']:.4f} ({margin_rule(metric)}" + (f", on {rows:,} eval rows)" if rows else ")")
    scores = f"the {ref['name']} scores {metric} {ref['value']:.4f} ({ref['description']})"
    winners = [g for g in groups if g.beats_reference]
    losers = [g for g in groups if not g.beats_reference]
    if not winners:
        sign = -1 if summary.lower_is_better else 1
        best = max((g for g in groups if g.mean("main_value") is not None), key=lambda g: sign * g.mean("main_value"))
        return Verdict("warning",
                       f"No method beats the {ref['name']} by more than {by}: {scores}; the best method, "
                       f"{best.label(sweep)}, scores {best.mean('main_value'):.4f}. Within this budget the methods "
                       f"learned nothing the {ref['name']} does not know: read the table as that, not as \"these "
                       "methods do not work\".",
                       _causes(summary, groups, budget), command(groups))
    if losers:
        return Verdict("warning",
                       f"{_names(winners, sweep)} beat{'s' if len(winners) == 1 else ''} the {ref['name']} by more "
                       f"than {by}; {_names(losers, sweep)} do{'es' if len(losers) == 1 else ''} not (✗ in the "
                       f"table): {scores}.",
                       _causes(summary, losers, budget), command(losers))
    head = f"Every method beats the {ref['name']} by more than {by}: {scores}."
    if not_falling:
        return Verdict("warning", head + f" But the training loss of {_names(not_falling, sweep)} fell by less than "
                                         f"{LOSS_DROP:.0%}: not converged, its figures may change with more steps.",
                       _causes(summary, not_falling, budget), command(not_falling))
    return Verdict("ok", head)


"""peftlab compare: every technique on one model / data / budget, rows kept across failures,
interrupts and re-runs, and a report that renders (headless Chromium)."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from peftlab.checkpoint import TrainingInterrupted
from peftlab import build_config, cli, compare
from peftlab.comparison import DEFAULT_LEARNING_RATES, parse_method_overrides, runner
from peftlab.comparison.plan import plan_runs, sweep_factors
from peftlab.errors import ConfigError, MethodError
from peftlab.methods import METHODS
from peftlab.train import train

STEPS = 6


@pytest.fixture(scope="module")
def base_raw(tiny_models, keyword_data) -> dict:
    """A tiny seq-cls config; no learning rate, so every technique gets its default."""
    return {
        "model": {"name": str(tiny_models["bert"])},
        "task": "seq-cls",
        "data": {"train_file": str(keyword_data["train"]), "validation_file": str(keyword_data["validation"]),
                 "max_length": 32},
        "training": {"max_steps": STEPS, "batch_size": 16, "eval_strategy": "no", "seed": 0},
    }


CLASSIC = ["lora", "ia3", "prefix", "ptuning-v2", "prompt", "ptuning"]


@pytest.fixture(scope="module")
def all_methods(base_raw, tmp_path_factory):
    """The six classic techniques, two seeds: the comparison most tests read (the newer techniques and full
    fine-tuning: test_new_techniques_and_full_fine_tuning_compare)."""
    out = tmp_path_factory.mktemp("compare") / "all"
    return compare(build_config(base_raw), methods=CLASSIC, seeds=[0, 1], out_dir=out, progress=False)


def train_spy(monkeypatch, fail: dict[str, BaseException] | None = None) -> list[str]:
    """Record which methods train() is called for; raise ``fail[method]`` for some."""
    calls = []

    def spy(config, **kwargs):
        calls.append(config.method.name)
        if fail and config.method.name in fail:
            raise fail[config.method.name]
        return train(config, **kwargs)

    monkeypatch.setattr(runner, "train", spy)
    return calls


# --- the rows ---------------------------------------------------------------------------

def test_every_technique_and_seed_has_a_row_with_sane_values(all_methods):
    result = all_methods
    assert [row["name"] for row in result.rows] == [f"{m}-seed{s}" for m in CLASSIC for s in (0, 1)]
    assert result.ran == [row["name"] for row in result.rows] and not result.skipped and not result.failed
    for row in result.rows:
        assert row["status"] == "ok" and row["error"] is None
        assert row["main_metric"] == "accuracy" and 0 <= row["main_value"] <= 1
        assert row["metrics"]["accuracy"] == row["main_value"] and "f1_binary" in row["metrics"]
        assert 0 < row["trainable_params"] < row["total_params"]
        assert row["trainable_share"] == pytest.approx(row["trainable_params"] / row["total_params"])
        assert row["learning_rate"] == METHODS[row["method"]].learning_rate_for(row["task"])
        assert row["lr_source"] == "default"
        # adapter size is the file's size; the run folder is a standard adapter directory
        run_dir = result.out_dir / row["run_dir"]
        assert row["adapter_bytes"] == (run_dir / "adapter_model.safetensors").stat().st_size
        saved = yaml.safe_load((run_dir / "peftlab.yaml").read_text())
        assert saved["method"]["name"] == row["method"] and saved["training"]["seed"] == row["seed"]
        assert saved["training"]["max_steps"] == STEPS
        # measured around train(): memory, throughput, curve
        assert row["memory_kind"] == "rss"
        assert row["run_peak_memory_mb"] >= row["peak_memory_mb"] >= row["memory_at_start_mb"] > 50
        assert row["steps"] == STEPS and [step for step, _ in row["loss_curve"]] == list(range(1, STEPS + 1))
        assert all(math.isfinite(loss) and loss > 0 for _, loss in row["loss_curve"])
        assert row["tokens_per_second"] > row["samples_per_second"] > 0
        assert row["train_tokens"] >= STEPS * 16 * 3  # every keyword text has at least 4 words
        assert row["wall_seconds"] >= row["train_seconds"] > 0


def test_lora_trains_a_small_share_and_prompt_techniques_add_tokens(all_methods):
    rows = {row["name"]: row for row in all_methods.rows}
    lora, ptuning_v2 = rows["lora-seed0"], rows["ptuning-v2-seed0"]
    # full fine-tuning would train total_params (100%); LoRA trains a fraction of it
    assert lora["trainable_share"] < 0.2 and lora["trainable_params"] < lora["total_params"]
    # same architecture, same base: the total differs only by each technique's added weights
    frozen = lora["total_params"] - lora["trainable_params"]
    assert frozen == ptuning_v2["total_params"] - ptuning_v2["trainable_params"]
    assert rows["lora-seed0"]["loss_curve"] != rows["lora-seed1"]["loss_curve"], "seeds must change the run"


def test_outputs_json_csv_markdown(all_methods):
    out = all_methods.out_dir
    saved = json.loads((out / "results.json").read_text())
    assert saved["rows"] == all_methods.rows and saved["seeds"] == [0, 1]
    with (out / "results.csv").open() as handle:
        table = list(csv.DictReader(handle))
    assert [r["name"] for r in table] == [row["name"] for row in all_methods.rows]
    assert float(table[0]["metric_accuracy"]) == all_methods.rows[0]["main_value"]
    assert int(table[0]["adapter_bytes"]) == all_methods.rows[0]["adapter_bytes"]
    markdown = (out / "results.md").read_text()
    lines = [line for line in markdown.splitlines() if line.startswith("| ") and not line.startswith("| *")]
    assert len(lines) == 1 + len(CLASSIC)  # header + one line per method (seeds averaged)
    references = [line.split("|")[1].strip() for line in markdown.splitlines() if line.startswith("| *")]
    assert references == ["*majority class*", "*untrained adapter*"]  # below the methods (tests/test_compare_baselines.py)
    assert set(saved["baselines"]) == {"majority", "untrained"} and saved["verdict"]["headline"]
    lora = next(line for line in lines if line.startswith("| lora |"))
    mean = (all_methods.rows[0]["main_value"] + all_methods.rows[1]["main_value"]) / 2
    assert f"{mean:.4f} ± " in lora and "(n=2)" in lora
    for figure in ("metric_vs_params", "memory", "throughput", "loss_curves"):
        assert (out / "figures" / f"{figure}.png").read_bytes()[:4] == b"\x89PNG"
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 4 and "<table>" in page
    assert "http://" not in page and "https://" not in page  # self-contained


# --- failures, interrupts, re-runs ------------------------------------------------------

def test_a_failing_method_keeps_the_others_and_a_rerun_retries_only_it(base_raw, tmp_path, monkeypatch, capsys):
    out = tmp_path / "cmp"
    calls = train_spy(monkeypatch, fail={"prefix": RuntimeError("injected [failure]")})
    result = compare(build_config(base_raw), methods=["lora", "prefix", "prompt"], out_dir=out)
    assert "x prefix-seed0: failed: RuntimeError: injected [failure]" in capsys.readouterr().err
    assert calls == ["lora", "prefix", "prompt"]
    rows = {row["method"]: row for row in result.rows}
    assert rows["lora"]["status"] == rows["prompt"]["status"] == "ok"
    assert rows["prefix"]["status"] == "failed" and rows["prefix"]["error"] == "RuntimeError: injected [failure]"
    assert "injected [failure]" in (out / rows["prefix"]["error_log"]).read_text()
    assert [row["name"] for row in result.failed] == ["prefix-seed0"]
    assert "prefix-seed0 failed: RuntimeError: injected [failure]" in (out / "results.md").read_text()
    assert 'class="failed"' in (out / "report.html").read_text()

    lora_adapter = out / "runs" / "lora-seed0" / "adapter_model.safetensors"
    before = lora_adapter.stat().st_mtime_ns
    calls = train_spy(monkeypatch)
    again = compare(build_config(base_raw), methods=["lora", "prefix", "prompt"], out_dir=out, progress=False)
    assert calls == ["prefix"], "finished runs must be skipped, the failed one retried"
    assert again.skipped == ["lora-seed0", "prompt-seed0"] and again.ran == ["prefix-seed0"]
    assert all(row["status"] == "ok" for row in again.rows)
    assert lora_adapter.stat().st_mtime_ns == before
    assert again.rows[0] == result.rows[0]
    assert not (out / rows["prefix"]["error_log"]).exists(), "the retried run's old error log is left"


def test_changed_settings_rerun_only_that_method(base_raw, tmp_path, monkeypatch):
    out = tmp_path / "cmp"
    config = build_config(base_raw)
    first = compare(config, methods=["lora", "ia3"], out_dir=out, progress=False)
    calls = train_spy(monkeypatch)
    result = compare(config, methods=["lora", "ia3"], out_dir=out, progress=False,
                     method_overrides=parse_method_overrides(["lora:method.options.r=2"]))
    assert calls == ["lora"] and result.skipped == ["ia3-seed0"]
    assert result.rows[0]["overrides"] == ["method.options.r=2"]
    assert result.rows[0]["trainable_params"] < first.rows[0]["trainable_params"]


# Ctrl-C before or between training steps is a KeyboardInterrupt; inside train() it becomes a checkpoint and
# TrainingInterrupted. Either must stop the comparison, not be recorded as a failed run.
INTERRUPTS = [KeyboardInterrupt(), TrainingInterrupted("interrupted at step 3 of 8", "--resume")]


@pytest.mark.parametrize("interrupt", [pytest.param(INTERRUPTS[0], marks=pytest.mark.slow), INTERRUPTS[1]],
                         ids=["keyboard", "in-training"])  # the keyboard case (~3 s) in CI's slow run
def test_interrupt_keeps_finished_rows_and_the_next_call_continues(base_raw, tmp_path, monkeypatch, interrupt):
    out = tmp_path / "cmp"
    train_spy(monkeypatch, fail={"ia3": interrupt})
    with pytest.raises(type(interrupt)):
        compare(build_config(base_raw), methods=["lora", "ia3", "prompt"], out_dir=out, progress=False)
    saved = json.loads((out / "results.json").read_text())
    assert [row["name"] for row in saved["rows"]] == ["lora-seed0"]
    assert "lora" in (out / "results.md").read_text() and (out / "report.html").is_file()
    assert not (out / "runs" / "ia3-seed0").exists()

    calls = train_spy(monkeypatch)
    result = compare(build_config(base_raw), methods=["lora", "ia3", "prompt"], out_dir=out, progress=False)
    assert calls == ["ia3", "prompt"] and result.skipped == ["lora-seed0"]


# --- the plan: learning rates, sweeps, overrides ----------------------------------------

def test_learning_rates_overrides_and_sweep(base_raw, tmp_path):
    raw = {**base_raw, "method": {"name": "lora", "options": {"r": 4}},
           "training": {**base_raw["training"], "learning_rate": 5e-4}}
    overrides = parse_method_overrides(["prefix:training.learning_rate=0.02", "*:training.batch_size=8",
                                        "prompt:training.batch_size=4"])
    runs = plan_runs(build_config(raw), tmp_path, ["lora", "prefix", "prompt", "ia3"], [1, 2], overrides, lr_sweep=3)
    by = {(r.method, r.seed, r.lr_factor): r for r in runs}
    assert len(runs) == 4 * 3 * 2 and sweep_factors(3) == [0.3, 1, 3]
    lora = by["lora", 1, 1]
    assert (lora.learning_rate, lora.lr_source) == (5e-4, "config")  # the config's lr is for its own method
    assert lora.config.method.options == {"r": 4} and by["ia3", 1, 1].config.method.options == {}
    assert (by["prefix", 2, 3].learning_rate, by["prefix", 2, 3].lr_source) == (0.06, "override")
    assert by["ia3", 1, 0.3].learning_rate == pytest.approx(METHODS["ia3"].learning_rate_for("seq-cls") * 0.3)
    assert by["ia3", 1, 1].lr_source == "default"
    assert by["lora", 1, 1].config.training.batch_size == 8 and by["prompt", 1, 1].config.training.batch_size == 4
    assert by["prefix", 2, 0.3].name == "prefix-seed2-lr0.006"
    assert by["prefix", 2, 0.3].config.output_dir == str(tmp_path / "runs" / "prefix-seed2-lr0.006")
    assert by["prefix", 2, 0.3].config.training.seed == 2
    assert len({r.key for r in runs}) == len(runs) and by["lora", 1, 1].key != by["lora", 2, 1].key
    assert sweep_factors(1) == [1] and sweep_factors(5) == [0.1, 0.3, 1, 3, 10]


def test_lr_sweep_marks_the_best_rate(base_raw, tmp_path):
    result = compare(build_config(base_raw), methods=["ia3"], lr_sweep=3, out_dir=tmp_path / "cmp", progress=False)
    rate = METHODS["ia3"].learning_rate_for("seq-cls")
    assert [row["name"] for row in result.rows] == [f"ia3-seed0-lr{rate * f:.3g}" for f in (0.3, 1, 3)]
    best = max(result.rows, key=lambda row: row["main_value"])
    marked = [line for line in (tmp_path / "cmp" / "results.md").read_text().splitlines() if "★ |" in line]
    assert len(marked) == 1 and f"| {best['learning_rate']:g} ★ |" in marked[0]


@pytest.mark.parametrize("bad, message", [
    (["prefx:training.learning_rate=1"], 'unknown method "prefx" (did you mean "prefix"?)'),
    (["prefix-training.learning_rate=1"], "is not METHOD:key=value"),
])
def test_bad_method_overrides(bad, message):
    with pytest.raises((ConfigError, MethodError), match=re.escape(message)):
        parse_method_overrides(bad)


def test_bad_override_values_fail_before_any_training(base_raw, tmp_path, monkeypatch):
    calls = train_spy(monkeypatch)
    with pytest.raises(ConfigError, match="^prompt: invalid config:.*batch_size"):
        compare(build_config(base_raw), methods=["lora", "prompt"], out_dir=tmp_path / "cmp", progress=False,
                method_overrides=parse_method_overrides(["prompt:training.batch_size=0"]))
    with pytest.raises(MethodError, match='unknown method "ful" \\(did you mean "full"\\?\\)'):
        compare(build_config(base_raw), methods=["ful"], out_dir=tmp_path / "cmp", progress=False)
    assert calls == [] and not (tmp_path / "cmp").exists()


def test_every_registered_method_is_compared_by_default_with_its_own_learning_rate(base_raw, tmp_path):
    """The default rate is the method spec's (methods.py); the exported DEFAULT_LEARNING_RATES is read from it."""
    runs = plan_runs(build_config(base_raw), tmp_path)
    assert [run.method for run in runs] == list(METHODS)
    assert all(run.learning_rate == METHODS[run.method].learning_rate_for("seq-cls") for run in runs)
    assert dict(DEFAULT_LEARNING_RATES) == {name: spec.learning_rate for name, spec in METHODS.items()}


def test_a_task_familys_own_default_rate_is_used_and_reported(base_raw, tmp_path, monkeypatch):
    """A spec's per-family rate (task_learning_rates) is the default for that family only; the results header and
    the report's notes list the rates of the comparison's family."""
    monkeypatch.setitem(METHODS, "ia3", dataclasses.replace(METHODS["ia3"], task_learning_rates={"seq-cls": 7e-3}))
    runs = {run.method: run for run in plan_runs(build_config(base_raw), tmp_path, ["ia3", "lora"])}
    assert (runs["ia3"].learning_rate, runs["ia3"].lr_source) == (7e-3, "default")
    assert runs["lora"].learning_rate == METHODS["lora"].learning_rate
    assert DEFAULT_LEARNING_RATES["ia3"] == METHODS["ia3"].learning_rate == 8e-3  # the general rate
    result = compare(build_config({**base_raw, "training": {**base_raw["training"], "max_steps": 1}}),
                     methods=["ia3"], out_dir=tmp_path / "cmp", progress=False)
    assert json.loads((tmp_path / "cmp" / "results.json").read_text())["default_learning_rates"]["ia3"] == 7e-3
    assert result.rows[0]["learning_rate"] == 7e-3
    assert "ia3 0.007," in (tmp_path / "cmp" / "results.md").read_text()


def test_the_docs_table_of_default_rates_is_the_registrys():
    """docs/compare.md's table says what the registry holds (each technique once)."""
    text = (Path(__file__).parents[1] / "docs" / "compare.md").read_text()
    section = text.split("## Learning rates", 1)[1].split("\n## ", 1)[0]
    header = next(line for line in section.splitlines() if line.startswith("| technique |"))
    families = [cell.strip() for cell in header.split("|")[3:-2]]  # between "default" and "where it comes from"
    assert families and set(families) <= {"seq-cls", "seq2seq", "causal-lm"}
    documented, per_family = {}, {family: {} for family in families}
    for cells in (line.split("|")[1:] for line in section.splitlines() if line.startswith("| `")):
        for name in re.findall(r"`([^`]+)`", cells[0]):
            documented[name] = float(cells[1])
            for family, cell in zip(families, cells[2:]):
                per_family[family][name] = float(cells[1]) if cell.strip() == "=" else float(cell)
    assert documented == {name: spec.learning_rate for name, spec in METHODS.items()}
    for family in families:
        assert per_family[family] == {name: spec.learning_rate_for(family) for name, spec in METHODS.items()}, family
    own = {family for spec in METHODS.values() for family in spec.task_learning_rates}
    assert own <= set(families)  # every family with rates of its own has a column


NEW_IN_COMPARE = ["dora", "lora-plus", "pissa", "adalora", "vera", "ln-tuning", "bitfit", "full"]


@pytest.mark.slow  # eight trainings (~5 s): CI runs it
def test_new_techniques_and_full_fine_tuning_compare(base_raw, tmp_path):
    raw = {**base_raw, "training": {**base_raw["training"], "eval_strategy": "no"}}
    result = compare(build_config(raw), methods=NEW_IN_COMPARE, out_dir=tmp_path / "cmp", progress=False)
    assert not result.failed, [row["error"] for row in result.rows if row["status"] != "ok"]
    rows = {row["method"]: row for row in result.rows}
    assert list(rows) == NEW_IN_COMPARE
    full = rows.pop("full")
    # the reference row: every weight trains, and its "adapter" is the whole model file
    assert full["trainable_params"] == full["total_params"] and full["trainable_share"] == 1.0
    assert full["adapter_bytes"] == (result.out_dir / full["run_dir"] / "model.safetensors").stat().st_size
    for row in rows.values():
        assert 0 < row["trainable_share"] < 0.5, row["method"]
        assert row["adapter_bytes"] < full["adapter_bytes"]
        assert (result.out_dir / row["run_dir"] / "adapter_model.safetensors").is_file()
    assert "| full |" in (result.out_dir / "results.md").read_text()
    assert (result.out_dir / "report.html").is_file()


# --- the command line -------------------------------------------------------------------

def test_cli_prints_the_table_and_the_report_path(base_raw, tmp_path, monkeypatch, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(base_raw))
    out = tmp_path / "cmp"
    monkeypatch.setattr(sys, "argv", ["peftlab", "compare", str(recipe), "--methods", "lora,ptuning", "--seeds", "3",
                                      "--set-method", "ptuning:training.learning_rate=0.005", "-o", str(out)])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    captured = capsys.readouterr()
    assert exit_info.value.code == 0, captured.err
    assert "done lora-seed3" in captured.err and "done ptuning-seed3" in captured.err  # the progress display
    table = [line for line in captured.out.splitlines() if line.startswith("│")]
    assert table[0].split("│")[1].strip() == "lora" and table[1].split("│")[2].strip() == "0.005"
    assert f"report: {out / 'report.html'}" in captured.out

    monkeypatch.setattr(sys, "argv", ["peftlab", "compare", str(recipe), "--seeds", "1,x", "-o", str(out)])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert exit_info.value.code == 2 and "error: --seeds" in capsys.readouterr().err

    for interrupt in INTERRUPTS:
        train_spy(monkeypatch, fail={"ia3": interrupt})
        monkeypatch.setattr(sys, "argv", ["peftlab", "compare", str(recipe), "--methods", "lora,ia3", "--seeds",
                                          "3", "-o", str(out)])
        with pytest.raises(SystemExit) as exit_info:
            cli.main()
        assert exit_info.value.code == 130
        assert f"interrupted: finished runs are kept in {out}" in capsys.readouterr().err


# --- the report in a browser ------------------------------------------------------------

def _chromium() -> str | None:
    return next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)


@pytest.mark.skipif(_chromium() is None, reason="headless Chromium not found (Debian: apt-get install chromium; "
                                                "scripts/setup.sh --dev installs it)")
def test_report_renders_table_and_figures_in_headless_chromium(all_methods, tmp_path):
    from PIL import Image

    shot = tmp_path / "report.png"
    subprocess.run([_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1280,3200",
                    "--hide-scrollbars", all_methods.report.resolve().as_uri()],
                   check=True, capture_output=True, timeout=120)
    image = Image.open(shot).convert("RGB")
    assert image.size == (1280, 3200)
    colors = image.getcolors(maxcolors=1 << 20)
    counts = {rgb: n for n, rgb in colors}
    # (a tall window: the verdict above the figures grows with the techniques' budget hints)
    # the summary table's header row (#f3f5f8) and the figures: matplotlib's tab10 colours, one per
    # method, only drawn when the embedded PNGs decode (a broken image shows none of them)
    assert counts.get((0xF3, 0xF5, 0xF8), 0) > 5000, "the table header is not rendered"
    tab10 = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]
    drawn = [rgb for rgb in tab10 if counts.get(rgb, 0) > 500]
    assert drawn == tab10, f"figure colours missing: {set(tab10) - set(drawn)}"


@pytest.mark.slow  # 19 techniques x 2 families: ~21 s; CI runs it
@pytest.mark.parametrize("arch, task", [("t5", "seq2seq"), ("llama", "causal-lm")])
def test_every_method_compares_on_the_generative_families(tiny_lms, generative_data, tmp_path, arch, task):
    """The default method list is every registered technique for the task; each gets a row on seq2seq and
    causal LM, and the one these architectures cannot take (BitFit: no bias terms) fails with its reason while
    the others go on."""
    raw = {
        "model": {"name": str(tiny_lms[arch])}, "task": task,
        "data": {"train_file": str(generative_data["train"]), "validation_file": str(generative_data["validation"]),
                 "target_column": "target", "max_length": 32, "target_max_length": 4, "max_eval_samples": 8,
                 **({"prompt_template": "review : {text} label :"} if task == "causal-lm" else {})},
        "training": {"max_steps": 2, "batch_size": 8, "eval_strategy": "no", "seed": 0},
    }
    result = compare(build_config(raw), out_dir=tmp_path / "cmp", progress=False)
    rows = {row["method"]: row for row in result.rows}
    assert list(rows) == [name for name, spec in METHODS.items() if task in spec.tasks]
    assert [row["method"] for row in result.failed] == ["bitfit"]  # neither T5 nor Llama has biased Linear layers
    assert "no bias terms" in rows.pop("bitfit")["error"]
    for name, row in rows.items():
        assert row["main_metric"] == "accuracy" and row["main_value"] is not None, name
        assert 0 < row["trainable_params"] <= row["total_params"], name
        assert (row["trainable_share"] == 1.0) == (name == "full"), name
        saved = "model.safetensors" if name == "full" else "adapter_model.safetensors"
        assert (result.out_dir / row["run_dir"] / saved).is_file(), name

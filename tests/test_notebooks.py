"""The notebooks (the collection's ten and peftlab's preference-tuning one) and their recipes.

Every packaged recipe validates; the workflows each have a full recipe and an offline
variant; ``peftlab recipes`` lists them; ``recipe:NAME`` loads with overrides and an unknown
name gets a did-you-mean. Each notebook in notebooks/ runs end to end in offline mode (a few
training steps, PEFTLAB_NOTEBOOK_STEPS) in a real Jupyter kernel, a failing cell fails the
test; then the adapter's weights are zeroed in that kernel and the notebook's reload check is
run again: it must fail, so it would have caught an adapter that was not restored.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from peftlab import cli, load_config, load_recipe
from peftlab.catalog import NOTEBOOKS, recipes, workflows
from peftlab.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK_DIR = ROOT / "notebooks"
STEPS = "3"  # training steps per notebook in CI (the offline variants' own budgets take a minute or two each)
CELL_TIMEOUT = 900

# Zero every adapter weight of the reloaded model (peft names them after the adapter, "default"), as if the
# adapter file had not been loaded; layers offloaded to disk (meta tensors) are left alone.
SABOTAGE = """
import torch
with torch.no_grad():
    zeroed = 0
    for name, parameter in reloaded.model.named_parameters():
        if ".default" in name and parameter.device.type != "meta":
            parameter.zero_()
            zeroed += 1
assert zeroed, "no adapter weights found to zero"
"""


def test_every_packaged_recipe_validates():
    for recipe in recipes().values():
        config = load_recipe(recipe.name)
        assert config.output_dir, recipe.name


def test_every_workflow_has_an_offline_variant():
    table = workflows()
    assert sorted(table) == list(range(1, 12))  # the collection's ten and peftlab's preference notebook
    for number, (full, offline) in table.items():
        assert offline is not None, f"notebook {number} has no offline variant"
        assert offline.name == f"{full.name}-offline" and offline.offline_of == full.name
        assert NOTEBOOKS[number] in full.description, full.description  # names the collection's notebook
        full_raw, offline_raw = full.raw(), offline.raw()
        assert not full_raw["model"]["name"].startswith("offline:"), full.name
        assert offline_raw["model"]["name"].startswith("offline:"), offline.name
        assert full_raw["method"]["name"] == offline_raw["method"]["name"], number
        assert full_raw["task"] == offline_raw["task"], number


def test_published_settings_of_the_new_workflows():
    nine = load_recipe("lora-bloomz-7b1-twitter-complaints")
    assert nine.model.name == "bigscience/bloomz-7b1"
    assert nine.method.options == {"r": 8, "lora_alpha": 32, "lora_dropout": 0.1, "target_modules": ["query_key_value"]}
    ten = load_recipe("lora-mistral-7b-chat-tokens")
    assert ten.model.name == "mistralai/Mistral-7B-v0.1" and ten.model.train_new_tokens == "lora"
    assert len(set(ten.model.new_tokens())) == 27
    assert ten.method.options["r"] == 64 and ten.method.options["lora_alpha"] == 128


def test_recipes_command_lists_all_ten(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["peftlab", "recipes"])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert exit_info.value.code in (0, None)
    out = capsys.readouterr().out
    for full, offline in workflows().values():
        assert full.name in out and offline.name in out
    assert "quickstart" in out


def test_recipe_names_load_with_overrides_and_unknown_names_suggest():
    config = load_config("recipe:lora-roberta-large-mrpc-offline", ["training.max_steps=5", "output_dir=x"])
    assert config.training.max_steps == 5 and config.output_dir == "x" and config.method.name == "lora"
    with pytest.raises(ConfigError, match='unknown recipe "lora-roberta-large-mrp".*did you mean '
                                          '"lora-roberta-large-mrpc"'):
        load_config("recipe:lora-roberta-large-mrp")


def test_train_command_takes_a_recipe_name(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(sys, "argv", ["peftlab", "train", "recipe:quickstrat", "-o", str(tmp_path / "run")])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and 'did you mean "quickstart"' in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_notebooks_are_what_the_generator_writes():
    assert sorted(p.stem for p in NOTEBOOK_DIR.glob("*.ipynb")) == sorted(NOTEBOOKS.values())
    check = subprocess.run([sys.executable, str(ROOT / "scripts" / "build_notebooks.py"), "--check"],
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    for path in NOTEBOOK_DIR.glob("*.ipynb"):  # stored without outputs (CI runs them)
        cells = json.loads(path.read_text())["cells"]
        assert all(not c.get("outputs") for c in cells if c["cell_type"] == "code"), path.name


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    """A kernelspec for this interpreter, with this checkout's peftlab first on the path."""
    import ipykernel  # noqa: F401  (the dev extra installs it: a missing one fails, it is not skipped)
    root = tmp_path_factory.mktemp("jupyter")
    spec = root / "kernels" / "peftlab-test"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "peftlab tests", "language": "python",
        "env": {"PYTHONPATH": str(ROOT / "src"), "PEFTLAB_NOTEBOOK_STEPS": STEPS, "HF_HUB_OFFLINE": "1",
                "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "2"},
    }))
    return {"name": "peftlab-test", "path": str(root)}


@pytest.mark.notebooks
@pytest.mark.parametrize("number", sorted(NOTEBOOKS), ids=lambda n: f"{n:02d}-{NOTEBOOKS[n]}")
def test_notebook_runs_offline_and_its_reload_check_bites(number, kernel, tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    monkeypatch.setenv("JUPYTER_PATH", kernel["path"])
    notebook = nbformat.read(NOTEBOOK_DIR / f"{NOTEBOOKS[number]}.ipynb", as_version=4)
    check = [c for c in notebook.cells if "reload-check" in c.metadata.get("tags", [])]
    assert len(check) == 1, "the notebook needs one cell tagged reload-check"
    client = NotebookClient(notebook, timeout=CELL_TIMEOUT, kernel_name=kernel["name"],
                            resources={"metadata": {"path": str(tmp_path)}})
    start = time.monotonic()
    client.reset_execution_trackers()
    with client.setup_kernel():
        for index, cell in enumerate(notebook.cells):  # a failing cell raises CellExecutionError
            client.execute_cell(cell, index)
        ran = time.monotonic() - start
        notebook.cells += [nbformat.v4.new_code_cell(SABOTAGE), nbformat.v4.new_code_cell(check[0].source)]
        client.execute_cell(notebook.cells[-2], len(notebook.cells) - 2)
        with pytest.raises(CellExecutionError, match="AssertionError"):
            client.execute_cell(notebook.cells[-1], len(notebook.cells) - 1)
    print(f"notebook {number} ran in {ran:.0f} s")
    run_dir = tmp_path / "runs" / "notebooks"
    saved = [p for p in run_dir.iterdir() if p.is_dir() and not p.name.endswith("-offload")]
    assert len(saved) == 1 and {"adapter_config.json", "adapter_model.safetensors"} <= {
        p.name for p in saved[0].iterdir()}

"""Data-parallel training: 2 CPU processes (gloo) give the adapter of 1 process with the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from peftlab import train

SETTINGS = {"training.max_steps": 8, "training.group_by_length": False, "training.eval_strategy": "no",
            "training.keep": "last", "data.max_train_samples": 96}


@pytest.mark.slow  # end to end in subprocesses: CI runs it; the everyday loop (-m "not slow ...") does not
def test_two_processes_match_one_with_the_same_global_batch(make_config, tmp_path):
    # no dropout, so both runs draw nothing at random after the seeded initialisation
    single = train(make_config("bert", "lora", {"lora_dropout": 0.0}, **SETTINGS, **{"training.batch_size": 16},
                               output_dir=tmp_path / "single"))

    config = make_config("bert", "lora", {"lora_dropout": 0.0}, **SETTINGS, output_dir=tmp_path / "ddp")
    recipe = tmp_path / "ddp.yaml"
    recipe.write_text(yaml.safe_dump(config.to_dict()))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "peftlab", "train", str(recipe), "--num-processes", "2",
                           "--set", "training.batch_size=8"], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("peftlab run: lora") == 1, "only the main process reports"

    record = json.loads((tmp_path / "ddp" / "peftlab.json").read_text())
    assert record["num_processes"] == 2 and record["steps"] == 8
    left = load_file(str(single.output_dir / "adapter_model.safetensors"))
    right = load_file(str(tmp_path / "ddp" / "adapter_model.safetensors"))
    assert left.keys() == right.keys()
    moved = 0
    for key in left:
        torch.testing.assert_close(right[key], left[key], atol=2e-5, rtol=1e-4)
        moved += "lora_B" in key and bool(left[key].abs().sum() > 0)
    assert moved, "training changed the adapter"  # lora_B starts at zero
    assert not list(tmp_path.glob(".ddp.*")), "no process left a temporary directory"

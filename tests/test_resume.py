"""Checkpoints and resume: an interrupted run ends with the adapter an uninterrupted one produces."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from peftlab import checkpoint, train
from peftlab.errors import PeftlabError

# dropout on, eval every 4 steps with keep=best, gradient accumulation over uneven epochs: everything
# a resume has to restore (RNG, best weights, data position, scheduler, optimizer moments) matters here
RESUMABLE = {"training.max_steps": 14, "training.epochs": 10, "training.eval_strategy": "steps",
             "training.eval_steps": 4, "training.gradient_accumulation_steps": 3, "training.checkpoint_every": 4,
             "training.keep": "best", "training.learning_rate": 5e-3, "data.max_train_samples": 100}
DROPOUT = {"lora_dropout": 0.3}


def adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "adapter_model.safetensors"))


def assert_same_adapter(a: Path, b: Path) -> None:
    left, right = adapter(a), adapter(b)
    assert left.keys() == right.keys()
    for key in left:
        assert torch.equal(left[key], right[key]), key


class Crash(Exception):
    pass


def crash_at(step: int):
    def hook(kind, data):
        if kind == "step" and data["step"] == step:
            raise Crash

    return hook


def test_resumed_run_equals_the_uninterrupted_run(make_config, tmp_path):
    reference = train(make_config("bert", "lora", DROPOUT, **RESUMABLE, output_dir=tmp_path / "reference"))

    config = make_config("bert", "lora", DROPOUT, **RESUMABLE, output_dir=tmp_path / "resumed")
    with pytest.raises(Crash):
        train(config, on_event=crash_at(10))  # checkpoints at 4 and 8, crash in the middle of the third epoch
    root = checkpoint.directory_for(config)
    assert [p.name for p in checkpoint.saved(root)] == ["step-00000004", "step-00000008"]
    assert not Path(config.output_dir).exists()

    resumed = train(config, resume=True)
    assert_same_adapter(reference.output_dir, resumed.output_dir)
    assert resumed.history == reference.history
    assert resumed.losses == reference.losses
    assert not root.exists(), "checkpoints are removed once the run is complete"


@pytest.mark.parametrize("method,options", [("adalora", {}), ("full", {})])
def test_resume_is_exact_for_techniques_with_their_own_loop_state(make_config, tmp_path, method, options):
    """AdaLoRA: importance scores and rank pattern are checkpointed (spec get_state / set_state); full fine-tuning:
    every weight and its optimizer moments."""
    settings = {**RESUMABLE, "training.learning_rate": 2e-2 if method == "adalora" else 1e-3}
    reference = train(make_config("bert", method, options, **settings, output_dir=tmp_path / "reference"))
    config = make_config("bert", method, options, **settings, output_dir=tmp_path / "resumed")
    with pytest.raises(Crash):
        train(config, on_event=crash_at(10))
    resumed = train(config, resume=True)
    name = "model.safetensors" if method == "full" else "adapter_model.safetensors"
    left, right = load_file(str(reference.output_dir / name)), load_file(str(resumed.output_dir / name))
    assert left.keys() == right.keys()
    for key in left:
        assert torch.equal(left[key], right[key]), key
    assert resumed.history == reference.history
    if method == "adalora":
        assert resumed.model.peft_config["default"].rank_pattern == reference.model.peft_config["default"].rank_pattern


def test_checkpoints_rotate_and_a_half_written_one_is_ignored(make_config, tmp_path):
    config = make_config("bert", "lora", **{**RESUMABLE, "training.checkpoint_every": 2,
                                            "training.checkpoint_keep": 3})
    with pytest.raises(Crash):
        train(config, on_event=crash_at(11))
    root = checkpoint.directory_for(config)
    assert [p.name for p in checkpoint.saved(root)] == ["step-00000006", "step-00000008", "step-00000010"]
    (root / ".tmp-step-00000012").mkdir()  # a kill while saving leaves only a temporary directory
    assert checkpoint.latest(root).name == "step-00000010"
    assert train(config, resume=True).output_dir.is_dir()


def test_resume_refuses_what_it_cannot_continue(make_config, tmp_path):
    config = make_config("bert", "lora", **RESUMABLE)
    with pytest.raises(PeftlabError, match="no checkpoint to resume"):
        train(config, resume=True)
    with pytest.raises(Crash):
        train(config, on_event=crash_at(5))
    with pytest.raises(PeftlabError, match="unfinished run .*step-00000004") as info:
        train(config)  # a fresh start would silently throw the checkpoints away
    assert "--resume" in info.value.hint
    changed = make_config("bert", "lora", **{**RESUMABLE, "training.learning_rate": 1e-3})
    with pytest.raises(PeftlabError, match="training.learning_rate: 0.005 in the checkpoint, 0.001 now"):
        train(changed, resume=True)
    # settings that do not change the result may differ
    relaxed = make_config("bert", "lora", **{**RESUMABLE, "training.checkpoint_every": 100, "training.progress": True})
    assert train(relaxed, resume=True).output_dir.is_dir()


def test_overwrite_starts_over(make_config):
    config = make_config("bert", "lora", **RESUMABLE)
    with pytest.raises(Crash):
        train(config, on_event=crash_at(5))
    result = train(config, overwrite=True)
    assert "resumed" not in " ".join(result.notes)
    assert not checkpoint.directory_for(config).exists()


# --- the command line, killed for real ------------------------------------------------------

def _cli(recipe: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "-m", "peftlab", "train", str(recipe), *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_checkpoint(process: subprocess.Popen, root: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not checkpoint.saved(root):
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.05)


@pytest.fixture
def cli_recipe(make_config, tmp_path):
    def write(name: str) -> tuple[Path, Path]:
        config = make_config("bert", "lora", DROPOUT, **{**RESUMABLE, "training.max_steps": 40,
                                                         "training.checkpoint_every": 2},
                             output_dir=tmp_path / name)
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config.to_dict()))
        return path, Path(config.output_dir)

    return write


@pytest.mark.slow  # end to end in subprocesses: CI runs it; the everyday loop (-m "not slow ...") does not
def test_kill_9_and_ctrl_c_then_resume_from_the_command_line(cli_recipe):
    recipe, reference = cli_recipe("reference")
    assert _cli(recipe).wait() == 0

    # kill -9 at whatever moment the first checkpoint has appeared (maybe while writing the next)
    recipe, killed = cli_recipe("killed")
    process = _cli(recipe)
    _wait_for_checkpoint(process, Path(f"{killed}.checkpoints"))
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not killed.exists()
    resumed = _cli(recipe, "--resume")
    assert resumed.wait() == 0, resumed.communicate()
    assert_same_adapter(reference, killed)

    # Ctrl-C: a checkpoint at the current step, a clean exit with a hint how to resume
    recipe, interrupted = cli_recipe("interrupted")
    process = _cli(recipe)
    _wait_for_checkpoint(process, Path(f"{interrupted}.checkpoints"))
    process.send_signal(signal.SIGINT)
    _, err = process.communicate()
    assert process.returncode == 130, err
    assert "Traceback" not in err
    assert "interrupted at step" in err and "--resume" in err
    assert not interrupted.exists()
    resumed = _cli(recipe, "--resume")
    assert resumed.wait() == 0, resumed.communicate()
    assert_same_adapter(reference, interrupted)

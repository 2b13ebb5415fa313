"""`peftlab push` and `peftlab card`: everything up to the upload, which cannot reach the Hub here.

What would be uploaded is checked file by file against the run directory; a folder without a real card,
a checkpoint, a staging folder, a bad repo id, offline mode, a missing token and an unreachable Hub are each
one readable error (exit 2, no traceback). The upload call itself is replaced by a recorder that checks
what push() hands to huggingface_hub.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import pytest

import peftlab
from peftlab import build_config, cli, push, train
from peftlab.card import CARD, write_card
from peftlab.errors import AdapterError, PeftlabError
from peftlab.hub import upload_files

PEFT_TEMPLATE = """---
base_model: bert
library_name: peft
---

# Model Card for Model ID

<!-- Provide a quick summary of what the model is/does. -->

## Model Details

- **Developed by:** [More Information Needed]
"""
UPLOADED = {"README.md", "adapter_config.json", "adapter_model.safetensors", "loss_curve.png", "tokenizer.json",
            "tokenizer_config.json"}
LOCAL = ["metrics.json", "peftlab.json", "peftlab.yaml", "tensorboard/"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_models, keyword_data) -> Path:
    out = tmp_path_factory.mktemp("hub") / "sst2-lora"
    raw = {
        "model": {"name": str(tiny_models["bert"])}, "task": "seq-cls",
        "data": {"train_file": str(keyword_data["train"]), "validation_file": str(keyword_data["validation"]),
                 "max_length": 32, "max_train_samples": 64, "max_eval_samples": 16},
        "training": {"max_steps": 4, "batch_size": 16, "learning_rate": 5e-2, "progress": False, "seed": 0,
                     "log_every": 1, "report_to": ["tensorboard"]},
        "output_dir": str(out),
    }
    return train(build_config(raw)).output_dir


@pytest.fixture
def copy(run_dir, tmp_path) -> Path:
    return Path(shutil.copytree(run_dir, tmp_path / "sst2-lora"))


@pytest.fixture
def no_hub(monkeypatch):
    """Any call that would reach the Hub fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("push reached the Hub")

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", refuse)
    monkeypatch.setattr(huggingface_hub.HfApi, "create_commit", refuse)


def run_cli(capsys, monkeypatch, *args: str) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["peftlab", *args])
    try:
        cli.main()
        code = 0
    except SystemExit as exit_info:
        code = exit_info.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_error(code: int, err: str, *fragments: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err and sum(line.startswith("error:") for line in err.splitlines()) == 1, err
    flat = " ".join(err.split())
    for fragment in fragments:
        assert fragment in flat, (fragment, err)


def test_dry_run_lists_exactly_what_would_be_uploaded(run_dir, capsys, monkeypatch, no_hub):
    result = push(run_dir, "someone/sst2-lora", private=True, dry_run=True)
    assert peftlab.push is push and result.dry_run and result.url is None
    names = [name for name, _ in result.files]
    assert names[0] == CARD and set(names) == UPLOADED and len(names) == len(UPLOADED)
    assert sorted(result.left_out) == LOCAL
    assert set(names) | {n.rstrip("/") for n in result.left_out} == {p.name for p in run_dir.iterdir()}
    assert dict(result.files) == {name: (run_dir / name).stat().st_size for name in names}
    assert result.total_bytes == sum(size for _, size in result.files)
    assert any("HF_HUB_OFFLINE is set" in note for note in result.notes)

    code, out, err = run_cli(capsys, monkeypatch, "push", str(run_dir), "someone/sst2-lora", "--dry-run",
                             "--private")
    assert code == 0, err
    lines = out.splitlines()
    assert f"-> someone/sst2-lora (private): {len(UPLOADED)} files" in " ".join(out.split())
    for name, size in result.files:
        assert any(line.split()[:1] == [name] for line in lines), name
    assert "not uploaded (local records, logs, reports): metrics.json, peftlab.json, peftlab.yaml, tensorboard/" \
        in " ".join(out.split())
    assert lines[-1] == "dry run: nothing was uploaded"


def test_a_run_without_a_real_card_is_refused_and_peftlab_card_writes_one(copy, capsys, monkeypatch, no_hub):
    (copy / CARD).unlink()
    with pytest.raises(PeftlabError, match="has no model card") as error:
        push(copy, "someone/sst2-lora", dry_run=True)
    assert f"peftlab card {copy}" in error.value.hint and f"write_card('{copy}')" in error.value.hint

    (copy / CARD).write_text(PEFT_TEMPLATE)  # what a run of an earlier peftlab version holds
    code, _, err = run_cli(capsys, monkeypatch, "push", str(copy), "someone/sst2-lora", "--dry-run")
    one_error(code, err, "is still peft's empty template (\"More Information Needed\")", f"peftlab card {copy}")

    code, out, err = run_cli(capsys, monkeypatch, "card", str(copy))
    assert code == 0 and f"wrote {copy / CARD} and loss_curve.png" in " ".join(out.split()), err
    assert "More Information Needed" not in (copy / CARD).read_text() and "## Results" in (copy / CARD).read_text()
    assert {name for name, _ in push(copy, "someone/sst2-lora", dry_run=True).files} == UPLOADED


def test_checkpoints_staging_folders_and_folders_without_weights_are_refused(copy, tmp_path, no_hub):
    step = tmp_path / "sst2-lora.checkpoints" / "step-00000004"
    step.mkdir(parents=True)
    (step / "state.json").write_text("{}")
    with pytest.raises(PeftlabError, match="is a training checkpoint, not a finished run"):
        push(step, "someone/x", dry_run=True)
    staging = Path(shutil.copytree(copy, tmp_path / ".sst2-lora.tmp-123-0a1b2c3d"))
    with pytest.raises(PeftlabError, match="staging folder of a run that did not finish"):
        push(staging, "someone/x", dry_run=True)
    (copy / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterError, match="holds no adapter"):
        push(copy, "someone/x", dry_run=True)
    with pytest.raises(AdapterError, match="is not a folder"):
        push(tmp_path / "nowhere", "someone/x", dry_run=True)


@pytest.mark.parametrize("repo_id", ["someone/sst2 lora", "a/b/c", "-bad/name", ""])
def test_a_bad_repo_id_is_refused(run_dir, repo_id, no_hub):
    with pytest.raises(PeftlabError, match="is not a Hub repo id") as error:
        push(run_dir, repo_id, dry_run=True)
    assert "NAMESPACE/NAME" in error.value.hint


def test_offline_and_without_a_token_one_readable_error(run_dir, capsys, monkeypatch, tmp_path, no_hub):
    assert os.environ["HF_HUB_OFFLINE"] == "1"  # the tests' own setting (conftest)
    code, _, err = run_cli(capsys, monkeypatch, "push", str(run_dir), "someone/sst2-lora")
    one_error(code, err, "cannot push: the Hugging Face Hub is switched off here (HF_HUB_OFFLINE is set)",
              "--dry-run shows what would be uploaded")

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    code, _, err = run_cli(capsys, monkeypatch, "push", str(run_dir), "someone/sst2-lora", "--private")
    one_error(code, err, "cannot push: no Hugging Face token", "hf auth login", "HF_TOKEN")
    result = push(run_dir, "someone/sst2-lora", dry_run=True)  # a dry run needs neither
    assert any("no Hugging Face token found" in note for note in result.notes)


@pytest.mark.slow  # a subprocess that waits for a refused connection: ~6 s; CI runs it
def test_an_unreachable_hub_is_one_readable_error(run_dir, tmp_path):
    """A real attempt (in a fresh process, offline mode off) against an endpoint nothing listens on."""
    env = {k: v for k, v in os.environ.items() if k not in {"HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"}}
    env.update(HF_TOKEN="hf_not_a_real_token", HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path / "hf"))
    done = subprocess.run([sys.executable, "-m", "peftlab", "push", str(run_dir), "someone/sst2-lora"], env=env,
                          capture_output=True, text=True, timeout=120)
    one_error(done.returncode, done.stderr, "could not push to someone/sst2-lora:", "check the connection to the Hub")


def test_the_upload_hands_huggingface_hub_exactly_the_listed_files(run_dir, monkeypatch):
    calls = {}

    def create_repo(self, repo_id, **kwargs):
        calls["repo"] = (repo_id, kwargs)
        return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

    def create_commit(self, repo_id, operations, **kwargs):
        calls["commit"] = (repo_id, [(op.path_in_repo, op.path_or_fileobj) for op in operations], kwargs)
        return huggingface_hub.CommitInfo(commit_url=f"https://huggingface.co/{repo_id}/commit/abc", commit_message="",
                                          commit_description="", oid="abc")

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "create_commit", create_commit)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    result = push(run_dir, "someone/sst2-lora", private=True, token="hf_test")
    assert calls["repo"] == ("someone/sst2-lora", {"private": True, "exist_ok": True, "repo_type": "model"})
    repo_id, operations, kwargs = calls["commit"]
    assert repo_id == "someone/sst2-lora" and "sst2-lora" in kwargs["commit_message"]
    assert operations == [(name, str(run_dir / name)) for name, _ in result.files]
    assert [p.name for p in upload_files(run_dir)[0]] == [name for name, _ in result.files]
    assert result.url == "https://huggingface.co/someone/sst2-lora" and not result.dry_run


def test_a_merged_model_and_a_full_run_push_their_model_files(run_dir, tmp_path, no_hub):
    merged = tmp_path / "merged"
    peftlab.merge(run_dir, merged)
    result = push(merged, "someone/sst2-merged", dry_run=True)
    names = {name for name, _ in result.files}
    assert {"README.md", "config.json", "model.safetensors", "tokenizer.json"} <= names
    assert "peftlab-merge.json" in result.left_out and not any(n.startswith("adapter") for n in names)
    write_card(merged)  # peftlab card on a merged model: its own card again
    assert [name for name, _ in push(merged, "someone/sst2-merged", dry_run=True).files] == \
        [name for name, _ in result.files]

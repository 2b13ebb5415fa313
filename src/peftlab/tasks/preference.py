"""Preference tuning of causal language models: DPO, IPO, ORPO, KTO, SimPO (``task: preference``).

Rows are a prompt with a chosen and a rejected completion, or (KTO) unpaired completions marked
desirable or not (tasks.pairs); the objective and its knobs are the run config's ``preference``
section (tasks.objectives), kept in the run's meta. The model is a causal LM like ``causal-lm``'s:
prediction and serving generate from prompts (inherited), so a preference-tuned adapter is served,
merged and exported like any other causal-LM adapter.

The reference model: for a technique with an adapter, the same model with the adapter switched off
(no second copy); for full fine-tuning (and selective techniques, which train the base's own
weights), a frozen copy of the base loaded once from where the base came from. With
``preference.precompute_reference`` each training row's reference log-probabilities are computed
the first time the row is seen and reused in later epochs.

Evaluation reports the objective's loss and TRL's logged values (``rewards/*``, ``logps/*``) where a
reference is known, and two reference-free measures that a bare base has too: ``pairwise_accuracy``
(the share of pairs whose chosen completion has the higher mean log-probability per token: the
main metric) and ``margin`` (the mean per-token log-probability of chosen minus rejected).
"""

from __future__ import annotations

import contextlib
import statistics
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import datasets
import torch

from peftlab.config import DataConfig, PreferenceConfig
from peftlab.errors import ConfigError, DataError
from peftlab.model import load_base, pad_with_eos
from peftlab.progress import warn
from peftlab.tasks import pairs
from peftlab.tasks.base import Baseline, Meta, model_device
from peftlab.tasks.causal_lm import CausalLM
from peftlab.tasks.objectives import SequenceLogps, kto_loss, pair_loss, sequence_logps


@dataclass
class PreferenceMeta:
    """What the preference family keeps with a run: the rows' shape and the objective it trained with."""

    mode: str = "text"  # "text" | "chat": how prompts and completions are written
    paired: bool = True  # the evaluation rows are chosen / rejected pairs; False: KTO's unpaired rows
    objective: PreferenceConfig = field(default_factory=PreferenceConfig)  # the run config's section

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "paired": self.paired, "preference": self.objective.model_dump(mode="json")}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> PreferenceMeta:
        return cls(mode=raw.get("mode") or "text", paired=bool(raw.get("paired", True)),
                   objective=PreferenceConfig.model_validate(raw.get("preference") or {}))

    @classmethod
    def of(cls, meta: Meta) -> PreferenceMeta:
        return meta if isinstance(meta, cls) else cls.from_dict(meta)


class PreferenceTuning(CausalLM):
    """prompt + chosen / rejected completions -> a causal LM that prefers the chosen (DPO, IPO, ORPO, KTO, SimPO)"""

    name = "preference"
    meta_type = PreferenceMeta
    packs = False  # a pair's two sequences share one loss term
    config_section = "preference"  # the objective: RunConfig.preference
    base_is_reference = True  # the bare base's pairwise accuracy is the "before" of every comparison

    def main_metric(self, meta: Meta) -> str:
        return "pairwise_accuracy" if PreferenceMeta.of(meta).paired else "margin"

    # --- data ---------------------------------------------------------------------------

    def inspect(self, splits, data):
        shapes = {split: pairs.layout(splits[split], data, f"the {split} split") for split in ("train", "eval")}
        # evaluation pairs give the pairwise accuracy (KTO may train on unpaired rows and be evaluated on pairs)
        return PreferenceMeta(mode="chat" if shapes["train"].chat else "text",
                              paired=shapes["eval"].paired).to_dict()

    def encode(self, dataset, tokenizer, data, meta, max_length, where="data"):
        meta = PreferenceMeta.of(meta)
        shape = pairs.layout(dataset, data, where)
        if not shape.paired and meta.objective.loss != "kto":
            raise ConfigError(f"preference.loss={meta.objective.loss} needs chosen / rejected pairs; {where} has "
                              "unpaired rows (a completion and a desirable flag)",
                              "use preference.loss=kto, or give pairs (data.chosen_column, data.rejected_column)")
        tokenized = [pairs.tokenize(tokenizer, *pairs.prompt_and_completions(row, data)) for row in dataset]
        pairs.check_budget([len(prompt) for prompt, _ in tokenized], max_length, where)
        features: dict[str, list] = {"input_ids": [], "prompt_length": [], "row": []}
        features.update({"rejected_ids": []} if shape.paired else {"desirable": []})
        cut = 0
        for index, ((prompt, whole), row) in enumerate(zip(tokenized, dataset)):
            completions = pairs.fit(prompt, whole, max_length)
            cut += completions != whole
            features["input_ids"].append(prompt + completions[0])
            features["prompt_length"].append(len(prompt))
            features["row"].append(index)
            if shape.paired:
                features["rejected_ids"].append(prompt + completions[1])
            else:
                features["desirable"].append(pairs.desirable(row, data))
        if cut:
            warn(f"{where}: {cut} of {len(dataset)} rows are longer than data.max_length={max_length} tokens; the end "
                 "of their completions was cut")
        return datasets.Dataset.from_dict(features)

    def collator(self, tokenizer):
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        return PairCollator(pad)

    def packed_collator(self, tokenizer) -> None:
        return None

    def training_loss(self, meta: Meta) -> PreferenceLoss:
        meta = PreferenceMeta.of(meta)
        return PreferenceLoss(meta.objective, cache=meta.objective.precompute_reference)

    def card_columns(self, data: DataConfig) -> str:
        return (f"prompt `{data.prompt_column}`, chosen `{data.chosen_column}`, rejected `{data.rejected_column}` "
                f"(or completion `{data.completion_column}` marked by `{data.label_column}`)")

    def _prompt(self, row: dict[str, Any], data, tokenizer) -> str:
        """A row's prompt as the model sees it before its completion (``predict`` / serving generate from it)."""
        value = row.get(data.prompt_column, row.get(data.text_column))
        if value is None:
            raise DataError(f'a row has no prompt (column "{data.prompt_column}" or "{data.text_column}")',
                            "give each row a prompt")
        if isinstance(value, list) and value and value[-1].get("role") == "assistant":
            value = value[:-1]
        return pairs.prompt_text(value, tokenizer)

    # --- model, evaluation ---------------------------------------------------------------

    def load_model(self, model, meta):
        def load():
            return pad_with_eos(load_base(model, self.auto_class))

        base = load()
        # full fine-tuning's reference: the base as it was loaded, read again when first needed (see reference())
        base.__dict__["_peftlab_reference_loader"] = load
        return base

    @torch.no_grad()
    def evaluate(self, model, tokenizer, raw, encoded, data, meta, max_length, batch_size):
        meta = PreferenceMeta.of(meta)
        model.eval()
        device, collate = model_device(model), self.collator(tokenizer)
        sums: dict[str, float] = defaultdict(float)
        counts: dict[str, int] = defaultdict(int)
        loss = PreferenceLoss(meta.objective, cache=False)
        for start in range(0, len(encoded), batch_size):
            batch = collate([encoded[i] for i in range(start, min(start + batch_size, len(encoded)))])
            batch = {k: v.to(device) for k, v in batch.items()}
            policy = sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
            for name, values in _reference_free(policy, batch).items():
                sums[name] += float(values.sum())
                counts[name] += len(values)
            scored = loss.terms(model, batch, policy)
            if scored is None:  # no reference known (a bare base, a reloaded full fine-tune): reference-free only
                continue
            rows = len(batch["row"])
            for name, number in {"loss": float(scored[0]), **scored[1]}.items():
                sums[name] += number * rows
                counts[name] += rows
        metrics = {name: sums[name] / counts[name] for name in sums if counts[name]}
        return {**metrics, "samples": float(len(raw))}

    def meta_from_adapter(self, tensors, base_config):
        return PreferenceMeta().to_dict()

    def meta_for_base(self) -> dict[str, Any]:
        return PreferenceMeta().to_dict()

    def baseline(self, splits, data, meta) -> Baseline | None:
        return None  # the bare base is the reference (measured: comparison.baselines)


def _reference_free(policy: SequenceLogps, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per pair: whether the chosen completion's mean log-probability per token beats the rejected's, and by how much
    (unpaired rows: the margin between the batch's desirable and undesirable means)."""
    mean = policy.mean.float()
    if "desirable" in batch:
        good, bad = mean[batch["desirable"]], mean[~batch["desirable"]]
        return {"margin": (good.mean() - bad.mean()).reshape(1)} if len(good) and len(bad) else {}
    chosen, rejected = mean.chunk(2)
    return {"pairwise_accuracy": (chosen > rejected).float(), "margin": chosen - rejected}


# --- the reference model -------------------------------------------------------------------

@contextlib.contextmanager
def reference(model: torch.nn.Module):
    """The module whose log-probabilities are the reference: the model with its adapter switched off; for a model
    whose own weights train (full fine-tuning, selective techniques) or whose adapter rewrote the base (PiSSA, OLoRA),
    a frozen copy of the base read once from where the base came from; None where no reference is known (a bare base,
    or a reloaded full fine-tune)."""
    from peft import PeftModel

    inner = getattr(model, "module", model)  # a DistributedDataParallel wrapper
    if isinstance(inner, PeftModel) and not _rewrites_base(inner):
        with inner.disable_adapter():
            yield model
        return
    base = _base(model)
    frozen = base.__dict__.get("_peftlab_reference")
    loader = base.__dict__.get("_peftlab_reference_loader")
    if frozen is None and loader is not None and any(p.requires_grad for p in model.parameters()):
        parameter = next(base.parameters())
        frozen = loader().to(device=parameter.device, dtype=parameter.dtype).eval().requires_grad_(False)
        rows = base.get_input_embeddings().weight.shape[0]
        if frozen.get_input_embeddings().weight.shape[0] != rows:
            frozen.resize_token_embeddings(rows)  # added tokens
        base.__dict__["_peftlab_reference"] = frozen  # not a submodule: never saved, never trained
    yield frozen


def _base(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under accelerate's and peft's wrappers (where load_model left the reference loader)."""
    inner = getattr(model, "module", model)
    return inner.get_base_model() if hasattr(inner, "get_base_model") else inner


def _frozen_copy(model: torch.nn.Module) -> torch.nn.Module | None:
    """The frozen reference copy :func:`reference` made for ``model``, if it made one."""
    return _base(model).__dict__.get("_peftlab_reference")


def _rewrites_base(model) -> bool:
    """Whether the adapter's initialisation moved part of the base's weights into the adapter (PiSSA, OLoRA, CorDA:
    ``init_lora_weights`` names such a method), so that the base without the adapter is not the base it started from."""
    init = getattr(model.peft_config.get(model.active_adapter), "init_lora_weights", True)
    return isinstance(init, str) and init.lower().startswith(("pissa", "olora", "corda"))


def _disable_dropout(model: torch.nn.Module) -> None:
    """Dropout off, as TRL's preference trainers do by default (``disable_dropout=True``): the policy's and the
    reference's log-probabilities of the same text must be comparable."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


# --- batches and the loss ------------------------------------------------------------------

class PairCollator:
    """Encoded rows -> one right-padded batch: pairs as their chosen sequences then their rejected ones (same order),
    unpaired rows as they are; ``labels`` -100 outside the completions; ``key``: each sequence's place in the split
    (the reference cache's key)."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        paired = "rejected_ids" in rows[0]
        sequences = [(r["input_ids"], r["prompt_length"]) for r in rows]
        keys = [2 * r["row"] for r in rows]
        if paired:
            sequences += [(r["rejected_ids"], r["prompt_length"]) for r in rows]
            keys += [2 * r["row"] + 1 for r in rows]
        batch = pad(sequences, self.pad_id)
        batch["row"] = torch.tensor([r["row"] for r in rows])
        batch["key"] = torch.tensor(keys)
        if not paired:
            batch["desirable"] = torch.tensor([bool(r["desirable"]) for r in rows])
        return batch


def pad(sequences: list[tuple[list[int], int]], pad_id: int) -> dict[str, torch.Tensor]:
    """(token ids, prompt length) per sequence -> input_ids, attention_mask, labels (the completion's ids only)."""
    width = max(len(ids) for ids, _ in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(sequences), width), dtype=torch.long)
    labels = torch.full((len(sequences), width), -100, dtype=torch.long)
    for i, (ids, prompt_length) in enumerate(sequences):
        input_ids[i, :len(ids)] = torch.tensor(ids)
        attention[i, :len(ids)] = 1
        labels[i, prompt_length:len(ids)] = torch.tensor(ids[prompt_length:], dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


class PreferenceLoss:
    """The training loss ``loss(model, batch)`` of an objective; ``logged()`` gives the means of TRL's logged values
    since its last call (the loss curve's entries carry them)."""

    def __init__(self, objective: PreferenceConfig, cache: bool):
        self.objective = objective
        self.cache: dict[int, float] | None = {} if cache and objective.uses_reference else None
        self._logged: dict[str, list[float]] = defaultdict(list)
        self._dropout_off: set[int] = set()
        self.notes: list[str] = []  # for the run record (the loop adds them): the frozen reference's memory

    def __call__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if id(model) not in self._dropout_off:
            _disable_dropout(model)
            self._dropout_off.add(id(model))
        policy = sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
        scored = self.terms(model, batch, policy)
        if scored is None:
            raise ConfigError(f"preference.loss={self.objective.loss} needs a reference model and this model has "
                              "none", "train an adapter, or fine-tune a base model's own weights")
        for name, number in scored[1].items():
            self._logged[name].append(number)
        if not self.notes and (copy := _frozen_copy(model)) is not None:
            count = sum(p.numel() for p in copy.parameters())
            size = sum(p.numel() * p.element_size() for p in copy.parameters())
            self.notes.append(f"memory: the reference is a frozen copy of the base ({count:,} parameters, "
                              f"{size / 2**20:,.0f} MiB) held beside the trained weights; this run's memory includes "
                              "it (an adapter's reference is the base with the adapter switched off: no copy)")
        return scored[0]

    def logged(self) -> dict[str, float]:
        means = {name: statistics.fmean(values) for name, values in self._logged.items() if values}
        self._logged.clear()
        return means

    def terms(self, model, batch, policy: SequenceLogps) -> tuple[torch.Tensor, dict[str, float]] | None:
        """The batch's loss and logged values (means over the batch), given the policy's log-probabilities; None
        when the objective needs a reference and the model has none."""
        objective = self.objective
        kto = objective.loss == "kto"
        kl_batch = _rotated(batch) if kto else None
        ref = ref_kl = policy_kl = None
        if objective.uses_reference:
            with torch.no_grad():
                ref = self._cached(batch)
                if ref is None or kto:  # KTO's KL rows change with the batch: never cached
                    with reference(model) as frozen:
                        if frozen is None:
                            return None
                        ref = self._reference_logps(frozen, batch) if ref is None else ref
                        ref_kl = sequence_logps(frozen, **kl_batch).logps if kto else None
                policy_kl = sequence_logps(model, **kl_batch).logps if kto else None  # the adapter on again
        half = len(batch["row"])
        if kto:
            desirable = batch.get("desirable")
            if desirable is None:  # pairs, unpaired: the chosen completions desirable, the rejected not
                desirable = torch.arange(2 * half, device=policy.logps.device) < half
            return kto_loss(objective, policy, ref, desirable, (policy_kl - ref_kl).mean().clamp(min=0))
        chosen, rejected = _split(policy, half)
        losses, logged = pair_loss(objective, chosen, rejected, *(ref.chunk(2) if ref is not None else (None, None)))
        return losses.mean(), {name: float(values.float().mean()) for name, values in logged.items()}

    def _cached(self, batch) -> torch.Tensor | None:
        keys = batch["key"].tolist()
        if self.cache is not None and all(k in self.cache for k in keys):
            return torch.tensor([self.cache[k] for k in keys], device=batch["input_ids"].device)
        return None

    def _reference_logps(self, frozen, batch) -> torch.Tensor:
        logps = sequence_logps(frozen, batch["input_ids"], batch["attention_mask"], batch["labels"]).logps
        if self.cache is not None:
            self.cache.update(zip(batch["key"].tolist(), logps.tolist()))
        return logps


def _rotated(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """KTO's KL batch: each prompt with the previous sequence's completion (the batch's completions rotated by one,
    as TRL pairs them); the KL estimate is the policy's log-probability of these minus the reference's."""
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    prompts, completions = [], []
    for i in range(len(ids)):
        present = ids[i][mask[i].bool()].tolist()
        in_completion = (labels[i] != -100).nonzero()
        start = int(in_completion[0]) if len(in_completion) else len(present)
        prompts.append(present[:start])
        completions.append(present[start:])
    rotated = [completions[-1]] + completions[:-1]
    return {k: v.to(ids.device) for k, v in pad([(p + c, len(p)) for p, c in zip(prompts, rotated)], 0).items()}


def _split(logps: SequenceLogps, half: int) -> tuple[SequenceLogps, SequenceLogps]:
    first = SequenceLogps(*(getattr(logps, f)[:half] for f in ("logps", "tokens", "token_nll_sum", "token_count")))
    second = SequenceLogps(*(getattr(logps, f)[half:] for f in ("logps", "tokens", "token_nll_sum", "token_count")))
    return first, second

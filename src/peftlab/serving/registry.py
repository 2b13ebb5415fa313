"""Adapters served on one base model.

The base model's weights are loaded once. peft keeps one technique per ``PeftModel`` (it refuses
to put a prefix-tuning adapter beside LoRA adapters), and a classification head has one shape
per model, so adapters are kept in *groups*: one ``PeftModel`` per (technique, head shape), each
over its own module tree whose frozen weights are the very tensors of the one base (shared, not
copied). Inside a group, peft's ``load_adapter`` adds each adapter under its name.

A group can *mix* when peft's ``adapter_names=[...]`` forward gives, row by row, what the
adapter gives alone (LoRA-like layers on supported modules, heads included): this is probed
once per adapter when it loads, not assumed. Other groups are run one adapter at a time.

Every method here that changes models runs on the batcher's worker thread (or before it
starts), never beside a forward pass.

Loading is split in two so that little of it stalls traffic: ``prepare`` (any thread, beside
forward passes) does the checks, reads the adapter and, when it needs a group of its own, builds
that group's model whole and probes it; ``install`` (worker thread) attaches into an existing
group or registers the prepared one. ``add`` is both in one. Adapters loaded at run time can be
capped (``max_adapters``): the least recently used one not in use (``touch`` marks use; ``in_use``
is the batcher's say) is evicted, and remembered with its directory so it can be reloaded on
demand; adapters given at start-up are pinned.
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel

from peftlab.adapters import AdapterSource, attach, detach, load_tokenizer_of, read_adapter
from peftlab.rundir import RunRecord
from peftlab.config import DataConfig, GenerationConfig, ModelConfig
from peftlab.tasks.base import output_scores
from peftlab.errors import AdapterError, ConfigError, PeftlabError
from peftlab.inference import data_config
from peftlab.model import embedding_rows, load_model_config, load_tokenizer, max_positions
from peftlab.tasks import get_task

BASE = "__base__"  # peft's name for the bare base in a mixed batch
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")


class AdapterNotFound(PeftlabError):
    """No adapter directory at the given place (HTTP 404)."""


class AdapterForbidden(PeftlabError):
    """An adapter directory outside the allowed root, or runtime loading switched off (HTTP 403)."""


class AdapterConflict(PeftlabError):
    """An adapter of that name is already served (HTTP 409)."""


class AdapterCapacity(PeftlabError):
    """The cap on adapters loaded at run time is reached and every one of them is in use (HTTP 503)."""


@dataclass(eq=False)
class Group:
    """One PeftModel (one technique, one head shape) holding one or more adapters."""

    key: tuple
    model: PeftModel
    prompt_learning: bool
    adapters: dict[str, "ServedAdapter"] = field(default_factory=dict)

    @property
    def mixable(self) -> bool:
        return bool(self.adapters) and all(a.mixable for a in self.adapters.values())


@dataclass(eq=False)
class ServedAdapter:
    name: str
    path: Path
    source: AdapterSource
    tokenizer: Any
    data: DataConfig
    max_length: int  # longest input in tokens: the model's positions, less any virtual tokens
    decoding: GenerationConfig
    group: Group | None  # None for the bare base
    method: str
    mixable: bool = False
    virtual_tokens: int = 0  # positions a prompt-learning adapter takes before the input
    runtime: bool = False  # loaded at run time: evictable under the cap (start-up adapters are pinned)

    @property
    def task(self):
        return self.source.task

    @property
    def meta(self) -> dict[str, Any]:
        return self.source.meta

    def describe(self) -> dict[str, Any]:
        info = {"task": self.source.task.name, "method": self.method, "mixed_batches": self.mixable}  # no paths
        if self.source.task.classifies and self.group is not None:  # the bare base has no trained head
            info["labels"] = self.source.task.labels(self.meta)
            info["text_pair"] = self.source.task.needs_pairs(self.data)
        return info


@dataclass(eq=False)
class Prepared:
    """An adapter read and checked by :meth:`Registry.prepare`, not served yet (:meth:`Registry.install`)."""

    name: str
    path: Path
    source: AdapterSource
    tokenizer: Any
    data: DataConfig
    runtime: bool
    key: tuple
    group: Group | None = None  # a new group, built with the adapter attached, when none of its key was there
    mixable: bool = False  # the probe's answer on that new group


def _share_weights(model: torch.nn.Module, reference: torch.nn.Module) -> None:
    """Make ``model`` use ``reference``'s parameters and buffers wherever name, shape and dtype agree."""
    params = dict(reference.named_parameters(remove_duplicate=False))
    buffers = dict(reference.named_buffers(remove_duplicate=False))
    for prefix, module in model.named_modules(remove_duplicate=False):
        for table, source in ((module._parameters, params), (module._buffers, buffers)):
            for name, tensor in list(table.items()):
                other = source.get(f"{prefix}.{name}" if prefix else name)
                if tensor is not None and other is not None and other.shape == tensor.shape \
                        and other.dtype == tensor.dtype:
                    table[name] = other


class Registry:
    """The base model, the served adapters and their groups."""

    def __init__(self, base: str, task: str, *, adapter_root: str | Path | None = None, device: str | None = None,
                 dtype: str = "auto", mixed_batches: bool = True, max_adapters: int | None = None):
        if max_adapters is not None and (isinstance(max_adapters, bool) or not isinstance(max_adapters, int)
                                         or max_adapters < 1):
            raise ConfigError(f"max_adapters must be a positive whole number, not {max_adapters!r}",
                              "leave it unset for no cap")
        self.max_adapters = max_adapters  # adapters loaded at run time held at once (start-up ones are pinned)
        self.in_use = lambda name: False  # the batcher's say: has the adapter queued or running rows
        self.evicted: dict[str, Path] = {}  # name -> directory, reloaded on demand
        self._recent: OrderedDict[str, None] = OrderedDict()  # runtime adapters served, least recently used first
        self._lock = threading.Lock()  # guards _recent and evicted: touch() comes from the event loop's thread
        self.model_config = ModelConfig(name=base, dtype=dtype)  # trust_remote_code stays off
        self.task = get_task(task)
        self.task.check_model(load_model_config(self.model_config), base)
        self.adapter_root = Path(adapter_root).resolve() if adapter_root else None
        self.device = device
        self.mixed_batches = mixed_batches
        self.tokenizer = load_tokenizer(self.model_config)
        base_meta = self.task.meta_for_base()
        self.base_model = self._load_base(base_meta)
        self.encoder_decoder = bool(getattr(self.base_model.config, "is_encoder_decoder", False))
        self.groups: list[Group] = []
        self.adapters: dict[str, ServedAdapter] = {}
        data = DataConfig(train_file="<inline>")
        self.base = ServedAdapter(
            name="base", path=Path(base), tokenizer=self.tokenizer, data=data,
            source=AdapterSource(path=Path(base), peft_config=None, shapes={}, task=self.task, meta=base_meta,
                                 config=None, model_config=self.model_config, record=RunRecord()),
            max_length=max_positions(self.base_model.config, self.tokenizer),  # not data.max_length's default
            decoding=GenerationConfig(), group=None, method="none")

    def _load_base(self, meta: dict[str, Any]):
        model = self.task.load_model(self.model_config, meta)
        if self.device:
            model.to(self.device)
        return model.eval()

    # --- lookups ---------------------------------------------------------------------

    def get(self, name: str) -> ServedAdapter | None:
        if name in ("base", self.model_config.name):
            return self.base
        return self.adapters.get(name)

    def names(self) -> list[str]:
        return ["base", *self.adapters]

    def resolve_path(self, path: str) -> Path:
        """A directory under the adapter root (runtime loads); anything else is refused."""
        if self.adapter_root is None:
            raise AdapterForbidden("loading adapters at run time is off",
                                   "start the server with --adapter-root DIR to allow directories under DIR")
        if not isinstance(path, str) or not path.strip() or "\x00" in path:
            raise AdapterError("path must be a non-empty directory name under the adapter root")
        candidate = Path(path)
        full = (candidate if candidate.is_absolute() else self.adapter_root / candidate).resolve()
        if full != self.adapter_root and self.adapter_root not in full.parents:
            raise AdapterForbidden(f"{path} is outside the adapter root", "give a directory under the adapter root, "
                                                                        "relative to it")
        if not full.is_dir():
            raise AdapterNotFound(f"no adapter directory {path} under the adapter root")
        return full

    def registered(self, name: str) -> Path | None:
        """The directory of an adapter evicted under the cap (reload it from there), else None."""
        with self._lock:
            return self.evicted.get(name)

    def touch(self, name: str) -> None:
        """Mark a runtime adapter as just used, for the cap's least-recently-used order (cheap; any thread)."""
        with self._lock:
            if name in self._recent:
                self._recent.move_to_end(name)

    # --- changes (worker thread; prepare on any thread) ------------------------------

    def add(self, name: str, path: str | Path, *, runtime: bool = False) -> ServedAdapter:
        """Load the adapter at ``path`` as ``name`` (checks: name, task family, fit to the base).

        ``runtime``: loaded at run time, so counted against ``max_adapters`` and evictable.
        """
        return self.install(self.prepare(name, path, runtime=runtime))

    def prepare(self, name: str, path: str | Path, *, runtime: bool = False) -> Prepared:
        """Check and read the adapter at ``path``; when no group of its kind is served, build one for it.

        Safe beside forward passes (any thread): it changes nothing they use. :meth:`install` serves it.
        """
        self._check_name(name, path)
        path = Path(path)
        if not path.is_dir():
            raise AdapterNotFound(f"adapter directory not found: {path}")
        source = read_adapter(path, base=self.model_config.name)
        source.model_config = source.model_config.model_copy(update={"trust_remote_code": False})
        if not _served_together(source.task, self.task):
            raise AdapterError(f'{path} is a {source.task.name} adapter; this server serves {self.task.name}',
                               "serve each task family with its own server")
        vocab = (source.record.base or {}).get("vocab_size")
        if vocab is not None and vocab != embedding_rows(self.base_model):
            raise AdapterError(f"{path} was trained with added tokens ({vocab} embedding rows; the base has "
                               f"{embedding_rows(self.base_model)})",
                               "serve it with a base that already holds those tokens (peftlab merge), or use "
                               "peftlab predict")
        tokenizer = load_tokenizer_of(source)
        if len(tokenizer) != len(self.tokenizer):
            raise AdapterError(f"{path} has a tokenizer of {len(tokenizer)} tokens; the base's has {len(self.tokenizer)}",
                               "adapters served together share the base's vocabulary")
        prepared = Prepared(name=name, path=path, source=source, tokenizer=tokenizer,
                            data=data_config(source, "<inline>", None), runtime=runtime, key=self._key(source))
        if self._group_for(prepared.key) is None:  # the slow part (a model load), done here off the worker
            prepared.group = self._new_group(source, name)
            prepared.mixable = not prepared.group.prompt_learning and self._mixes(prepared.group, name)
        return prepared

    def install(self, prepared: Prepared) -> ServedAdapter:
        """Serve a prepared adapter: attach it into its group, or register the group built for it.

        Evicts the least recently used runtime adapters not in use when the cap is reached
        (:class:`AdapterCapacity` when every one is in use, before any change).
        """
        name, source, tokenizer, path = prepared.name, prepared.source, prepared.tokenizer, prepared.path
        self._check_name(name, path)  # another install may have taken the name since prepare
        victims = self._victims() if prepared.runtime else []
        peft_config = source.peft_config
        group = self._group_for(prepared.key)
        created = group is None
        if created:  # the group prepare built; built here only when the one prepare saw is gone since
            group = prepared.group if prepared.group is not None else self._new_group(source, name)
            mixable = prepared.mixable if prepared.group is not None else \
                not group.prompt_learning and self._mixes(group, name)
        else:  # a group of this kind is served (perhaps installed after this prepare): the adapter joins it
            attach(group.model, source, name)
            group.model.set_adapter(name)
            if self.device:
                group.model.to(self.device)
            group.model.eval()
            mixable = not group.prompt_learning and self._mixes(group, name)
        prepared.group = None  # installed once
        data = prepared.data
        # what the model takes, not the length the run trained with (predict / eval keep that: inference.input_limit)
        reserved = (getattr(peft_config, "num_virtual_tokens", 0) or 0) if peft_config.is_prompt_learning else 0
        served = ServedAdapter(
            name=name, path=path, source=source, tokenizer=tokenizer, data=data,
            max_length=max_positions(group.model.config, tokenizer) - reserved,
            decoding=source.config.generation if source.config else GenerationConfig(), group=group,
            method=str(getattr(peft_config.peft_type, "value", peft_config.peft_type)).lower(),
            virtual_tokens=reserved, runtime=prepared.runtime)
        served.mixable = mixable
        group.adapters[name] = served
        if created:
            self.groups.append(group)
        self.adapters[name] = served
        with self._lock:
            self.evicted.pop(name, None)
            if prepared.runtime:
                self._recent[name] = None
        for victim in victims:
            self._evict(victim)
        return served

    def remove(self, name: str) -> None:
        """Stop serving ``name`` (or forget it, when it was evicted)."""
        if name not in self.adapters:
            with self._lock:
                if self.evicted.pop(name, None) is not None:
                    return
            raise AdapterNotFound(f'no adapter named "{name}"')
        self._unload(name)

    def _unload(self, name: str) -> None:
        served = self.adapters[name]
        group = served.group
        del self.adapters[name]
        del group.adapters[name]
        with self._lock:
            self._recent.pop(name, None)
        if not group.adapters:
            self.groups.remove(group)  # its module tree goes; the shared base weights stay
        else:
            detach(group.model, name)

    def _evict(self, name: str) -> None:
        path = self.adapters[name].path
        self._unload(name)
        with self._lock:
            self.evicted[name] = path

    def _victims(self) -> list[str]:
        """The runtime adapters to evict to make room for one more: least recently used first, none in use."""
        if self.max_adapters is None:
            return []
        with self._lock:
            order = list(self._recent)
        excess = len(order) - self.max_adapters + 1
        if excess <= 0:
            return []
        victims = [name for name in order if not self.in_use(name)][:excess]
        if len(victims) < excess:
            raise AdapterCapacity(f"the cap of {self.max_adapters} adapters loaded at run time is reached and they "
                                  "are all in use", "retry when their requests have finished, or serve with a higher "
                                                    "--max-adapters")
        return victims

    def _check_name(self, name: str, path: str | Path) -> None:
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise AdapterError(f"invalid adapter name {name!r}", "use 1-64 letters, digits, '.', '_', ':' or '-', "
                                                                 "starting with a letter or digit")
        if name in self.adapters or name in ("base", self.model_config.name) or name == BASE:
            raise AdapterConflict(f'an adapter named "{name}" is already served', "choose another name, or delete "
                                                                                  "the served one first")
        registered = self.registered(name)  # an evicted adapter reloads from its own directory only
        if registered is not None and Path(path).resolve() != registered.resolve():
            raise AdapterConflict(f'an adapter named "{name}" is already served (evicted, reloaded on demand) from '
                                  "another directory", "choose another name, or delete the served one first")

    def _new_group(self, source: AdapterSource, name: str) -> Group:
        """A new PeftModel holding the adapter, over a module tree that shares the base's weights."""
        group_base = self.task.load_model(self.model_config, source.meta)
        _share_weights(group_base, self.base_model)
        group = Group(key=self._key(source), model=attach(group_base, source, name),
                      prompt_learning=source.peft_config.is_prompt_learning)
        group.model.set_adapter(name)
        if self.device:
            group.model.to(self.device)
        group.model.eval()
        return group

    def _key(self, source: AdapterSource) -> tuple:
        head = len(self.task.labels(source.meta)) if self.task.classifies else None  # one head shape per model
        return (str(source.peft_config.peft_type), head)

    def _group_for(self, key: tuple) -> Group | None:
        return next((g for g in list(self.groups) if g.key == key), None)

    @torch.no_grad()
    def _mixes(self, group: Group, name: str) -> bool:
        """Whether a mixed batch ([name, base]) gives each row what the adapter / the base gives alone."""
        model = group.model
        vocab = min(len(self.tokenizer), 64)
        ids = torch.arange(vocab - 6, vocab, dtype=torch.long).unsqueeze(0)
        device = next(model.parameters()).device
        inputs: dict[str, torch.Tensor] = {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)}
        if self.encoder_decoder:
            start = model.config.decoder_start_token_id
            start = self.tokenizer.pad_token_id if start is None else start
            inputs["decoder_input_ids"] = torch.tensor([[start, ids[0, 0]]], device=device)
        twice = {k: v.repeat(2, 1) for k, v in inputs.items()}
        try:
            mixed = output_scores(model(**twice, adapter_names=[name, BASE]))
            model.set_adapter(name)
            alone = output_scores(model(**inputs))
            with model.disable_adapter():
                bare = output_scores(model(**inputs))
        except (TypeError, ValueError, RuntimeError, AttributeError, NotImplementedError):
            return False
        finally:
            model.set_adapter(name)
        tol = dict(atol=1e-4, rtol=1e-4)
        return bool(torch.allclose(mixed[0], alone[0], **tol) and torch.allclose(mixed[1], bare[0], **tol))


def _served_together(family, served) -> bool:
    """Whether one server serves adapters of both families: the same family, or two that generate with the same kind
    of model (a preference-tuned causal LM beside causal-lm adapters: the same prompts, the same generation)."""
    return family.name == served.name or (family.generates and served.generates
                                          and family.auto_class is served.auto_class)


def infer_task(adapters: dict[str, str | Path], base: str, task: str | None) -> str:
    """The task family: given, or the first adapter's."""
    if task:
        get_task(task)
        return task
    if not adapters:
        raise ConfigError("no adapters and no --task", "pass --adapter NAME=DIR, or --task seq-cls|seq2seq|causal-lm "
                                                       "to serve the bare base and load adapters at run time")
    return read_adapter(next(iter(adapters.values())), base=base).task.name

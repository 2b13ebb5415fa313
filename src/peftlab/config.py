"""The run configuration: one typed object, loaded from YAML, overridable from the CLI.

A config is validated completely before any work starts. Unknown keys are errors with
a "did you mean"; the resolved config is saved with every run (``peftlab.yaml``).

Layout (every section optional except ``model`` and ``data``)::

    model:    {name, revision, dtype, trust_remote_code, add_tokens, add_special_tokens, train_new_tokens}
    task:     seq-cls                      # a task family (peftlab tasks)
    method:   {name: lora, options: {r: 8}}  # a technique (peftlab methods)
    data:     {dataset | train_file | builtin, columns, splits, max_length}
    training: {epochs | max_steps, batch_size, learning_rate, ...}
    preference: {loss: dpo, beta: 0.1, ...}  # task: preference only
    output_dir: runs/my-run
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from peftlab.errors import ConfigError, did_you_mean


SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
TRACKERS = ("tensorboard", "mlflow", "wandb")  # training.report_to (peftlab.tracking)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class ModelConfig(_Section):
    """The base model."""

    name: str = Field(description="Hub id or local folder of the base model.")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Dtype of the frozen base weights; auto = bfloat16 on a CUDA GPU with bf16 (trainable "
                            "weights stay float32), float32 elsewhere."
    )
    attention: Literal["auto", "sdpa", "flash_attention_2", "eager"] = Field(
        "auto", description="Attention kernels; auto = transformers' choice (PyTorch SDPA where the model has it).")
    trust_remote_code: bool = Field(False, description="Run model code from the Hub (off unless asked).")
    add_tokens: list[str] = Field(default_factory=list, description="New ordinary tokens for the tokenizer; the "
                                                                     "embeddings grow to fit (docs/big-models.md).")
    add_special_tokens: dict[str, str | list[str]] = Field(
        default_factory=dict, description="Special tokens as for tokenizer.add_special_tokens, e.g. "
                                          "{pad_token: \"<pad>\", additional_special_tokens: [\"<|user|>\"]}.")
    train_new_tokens: Literal["rows", "lora"] = Field(
        "rows", description="How added tokens learn (method lora): rows = only their embedding (and output) rows "
                            "through peft's trainable_token_indices; lora = LoRA on the embedding and output layers "
                            "as well (notebook 10).")

    pooling: Literal["auto", "mean", "cls"] = Field(
        "auto", description="Sentence embeddings: token vectors -> one vector per text; auto = the base's own "
                            "(its sentence-transformers 1_Pooling config, with its Normalize step), else mean.")

    device_map: str | dict[str, int | str] | None = Field(
        None, description='Where the base model\'s layers go for eval / predict / serve: "auto", "balanced", '
                          '"sequential" or {module: device}; set by max_memory / offload_folder too '
                          '(docs/big-models.md).')
    max_memory: dict[str, str] | None = Field(
        None, description='Memory budget per device, e.g. {"0": "20GiB", "cpu": "30GiB"}; layers that do not fit '
                          'go to the next device, then to disk (offload_folder).')
    offload_folder: str | None = Field(None, description="Where layers that fit in no budget are kept on disk.")
    quantization: Literal["none", "8bit", "4bit"] = Field(
        "none", description="Load the frozen base in 8 or 4 bits with bitsandbytes (4bit: NF4, double quantization, "
                            "bf16 compute; training prepares it as QLoRA does). Needs a CUDA GPU.")

    @field_validator("add_special_tokens")
    @classmethod
    def _special_keys(cls, value: dict[str, Any]) -> dict[str, Any]:
        allowed = [*SPECIAL_TOKEN_KEYS, "additional_special_tokens"]
        for key, tokens in value.items():
            if key not in allowed:
                raise ValueError(f"unknown special token `{key}`{did_you_mean(key, allowed)}; known: "
                                 f"{', '.join(allowed)}")
            if (key == "additional_special_tokens") != isinstance(tokens, list):
                raise ValueError(f"`{key}` takes " + ("a list of tokens" if key == "additional_special_tokens"
                                                      else "one token"))
        return value

    def new_tokens(self) -> list[str]:
        """Every token the config adds, in order."""
        special = [t for key, t in self.add_special_tokens.items() if key != "additional_special_tokens"]
        return [*self.add_tokens, *special, *self.add_special_tokens.get("additional_special_tokens", [])]


class MethodConfig(_Section):
    """The PEFT technique and its options (passed to the peft config)."""

    name: str = Field("lora", description="A technique from `peftlab methods`.")
    options: dict[str, Any] = Field(default_factory=dict, description="Overrides of the technique's defaults.")


class DataConfig(_Section):
    """Where the examples come from and which columns hold what."""

    builtin: str | None = Field(None, description="A built-in dataset (`peftlab tasks` lists them).")
    dataset: str | None = Field(None, description="A Hugging Face Hub dataset name.")
    dataset_config: str | None = Field(None, description="The Hub dataset's configuration (e.g. mrpc).")
    train_file: str | None = Field(None, description="Local CSV / JSON Lines / Parquet training file.")
    validation_file: str | None = Field(None, description="Local validation file.")
    test_file: str | None = Field(None, description="Local test file.")
    train_split: str = "train"
    eval_split: str | None = Field("validation", description="Split evaluated each epoch; null = carve one out.")
    validation_fraction: float = Field(
        0.1, gt=0, lt=1, description="Share of train held out when there is no evaluation split."
    )
    text_column: str = "text"
    text_pair_column: str | None = None
    label_column: str = "label"
    labels: list[str] | None = Field(None, description="Label names in id order; default: found in the data.")
    regression: bool = Field(False, description="Seq-cls: the label is a number to predict (e.g. STS-B).")
    target_column: str | None = Field(None, description="Seq2seq target / causal-LM completion column.")
    prompt_template: str | None = Field(
        None, description='Builds the input from a row, e.g. "Tweet text : {text} Label : " (columns in braces).'
    )
    messages_column: str | None = Field(None, description="Causal LM: a column of chat messages "
                                                          "[{role, content}, ...]; the last one is the target.")
    loss_on: Literal["completion", "all"] = Field("completion", description="Causal LM: which tokens carry loss.")
    tokens_column: str = Field("tokens", description="Token classification: a column of words (a list per row).")
    tags_column: str = Field("tags", description="Token classification: a column of tags, one per word (names, e.g. "
                                                 "B-PER, or indices into data.labels).")
    label_subwords: Literal["first", "all"] = Field(
        "first", description="Token classification: which sub-word tokens of a word carry its tag in training: the "
                             "first (the rest are ignored), or all (a B- tag continues as I-).")
    negative_column: str | None = Field(None, description="Sentence embeddings: a hard negative per row (triplets "
                                                          "with text_column, text_pair_column).")
    question_column: str = Field("question", description="Question answering: the question column.")
    context_column: str = Field("context", description="Question answering: the passage the answer is taken from.")
    answers_column: str = Field("answers", description="Question answering: SQuAD's answers, {text: [...], "
                                                       "answer_start: [...]} (empty lists: no answer in the passage).")
    doc_stride: int = Field(64, ge=0, description="Question answering: tokens shared by consecutive windows of a "
                                                  "passage longer than max_length.")
    max_answer_length: int = Field(30, ge=1, description="Question answering: the longest answer span, in tokens.")
    conll_tag_column: int | None = Field(None, description="Token classification, CoNLL files: the column holding "
                                                           "the tags (0 = the word; default: the last column, "
                                                           "UPOS (3) in .conllu files).")
    prompt_column: str = Field("prompt", description="Preference / reward: the prompt (text, or chat messages).")
    chosen_column: str = Field("chosen", description="Preference / reward: the preferred completion (text, or the "
                               "assistant's messages).")
    rejected_column: str = Field("rejected", description="Preference / reward: the completion that lost.")
    completion_column: str = Field("completion", description="Preference, unpaired rows (KTO): one completion per "
                                   "row, desirable or not as data.label_column says (true / false).")
    max_length: int = Field(128, ge=8)
    target_max_length: int = Field(32, ge=1, description="Longest target / completion in tokens (generation "
                                                         "budget in evaluation).")
    max_train_samples: int | None = Field(None, ge=1)
    max_eval_samples: int | None = Field(None, ge=1)

    @field_validator("prompt_template")
    @classmethod
    def _template_fields(cls, value: str | None) -> str | None:
        if value is not None:
            import string

            try:
                fields = [f for _, f, _, _ in string.Formatter().parse(value) if f is not None]
            except ValueError as error:
                raise ValueError(f"prompt_template is not a valid template: {error}") from None
            if not fields:
                raise ValueError("prompt_template names no column: write e.g. \"Review: {text} Sentiment:\"")
        return value

    @model_validator(mode="after")
    def _one_source(self) -> DataConfig:
        sources = [s for s in ("builtin", "dataset", "train_file") if getattr(self, s)]
        if len(sources) != 1:
            raise ValueError(
                "data needs exactly one source: `builtin`, `dataset` (Hub) or `train_file` (local); "
                f"got {', '.join(sources) or 'none'}"
            )
        return self


class TrainingConfig(_Section):
    """The optimisation loop."""

    epochs: float = Field(3, gt=0)
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimizer steps (wins over epochs).")
    batch_size: int = Field(16, ge=1)
    eval_batch_size: int = Field(64, ge=1)
    learning_rate: float = Field(3e-4, gt=0)
    new_weights_learning_rate: float | None = Field(
        None, gt=0, description="The rate of the weights the base checkpoint lacks (drawn at random on load, trained "
                                "in full and saved with every technique: a warm-started encoder-decoder's cross-"
                                "attention, DeBERTa's pooler); default 2e-3, whatever the technique's rate. Not "
                                "the classification head, which trains at learning_rate.")
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "linear"
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    warmup_steps: int | None = Field(None, ge=0, description="Wins over warmup_ratio.")
    weight_decay: float = Field(0.0, ge=0)
    gradient_accumulation_steps: int = Field(1, ge=1)
    max_grad_norm: float | None = Field(1.0, gt=0)
    group_by_length: bool = Field(True, description="Batch rows of similar length (less padding, same data).")
    packing: Literal["auto"] | bool = Field(
        "auto", description="Causal LM: concatenate a batch's rows into one, without padding, attention kept inside "
                            "each row; auto = on for weight adapters where the model keeps rows apart (checked).")
    fused_optimizer: Literal["auto"] | bool = Field("auto", description="One fused AdamW kernel; auto = on a GPU.")
    compile: bool = Field(False, description="torch.compile the base model (slow first steps, faster after).")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in the backward pass: less "
                                                            "memory, about a third more compute.")
    seed: int = 42
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="Autocast precision; auto = bf16 on capable GPUs, fp32 on CPU."
    )
    eval_strategy: Literal["epoch", "steps", "no"] = "epoch"
    eval_steps: int | None = Field(None, ge=1, description="With eval_strategy=steps.")
    keep: Literal["best", "last"] = Field("best", description="Which adapter ends in output_dir.")
    metric_for_best: str | None = Field(None, description="Default: the task's main metric.")
    class_weights: Literal["balanced"] | dict[str, float] | None = Field(
        None, description="Classification: weight the training loss per class; balanced = n_samples / (n_classes * "
                          "count) as scikit-learn, or a mapping label -> weight (labels left out: 1).")
    log_every: int = Field(10, ge=1)
    report_to: list[Literal["tensorboard", "mlflow", "wandb"]] = Field(
        default_factory=list, description="Experiment trackers that follow the run (any of tensorboard, mlflow, "
                                          "wandb; docs/training.md): the config as parameters, the loss every "
                                          "log_every steps, each evaluation, the run directory as artifacts. "
                                          "(training.tensorboard: true, the older form, adds tensorboard.)")
    progress: bool = True
    checkpoint_every: int | None = Field(
        200, ge=1, description="Save a resumable checkpoint every N optimizer steps (null: only on Ctrl-C)."
    )
    checkpoint_keep: int = Field(2, ge=1, description="How many checkpoints to keep (oldest are deleted).")
    checkpoint_dir: str | None = Field(None, description="Default: <output_dir>.checkpoints beside the output.")

    @model_validator(mode="before")
    @classmethod
    def _tensorboard_flag(cls, data: Any) -> Any:
        """``tensorboard: true`` (before report_to existed; still in saved runs as ``tensorboard: false``) is
        ``report_to: [tensorboard]``."""
        if not isinstance(data, dict) or "tensorboard" not in data:
            return data
        data = dict(data)
        flag = data.pop("tensorboard")
        if not isinstance(flag, bool) and flag is not None:
            raise ValueError(f"`tensorboard` is {_shown(flag)}, but it must be true or false (or write "
                             "report_to: [tensorboard])")
        if flag:
            report = _tracker_list(data.get("report_to"))
            data["report_to"] = report + ["tensorboard"] if isinstance(report, list) and \
                "tensorboard" not in report else report
        return data

    @field_validator("report_to", mode="before")
    @classmethod
    def _report_to(cls, value: Any) -> Any:
        value = _tracker_list(value)
        return list(dict.fromkeys(value)) if isinstance(value, list) and all(isinstance(v, str) for v in value) \
            else value

    @field_validator("eval_strategy", mode="before")
    @classmethod
    def _yaml_no(cls, value: Any) -> Any:
        return "no" if value is False else value  # YAML 1.1 reads a bare `no` as false

    @field_validator("class_weights", mode="before")
    @classmethod
    def _class_weights(cls, value: Any) -> Any:
        if value is None or value == "balanced":
            return value
        if not isinstance(value, dict) or not value:
            raise ValueError(f'must be "balanced" or a mapping label: weight (e.g. {{positive: 3}}), not {value!r}')
        # YAML reads label names such as 0 / 1 / true as numbers or booleans: compare them as text
        weights = {str(k).lower() if isinstance(k, bool) else str(k): v for k, v in value.items()}
        bad = {k: v for k, v in weights.items()
               if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and v > 0)}
        if bad:
            raise ValueError(f"class weights must be positive numbers: {bad}")
        return {k: float(v) for k, v in weights.items()}

    @model_validator(mode="after")
    def _eval_steps(self) -> TrainingConfig:
        if self.eval_strategy == "steps" and not self.eval_steps:
            raise ValueError("eval_strategy=steps needs eval_steps")
        return self


def _tracker_list(value: Any) -> Any:
    """report_to as written: one name, a comma-separated text ("mlflow,wandb"), none / null, or a list."""
    if value is None or value in ("none", ""):
        return []
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class GenerationConfig(_Section):
    """Decoding for generative tasks (evaluation is always greedy)."""

    max_new_tokens: int | None = Field(None, ge=1, description="Default: data.target_max_length.")
    do_sample: bool = False
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    num_beams: int = Field(1, ge=1)
    stop: list[str] = Field(default_factory=list, description="Stop strings (causal LM).")


class PreferenceConfig(_Section):
    """Preference tuning (task: preference): the objective and its knobs, named as in TRL."""

    loss: Literal["dpo", "ipo", "orpo", "kto", "simpo"] = Field(
        "dpo", description="dpo (sigmoid), ipo, orpo, kto (unpaired rows or pairs), simpo.")
    beta: float = Field(0.1, gt=0, description="The objective's temperature (IPO: its regularisation tau; ORPO: "
                        "the odds-ratio weight lambda).")
    simpo_gamma: float = Field(0.5, ge=0, description="SimPO: the target reward margin.")
    desirable_weight: float = Field(1.0, gt=0, description="KTO: weight of the desirable rows' losses.")
    undesirable_weight: float = Field(1.0, gt=0, description="KTO: weight of the undesirable rows' losses.")
    precompute_reference: bool = Field(False, description="Compute each training row's reference log-probabilities "
                                       "once (the first epoch) and reuse them (DPO, IPO, KTO).")

    @property
    def uses_reference(self) -> bool:
        """Whether the objective measures the policy against a reference model (ORPO and SimPO do not)."""
        return self.loss not in ("orpo", "simpo")


class RunConfig(_Section):
    """A complete run."""

    model: ModelConfig
    task: str = Field("seq-cls", description="Task family (`peftlab tasks`).")
    method: MethodConfig = Field(default_factory=MethodConfig)
    data: DataConfig
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    preference: PreferenceConfig = Field(default_factory=PreferenceConfig)
    output_dir: str = "runs/peftlab-run"

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def with_absolute_paths(self) -> RunConfig:
        """The same run with its local paths (a model folder, data files, offload and checkpoint folders)
        made absolute, so that the saved run works from any working directory.

        A ``model.name`` is a path only when such a folder exists here (else it is a Hub id); the
        output directory stays as given (a run directory may be moved).
        """
        def absolute(value: str | None, must_exist: bool = False) -> str | None:
            if not value or (must_exist and not Path(value).exists()):
                return value
            path = Path(value).expanduser()
            return value if path.is_absolute() else str(path.absolute())

        return self.model_copy(update={
            "model": self.model.model_copy(update={"name": absolute(self.model.name, must_exist=True),
                                                   "offload_folder": absolute(self.model.offload_folder)}),
            "data": self.data.model_copy(update={key: absolute(getattr(self.data, key)) for key in
                                                 ("train_file", "validation_file", "test_file")}),
            "training": self.training.model_copy(update={"checkpoint_dir": absolute(self.training.checkpoint_dir)}),
        })

    def save(self, path: Path) -> None:
        path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


# ---------------------------------------------------------------------------------------
# Loading, overrides, and readable errors


def _section_fields(path: tuple, root: type[BaseModel]) -> list[str]:
    """The field names allowed at a location in the config, for "did you mean"."""
    model: type[BaseModel] | None = root
    for part in path[:-1]:
        if model is None or not isinstance(part, str) or part not in model.model_fields:
            return []
        annotation = model.model_fields[part].annotation
        model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    return list(model.model_fields) if model else []


_PLAIN = {"a valid integer": "a whole number", "a valid number": "a number", "a valid boolean": "true or false",
          "a valid string": "text", "a valid list": 'a list, e.g. ["a", "b"]',
          "greater than or equal to": "at least", "less than or equal to": "at most"}


def _shown(value: Any) -> str:
    """A config value as the user wrote it (YAML-like), shortened."""
    text = json.dumps(value, default=str, ensure_ascii=False)
    return text if len(text) <= 60 else text[:57] + "..."


def _problem(item: dict[str, Any]) -> str:
    """What is wrong with one value: the value given and what is allowed."""
    if item["type"] in {"dict_type", "model_type", "model_attributes_type"}:
        allowed = "a section of `key: value` lines"
    else:
        allowed = item["msg"].removeprefix("Input should be ").split(", unable to")[0].split(", got a")[0]
        for pydantic_words, plain in _PLAIN.items():
            allowed = allowed.replace(pydantic_words, plain)
        if item["type"] == "literal_error":
            allowed = "one of " + allowed
    return f"is {_shown(item['input'])}, but it must be {allowed}"


def readable_error(error: ValidationError, root: type[BaseModel] | None = None, prefix: str = "") -> str:
    """Pydantic's errors as one line: each key with what is wrong, unknown keys with a suggestion."""
    root = root or RunConfig
    lines = []
    for item in error.errors():
        loc = tuple(item["loc"])
        where = prefix + ".".join(str(p) for p in loc) or "config"
        if item["type"] == "extra_forbidden":
            hint = did_you_mean(str(loc[-1]), _section_fields(loc, root))
            lines.append(f"unknown key `{where}`{hint}")
        elif item["type"] == "missing":
            lines.append(f"missing key `{where}`")
        elif item["msg"].startswith("Input should be"):  # a wrong type or a value out of range
            lines.append(f"`{where}` {_problem(item)}")
        else:
            msg = item["msg"].removeprefix("Value error, ")
            lines.append(f"`{where}`: {msg}" if loc else msg)
    return "; ".join(lines)


def parse_value(text: str) -> Any:
    """Parse an override value as YAML (numbers, booleans, lists), falling back to text."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``dotted.key=value`` overrides to a raw config mapping (returns a copy)."""
    raw = copy.deepcopy(raw)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f'override "{item}" is not key=value', "e.g. --set training.learning_rate=1e-3")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(part.strip() for part in parts):
            raise ConfigError(f'override "{item}" has ' + ("no key before `=`" if not key.strip() else
                                                           f"an empty part in the key `{key.strip()}`"),
                              "write --set SECTION.KEY=VALUE, e.g. --set training.learning_rate=1e-3")
        node = raw
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f'override "{key}": `{part}` is not a section')
            node = child
        node[parts[-1]] = parse_value(value)
    return raw


def parse_config(raw: dict[str, Any], overrides: list[str] | None = None) -> RunConfig:
    """Validate a raw mapping (plus overrides) against the schema alone (keys, types, ranges).

    Which tasks and methods exist is checked a layer up, by :func:`peftlab.recipe.build_config`.
    """
    if not isinstance(raw, dict):
        raise ConfigError(f"a config must be a YAML mapping of sections (model, data, ...), not {_kind(raw)}")
    raw = apply_overrides(raw, overrides or [])
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(f"invalid config: {readable_error(error)}", CONFIG_HINT) from None


CONFIG_HINT = "fix these keys in the recipe or --set overrides (see `peftlab train --help`)"


def _kind(value: Any) -> str:
    return {list: "a list", str: "a single text", type(None): "empty"}.get(type(value), f"a {type(value).__name__}")


_NEEDS = ("a recipe needs at least a `model:` section (with `name:`) and a `data:` section (with `builtin:`, "
          "`dataset:` or `train_file:`), each key on its own line, indented below its section")


def read_recipe_file(path: str | Path) -> dict[str, Any]:
    """The raw mapping of a YAML recipe file, with readable errors for what users get wrong in one."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path} is a folder, not a recipe file", "pass the YAML file itself, e.g. recipe.yaml")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as error:
        line = error.object.count(b"\n", 0, error.start) + 1
        raise ConfigError(f"{path} is not UTF-8 text (byte {error.object[error.start]:#04x} on line {line})",
                          "save the recipe as UTF-8") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        if mark is None:
            raise ConfigError(f"{path} is not valid YAML: {error}") from None
        context = f" ({error.context} from line {error.context_mark.line + 1})" if getattr(
            error, "context_mark", None) else ""
        raise ConfigError(f"{path} is not valid YAML: line {mark.line + 1}, column {mark.column + 1}: "
                          f"{error.problem}{context}",
                          f"check the indentation (spaces, not tabs), colons and quotes near line {mark.line + 1}"
                          ) from None
    if raw is None:
        raise ConfigError(f"{path} is empty", _NEEDS)
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must be a mapping of sections (model:, data:, ...), but it holds {_kind(raw)}",
                          _NEEDS)
    return raw

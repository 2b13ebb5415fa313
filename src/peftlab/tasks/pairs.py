"""Preference data, what the preference and reward families share.

A row is a prompt with a chosen and a rejected completion (paired), or, unpaired (KTO), a prompt
with one completion and whether it is desirable (``data.label_column``: true / false). Prompts and
completions are text, or chat messages rendered by the tokenizer's chat template (TRL's
"conversational" format: the prompt a list of messages, each completion the assistant's messages).

Rows are tokenized as TRL tokenizes them, so that log-probabilities agree with it: the prompt
alone, and the prompt with each completion (text: with EOS appended); the completion starts where
the two token lists diverge (a token merging across the boundary belongs to the completion).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import datasets

from peftlab.config import DataConfig
from peftlab.data import require_columns
from peftlab.errors import ConfigError, DataError


@dataclass(frozen=True)
class Layout:
    """What a split's preference rows hold."""

    paired: bool  # chosen and rejected columns; else completion + desirable flag (KTO's unpaired rows)
    chat: bool  # completions are chat messages


def layout(dataset: datasets.Dataset, data: DataConfig, where: str) -> Layout:
    """Paired or unpaired rows, text or chat, checked: the columns exist, no empty values, chosen != rejected."""
    columns = set(dataset.column_names)
    paired = data.chosen_column in columns or data.rejected_column in columns
    if paired:  # without a prompt column the prompt is the completions' shared beginning (TRL's implicit prompt)
        require_columns(dataset, {"chosen_column": data.chosen_column, "rejected_column": data.rejected_column},
                        where)
    elif data.completion_column in columns:
        require_columns(dataset, {"prompt_column": data.prompt_column, "label_column": data.label_column}, where)
    else:
        raise DataError(
            f'{where} has neither preference pairs (columns "{data.chosen_column}" and "{data.rejected_column}") nor '
            f'unpaired rows (columns "{data.completion_column}" and "{data.label_column}")',
            f"its columns are: {', '.join(dataset.column_names)}; set data.chosen_column / data.rejected_column, or "
            "data.completion_column / data.label_column (KTO)")
    first = dataset[0][data.chosen_column if paired else data.completion_column] if len(dataset) else ""
    shape = Layout(paired=paired, chat=isinstance(first, list))
    _check_rows(dataset, data, shape, where)
    return shape


def _check_rows(dataset: datasets.Dataset, data: DataConfig, shape: Layout, where: str) -> None:
    completions = (data.chosen_column, data.rejected_column) if shape.paired else (data.completion_column,)
    prompt = (data.prompt_column,) if data.prompt_column in dataset.column_names else ()
    for column in (*prompt, *completions):
        empty = [i for i, value in enumerate(dataset[column]) if is_empty(value)]
        if empty:
            raise DataError(f'{where} has {len(empty)} empty value(s) in column "{column}" (rows '
                            f"{', '.join(map(str, empty[:5]))}{' ...' if len(empty) > 5 else ''}; counted from 0)",
                            "fill or drop those rows")
    if shape.paired:
        same = [i for i, (c, r) in enumerate(zip(dataset[data.chosen_column], dataset[data.rejected_column]))
                if c == r]
        if same:
            raise DataError(f"{where} has {len(same)} row(s) whose chosen and rejected completions are identical "
                            f"(rows {', '.join(map(str, same[:5]))}{' ...' if len(same) > 5 else ''}; counted from 0):"
                            " such a pair teaches nothing", "drop those rows")
    else:
        bad = [i for i, flag in enumerate(dataset[data.label_column]) if _desirable(flag) is None]
        if bad:
            raise DataError(f'{where} has {len(bad)} value(s) in column "{data.label_column}" that are not true / '
                            f"false (rows {', '.join(map(str, bad[:5]))}{' ...' if len(bad) > 5 else ''})",
                            "mark each completion desirable (true, 1) or not (false, 0)")


def is_empty(value: Any) -> bool:
    """A missing value: None, blank text, or a conversation without content."""
    if isinstance(value, list):
        return not value or not any(str(m.get("content", "")).strip() for m in value if isinstance(m, dict))
    return value is None or not str(value).strip()


def _desirable(flag: Any) -> bool | None:
    if isinstance(flag, bool):
        return flag
    if isinstance(flag, (int, float)) and flag in (0, 1):
        return bool(flag)
    if isinstance(flag, str) and flag.strip().lower() in ("true", "false", "1", "0", "yes", "no"):
        return flag.strip().lower() in ("true", "1", "yes")
    return None


def desirable(row: dict[str, Any], data: DataConfig) -> bool:
    return bool(_desirable(row[data.label_column]))


def prompt_and_completions(row: dict[str, Any], data: DataConfig) -> tuple[Any, list[Any]]:
    """A row's prompt and its completions (chosen, rejected; or the one unpaired completion). Without a prompt
    column the prompt is what chosen and rejected share from their start (whole messages of a conversation; text up
    to the word where they part), as TRL's ``extract_prompt`` reads Anthropic-HH-style rows."""
    paired = data.chosen_column in row
    completions = [row[data.chosen_column], row[data.rejected_column]] if paired else [row[data.completion_column]]
    if data.prompt_column in row and row[data.prompt_column] is not None:
        return row[data.prompt_column], completions
    if not paired:
        raise DataError(f'unpaired rows need a prompt column ("{data.prompt_column}")', "set data.prompt_column")
    chosen, rejected = completions
    if isinstance(chosen, list) and isinstance(rejected, list):
        shared = 0
        while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
            shared += 1
        return chosen[:shared], [chosen[shared:], rejected[shared:]]
    chosen, rejected = str(chosen), str(rejected)
    shared = _common_prefix(list(chosen), list(rejected))
    if 0 < shared < min(len(chosen), len(rejected)) and chosen[shared - 1] == " ":
        shared -= 1  # the completions start with their space (TRL's rule)
    return chosen[:shared], [chosen[shared:], rejected[shared:]]


# --- rendering and tokenizing ------------------------------------------------------------

def _messages(value: Any, role: str) -> list[dict[str, str]]:
    if isinstance(value, list):
        if not all(isinstance(m, dict) and "role" in m and "content" in m for m in value):
            raise DataError(f"a chat value is not a list of {{role, content}}: {str(value)[:80]}")
        return value
    return [{"role": role, "content": str(value)}]


def prompt_text(prompt: Any, tokenizer) -> str:
    """A prompt as the model sees it before its completion (chat: the template up to the assistant's turn)."""
    if isinstance(prompt, list):
        _need_template(tokenizer)
        return tokenizer.apply_chat_template(_messages(prompt, "user"), add_generation_prompt=True, tokenize=False)
    return str(prompt)


def _need_template(tokenizer) -> None:
    if not tokenizer.chat_template:
        raise ConfigError("chat-format preference rows need a tokenizer with a chat template",
                          "use a chat model, or write prompts and completions as plain text")


def tokenize(tokenizer, prompt: Any, completions: list[Any]) -> tuple[list[int], list[list[int]]]:
    """A prompt's token ids and each completion's (TRL's way: the completions start where the prompt's tokens and
    the prompt-with-completion's diverge; text completions end with EOS, chat ones with the template's end of turn)."""
    if any(isinstance(c, list) for c in completions):
        _need_template(tokenizer)
        history = _messages(prompt, "user")
        prompt_ids = _ids(tokenizer, tokenizer.apply_chat_template(history, add_generation_prompt=True,
                                                                   tokenize=False), chat=True)
        fulls = [_ids(tokenizer, tokenizer.apply_chat_template(history + _messages(c, "assistant"), tokenize=False),
                      chat=True) for c in completions]
    else:
        eos = tokenizer.eos_token or ""
        prompt_ids = _ids(tokenizer, str(prompt))
        fulls = [_ids(tokenizer, str(prompt) + (c if str(c).endswith(eos) else str(c) + eos)) for c in completions]
    start = min(_common_prefix(prompt_ids, full) for full in fulls)
    return prompt_ids[:start], [full[start:] for full in fulls]


def _ids(tokenizer, text: str, chat: bool = False) -> list[int]:
    return tokenizer(text, add_special_tokens=not chat)["input_ids"]


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def fit(prompt_ids: list[int], completions: list[list[int]], max_length: int) -> list[list[int]]:
    """Each completion cut so that prompt + completion fits ``max_length`` (its end is dropped: TRL's keep_start);
    the caller has checked that the prompt alone leaves room (:func:`check_budget`)."""
    room = max_length - len(prompt_ids)
    return [c[:room] for c in completions]


def check_budget(prompt_lengths: list[int], max_length: int, where: str) -> None:
    """A readable error for rows whose prompt alone fills the token budget (nothing of the completion would be left
    to learn from; TRL drops such rows silently)."""
    long = [i for i, n in enumerate(prompt_lengths) if n >= max_length]
    if long:
        raise DataError(f"{where} has {len(long)} row(s) whose prompt alone fills the token budget data.max_length="
                        f"{max_length} (the longest: {max(prompt_lengths)} tokens; rows {', '.join(map(str, long[:5]))}"
                        f"{' ...' if len(long) > 5 else ''}, counted from 0): no completion token would be left",
                        "raise data.max_length, shorten those prompts, or drop those rows")

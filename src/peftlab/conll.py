"""CoNLL-style files -> rows of words and tags (token classification's local input).

Two layouts, told apart by the file's extension:

- ``.conll`` / ``.iob`` / ``.bio`` / ``.txt`` (CoNLL-2000 / CoNLL-2003 and most NER corpora): one word per
  line, whitespace-separated columns, the word first and the tag last by default; a blank line ends a
  sentence; ``-DOCSTART-`` lines are document marks, not words.
- ``.conllu`` (Universal Dependencies): ten tab-separated columns (ID FORM LEMMA UPOS XPOS ...); comment
  lines start with ``#``; multi-word token ranges (``1-2``) and empty nodes (``1.1``) are skipped, so the
  words are the syntactic words; the tag is UPOS (column 3) by default.

``data.conll_tag_column`` picks another column (0 is the word itself). Every sentence becomes one row
``{tokens_column: [...], tags_column: [...]}``.
"""

from __future__ import annotations

from pathlib import Path

from peftlab.errors import DataError

CONLL_SUFFIXES = (".conll", ".conllu", ".iob", ".bio")
_UPOS = 3


def _open_text(path: Path):
    """The file as UTF-8 text, decompressed when its last suffix says so (.gz / .bz2 / .xz)."""
    import bz2
    import gzip
    import lzma

    opener = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}.get(path.suffix)
    return opener(path, "rt", encoding="utf-8") if opener else path.open(encoding="utf-8")


def read_conll(path: str | Path, tokens_column: str = "tokens", tags_column: str = "tags",
               tag_column: int | None = None, name: str | None = None) -> list[dict[str, list[str]]]:
    """The sentences of a CoNLL file as rows; a DataError names the first malformed line."""
    path = Path(path)
    name = name or str(path)
    conllu = ".conllu" in path.suffixes[-2:]
    column = tag_column if tag_column is not None else (_UPOS if conllu else -1)
    rows: list[dict[str, list[str]]] = []
    words: list[str] = []
    tags: list[str] = []

    def end_sentence() -> None:
        if words:
            rows.append({tokens_column: list(words), tags_column: list(tags)})
            words.clear()
            tags.clear()

    with _open_text(path) as handle:
        for number, line in enumerate(handle, 1):
            line = line.rstrip("\n").rstrip("\r")
            if not line.strip():
                end_sentence()
                continue
            if conllu and line.startswith("#"):
                continue
            fields = line.split("\t") if conllu else line.split()
            if fields[0] == "-DOCSTART-":
                end_sentence()
                continue
            if conllu:
                if len(fields) != 10:
                    raise DataError(f"{name} line {number}: a CoNLL-U line has 10 tab-separated columns, this one "
                                    f"{len(fields)}", "check the file (is it CoNLL-U? other layouts: .conll)")
                if "-" in fields[0] or "." in fields[0]:
                    continue  # a multi-word token's range or an empty node: the words are listed on their own
                word = fields[1]
            else:
                word = fields[0]
            if len(fields) < 2 and column != 0:
                raise DataError(f"{name} line {number} has one column ({line.strip()!r}): no tag",
                                "one word per line with its tag in another column (CoNLL); blank lines between "
                                "sentences")
            try:
                tag = fields[column]
            except IndexError:
                raise DataError(f"{name} line {number} has {len(fields)} columns; data.conll_tag_column is {column}",
                                f"set data.conll_tag_column to a column from 0 to {len(fields) - 1}") from None
            words.append(word)
            tags.append(tag)
    end_sentence()
    if not rows:
        raise DataError(f"{name} holds no sentences", "one word per line with its tag, blank lines between "
                                                      "sentences (CoNLL)")
    return rows

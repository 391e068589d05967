"""Training data from local files: JSON / JSON Lines, Parquet and CSV, read through Hugging Face
``datasets`` (never from the hub), and plain text for prompts.

Three kinds of records, each in a plain or a chat form:

* SFT examples: ``prompt`` + ``response`` columns, or a ``messages`` column (a conversation: a
  list of ``{"role", "content"}``; the last message is the assistant's response).
* preference pairs: ``chosen`` + ``rejected`` columns, with an optional ``prompt`` column; the
  three may also be conversations (``chosen`` and ``rejected`` then end with the assistant's
  answer; ``prompt``, when there, holds the turns before it).
* prompts: a ``prompt`` column, or ``messages`` (a final assistant turn is left out).

Token convention, the one the PPO trainer uses when it encodes prompts and ends completions: a
prompt is encoded with the tokenizer's special tokens, ``encode(prompt, add_special_tokens=True)``
(a <bos> first, for most tokenizers), a response without them and ended by EOS,
``encode(response, add_special_tokens=False) + [eos_token_id]``. A conversation becomes the same
pair of texts: the prompt is the chat template's rendering of the turns before the last
assistant message, with the generation prompt; the response is that message's content.

Every problem is a :class:`ConfigError` that names the file, and the row (counting from 0) when
one row is at fault. Nothing is truncated or dropped silently.
"""

from __future__ import annotations

import csv
import tempfile
from pathlib import Path
from typing import NamedTuple

from .errors import ConfigError

BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
"""File extension -> the ``datasets`` builder that reads it."""

SFT_COLUMNS = (("prompt", "response"), ("messages",))
PREFERENCE_COLUMNS = (("prompt", "chosen", "rejected"), ("chosen", "rejected"))
PROMPT_COLUMNS = (("prompt",), ("messages",))


class Example(NamedTuple):
    """One SFT sequence: prompt tokens then response tokens (EOS last)."""

    ids: list[int]
    prompt_len: int
    """The first ``prompt_len`` ids are the prompt; the loss is on the rest."""


class Pair(NamedTuple):
    """One preference pair: the token ids of the preferred and of the other sequence."""

    chosen: list[int]
    rejected: list[int]


def load_records(path: str, column_sets: tuple[tuple[str, ...], ...],
                 what: str) -> tuple[list[dict], tuple[str, ...]]:
    """The rows of a local ``.jsonl`` / ``.json`` / ``.parquet`` / ``.csv`` file as dicts, and the
    first of ``column_sets`` whose columns the file has (``what`` names the records in errors).
    Raises ConfigError when the file is missing, of another kind, unreadable, holds no rows or
    lacks the columns of every accepted set."""
    file = Path(path)
    exists_as_file(file, "data file")
    builder = BUILDERS.get(file.suffix.lower())
    if builder is None:
        raise ConfigError(f"{path}: unsupported file type {file.suffix or '(no extension)'!r}; "
                          f"{what} are read from {', '.join(BUILDERS)} files")
    if file.stat().st_size == 0:
        raise ConfigError(f"{path} is empty (no {what})")
    records = _read(file, builder)
    if not records:
        raise ConfigError(f"{path} holds no rows (no {what})")
    have = list(records[0])
    for columns in column_sets:
        if set(columns) <= set(have):
            return records, columns
    missing = min(([c for c in columns if c not in have] for columns in column_sets), key=len)
    raise ConfigError(f"{path} lacks the column(s) {', '.join(missing)} for {what}; it has "
                      f"{', '.join(have) or 'none'}. Accepted column sets: "
                      f"{' or '.join(' + '.join(columns) for columns in column_sets)}")


def exists_as_file(file: Path, what: str) -> None:
    if file.is_dir():
        raise ConfigError(f"{what} {file} is a directory; give the file itself")
    if not file.is_file():
        raise ConfigError(f"{what} {file} does not exist")


def utf8_text(file: Path) -> str:
    """The file's text; bytes that are not UTF-8 are an error naming the line."""
    try:
        return file.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError:
        raise _not_utf8(file) from None


def _not_utf8(file: Path) -> ConfigError:
    """The error for the file's first line that is not UTF-8, found line by line: the readers
    only say that some byte somewhere is not (pyarrow's, deep in a traceback)."""
    with open(file, "rb") as f:
        for number, line in enumerate(f, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as exc:
                return ConfigError(f"{file}: line {number}, byte {exc.start + 1} is not UTF-8 ({exc.reason}: "
                                   f"{line[exc.start:exc.end]!r}); save the file as UTF-8")
    return ConfigError(f"{file}: a character is cut off at the end of the file (not UTF-8); save it as UTF-8")


def _read(file: Path, builder: str) -> list[dict]:
    import datasets

    datasets.disable_progress_bars()
    try:
        return _load(datasets, file, builder)
    except UnicodeDecodeError as exc:
        if builder == "parquet":  # binary: it has no lines to name
            raise ConfigError(f"{file}: a text column holds bytes that are not UTF-8 ({exc.reason})") from None
        raise _not_utf8(file) from None


def _load(datasets, file: Path, builder: str) -> list[dict]:
    options = {}
    if builder == "csv":
        # Every CSV column as text: pandas would read a response "07" as the number 7 and an empty
        # cell as NaN.
        # utf-8-sig: spreadsheet exports start with a byte-order mark, which would stick to the
        # first column's name.
        with open(file, newline="", encoding="utf-8-sig") as f:
            header = next(csv.reader(f), [])
        options = dict(keep_default_na=False, encoding="utf-8-sig",
                       features=datasets.Features({name: datasets.Value("string") for name in header}))
    # A private cache, deleted afterwards: the shared one could serve a stale copy of a file
    # rewritten in place.
    with tempfile.TemporaryDirectory(prefix="ppo_fast_data_") as cache:
        try:
            table = datasets.load_dataset(builder, data_files=str(file), split="train", cache_dir=cache,
                                          **options)
        except Exception as exc:
            if "corresponds to no data" in str(exc):  # blank lines, [] or a CSV header only
                return []
            cause = exc.__cause__ or exc
            if isinstance(cause, UnicodeDecodeError):
                raise cause from None
            raise ConfigError(f"{file}: cannot read it as {builder} ({type(cause).__name__}: "
                              f"{cause})") from None
        return table.to_list()


def sft_examples(path: str, tokenizer, max_len: int) -> list[Example]:
    """Every row of an SFT file as token ids (see the module's token convention); a row longer
    than ``max_len`` tokens is an error naming it."""
    records, columns = load_records(path, SFT_COLUMNS, "SFT examples (a prompt and its response)")
    eos = _eos(tokenizer)
    examples = []
    for i, record in enumerate(records):
        if columns == ("messages",):
            prompt, response = _split_conversation(tokenizer, _messages(record, "messages", path, i),
                                                   path, i, "messages")
        else:
            prompt, response = (_text(record, name, path, i) for name in columns)
        prompt_ids = tokenizer.encode(prompt, add_special_tokens=True)
        ids = prompt_ids + tokenizer.encode(response, add_special_tokens=False) + [eos]
        _check_length(ids, max_len, path, i)
        examples.append(Example(ids, len(prompt_ids)))
    return examples


def preference_pairs(path: str, tokenizer, max_len: int) -> list[Pair]:
    """Every row of a preference file as a pair of token sequences, prompt + chosen and prompt +
    rejected (see the module's token convention); a sequence longer than ``max_len`` tokens is an
    error naming its row."""
    records, columns = load_records(path, PREFERENCE_COLUMNS,
                                    "preference pairs (a chosen and a rejected response)")
    eos = _eos(tokenizer)
    pairs = []
    for i, record in enumerate(records):
        sequences = []
        for name in ("chosen", "rejected"):
            if isinstance(record[name], list):
                turns = _messages(record, name, path, i)
                if "prompt" in columns:
                    turns = _messages(record, "prompt", path, i) + turns
                prompt, response = _split_conversation(tokenizer, turns, path, i, name)
            else:
                prompt = _text(record, "prompt", path, i) if "prompt" in columns else ""
                response = _text(record, name, path, i)
            ids = (tokenizer.encode(prompt, add_special_tokens=True)
                   + tokenizer.encode(response, add_special_tokens=False) + [eos])
            _check_length(ids, max_len, path, i, f" ({name})")
            sequences.append(ids)
        pairs.append(Pair(*sequences))
    return pairs


def prompt_texts(path: str, tokenizer=None) -> list[str]:
    """The prompts of a file: one per line of a ``.txt`` file, or the ``prompt`` column of a data
    file, or its ``messages`` rendered by the tokenizer's chat template with the generation prompt
    (a final assistant turn left out; these need ``tokenizer``)."""
    if Path(path).suffix.lower() == ".txt":
        exists_as_file(Path(path), "prompt file")
        prompts = [line for line in utf8_text(Path(path)).splitlines() if line.strip()]
        if not prompts:
            raise ConfigError(f"{path} holds no prompts")
        return prompts
    records, columns = load_records(path, PROMPT_COLUMNS, "prompts")
    if columns == ("prompt",):
        return [_text(record, "prompt", path, i) for i, record in enumerate(records)]
    if tokenizer is None:
        raise ConfigError(f"{path}: chat messages need a tokenizer's chat template to become prompts; "
                          "pass the tokenizer, or give a prompt column")
    prompts = []
    for i, record in enumerate(records):
        turns = _messages(record, "messages", path, i)
        if turns and turns[-1]["role"] == "assistant":
            turns = turns[:-1]
        if not turns:
            raise ConfigError(f"{path}: row {i} has no turn before the assistant's answer to prompt with")
        prompts.append(render_prompt(tokenizer, turns, path, i))
    return prompts


def render_prompt(tokenizer, messages: list[dict], path: str = "", row: int = 0) -> str:
    """The chat template's rendering of ``messages`` followed by the generation prompt: the text
    a model continues with the assistant's answer."""
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(f"{path}: row {row} is a chat conversation, but the tokenizer has no "
                          "chat_template to render it; use prompt/response columns or a tokenizer "
                          "with a chat template")
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _split_conversation(tokenizer, messages: list[dict], path: str, row: int,
                        column: str) -> tuple[str, str]:
    """(prompt text, response text) of a conversation that ends with the assistant's answer."""
    if not messages or messages[-1]["role"] != "assistant":
        last = repr(messages[-1]["role"]) if messages else "nothing"
        raise ConfigError(f"{path}: row {row}: {column} must end with the assistant's message (the "
                          f"response to learn), it ends with {last}")
    return render_prompt(tokenizer, messages[:-1], path, row), messages[-1]["content"]


def _text(record: dict, column: str, path: str, row: int) -> str:
    value = record[column]
    if not isinstance(value, str):
        raise ConfigError(f"{path}: row {row}: {column} must be text, got {type(value).__name__} "
                          f"{value!r}")
    return value


def _messages(record: dict, column: str, path: str, row: int) -> list[dict]:
    value = record[column]
    if not (isinstance(value, list) and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in value)):
        raise ConfigError(f"{path}: row {row}: {column} must be a list of messages, each "
                          f'{{"role": ..., "content": ...}} with text values, got {value!r:.200}')
    # Only role and content: Arrow gives every message every key any message of the file has.
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _check_length(ids: list[int], max_len: int, path: str, row: int, which: str = "") -> None:
    if len(ids) > max_len:
        raise ConfigError(f"{path}: row {row}{which} is {len(ids)} tokens (prompt and response "
                          f"with EOS), longer than max_len={max_len}; shorten or remove the row, "
                          "or raise max_len")


def _eos(tokenizer) -> int:
    if tokenizer.eos_token_id is None:
        raise ConfigError("the tokenizer has no EOS token: responses must end with one, as the "
                          "PPO trainer's completions do")
    return tokenizer.eos_token_id

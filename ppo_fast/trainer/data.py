"""Training data from local files (never from a hub): JSON / JSON Lines and CSV, read with
Python's own parsers so that a value is what the file holds (Arrow's type inference, which
``datasets`` reads them with, turns one number in a text column into a number column and every
text in it into a number), Parquet (typed columns) with pyarrow, and plain text for prompts.

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

A conversation answers someone: the assistant's answer must follow at least one user turn (checked
before the chat template runs; any failure of the template is an error naming the row).

Every problem is a :class:`ConfigError` that names the file, and the row when one row is at fault:
in a JSON Lines or CSV file by its line (counting from 1, as an editor shows it; a CSV header is
line 1), in a JSON list or a Parquet file by its index (counting from 0). Nothing is truncated or
dropped silently.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import NamedTuple

from .errors import ConfigError

FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
"""File extension -> the format it is read as."""

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


class Records(NamedTuple):
    """The rows of a data file, the accepted column set it has, and where each row is in it."""

    path: str
    rows: list[dict]
    columns: tuple[str, ...]
    lines: list[int] | None
    """The line each row starts on (JSON Lines, CSV); None where rows are not lines."""

    def where(self, row: int) -> str:
        """A row as errors name it: the file and the row's line, or its index (see the module)."""
        if self.lines is not None:
            return f"{self.path}: line {self.lines[row]}"
        return f"{self.path}: row {row} (counting from 0)"


def load_records(path: str, column_sets: tuple[tuple[str, ...], ...], what: str) -> Records:
    """The rows of a local ``.jsonl`` / ``.json`` / ``.parquet`` / ``.csv`` file as dicts, with the
    first of ``column_sets`` whose columns the file has (``what`` names the records in errors).
    Raises ConfigError when the file is missing, of another kind, unreadable, holds no rows or
    lacks the columns of every accepted set."""
    file = Path(path)
    exists_as_file(file, "data file")
    kind = FORMATS.get(file.suffix.lower())
    if kind is None:
        raise ConfigError(f"{path}: unsupported file type {file.suffix or '(no extension)'!r}; "
                          f"{what} are read from {', '.join(FORMATS)} files")
    if file.stat().st_size == 0:
        raise ConfigError(f"{path} is empty (no {what})")
    rows, lines = {"json": _json_rows, "csv": _csv_rows, "parquet": _parquet_rows}[kind](file)
    if not rows:
        raise ConfigError(f"{path} holds no rows (no {what})")
    # JSON rows may each have their own keys: the file has every column some row has.
    have = list(dict.fromkeys(name for row in rows for name in row))
    for columns in column_sets:
        if set(columns) <= set(have):
            return Records(path, rows, columns, lines)
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
    """The error for the file's first line that is not UTF-8, found line by line: the decoder
    names only a byte offset in the whole file."""
    with open(file, "rb") as f:
        for number, line in enumerate(f, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as exc:
                return ConfigError(f"{file}: line {number}, byte {exc.start + 1} is not UTF-8 ({exc.reason}: "
                                   f"{line[exc.start:exc.end]!r}); save the file as UTF-8")
    return ConfigError(f"{file}: a character is cut off at the end of the file (not UTF-8); save it as UTF-8")


def _json_rows(file: Path) -> tuple[list[dict], list[int] | None]:
    """A JSON list of objects, or JSON Lines (one object per line; blank lines skipped)."""
    text = utf8_text(file)
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{file}: line {exc.lineno}, column {exc.colno} is not valid JSON ({exc.msg})") from None
        for i, row in enumerate(rows):
            if not isinstance(row, dict):
                raise ConfigError(f"{file}: row {i} (counting from 0) is {_json_kind(row)} {row!r:.80}, not an "
                                  'object of columns ({"prompt": ..., ...})')
        return rows, None
    rows, lines = [], []
    # Lines end at "\n" only: a JSON text may hold U+2028 and other characters str.splitlines splits at.
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{file}: line {number}, column {exc.colno} is not valid JSON ({exc.msg}); a "
                              f"{file.suffix} file holds one JSON object per line, or a JSON list of them") from None
        if not isinstance(row, dict):
            raise ConfigError(f"{file}: line {number} is {_json_kind(row)} {row!r:.80}, not an object of "
                              'columns ({"prompt": ..., ...})')
        rows.append(row)
        lines.append(number)
    return rows, lines


def _json_kind(value) -> str:
    return {list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(type(value), "a number")


def _csv_rows(file: Path) -> tuple[list[dict], list[int]]:
    """Every cell as the text it holds (an empty cell is ""; "07" stays "07"), under the header's
    names; blank lines skipped."""
    text = utf8_text(file)  # a spreadsheet's byte-order mark is dropped with the decoding
    # A cell may be as long as the file (a long response); the csv module's default cap is 128 KiB.
    csv.field_size_limit(max(csv.field_size_limit(), len(text)))
    reader = csv.reader(io.StringIO(text, newline=""))
    header, rows, lines = None, [], []
    try:
        while True:
            start = reader.line_num + 1
            cells = next(reader, None)
            if cells is None:
                break
            if not cells:
                continue
            if header is None:
                header = cells
                twice = sorted({name for name in header if header.count(name) > 1})
                if twice:
                    raise ConfigError(f"{file}: the header (line {start}) names the column(s) {', '.join(twice)} "
                                      "more than once")
                continue
            if len(cells) != len(header):
                raise ConfigError(f"{file}: line {start} has {len(cells)} cells, the header has {len(header)} "
                                  f"({', '.join(header)}); quote a cell that holds a comma or a line break")
            rows.append(dict(zip(header, cells)))
            lines.append(start)
    except csv.Error as exc:
        raise ConfigError(f"{file}: line {reader.line_num} cannot be read as CSV ({exc})") from None
    return rows, lines


def _parquet_rows(file: Path) -> tuple[list[dict], None]:
    import pyarrow
    import pyarrow.parquet

    try:
        table = pyarrow.parquet.read_table(file)
    except (pyarrow.ArrowException, OSError) as exc:
        raise ConfigError(f"{file}: cannot read it as parquet ({type(exc).__name__}: {exc})") from None
    try:
        return table.to_pylist(), None
    except UnicodeDecodeError as exc:  # binary: it has no lines to name
        raise ConfigError(f"{file}: a text column holds bytes that are not UTF-8 ({exc.reason})") from None


def sft_examples(path: str, tokenizer, max_len: int) -> list[Example]:
    """Every row of an SFT file as token ids (see the module's token convention); a row longer
    than ``max_len`` tokens is an error naming it."""
    records = load_records(path, SFT_COLUMNS, "SFT examples (a prompt and its response)")
    eos = _eos(tokenizer)
    examples = []
    for i, record in enumerate(records.rows):
        where = records.where(i)
        if records.columns == ("messages",):
            prompt, response = _split_conversation(tokenizer, _messages(record, "messages", where), where, "messages")
        else:
            prompt, response = (_text(record, name, where) for name in records.columns)
        prompt_ids = tokenizer.encode(prompt, add_special_tokens=True)
        ids = prompt_ids + tokenizer.encode(response, add_special_tokens=False) + [eos]
        _check_length(ids, max_len, where)
        examples.append(Example(ids, len(prompt_ids)))
    return examples


def preference_pairs(path: str, tokenizer, max_len: int) -> list[Pair]:
    """Every row of a preference file as a pair of token sequences, prompt + chosen and prompt +
    rejected (see the module's token convention); a sequence longer than ``max_len`` tokens is an
    error naming its row."""
    records = load_records(path, PREFERENCE_COLUMNS, "preference pairs (a chosen and a rejected response)")
    eos = _eos(tokenizer)
    pairs = []
    for i, record in enumerate(records.rows):
        where = records.where(i)
        sequences = []
        for name in ("chosen", "rejected"):
            if isinstance(record.get(name), list):
                turns = _messages(record, name, where)
                column = name
                if "prompt" in records.columns:
                    turns = _messages(record, "prompt", where) + turns
                    column = f"prompt + {name}"
                prompt, response = _split_conversation(tokenizer, turns, where, column)
            else:
                prompt = _text(record, "prompt", where) if "prompt" in records.columns else ""
                response = _text(record, name, where)
            ids = (tokenizer.encode(prompt, add_special_tokens=True)
                   + tokenizer.encode(response, add_special_tokens=False) + [eos])
            _check_length(ids, max_len, where, f" ({name})")
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
    records = load_records(path, PROMPT_COLUMNS, "prompts")
    if records.columns == ("prompt",):
        return [_text(record, "prompt", records.where(i)) for i, record in enumerate(records.rows)]
    if tokenizer is None:
        raise ConfigError(f"{path}: chat messages need a tokenizer's chat template to become prompts; "
                          "pass the tokenizer, or give a prompt column")
    prompts = []
    for i, record in enumerate(records.rows):
        where = records.where(i)
        turns = _messages(record, "messages", where)
        if turns and turns[-1]["role"] == "assistant":
            turns = turns[:-1]
        _needs_a_user_turn(turns, where, "messages")
        prompts.append(render_prompt(tokenizer, turns, where))
    return prompts


def render_prompt(tokenizer, messages: list[dict], where: str = "the conversation") -> str:
    """The chat template's rendering of ``messages`` followed by the generation prompt: the text
    a model continues with the assistant's answer. ``where`` names the row in errors."""
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(f"{where} is a chat conversation, but the tokenizer has no chat_template to "
                          "render it; use prompt/response columns or a tokenizer with a chat template")
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as exc:  # the template is the model's own code (Jinja), and fails in its own ways
        roles = ", ".join(repr(m["role"]) for m in messages) or "no turns"
        raise ConfigError(f"{where}: the tokenizer's chat template cannot render the turns ({roles}): "
                          f"{type(exc).__name__}: {exc}") from None


def _split_conversation(tokenizer, messages: list[dict], where: str, column: str) -> tuple[str, str]:
    """(prompt text, response text) of a conversation that ends with the assistant's answer."""
    if not messages or messages[-1]["role"] != "assistant":
        last = repr(messages[-1]["role"]) if messages else "nothing"
        raise ConfigError(f"{where}: {column} must end with the assistant's message (the response to "
                          f"learn), it ends with {last}")
    _needs_a_user_turn(messages[:-1], where, column)
    return render_prompt(tokenizer, messages[:-1], where), messages[-1]["content"]


def _needs_a_user_turn(turns: list[dict], where: str, column: str) -> None:
    """The turns before the assistant's answer hold a user message: an answer to no one is not a
    prompt and response (and many chat templates fail on it)."""
    if not any(m["role"] == "user" for m in turns):
        before = ", ".join(repr(m["role"]) for m in turns) or "nothing"
        raise ConfigError(f"{where}: {column} has no user turn before the assistant's answer (before it: "
                          f"{before}); the answer must follow at least one user message")


def _text(record: dict, column: str, where: str) -> str:
    value = _value(record, column, where)
    if not isinstance(value, str):
        raise ConfigError(f"{where}: {column} must be text, got {type(value).__name__} {value!r:.200}")
    return value


def _value(record: dict, column: str, where: str):
    if column not in record:
        raise ConfigError(f"{where} has no {column} (it has {', '.join(record) or 'no columns'})")
    return record[column]


def _messages(record: dict, column: str, where: str) -> list[dict]:
    value = _value(record, column, where)
    if not (isinstance(value, list) and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in value)):
        raise ConfigError(f"{where}: {column} must be a list of messages, each "
                          f'{{"role": ..., "content": ...}} with text values, got {value!r:.200}')
    # Only role and content: a Parquet file gives every message every key any message of the file has.
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _check_length(ids: list[int], max_len: int, where: str, which: str = "") -> None:
    if len(ids) > max_len:
        raise ConfigError(f"{where}{which} is {len(ids)} tokens (prompt and response with EOS), longer "
                          f"than max_len={max_len}; shorten or remove the row, or raise max_len")


def _eos(tokenizer) -> int:
    if tokenizer.eos_token_id is None:
        raise ConfigError("the tokenizer has no EOS token: responses must end with one, as the "
                          "PPO trainer's completions do")
    return tokenizer.eos_token_id

"""Stream samples out of a LLaVA .json (one top-level list) or .jsonl file in constant memory.

`json.load` of the 665k-sample LLaVA mix needs several times the file's size in RAM before the first
sample can be looked at. Here a .json list is decoded one element at a time from a buffered reader
(`JSONDecoder.raw_decode`), and a .jsonl file one line at a time, so memory stays at one buffer plus
one sample. Syntax errors come back as records with line and column instead of exceptions: a .jsonl
reader goes on with the next line; a .json reader cannot resynchronise inside a list, so it stops.
Valid JSON that no later step could handle is an error record too, and reading goes on: an integer
past Python's digit limit, nesting past the decoder's recursion limit, text with a lone surrogate.
"""

from __future__ import annotations

import codecs
import json
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llava_cluster.errors import UserError

CHUNK = 1 << 20
_WS = re.compile(r"[ \t\n\r]*")
_LINE_SUFFIXES = (".jsonl", ".ndjson")


@dataclass(slots=True)
class Record:
    """One element of the file: a decoded value, or the syntax error found where it should be."""

    index: int  # position among the file's samples (a broken .jsonl line takes a position too)
    value: Any = None
    error: str | None = None  # "line L column C: message"
    kind: str = "invalid_json"  # the defect kind of `error`: "invalid_text" for valid JSON that holds bad text
    field: str = "(json)"  # where in the sample `error` is


class SampleReader:
    """Iterate `Record`s of a LLaVA data file; `bytes_read`/`size` drive a progress bar.

    Unusable input (missing, not a file, not JSON at all, top-level not a list) raises
    `UserError(exit_code=2)` before the first record.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise UserError(f"data file not found: {self.path}", 2)
        if not self.path.is_file():
            raise UserError(f"not a file: {self.path}", 2)
        self.size = self.path.stat().st_size
        self.bytes_read = 0
        self.stopped_early = False  # a .json list broke off at a syntax error
        self.decoder = _Decoder()
        try:
            with open(self.path, "rb") as fh:
                head = fh.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
        except OSError as err:
            raise UserError(f"cannot read {self.path}: {err.strerror or err}", 2) from None
        if not head:
            raise UserError(f"{self.path} is empty", 2)
        first = chr(head[0])
        suffix = self.path.suffix.lower()
        if suffix in _LINE_SUFFIXES:
            self.lines = True
            if first == "[":
                raise UserError(f"{self.path} holds one JSON list, not JSON Lines: rename it to .json", 2)
        elif suffix == ".json":
            self.lines = False
        else:
            self.lines = first == "{"
        if not self.lines and first != "[":
            what = "a JSON object" if first == "{" else f"{first!r}, which is not JSON"
            raise UserError(
                f"{self.path} starts with {what}; expected a list of samples [{{...}}, ...]"
                + (" (for one sample per line, name the file .jsonl)" if first == "{" else ""), 2)
        if self.lines and first != "{":
            raise UserError(f"{self.path} is not JSON Lines: line 1 starts with {first!r}, not '{{'", 2)

    def __iter__(self) -> Iterator[Record]:
        self.bytes_read = 0
        try:
            with open(self.path, "rb") as fh:
                yield from (self._lines(fh) if self.lines else self._array(fh))
        except OSError as err:
            raise UserError(f"cannot read {self.path}: {err.strerror or err}", 2) from None

    def _lines(self, fh) -> Iterator[Record]:
        index = 0
        for lineno, raw in enumerate(fh, 1):
            self.bytes_read += len(raw)
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as err:
                yield Record(index, error=f"line {lineno}: not UTF-8 text ({err.reason})")
            else:
                try:
                    value, end = self.decoder.decode(text, _WS.match(text).end())
                    if text[end:].strip():
                        raise json.JSONDecodeError("Extra data", text, end)
                except json.JSONDecodeError as err:
                    yield Record(index, error=f"line {lineno} column {err.colno}: {err.msg}")
                except ValueError as err:
                    yield Record(index, error=f"line {lineno}: {err}")
                else:
                    yield self.decoder.record(index, value, text, 0, end, lambda n=lineno: f"line {n}")
            index += 1

    def _array(self, fh) -> Iterator[Record]:
        """Decode `[v, v, ...]` one element at a time; see the module docstring."""
        scanner = _ArrayScanner(fh, self)
        index = 0
        for value, error, fatal in scanner:
            if error is not None:
                self.stopped_early = self.stopped_early or fatal
                yield Record(index, error=error)
                if fatal:
                    return
                index += 1
                continue
            yield self.decoder.record(index, value, scanner.buf, *scanner.last_span,
                                      lambda: scanner._where(scanner.last_span[0]))
            index += 1


class _ArrayScanner:
    """A sliding text window over the file with line/column bookkeeping for error messages."""

    def __init__(self, fh, owner: SampleReader) -> None:
        self.fh, self.owner = fh, owner
        self.decoder = codecs.getincrementaldecoder("utf-8-sig")()
        self.json = owner.decoder
        self.last_span = (0, 0)  # where in `buf` the element decoded last lies
        self.buf, self.pos, self.eof = "", 0, False
        self.base_line, self.base_col = 1, 0  # line and 0-based column of buf[0]

    def _fill(self) -> None:
        if self.pos:
            dropped = self.buf[: self.pos]
            newlines = dropped.count("\n")
            if newlines:
                self.base_line += newlines
                self.base_col = len(dropped) - dropped.rfind("\n") - 1
            else:
                self.base_col += len(dropped)
            self.buf, self.pos = self.buf[self.pos:], 0
        data = self.fh.read(CHUNK)
        self.owner.bytes_read += len(data)
        try:
            self.buf += self.decoder.decode(data, final=not data)
        except UnicodeDecodeError as err:
            raise UserError(f"{self.owner.path} is not UTF-8 text near byte {self.owner.bytes_read}: {err.reason}",
                            2) from None
        self.eof = not data

    def _where(self, pos: int) -> str:
        newlines = self.buf.count("\n", 0, pos)
        if newlines:
            column = pos - self.buf.rfind("\n", 0, pos)
            return f"line {self.base_line + newlines} column {column}"
        return f"line {self.base_line} column {self.base_col + pos + 1}"

    def _skip_ws(self) -> bool:
        """Move to the next non-blank character; False at the end of the file."""
        while True:
            self.pos = _WS.match(self.buf, self.pos).end()
            if self.pos < len(self.buf):
                return True
            if self.eof:
                return False
            self._fill()

    def _decode(self) -> tuple[Any, str | None, bool]:
        """(value, error, whether reading must stop there)."""
        while True:
            try:
                value, end = self.json.decode(self.buf, self.pos)
            except json.JSONDecodeError as err:
                cut = err.msg.startswith("Unterminated string") or err.pos >= len(self.buf) - 8
                if cut and not self.eof:
                    self._fill()
                    continue
                return None, f"{self._where(err.pos)}: {err.msg}", True
            except ValueError as err:  # nested too deeply for the decoder: step over it by counting brackets
                where = self._where(self.pos)
                if self._skip_nested():
                    return None, f"{where}: {err}", False
                return None, f"{where}: {err}, and the file ends inside it", True
            if end >= len(self.buf) - 8 and not self.eof:  # a number may continue in the next chunk
                self._fill()
                continue
            self.last_span = (self.pos, end)
            self.pos = end
            return value, None, False

    def _skip_nested(self) -> bool:
        """Move `pos` past the array/object starting there, counting brackets outside strings; False when
        the file ends first. Offsets are kept relative to `pos`, which `_fill` moves to 0."""
        depth, at = 0, 0
        while True:
            match = _BRACKET_OR_STRING.search(self.buf, self.pos + at)
            if match is None or (match.group(1) is None and match.group()[0] == '"'):  # needs more text
                if self.eof:
                    return False
                at = (match.start() if match else len(self.buf)) - self.pos
                self._fill()
                continue
            at = match.end() - self.pos
            char = match.group()
            if char in "[{":
                depth += 1
            elif char in "]}":
                depth -= 1
                if depth == 0:
                    self.pos = match.end()
                    return True

    def __iter__(self) -> Iterator[tuple[Any, str | None, bool]]:
        self._skip_ws()
        self.pos += 1  # the "[" checked by SampleReader
        first = True
        while True:
            if not self._skip_ws():
                yield None, f"{self._where(self.pos)}: the file ends before the list is closed with ']'", True
                return
            char = self.buf[self.pos]
            if char == "]":
                self.pos += 1
                if self._skip_ws():
                    yield None, f"{self._where(self.pos)}: extra data after the closing ']'", True
                return
            if not first:
                if char != ",":
                    yield None, f"{self._where(self.pos)}: expected ',' or ']' after sample, found {char!r}", True
                    return
                self.pos += 1
                if not self._skip_ws():
                    continue
            value, error, fatal = self._decode()
            yield value, error, fatal
            if fatal:
                return
            first = False


# A string (its closing quote in group 1, absent when the buffer ends inside it), or a bracket.
_BRACKET_OR_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*(")?|[\[\]{}]')

# A lone surrogate can only enter through a \uD800-\uDFFF escape: valid UTF-8 cannot encode one.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89abcdefABCDEF]")


class _Decoder:
    """JSON decoding whose hostile cases are record errors, not exceptions: an integer past Python's
    digit limit, nesting past the recursion limit, and text that is not Unicode (lone surrogates), which
    every later step (UTF-8 output, the tokenizer) would crash on."""

    def __init__(self) -> None:
        self.longest_int = 0
        self.json = json.JSONDecoder(parse_int=self._int)

    def _int(self, digits: str) -> int | None:
        try:
            return int(digits)
        except ValueError:  # more digits than sys.get_int_max_str_digits()
            self.longest_int = max(self.longest_int, len(digits.lstrip("-")))
            return None

    def decode(self, text: str, pos: int) -> tuple[Any, int]:
        """`raw_decode`; ValueError (not JSONDecodeError) for nesting too deep."""
        self.longest_int = 0
        try:
            return self.json.raw_decode(text, pos)
        except RecursionError:
            raise ValueError("the sample is nested too deeply to decode (over ~1000 levels of [ and {)") from None

    def record(self, index: int, value: Any, text: str, start: int, end: int, where: Callable[[], str]) -> Record:
        """The Record of the element decoded from text[start:end], with the error of a too-long integer
        or of invalid text; `where` says where it starts (computed only for an error)."""
        if self.longest_int:
            return Record(index, error=f"{where()}: an integer of {self.longest_int:,} digits; at most "
                                       f"{sys.get_int_max_str_digits():,} can be read")
        if _SURROGATE_ESCAPE.search(text, start, end):
            found = _unencodable(value)
            if found is not None:
                field, bad = found
                at = next(i for i, c in enumerate(bad) if "\ud800" <= c <= "\udfff")
                return Record(index, value, kind="invalid_text", field=field,
                              error=f"a lone surrogate \\u{ord(bad[at]):04x} at character {at}: not Unicode "
                                    "text, so it cannot be written as UTF-8 or tokenized")
        return Record(index, value)


def _unencodable(value: Any) -> tuple[str, str] | None:
    """(field path, text) of the first string (key or value) that UTF-8 cannot encode, else None."""
    stack: list[tuple[str, Any]] = [("", value)]
    while stack:
        path, item = stack.pop()
        if isinstance(item, str):
            if not _encodes(item):
                return path or "(sample)", item
        elif isinstance(item, dict):
            for key, child in reversed(item.items()):
                if not _encodes(key):
                    return f"{path}.{key!r}".lstrip("."), key
                stack.append((f"{path}.{key}" if path else key, child))
        elif isinstance(item, list):
            stack.extend((f"{path}[{i}]", child) for i, child in reversed(list(enumerate(item))))
    return None


def _encodes(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True

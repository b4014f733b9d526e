"""The entries of one top-level JSON object, read from a file one at a time, never the whole file at once.

`entries(stream)` yields each (key, value) of `{"k1": v1, "k2": v2, ...}` in file order. It keeps a text
buffer of what has been read and not yet decoded, and decodes each key and value with the standard
library's `json.JSONDecoder.raw_decode`. When a value runs past the end of the buffer, the buffer grows by
as much as it already holds (read geometrically, so a large value costs O(its size) to decode, not
O(size² / chunk)). Memory is the largest entry (its text and its decoded value), plus one chunk.

A value still incomplete at the end of the file, or text that is not JSON, is a `JSONFormatError` naming
the character offset: after a syntax error there is no reliable next entry, so reading stops there.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Callable, Iterator
from typing import BinaryIO

CHUNK = 1 << 20  # characters read at a time while between entries
_WHITESPACE = " \t\n\r"
_decoder = json.JSONDecoder()


class JSONFormatError(ValueError):
    "The file is not one JSON object of entries (the message says where and why)"


class _Buffer:
    """Decoded text not yet consumed, refilled from a binary stream through an incremental UTF-8 decoder."""

    def __init__(self, stream: BinaryIO, max_chars: int, on_read: Callable[[int], None], chunk: int = CHUNK):
        self.stream = stream
        self.chunk = chunk
        self.text = ""
        self.pos = 0  # where the next token starts in `text`
        self.offset = 0  # characters consumed before `text` (for messages)
        self.eof = False
        self.max_chars = max_chars
        self.on_read = on_read
        self._utf8 = codecs.getincrementaldecoder("utf-8-sig")()  # "-sig": a leading BOM is not an error

    def more(self, at_least: int = 0) -> None:
        """Read at least `at_least` more characters (fewer at the end of the file), dropping what is consumed."""
        if self.eof:
            return
        at_least = max(at_least, self.chunk)
        if len(self.text) - self.pos + at_least > self.max_chars:
            raise JSONFormatError(
                f"An entry near character {self.where()} is larger than {self.max_chars:,} characters: "
                "it is too large to import."
            )
        self.offset += self.pos
        parts = [self.text[self.pos :]]
        got = 0
        while got < at_least:
            raw = self.stream.read(max(self.chunk, at_least - got))
            self.on_read(len(raw))
            try:
                part = self._utf8.decode(raw, final=not raw)
            except UnicodeDecodeError as exc:
                raise JSONFormatError(
                    f"The file is not UTF-8 text near character {self.where()}: {exc.reason}."
                ) from exc
            parts.append(part)
            got += len(part)
            if not raw:
                self.eof = True
                break
        self.text, self.pos = "".join(parts), 0

    def where(self) -> int:
        return self.offset + self.pos

    def skip_space(self) -> str:
        """The next character that is not whitespace ("" at the end of the file)."""
        while True:
            while self.pos < len(self.text) and self.text[self.pos] in _WHITESPACE:
                self.pos += 1
            if self.pos < len(self.text) or self.eof:
                return self.text[self.pos : self.pos + 1]
            self.more()

    def expect(self, allowed: str, what: str) -> str:
        ch = self.skip_space()
        if ch == "" or ch not in allowed:
            found = "the end of the file" if ch == "" else repr(ch)
            raise JSONFormatError(f"Expected {what} at character {self.where()}, found {found}.")
        self.pos += 1
        return ch

    def value(self) -> object:
        """Decode the JSON value that starts here, reading more while it runs past the end of the buffer."""
        self.skip_space()
        while True:
            try:
                value, end = _decoder.raw_decode(self.text, self.pos)
            except json.JSONDecodeError as exc:
                if self.eof or not _incomplete(exc, len(self.text)):
                    raise JSONFormatError(
                        f"The file is not valid JSON at character {self.offset + exc.pos}: {exc.msg}."
                    ) from exc
                self.more(len(self.text) - self.pos)  # double what the value already holds
                continue
            if end == len(self.text) and not self.eof and not isinstance(value, (dict, list, str)):
                self.more()  # a number (or true/null) at the buffer's end may go on in the next chunk
                continue
            self.pos = end
            if end > self.chunk:  # drop the text of a large value now: its decoded copy is all that is needed
                self.offset += end
                self.text, self.pos = self.text[end:], 0
            return value


def _incomplete(exc: json.JSONDecodeError, buffered: int) -> bool:
    """Whether decoding failed only because the value goes on past the buffer (not a syntax error)."""
    return exc.msg.startswith("Unterminated string") or exc.pos >= buffered - 8  # e.g. a cut "\\u00e9" or "nul"


def entries(
    stream: BinaryIO,
    *,
    max_entry_chars: int = 1 << 30,
    on_read: Callable[[int], None] = lambda n: None,
    chunk: int = CHUNK,
) -> Iterator[tuple[str, object]]:
    """Each (key, value) of the one JSON object in `stream`, in order; `on_read(n)` after each n bytes read;
    `chunk`: characters read at a time between entries."""
    buf = _Buffer(stream, max_entry_chars, on_read, chunk)
    if buf.skip_space() != "{":
        raise JSONFormatError("The file does not hold a JSON object ({...}) of entries keyed by image id.")
    buf.pos += 1
    if buf.skip_space() == "}":
        buf.pos += 1
    else:
        while True:
            if buf.skip_space() != '"':
                buf.expect('"', "an image id in quotes")
            key = buf.value()
            buf.expect(":", "':' after the image id")
            yield str(key), buf.value()
            if buf.expect(",}", "',' or '}' after an entry") == "}":
                break
    if buf.skip_space() != "":
        raise JSONFormatError(f"Unexpected text after the JSON object at character {buf.where()}.")

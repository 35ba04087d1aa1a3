"""The three tokenizers (d2l, chars, bytes) and the Vocab, encoding a byte stream chunk by chunk with numpy.

- d2l: d2l's read_time_machine: each line keeps letters only (other runs become one space), stripped, lower-cased,
  the lines concatenated with no separator; vocabulary `<unk>` + characters by decreasing frequency (ties: first seen).
- chars: every character of UTF-8 text; vocabulary the sorted characters (nanoGPT's `sorted(set(data))`).
- bytes: every byte; vocabulary the 256 byte values (token i is chr(i)), so any file can be read.

Encoding never builds Python lists of characters: a corpus is read in chunks of CHUNK bytes and mapped through
lookup tables, so 100 MB encodes in seconds with memory bounded by a few chunks.
"""

from __future__ import annotations

import codecs
from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np

from gruexp import UserError

TOKENIZERS = ("d2l", "chars", "bytes")
CHUNK = 1 << 24  # 16 MiB

_LETTER = np.zeros(256, dtype=bool)
_LETTER[np.frombuffer(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz", np.uint8)] = True
_LOWER = np.arange(256, dtype=np.uint8)
_LOWER[65:91] += 32
_LINE_END = np.zeros(256, dtype=bool)
_LINE_END[[10, 13]] = True  # d2l reads lines with readlines(): universal newlines \n, \r, \r\n


class Vocab:
    """Token <-> id. d2l's vocabulary when built from tokens (`<unk>` first, then by descending frequency).

    A vocabulary of exactly the 256 byte values (the `bytes` tokenizer) encodes text as UTF-8 and decodes ids back
    through UTF-8, so prefixes and samples read as text.
    """

    def __init__(self, tokens: Sequence[str] = (), idx_to_token: Sequence[str] | None = None):
        if idx_to_token is None:
            counts: dict[str, int] = {}
            for t in tokens:
                counts[t] = counts.get(t, 0) + 1
            ordered = sorted(counts.items(), key=lambda kv: kv[1], reverse=True)  # stable: ties stay first-seen
            idx_to_token = ["<unk>"] + [t for t, _ in ordered if t != "<unk>"]
        self.idx_to_token = list(idx_to_token)
        self.token_to_idx = {t: i for i, t in enumerate(self.idx_to_token)}
        self.is_bytes = len(self.idx_to_token) == 256 and all(t == chr(i) for i, t in enumerate(self.idx_to_token))

    unk = 0

    def __len__(self) -> int:
        return len(self.idx_to_token)

    def __getitem__(self, token: str) -> int:
        return self.token_to_idx.get(token, self.unk)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocab) and self.idx_to_token == other.idx_to_token

    def encode(self, text: str) -> list[int]:
        if self.is_bytes:
            return list(text.encode("utf-8"))
        return [self[c] for c in text]

    def decode(self, ids: Iterable[int]) -> str:
        if self.is_bytes:
            return bytes(int(i) for i in ids).decode("utf-8", errors="replace")
        return "".join(self.idx_to_token[int(i)] for i in ids)


def byte_vocab() -> Vocab:
    return Vocab(idx_to_token=[chr(i) for i in range(256)])


def token_dtype(vocab_size: int) -> np.dtype:
    """One byte per token when the vocabulary fits (nanoGPT's train.bin is uint16 for GPT-2's 50k tokens)."""
    return np.dtype(np.uint8 if vocab_size <= 256 else np.uint16 if vocab_size <= 65536 else np.uint32)


def check_text(head: bytes, name: str) -> None:
    """Refuse what is not UTF-8 text before decoding it: UTF-16 (say so and how to convert) or binary."""
    if head[:2] in (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE) or _looks_utf16(head):
        raise UserError(
            f"corpus {name} is UTF-16 text, not UTF-8: convert it with `iconv -f UTF-16 -t UTF-8 {name} > out.txt` "
            "and pass data.path=out.txt (or read its raw bytes with data.tokenizer=bytes)"
        )
    if b"\x00" in head:
        raise UserError(
            f"corpus {name} looks binary (it holds NUL bytes): give a plain text file, or data.tokenizer=bytes"
        )


def _looks_utf16(head: bytes) -> bool:
    """BOM-less UTF-16 of mostly-ASCII text: every other byte is NUL, the others mostly not."""
    b = np.frombuffer(head[: 1 << 16], np.uint8)
    if len(b) < 4:
        return False
    even, odd = b[0::2] == 0, b[1::2] == 0
    return bool((even.mean() > 0.9 and odd.mean() < 0.1) or (odd.mean() > 0.9 and even.mean() < 0.1))


def utf8_chunks(chunks: Iterable[bytes], name: str) -> Iterator[bytes]:
    """The chunks, checked to be UTF-8 text (first chunk: UTF-16 / binary), split on character boundaries.

    ASCII pieces (bytes.isascii, a word-at-a-time C loop) need no decoding; others are decoded once to check them.
    """
    offset, carry, first = 0, b"", True
    for chunk in chunks:
        if first:
            check_text(chunk, name)
            first = False
        data = carry + chunk if carry else chunk
        cut = _complete_prefix(data)  # keep an unfinished trailing character for the next chunk
        piece, carry = data[:cut], data[cut:]
        if not piece.isascii():
            try:
                piece.decode("utf-8")
            except UnicodeDecodeError as e:
                raise UserError(
                    f"corpus {name} is not UTF-8 text (byte {offset + e.start}): convert it, e.g. iconv -t utf-8, "
                    "or read its raw bytes with data.tokenizer=bytes"
                ) from e
        offset += len(piece)
        if piece:
            yield piece
    if carry:
        raise UserError(f"corpus {name} is not UTF-8 text (it ends inside a character at byte {offset}): convert it")


def _complete_prefix(data: bytes) -> int:
    """The length of `data` without a trailing, unfinished UTF-8 character."""
    for k in range(1, min(4, len(data)) + 1):
        byte = data[-k]
        if byte & 0xC0 == 0x80:
            continue  # a continuation byte: look further back for its lead byte
        if byte >= 0xC0:
            need = 2 if byte < 0xE0 else 3 if byte < 0xF0 else 4
            return len(data) - k if k < need else len(data)
        return len(data)
    return len(data)


def d2l_clean(b: np.ndarray, at_start: bool, at_end: bool) -> np.ndarray:
    """d2l's cleaning of a byte array of UTF-8 text that starts and ends at a letter boundary (see `d2l_chunks`).

    A run of non-letters becomes one space inside a line, and nothing where it touches a line end (strip) or holds
    one (lines are joined without a separator); letters are lower-cased. Non-ASCII bytes are never letters.
    """
    if len(b) == 0:
        return b
    letter = _LETTER[b]
    starts = np.flatnonzero(~letter & np.concatenate(([True], letter[:-1])))  # first byte of each non-letter run
    if len(starts) == 0:
        return _LOWER[b]
    has_end = np.logical_or.reduceat(_LINE_END[b], starts)  # a segment is a run and the letters after it
    space = ~has_end
    if at_start and starts[0] == 0:
        space[0] = False
    if at_end and not letter[-1]:
        space[-1] = False
    keep = letter.copy()
    keep[starts[space]] = True
    out = _LOWER[b]
    out[starts[space]] = 32
    return out[keep]


def _chunk_arrays(chunks: Iterable[bytes]) -> Iterator[np.ndarray]:
    for c in chunks:
        yield np.frombuffer(c, np.uint8)


def d2l_chunks(chunks: Iterable[bytes], name: str) -> Iterator[np.ndarray]:
    """The cleaned text (ASCII codes of a-z and space), chunk by chunk; non-letter runs never split across chunks."""
    carry = np.zeros(0, np.uint8)
    first = True
    for b in _chunk_arrays(utf8_chunks(chunks, name)):
        data = np.concatenate((carry, b)) if len(carry) else b
        cut = _after_last_letter(data)
        if cut:
            yield d2l_clean(data[:cut], at_start=first, at_end=False)
            first = False
        carry = data[cut:]
    yield d2l_clean(carry, at_start=first, at_end=True)


def _after_last_letter(data: np.ndarray) -> int:
    """The index just after the last letter of `data`, 0 if it has none (searched from the end, a tail at a time)."""
    end = len(data)
    while end > 0:
        lo = max(0, end - 4096)
        tail = _LETTER[data[lo:end][::-1]]
        k = int(tail.argmax())  # the first True from the end (argmax of a bool array stops there)
        if tail[k]:
            return end - k
        end = lo
    return 0


def encode(
    chunks: Callable[[], Iterable[bytes]], tokenizer: str, name: str, write: Callable[[bytes], None]
) -> tuple[Vocab, int]:
    """Encode the stream `chunks()` (callable: the chars tokenizer reads it twice) with `tokenizer`.

    `write` receives the encoded ids chunk by chunk as bytes (dtype `token_dtype(len(vocab))`), except for d2l,
    whose ids depend on frequencies known only at the end: it writes the cleaned ASCII codes, to be remapped with
    `remap_table(vocab)`. Returns the vocabulary and the number of tokens. Byte-to-byte maps use bytes.translate,
    the fastest 256-entry table lookup Python has (numpy's fancy indexing and bincount widen to int64 first).
    """
    if tokenizer not in TOKENIZERS:
        raise UserError(f"data.tokenizer={tokenizer} is unknown: choose one of {', '.join(TOKENIZERS)}")
    n = 0
    if tokenizer == "bytes":
        for c in chunks():
            write(c)
            n += len(c)
        return byte_vocab(), n
    if tokenizer == "chars":
        present = np.zeros(256, bool)
        for c in utf8_chunks(chunks(), name):
            if c.isascii():  # the common case (text8, Shakespeare, the book): a byte is a character
                # the bytes seen so far deleted in one C pass: what is left is new (usually nothing)
                seen = set(c[:65536]) | set(np.flatnonzero(present[:128]).tolist())
                seen |= set(c.translate(None, bytes(sorted(seen))))
                present[sorted(seen)] = True
            else:
                cp = _code_points(c)
                present = _grow(present, int(cp.max()) + 1)
                present[cp] = True
        chars = np.flatnonzero(present)
        if len(chars) == 0:
            raise UserError(f"corpus {name} is empty: give a text file with some characters")
        dtype = token_dtype(len(chars))
        lut = np.zeros(max(len(present), 256), dtype)
        lut[chars] = np.arange(len(chars), dtype=dtype)
        table = lut[:256].tobytes() if dtype == np.uint8 else None
        for c in utf8_chunks(chunks(), name):
            ids = c.translate(table) if table is not None and c.isascii() else lut[_code_points(c)].tobytes()
            write(ids)
            n += len(ids) // dtype.itemsize
        return Vocab(idx_to_token=[chr(int(i)) for i in chars]), n
    # d2l: counts by a radix sort (numpy's stable sort of uint8; bincount widens to int64 first and is slower),
    # first occurrences by bytes.find, only for symbols not seen yet
    counts = np.zeros(256, np.int64)
    first_seen: dict[int, int] = {}
    for ids in d2l_chunks(chunks(), name):
        counts += np.diff(np.searchsorted(np.sort(ids, kind="stable"), np.arange(257)))
        cleaned = ids.tobytes()
        for s in np.flatnonzero(counts):
            if int(s) not in first_seen:
                first_seen[int(s)] = n + cleaned.find(int(s).to_bytes(1, "little"))
        write(cleaned)
        n += len(cleaned)
    if n == 0:
        raise UserError(f"corpus {name} has no letters after d2l's cleaning: give a text with English words")
    order = sorted(first_seen, key=lambda s: (-counts[s], first_seen[s]))
    return Vocab(idx_to_token=["<unk>"] + [chr(s) for s in order]), n


def remap_table(vocab: Vocab) -> bytes:
    """The bytes.translate table from d2l-cleaned ASCII codes to ids of `vocab`."""
    lut = bytearray(256)
    for i, t in enumerate(vocab.idx_to_token[1:], start=1):
        lut[ord(t)] = i
    return bytes(lut)


def _code_points(chunk: bytes) -> np.ndarray:
    if chunk.isascii():  # the common case (text8, Shakespeare, the book): a byte is a character
        return np.frombuffer(chunk, np.uint8)
    return np.frombuffer(chunk.decode("utf-8").encode("utf-32-le"), np.uint32)


def _grow(a: np.ndarray, size: int) -> np.ndarray:
    return a if len(a) >= size else np.concatenate((a, np.zeros(size - len(a), a.dtype)))

"""Encode a corpus once into a token file in the user cache, memory-map it on every later run (nanoGPT's train.bin).

`<cache>/tokens/<sha256 of the source>-<member>-<tokenizer>.bin` holds the ids (uint8 when the vocabulary fits),
`.json` beside it the vocabulary, token count, dtype and the .bin's sha256. The .json is written last, so its
presence means the .bin is complete; every load checks the .bin against it (a damaged cache would train on other
data with no word) and encodes again when they differ. Concurrent runs (DDP ranks, sweep jobs) serialise on a lock
file, and the first one encodes.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gruexp import UserError, cache_dir
from gruexp.data import tokenizers
from gruexp.data.corpora import file_digest, read_chunks
from gruexp.data.tokenizers import Vocab

log = logging.getLogger(__name__)

FORMAT = 2  # bump when the encoding or the .json changes (2: the tokens' digest): old token files are then ignored


@dataclass
class Tokens:
    """An encoded corpus on disk: `ids()` memory-maps it (read-only, shared by every process that maps it)."""

    path: Path
    n: int
    dtype: np.dtype
    vocab: Vocab

    def ids(self) -> np.memmap:
        return np.memmap(self.path, dtype=self.dtype, mode="r", shape=(self.n,))


def tokens_dir() -> Path:
    return cache_dir() / "tokens"


def encoded(source: Path, member: str | None, tokenizer: str, name: str | None = None) -> Tokens:
    """The token file of `source` (or of its zip `member`) under `tokenizer`, encoding it on first use."""
    digest = file_digest(source)
    key = f"{digest[:32]}-{re.sub(r'[^A-Za-z0-9_.-]', '_', member or 'file')}-{tokenizer}-v{FORMAT}"
    folder = tokens_dir()
    meta_path, bin_path = folder / f"{key}.json", folder / f"{key}.bin"
    found, _ = _load(meta_path, bin_path)
    if found is not None:
        return found
    try:
        folder.mkdir(parents=True, exist_ok=True)
        lock = open(folder / f"{key}.lock", "w")
    except OSError as e:
        if e.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise
        raise UserError(
            f"cannot write the token cache {folder} ({e.strerror}): make it writable, or point gruexp at another "
            "cache folder with XDG_CACHE_HOME=<folder>"
        ) from None
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be encoding it right now: wait, then reuse
        found, damage = _load(meta_path, bin_path)
        if found is not None:
            return found
        # the encoder holds this lock: a partial file of this key now is a killed (kill -9) encoder's
        for stale in folder.glob(f".{bin_path.name}.*.part"):
            log.info("removing %s, left by an encoding that was killed", stale)
            stale.unlink(missing_ok=True)
        if damage:
            log.warning("token cache %s is damaged (%s): encoding %s again", bin_path, damage, name or source)
        return _encode(source, member, tokenizer, name or str(source), digest, meta_path, bin_path)


def _load(meta_path: Path, bin_path: Path) -> tuple[Tokens | None, str | None]:
    """The cached tokens if their .bin holds what was encoded; else None and why (None: nothing cached yet)."""
    try:
        meta = json.loads(meta_path.read_text())
        dtype, vocab = np.dtype(meta["dtype"]), Vocab(idx_to_token=meta["vocab"])
        size = bin_path.stat().st_size
    except (OSError, ValueError, KeyError, TypeError):
        return None, None
    if size != meta["tokens"] * dtype.itemsize:
        return None, f"{size:,} bytes, {meta['tokens'] * dtype.itemsize:,} encoded"
    digest, top = _scan(bin_path, dtype)
    if digest != meta.get("tokens_sha256"):
        return None, "its bytes differ from those encoded (sha256)"
    if top >= len(vocab):
        return None, f"token id {top} past its vocabulary of {len(vocab)}"
    return Tokens(bin_path, meta["tokens"], dtype, vocab), None


def _scan(path: Path, dtype: np.dtype) -> tuple[str, int]:
    """sha256 and largest id of a token file, in one read."""
    h, top = hashlib.sha256(), -1
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            h.update(block)
            top = max(top, int(np.frombuffer(block, dtype).max()))
    return h.hexdigest(), top


def _encode(
    source: Path, member: str | None, tokenizer: str, name: str, digest: str, meta_path: Path, bin_path: Path
) -> Tokens:
    t0 = time.perf_counter()
    fd, tmp_name = tempfile.mkstemp(dir=bin_path.parent, prefix=f".{bin_path.name}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            vocab, n = tokenizers.encode(
                lambda: read_chunks(source, member, tokenizers.CHUNK), tokenizer, name, out.write
            )
        dtype = tokenizers.token_dtype(len(vocab))
        if tokenizer == "d2l":  # ids by frequency, known only now: remap the cleaned text in place
            table = tokenizers.remap_table(vocab)
            with open(tmp, "r+b") as f:
                for i in range(0, n, tokenizers.CHUNK):
                    f.seek(i)
                    block = f.read(tokenizers.CHUNK)
                    f.seek(i)
                    f.write(block.translate(table))
        os.replace(tmp, bin_path)
    finally:
        tmp.unlink(missing_ok=True)
    meta = {
        "format": FORMAT,
        "source": str(source),
        "member": member,
        "sha256": digest,
        "tokenizer": tokenizer,
        "tokens": n,
        "dtype": dtype.name,
        "vocab": vocab.idx_to_token,
        "tokens_sha256": _scan(bin_path, dtype)[0],
    }
    tmp_meta = meta_path.with_name(meta_path.name + ".tmp")
    tmp_meta.write_text(json.dumps(meta))
    os.replace(tmp_meta, meta_path)
    seconds = time.perf_counter() - t0
    log.info(
        "encoded %s (%s tokenizer): %s tokens, vocabulary %d, in %.1f s -> %s",
        name,
        tokenizer,
        f"{n:,}",
        len(vocab),
        seconds,
        bin_path,
    )
    return Tokens(bin_path, n, dtype, vocab)

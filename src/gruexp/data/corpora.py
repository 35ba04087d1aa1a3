"""The named corpora (where to download them, their checksums, their tokenizer) and how a corpus file is found.

Lookup order for a named corpus: `data.path` (the user's own copy, no checksum), `$GRUEXP_DATA_DIR/<file>`,
the user cache `gruexp.cache_dir()/<file>`, else a download (progress bar, temporary file, checksum, rename).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import tempfile
import urllib.request
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from gruexp import UserError, cache_dir

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Corpus:
    """A downloadable corpus: its file name, URL, digest ("sha256:<hex>" or "sha1:<hex>"), size, zip member."""

    name: str
    filename: str
    url: str
    digest: str
    tokenizer: str
    size: int | None = None
    member: str | None = None  # the file inside a zip
    origin: str = ""  # who publishes it, for messages


CORPORA: dict[str, Corpus] = {
    c.name: c
    for c in (
        Corpus(
            "timemachine",
            "timemachine.txt",
            "http://d2l-data.s3-accelerate.amazonaws.com/timemachine.txt",
            "sha1:090b5e7e70c295757f55df93cb0a180b9691891a",
            "d2l",
            origin="d2l",
        ),
        Corpus(
            "tinyshakespeare",
            "tinyshakespeare.txt",
            "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
            "sha256:86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
            "chars",
            size=1_115_394,
            origin="char-rnn",
        ),
        Corpus(
            "text8",
            "text8.zip",
            "http://mattmahoney.net/dc/text8.zip",
            # not downloaded here (no network): the digest two public repositories pin for this file; the size is
            # Mahoney's. Verify it on the first real download (docs/corpora.md).
            "sha256:a6640522afe85d1963ad56c05b0ede0a0c000dddc9671758a6cc09b7a38e5232",
            "chars",
            size=31_344_016,
            member="text8",
            origin="Mahoney",
        ),
        Corpus(
            "enwik8",
            "enwik8.zip",
            "http://mattmahoney.net/dc/enwik8.zip",
            "sha256:547994d9980ebed1288380d652999f38a14fe291a6247c157c3d33d4932534bc",
            "bytes",
            size=36_445_475,
            member="enwik8",
            origin="Mahoney",
        ),
    )
}


def file_digest(path: Path, algorithm: str = "sha256") -> str:
    """The hex digest of a file, read in 1 MiB blocks."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def verify(path: Path, corpus: Corpus) -> Path:
    """Check size and digest of a corpus file; a mismatch is one line naming the fix."""
    try:
        size = path.stat().st_size
        if corpus.size is not None and size != corpus.size:
            raise UserError(
                f"corpus {path} has {size:,} bytes, expected {corpus.origin}'s {corpus.size:,}: delete it to "
                f"download it again ({corpus.url}), or pass your own copy with data.path=<file>"
            )
        algorithm, expected = corpus.digest.split(":")
        digest = file_digest(path, algorithm)
    except OSError as e:
        raise UserError(f"cannot read the corpus {path}: {e.strerror}; fix its permissions or delete it") from e
    if digest != expected:
        raise UserError(
            f"corpus {path} has {algorithm.upper().replace('SHA', 'SHA-')} {digest}, expected {corpus.origin}'s "
            f"{expected}: delete it to download it again, or pass your own text with data.path=<file>"
        )
    return path


_warned_data_dir: set[str] = set()


def data_dir() -> Path | None:
    """$GRUEXP_DATA_DIR, warned about once when it names no folder (a typo would otherwise trigger a download)."""
    env = os.environ.get("GRUEXP_DATA_DIR")
    if not env:
        return None
    p = Path(env).expanduser()
    if not p.is_dir():
        if env not in _warned_data_dir:
            _warned_data_dir.add(env)
            log.warning("GRUEXP_DATA_DIR=%s is not a folder: ignoring it (fix or unset it)", env)
        return None
    return p


def check_readable(path: str | os.PathLike) -> Path:
    """A user-given data.path: an existing, readable file, or one line naming it."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"data.path={path} is not a file: give an existing text file or drop data.path")
    try:
        with open(p, "rb") as f:
            f.read(1)
    except OSError as e:
        raise UserError(f"cannot read data.path={path}: {e.strerror}; fix its permissions (chmod +r {p})") from e
    return p


def resolve(corpus: Corpus, download: bool = True) -> Path:
    """The verified file of a named corpus: $GRUEXP_DATA_DIR, the user cache, else downloaded into the cache."""
    env = data_dir()
    candidates = ([env / corpus.filename] if env else []) + [cache_dir() / corpus.filename]
    for p in candidates:
        if p.is_file():
            return verify(p, corpus)
    target = cache_dir() / corpus.filename
    if download and _download(corpus, target):
        return target
    where = candidates[0].parent
    raise UserError(
        f"no {corpus.filename} and no network: download {corpus.url} and put it in {where}/ "
        "(or set GRUEXP_DATA_DIR to the folder holding it, or pass data.path=<file>)"
    )


def _download(corpus: Corpus, target: Path) -> bool:
    """Download to a temporary file beside `target`, verify, rename: a killed download never leaves a file that
    passes. False when the network cannot be reached; a file that fails its checksum is refused."""
    from tqdm import tqdm  # lightning's dependency: a progress bar for a 36 MB download

    target.parent.mkdir(parents=True, exist_ok=True)
    log.info("downloading %s to %s", corpus.url, target)
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{corpus.filename}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        try:
            with urllib.request.urlopen(corpus.url, timeout=30) as r, os.fdopen(fd, "wb") as out:
                total = int(r.headers.get("Content-Length") or 0) or None
                with tqdm(total=total, unit="B", unit_scale=True, desc=corpus.filename, disable=None) as bar:
                    while block := r.read(1 << 20):
                        out.write(block)
                        bar.update(len(block))
        except OSError as e:
            log.debug("download failed: %s", e)
            return False
        verify(tmp, corpus)
        os.replace(tmp, target)
        return True
    finally:
        tmp.unlink(missing_ok=True)


def zip_member(path: Path, member: str | None) -> str:
    """The member of a zip file to read: `member` if given and present, else the zip's only file."""
    try:
        with zipfile.ZipFile(path) as z:
            names = [i.filename for i in z.infolist() if not i.is_dir()]
    except zipfile.BadZipFile as e:
        raise UserError(f"{path} is not a valid zip file ({e}): delete it and download it again") from e
    if member is not None and member in names:
        return member
    if member is None and len(names) == 1:
        return names[0]
    raise UserError(
        f"{path} holds {', '.join(names) or 'nothing'}, not {member or 'a single file'}: give the right zip"
    )


def read_chunks(path: Path, member: str | None, size: int) -> Iterator[bytes]:
    """The bytes of a file, or of a member of a zip file (streamed, never extracted to disk)."""
    with contextlib.ExitStack() as stack:
        if member is None:
            f = stack.enter_context(open(path, "rb"))
        else:
            f = stack.enter_context(stack.enter_context(zipfile.ZipFile(path)).open(member))
        while block := f.read(size):
            yield block

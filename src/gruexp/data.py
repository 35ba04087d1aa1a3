"""The Time Machine corpus, d2l's tokenization and vocabulary, its two partitions, and the DataModule.

Data flow: resolve_corpus -> read_lines (letters only, lower case) -> Vocab (characters, by frequency)
-> corpus ids -> train head / validation tail -> StreamSampler (sequential or random, per rank) -> batches.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import urllib.request
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from gruexp import UserError, cache_dir

log = logging.getLogger(__name__)

URL = "http://d2l-data.s3-accelerate.amazonaws.com/timemachine.txt"
SHA1 = "090b5e7e70c295757f55df93cb0a180b9691891a"
FILENAME = "timemachine.txt"


def sha1(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()


def _verified(path: Path) -> Path:
    try:
        digest = sha1(path)
    except OSError as e:
        raise UserError(f"cannot read the corpus {path}: {e.strerror}; fix its permissions or delete it") from e
    if digest != SHA1:
        raise UserError(
            f"corpus {path} has SHA-1 {digest}, expected d2l's {SHA1}: delete it to download it again, "
            "or pass your own text with data.path=<file>"
        )
    return path


def resolve_corpus(path: str | os.PathLike | None = None, download: bool = True) -> Path:
    """Find the corpus: `path` as given, else $GRUEXP_DATA_DIR, else the user cache, else download d2l's file.

    A user-given `path` may be any text file; the other three places must hold d2l's file (SHA-1 checked).
    """
    if path is not None:
        p = Path(path).expanduser()
        if not p.is_file():
            raise UserError(f"data.path={path} is not a file: give an existing text file or drop data.path")
        return p
    env = os.environ.get("GRUEXP_DATA_DIR")
    candidates = ([Path(env).expanduser() / FILENAME] if env else []) + [cache_dir() / FILENAME]
    for p in candidates:
        if p.is_file():
            return _verified(p)
    target = cache_dir() / FILENAME
    if download:
        log.info("downloading %s to %s", URL, target)
        try:
            with urllib.request.urlopen(URL, timeout=30) as r:
                payload = r.read()
        except OSError as e:
            log.debug("download failed: %s", e)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_suffix(".part")
            tmp.write_bytes(payload)
            _verified(tmp).replace(target)
            return target
    where = " or ".join(str(p) for p in candidates)
    raise UserError(
        f"no corpus and no network: put d2l's {FILENAME} ({URL}) at {where}, "
        "or set GRUEXP_DATA_DIR to the folder holding it, or pass data.path=<file>"
    )


def read_lines(path: Path) -> list[str]:
    """d2l's read_time_machine: each line keeps letters only (others become a space), stripped, lower-cased."""
    raw = path.read_bytes()
    if b"\x00" in raw:
        raise UserError(f"corpus {path} looks binary (it holds NUL bytes): give a plain text file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"corpus {path} is not UTF-8 text (byte {e.start}): convert it, e.g. iconv -t utf-8") from e
    return [re.sub("[^A-Za-z]+", " ", line).strip().lower() for line in text.splitlines()]


class Vocab:
    """d2l's character vocabulary: `<unk>` first, then tokens by descending frequency (ties: first seen)."""

    def __init__(self, tokens: Sequence[str] = (), idx_to_token: Sequence[str] | None = None):
        if idx_to_token is None:
            counts = sorted(Counter(tokens).items(), key=lambda kv: kv[1], reverse=True)
            idx_to_token = ["<unk>"] + [t for t, _ in counts if t != "<unk>"]
        self.idx_to_token = list(idx_to_token)
        self.token_to_idx = {t: i for i, t in enumerate(self.idx_to_token)}

    unk = 0

    def __len__(self) -> int:
        return len(self.idx_to_token)

    def __getitem__(self, token: str) -> int:
        return self.token_to_idx.get(token, self.unk)

    def encode(self, text: str) -> list[int]:
        return [self[c] for c in text]

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.idx_to_token[i] for i in ids)


def load_corpus(path: Path) -> tuple[torch.Tensor, Vocab]:
    """d2l's load_corpus_time_machine: the lines' characters concatenated (no separator) as ids, and the vocab."""
    chars = [c for line in read_lines(path) for c in line]
    if not chars:
        raise UserError(f"corpus {path} has no letters after d2l's cleaning: give a text with English words")
    vocab = Vocab(chars)
    return torch.tensor(vocab.encode(chars), dtype=torch.long), vocab


class Windows(Dataset):
    """Item `s` is the pair (corpus[s : s+T], corpus[s+1 : s+T+1]): input steps and their next-token targets."""

    def __init__(self, corpus: torch.Tensor, num_steps: int):
        self.corpus, self.num_steps = corpus, num_steps

    def __len__(self) -> int:
        return len(self.corpus) - self.num_steps

    def __getitem__(self, s: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.corpus[s : s + self.num_steps], self.corpus[s + 1 : s + self.num_steps + 1]


class StreamSampler(Sampler[int]):
    """Yields window starts so that each run of `rows` consecutive starts is one batch (this rank's share).

    d2l's two partitions, both drawn afresh each epoch from `seed + epoch`:
    - sequential: after a random offset in [0, T], the corpus is cut into `batch_size` contiguous rows; batch t
      holds columns [tT, (t+1)T) of every row, so row i of batch t+1 continues row i of batch t.
    - random: after a random offset in [0, T), the corpus is cut into windows of T, shuffled, B per batch.
    Under DDP each rank takes its own `batch_size / world_size` rows of every batch, so streams stay contiguous.
    Lightning calls `set_epoch` on a DataLoader's sampler at each epoch.
    """

    def __init__(
        self,
        n: int,
        num_steps: int,
        batch_size: int,
        partition: str = "sequential",
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle_offset: bool = True,
    ):
        if partition not in ("sequential", "random"):
            raise UserError(f"data.partition={partition} is unknown: choose sequential or random")
        if batch_size % world_size:
            raise UserError(
                f"data.batch_size={batch_size} is the global batch and must divide by the {world_size} devices"
            )
        self.n, self.T, self.B, self.partition = n, num_steps, batch_size, partition
        self.rank, self.world_size, self.seed, self.shuffle_offset = rank, world_size, seed, shuffle_offset
        self.rows = batch_size // world_size
        self.epoch = 0
        self._resume: tuple[int, int] | None = None  # (epoch, batches already trained) from a checkpoint
        self._skip = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def resume(self, epoch: int, batches: int) -> None:
        """Start the next pass over `epoch` after its first `batches` batches (a mid-epoch checkpoint's position)."""
        self._resume = (epoch, batches)

    def take_skip(self) -> int:
        """How many batches the pass about to start skips: the resume position if it is for this epoch, else 0."""
        epoch, batches = self._resume or (-1, 0)
        self._resume = None
        self._skip = batches if epoch == self.epoch else 0
        return self._skip

    def batches(self) -> list[list[int]]:
        """Every batch of the epoch, all ranks' rows, as window starts."""
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        T, B = self.T, self.B
        if self.partition == "sequential":
            offset = int(torch.randint(0, T + 1, (1,), generator=g)) if self.shuffle_offset else 0
            row_len = (self.n - offset - 1) // B
            return [[offset + i * row_len + t * T for i in range(B)] for t in range(row_len // T)]
        offset = int(torch.randint(0, T, (1,), generator=g)) if self.shuffle_offset else 0
        starts = offset + T * torch.randperm((self.n - offset - 1) // T, generator=g)
        return [starts[b * B : (b + 1) * B].tolist() for b in range(len(starts) // B)]

    def __iter__(self) -> Iterator[int]:
        lo = self.rank * self.rows
        skip, self._skip = self._skip, 0
        for batch in self.batches()[skip:]:
            yield from batch[lo : lo + self.rows]

    def __len__(self) -> int:
        return len(self.batches()) * self.rows


class StreamLoader(DataLoader):
    """A DataLoader over a StreamSampler that Lightning can checkpoint mid-epoch (state_dict / load_state_dict).

    Lightning's fit loop saves `state_dict()` of every training loader that has one and, on a mid-epoch resume,
    loads it before iterating; the state is (epoch, batches handed out), so the resumed pass skips exactly those.
    """

    sampler: StreamSampler

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._batches = 0

    def __iter__(self):
        # runs at the first next(), after Lightning's set_epoch: the skip is decided for the right epoch
        self._batches = self.sampler.take_skip()
        for batch in super().__iter__():
            self._batches += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.sampler.epoch, "batches": self._batches}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.sampler.resume(state["epoch"], state["batches"])


class TimeMachineDataModule(L.LightningDataModule):
    """The Time Machine for all three variants: train on the head of the corpus, validate on its tail.

    `batch_size` is global: under DDP each of the W ranks gets batch_size / W rows, so a run computes the same
    updates on any number of devices. `max_tokens` caps the training head (10000 reproduces d2l); the validation
    tail is always the last `val_fraction` of the whole corpus, read sequentially from its start.
    """

    def __init__(
        self,
        path: str | None = None,
        batch_size: int = 32,
        num_steps: int = 35,
        max_tokens: int | None = None,
        val_fraction: float = 0.1,
        partition: str = "sequential",
        seed: int = 0,
        num_workers: int = 0,
    ):
        super().__init__()
        for name, v in (("batch_size", batch_size), ("num_steps", num_steps)):
            if not isinstance(v, int) or v <= 0:
                raise UserError(f"data.{name} must be a positive integer, got {v}")
        if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens <= 0):
            raise UserError(f"data.max_tokens must be a positive integer or null, got {max_tokens}")
        if not 0 <= val_fraction < 1:
            raise UserError(f"data.val_fraction must be in [0, 1), got {val_fraction}")
        if partition not in ("sequential", "random"):
            raise UserError(f"data.partition={partition} is unknown: choose sequential or random")
        self.path, self.batch_size, self.num_steps = path, batch_size, num_steps
        self.max_tokens, self.val_fraction, self.partition = max_tokens, val_fraction, partition
        self.seed, self.num_workers = seed, num_workers
        self.corpus, self.vocab = load_corpus(resolve_corpus(path))
        n_val = int(len(self.corpus) * val_fraction)
        self.train_ids = self.corpus[: len(self.corpus) - n_val][:max_tokens]
        self.val_ids = self.corpus[len(self.corpus) - n_val :]
        self._check_fits(self.train_ids, "training head")
        if n_val:
            self._check_fits(self.val_ids, "validation tail")

    def _check_fits(self, ids: torch.Tensor, what: str) -> None:
        need = self.num_steps + 1
        if len(ids) < need:
            raise UserError(
                f"data.num_steps={self.num_steps} needs at least {need} tokens but the {what} has {len(ids)}: "
                "lower data.num_steps or use a longer corpus"
            )

    def _rank(self) -> tuple[int, int]:
        t = self.trainer
        return (t.global_rank, t.world_size) if t is not None else (0, 1)

    def _loader(self, ids: torch.Tensor, batch_size: int, partition: str, shuffle_offset: bool) -> StreamLoader:
        rank, world = self._rank()
        sampler = StreamSampler(len(ids), self.num_steps, batch_size, partition, rank, world, self.seed, shuffle_offset)
        if len(sampler) == 0:
            raise UserError(
                f"the {len(ids)}-token split holds no batch of {batch_size} rows x {self.num_steps} steps: "
                "lower data.batch_size or data.num_steps, or raise data.max_tokens"
            )
        return StreamLoader(
            Windows(ids, self.num_steps),
            batch_size=sampler.rows,
            sampler=sampler,
            drop_last=True,
            num_workers=self.num_workers,
        )

    def train_dataloader(self) -> StreamLoader:
        return self._loader(self.train_ids, self.batch_size, self.partition, shuffle_offset=True)

    def val_dataloader(self) -> StreamLoader | list:
        if not len(self.val_ids):
            return []
        # The tail is short: use as many rows as it can fill (a multiple of the world size), up to batch_size.
        _, world = self._rank()
        fit = (len(self.val_ids) - 1) // self.num_steps
        rows = max(world, min(self.batch_size, fit) // world * world)
        return self._loader(self.val_ids, rows, "sequential", shuffle_offset=False)

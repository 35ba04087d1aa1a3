"""The DataModule: a corpus's token file, memory-mapped, cut into train / val / test, served as d2l's partitions.

Data flow: corpora.resolve (file) -> cache.encoded (token file + vocab, encoded once) -> np.memmap
-> train head / val / test tail -> StreamSampler (sequential or random, per rank; starts computed, never listed)
-> Windows.__getitems__ (one numpy gather per batch) -> batches.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from gruexp import UserError
from gruexp.data import cache, corpora
from gruexp.data.tokenizers import TOKENIZERS, Vocab

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


class MappedIds(Dataset):
    """A split's ids that hold the token file's path, not the mapped array, so a DataLoader worker or DDP rank maps
    it itself (a pickled np.memmap would be copied whole)."""

    def __init__(self, ids: np.ndarray | torch.Tensor, num_steps: int, source: tuple[str, str, int, int] | None = None):
        """`source` = (token file, dtype, first token, count) when `ids` is a slice of a memory-mapped token file."""
        self.num_steps = num_steps
        self._ids = ids.numpy() if isinstance(ids, torch.Tensor) else ids
        self._src = source

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        if self._src is not None:
            state["_ids"] = None
        return state

    @property
    def ids(self) -> np.ndarray:
        if self._ids is None:
            path, dtype, start, n = self._src
            dt = np.dtype(dtype)
            self._ids = np.memmap(path, dtype=dt, mode="r", offset=start * dt.itemsize, shape=(n,))
        return self._ids


class Windows(MappedIds):
    """Item `s` is the pair (ids[s : s+T], ids[s+1 : s+T+1]); `__getitems__` gathers a whole batch in one go."""

    def __len__(self) -> int:
        return len(self.ids) - self.num_steps

    def __getitem__(self, s: int) -> tuple[torch.Tensor, torch.Tensor]:
        w = torch.from_numpy(self.ids[s : s + self.num_steps + 1].astype(np.int64))
        return w[:-1], w[1:]

    def __getitems__(self, starts: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        idx = np.asarray(starts, dtype=np.int64)[:, None] + np.arange(self.num_steps + 1)
        w = torch.from_numpy(self.ids[idx].astype(np.int64))
        return w[:, :-1].contiguous(), w[:, 1:].contiguous()


PAD = -100  # the target of a padded position: F.cross_entropy's ignore_index, so it is never scored


class HeldOut(MappedIds):
    """A held-out split read whole: item t is batch t, every token after the first predicted and scored once.

    The split's n - 1 predictions are cut into `rows` contiguous rows of L = ceil((n - 1) / rows); batch t holds
    columns [tT, (t+1)T) of this rank's rows (the last batch narrower), so the state carried from batch to batch
    continues each row. The last row's missing tail is padding: input 0, target PAD, after every real token.
    """

    def __init__(self, ids, num_steps: int, rows: int, mine: tuple[int, int] = (0, 1), source=None):
        """`mine` = (first row, rows) of this rank's share (DDP)."""
        super().__init__(ids, num_steps, source)
        self.rows, self.mine = rows, mine
        self.row_len = -(-(len(self.ids) - 1) // rows)

    @property
    def targets(self) -> int:
        """How many tokens this share scores (the whole split's n - 1 on one device)."""
        n, (lo, k) = len(self.ids) - 1, self.mine
        return int(np.clip(n - np.arange(lo, lo + k) * self.row_len, 0, self.row_len).sum())

    def __len__(self) -> int:
        return -(-self.row_len // self.num_steps)

    def __getitem__(self, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= t < len(self):
            raise IndexError(t)
        lo, k = self.mine
        cols = np.arange(t * self.num_steps, min((t + 1) * self.num_steps, self.row_len))
        pos = np.arange(lo, lo + k)[:, None] * self.row_len + cols  # the input's position in the split
        last = len(self.ids) - 2
        x = self.ids[np.minimum(pos, last)].astype(np.int64)
        y = self.ids[np.minimum(pos, last) + 1].astype(np.int64)
        pad = pos > last
        x[pad], y[pad] = 0, PAD
        return torch.from_numpy(x), torch.from_numpy(y)


def _batch(data: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """collate_fn for Windows.__getitems__, which already returns the batch (module-level: workers pickle it)."""
    return data


class Chunks:
    """collate_fn of a loader that hands out `steps_per_call` batches at once: the rows of up to K consecutive
    batches, gathered in one go, as X and Y of shape [k, rows, T] (k < K for an epoch's last chunk)."""

    def __init__(self, rows: int) -> None:
        self.rows = rows

    def __call__(self, data: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        X, Y = data
        return X.view(-1, self.rows, X.shape[-1]), Y.view(-1, self.rows, Y.shape[-1])


class StreamSampler(Sampler[int]):
    """Yields window starts so that each run of `rows` consecutive starts is one batch (this rank's share).

    d2l's two partitions, both drawn afresh each epoch from `seed + epoch`:
    - sequential: after a random offset in [0, T], the corpus is cut into `batch_size` contiguous rows; batch t
      holds columns [tT, (t+1)T) of every row, so row i of batch t+1 continues row i of batch t.
    - random: after a random offset in [0, T), the corpus is cut into windows of T, shuffled, B per batch.
    Under DDP each rank takes its own `batch_size / world_size` rows of every batch, so streams stay contiguous.
    Starts are computed batch by batch (a 90M-token split is never a list); Lightning calls `set_epoch`.
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
        limit: int | float | None = None,
    ):
        """`limit`: at most that many batches an epoch (an int), or that fraction of them (a float), as Lightning's
        `limit_train_batches` counts them; the loader of a steps_per_call run applies it, not Lightning."""
        if partition not in ("sequential", "random"):
            raise UserError(f"data.partition={partition} is unknown: choose sequential or random")
        if batch_size % world_size:
            raise UserError(
                f"data.batch_size={batch_size} is the global batch and must divide by the {world_size} devices"
            )
        self.n, self.T, self.B, self.partition = n, num_steps, batch_size, partition
        self.rank, self.world_size, self.seed, self.shuffle_offset = rank, world_size, seed, shuffle_offset
        self.limit = limit
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

    def _draw(self) -> tuple[torch.Generator, int]:
        """This epoch's generator and offset (the same draws d2l's samplers make)."""
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        hi = self.T + 1 if self.partition == "sequential" else self.T
        offset = int(torch.randint(0, hi, (1,), generator=g)) if self.shuffle_offset else 0
        return g, offset

    def num_batches(self) -> int:
        _, offset = self._draw()
        if self.partition == "sequential":
            n = (self.n - offset - 1) // self.B // self.T
        else:
            n = (self.n - offset - 1) // self.T // self.B
        if self.limit is None:
            return n
        return min(n, self.limit) if isinstance(self.limit, int) else int(n * self.limit)

    def iter_batches(self, skip: int = 0) -> Iterator[range | list[int]]:
        """This epoch's batches from batch `skip` on, each as the window starts of all ranks' rows."""
        g, offset = self._draw()
        T, B, n = self.T, self.B, self.num_batches()
        if self.partition == "sequential":
            row_len = (self.n - offset - 1) // B
            for t in range(skip, n):
                yield range(offset + t * T, offset + t * T + B * row_len, row_len)
            return
        starts = offset + T * torch.randperm((self.n - offset - 1) // T, generator=g)  # a tensor, not a list
        for b in range(skip, n):
            yield starts[b * B : (b + 1) * B].tolist()

    def batches(self) -> list[list[int]]:
        """Every batch of the epoch as lists (for tests and small corpora; iteration does not build this)."""
        return [list(b) for b in self.iter_batches()]

    def __iter__(self) -> Iterator[int]:
        lo = self.rank * self.rows
        skip, self._skip = self._skip, 0
        for batch in self.iter_batches(skip):
            yield from batch[lo : lo + self.rows]

    def __len__(self) -> int:
        return self.num_batches() * self.rows


class StreamLoader(DataLoader):
    """A DataLoader over a StreamSampler that Lightning can checkpoint mid-epoch (state_dict / load_state_dict).

    Lightning's fit loop saves `state_dict()` of every training loader that has one and, on a mid-epoch resume,
    loads it before iterating; the state is (epoch, batches trained), so the resumed pass skips exactly those.
    With `steps_per_call` K each item is a chunk of K batches (Chunks); its state still counts batches, so a
    checkpoint resumes with any K.
    """

    sampler: StreamSampler

    def __init__(self, *args, steps_per_call: int = 1, **kwargs):
        if steps_per_call > 1:  # the last chunk of an epoch holds the batches left: never dropped
            kwargs.update(batch_size=kwargs["batch_size"] * steps_per_call, drop_last=False)
            kwargs["collate_fn"] = Chunks(kwargs["sampler"].rows)
        super().__init__(*args, **kwargs)
        self.steps_per_call = steps_per_call
        self._batches = 0

    def __iter__(self):
        # runs at the first next(), after Lightning's set_epoch: the skip is decided for the right epoch
        self._batches = self.sampler.take_skip()
        for batch in super().__iter__():
            self._batches += len(batch[1]) if self.steps_per_call > 1 else 1
            yield batch

    def batches_per_epoch(self) -> int:
        """Batches (not chunks) in this epoch's pass, after the limit: what an epoch's optimizer steps number."""
        return self.sampler.num_batches()

    def untrained(self, batches: int) -> None:
        """The last chunk's final `batches` were not trained (max_steps came first): a resume reads them again."""
        self._batches -= batches

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.sampler.epoch, "batches": self._batches}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.sampler.resume(state["epoch"], state["batches"])


def split_bounds(n: int, val_fraction: float, test_fraction: float) -> tuple[int, int]:
    """(end of train, end of val): train is the first int(n * (1 - val - test)) tokens, test the last int(n * test).

    nanoGPT's `data[:int(n*0.9)]` for 90/10, and the same train head for 90/5/5 (so a model trained on one split
    can be evaluated on the other's held-out part); 90M / 5M / 5M for text8 and enwik8.
    """
    train_end = int(n * round(1 - val_fraction - test_fraction, 12))
    return train_end, n - int(n * test_fraction)


def load_corpus(
    corpus: str | None = "timemachine", path: str | os.PathLike | None = None, tokenizer: str | None = None
) -> tuple[np.memmap, Vocab]:
    """The memory-mapped ids and vocabulary of a named corpus or of any file (encoded on first use)."""
    tokens = encoded_corpus(corpus, path, tokenizer)
    return tokens.ids(), tokens.vocab


def encoded_corpus(
    corpus: str | None = "timemachine", path: str | os.PathLike | None = None, tokenizer: str | None = None
) -> cache.Tokens:
    """The token file of a named corpus (found or downloaded, verified) or of any file, encoded on first use."""
    known = corpora.CORPORA.get(corpus) if corpus is not None else None
    if corpus is not None and known is None:
        raise UserError(f"data.corpus={corpus} is unknown: choose one of {', '.join(corpora.CORPORA)} or null")
    if known is None and path is None:
        raise UserError(
            "data=file (data.corpus=null) needs data.path=<file>: give a file, or a named corpus (data=tinyshakespeare)"
        )
    tokenizer = tokenizer or (known.tokenizer if known else "chars")
    if tokenizer not in TOKENIZERS:
        raise UserError(f"data.tokenizer={tokenizer} is unknown: choose one of {', '.join(TOKENIZERS)}")
    source = corpora.check_readable(path) if path is not None else corpora.resolve(known)
    member = None
    if zipfile_like(source):
        member = corpora.zip_member(source, known.member if known else None)
    return cache.encoded(source, member, tokenizer, name=str(source))


def zipfile_like(path: Path) -> bool:
    with open(path, "rb") as f:
        return path.suffix == ".zip" and f.read(4) == b"PK\x03\x04"


class CharDataModule(L.LightningDataModule):
    """Any corpus for all three variants: train on its head, validate on the next part, test on its tail.

    `batch_size` is global: under DDP each of the W ranks gets batch_size / W rows, so a run computes the same
    updates on any number of devices. `max_tokens` caps the training head (10000 reproduces d2l), `val_tokens` the
    validation split (the test always uses its whole split). Splits: `split_bounds`.
    """

    def __init__(
        self,
        corpus: str | None = "timemachine",
        path: str | None = None,
        tokenizer: str | None = None,
        batch_size: int = 32,
        num_steps: int = 35,
        max_tokens: int | None = None,
        val_fraction: float = 0.05,
        test_fraction: float = 0.05,
        val_tokens: int | None = None,
        partition: str = "sequential",
        seed: int = 0,
        num_workers: int = 0,
        steps_per_call: int = 1,
        limit_train_batches: int | float | None = None,
    ):
        """`steps_per_call` K > 1: training items are chunks of K batches (gruexp.steps), and `limit_train_batches`
        (trainer.limit_train_batches, in batches) is applied here, since Lightning would count chunks."""
        super().__init__()
        for name, v in (("batch_size", batch_size), ("num_steps", num_steps)):
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise UserError(f"data.{name} must be a positive integer, got {v}")
        for name, v in (("max_tokens", max_tokens), ("val_tokens", val_tokens)):
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v <= 0):
                raise UserError(f"data.{name} must be a positive integer or null, got {v}")
        for name, v in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            if not isinstance(v, (int, float)) or not 0 <= v < 1:
                raise UserError(f"data.{name} must be in [0, 1), got {v}")
        if val_fraction + test_fraction >= 1:
            raise UserError(
                f"data.val_fraction + data.test_fraction = {val_fraction + test_fraction:g} leaves nothing to train on:"
                " keep their sum below 1"
            )
        if partition not in ("sequential", "random"):
            raise UserError(f"data.partition={partition} is unknown: choose sequential or random")
        # in every checkpoint: gruexp.evaluate rebuilds the splits from it (how training read them is not the splits)
        self.save_hyperparameters(ignore=["steps_per_call", "limit_train_batches"], logger=False)
        self.corpus_name, self.path, self.batch_size, self.num_steps = corpus, path, batch_size, num_steps
        self.max_tokens, self.val_tokens, self.partition = max_tokens, val_tokens, partition
        self.seed, self.num_workers = seed, num_workers
        self.steps_per_call, self.limit_train_batches = steps_per_call, limit_train_batches
        self.tokens = encoded_corpus(corpus, path, tokenizer)
        self.ids, self.vocab = self.tokens.ids(), self.tokens.vocab
        train_end, val_end = split_bounds(len(self.ids), val_fraction, test_fraction)
        self.bounds = {
            "train": (0, train_end if max_tokens is None else min(train_end, max_tokens)),
            "val": (train_end, val_end if val_tokens is None else min(val_end, train_end + val_tokens)),
            "test": (val_end, len(self.ids)),
        }
        self._check_fits("train", train_end)
        for name in ("val", "test"):
            if self.split_len(name):
                self._check_fits(name)

    def split(self, name: str) -> np.ndarray:
        """The ids of a split (a view of the memory map; val capped by val_tokens, train by max_tokens)."""
        lo, hi = self.bounds[name]
        return self.ids[lo:hi]

    def split_len(self, name: str) -> int:
        lo, hi = self.bounds[name]
        return hi - lo

    def _check_fits(self, name: str, uncapped: int | None = None) -> None:
        need, have = self.num_steps + 1, self.split_len(name)
        if have >= need:
            return
        head = f"data.num_steps={self.num_steps} needs at least {need} tokens"
        if name == "train" and self.max_tokens is not None and (uncapped or 0) >= need:
            raise UserError(
                f"{head} but data.max_tokens={self.max_tokens} leaves the training split {have}: "
                "raise data.max_tokens (or drop it) or lower data.num_steps"
            )
        if name == "val" and self.val_tokens is not None:
            raise UserError(f"{head} but data.val_tokens={self.val_tokens} leaves the validation split {have}")
        what = {"train": "training head", "val": "validation split", "test": "test split"}[name]
        raise UserError(f"{head} but the {what} has {have}: lower data.num_steps or use a longer corpus")

    def _rank(self) -> tuple[int, int]:
        t = self.trainer
        return (t.global_rank, t.world_size) if t is not None else (0, 1)

    def _loader(self, name: str, batch_size: int, partition: str, shuffle_offset: bool) -> StreamLoader:
        rank, world = self._rank()
        ids = self.split(name)
        sampler = StreamSampler(
            len(ids),
            self.num_steps,
            batch_size,
            partition,
            rank,
            world,
            self.seed,
            shuffle_offset,
            limit=self.limit_train_batches if name == "train" else None,
        )
        if len(sampler) == 0:
            raise UserError(
                f"the {len(ids)}-token {name} split holds no batch of {batch_size} rows x {self.num_steps} steps: "
                "lower data.batch_size or data.num_steps, or raise data.max_tokens"
            )
        lo, hi = self.bounds[name]
        source = (str(self.tokens.path), self.tokens.dtype.str, lo, hi - lo)
        return StreamLoader(
            Windows(ids, self.num_steps, source),
            batch_size=sampler.rows,
            sampler=sampler,
            drop_last=True,
            collate_fn=_batch,
            num_workers=self.num_workers,
            steps_per_call=self.steps_per_call,
        )

    def eval_dataloader(self, name: str) -> DataLoader | list:
        """A held-out split read whole (HeldOut): as many rows as it fills (a multiple of the world size) up to
        batch_size, each rank its own rows; empty when the split is."""
        if self.split_len(name) <= self.num_steps:
            return []
        rank, world = self._rank()
        fit = (self.split_len(name) - 1) // self.num_steps
        rows = max(world, min(self.batch_size, fit) // world * world)
        lo, hi = self.bounds[name]
        source = (str(self.tokens.path), self.tokens.dtype.str, lo, hi - lo)
        mine = (rank * (rows // world), rows // world)
        held_out = HeldOut(self.split(name), self.num_steps, rows, mine, source)
        return DataLoader(held_out, batch_size=None, shuffle=False, num_workers=self.num_workers)

    def train_dataloader(self) -> StreamLoader:
        return self._loader("train", self.batch_size, self.partition, shuffle_offset=True)

    def val_dataloader(self) -> StreamLoader | list:
        return self.eval_dataloader("val")

    def test_dataloader(self) -> StreamLoader | list:
        return self.eval_dataloader("test")

    def describe(self) -> str:
        """One line: corpus, tokenizer, vocabulary and split sizes."""
        sizes = " / ".join(f"{name} {self.split_len(name):,}" for name in SPLITS)
        src = self.path or self.corpus_name
        return f"{src}: {len(self.ids):,} tokens, vocabulary {len(self.vocab)}; {sizes}"

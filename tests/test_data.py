"""The Time Machine through the new loader (d2l's numbers), the two partitions, and the DataModule's errors."""

from __future__ import annotations

import functools
import http.server
import random
import shutil
import threading
import tracemalloc

import numpy as np
import pytest
import torch

from gruexp import UserError, data
from gruexp.data import CORPORA, CharDataModule, StreamSampler, Vocab, corpora, load_corpus
from gruexp.data.datamodule import PAD, HeldOut


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def read_lines(path):
    """The d2l cleaning of a small file, through the encoder."""
    ids, vocab = load_corpus(None, path, "d2l")
    return vocab.decode(ids)


def test_d2l_corpus_and_vocab(corpus_path):
    corpus, vocab = load_corpus("timemachine")
    # d2l 0.17, section 8.2: len(corpus), len(vocab) == (170580, 28) and the ten most frequent tokens.
    assert (len(corpus), len(vocab)) == (170580, 28)
    assert vocab.idx_to_token[:10] == ["<unk>", " ", "e", "t", "a", "i", "n", "o", "s", "h"]
    assert vocab.decode(corpus[:14].tolist()) == "the time machi"
    assert isinstance(corpus, np.memmap) and corpus.dtype == np.uint8


def test_tokenization_keeps_letters_lowercased(tmp_path):
    p = tmp_path / "t.txt"
    p.write_text("Hello, World!\n\n  It's 1898...  \n")
    assert read_lines(p) == "hello worldit s"  # lines joined without a separator, as d2l does
    assert Vocab("aab").idx_to_token == ["<unk>", "a", "b"]
    assert Vocab("ab")["z"] == Vocab.unk


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "no letters"),
        (b"1234 !!\n", "no letters"),
        (b"abc\x00\x01def", "binary"),
        ("time machine".encode("utf-16"), "is UTF-16 text"),
        (b"caf\xe9 au lait", "not UTF-8"),
    ],
)
def test_bad_corpus_is_refused(tmp_path, content, message):
    p = tmp_path / "bad.txt"
    p.write_bytes(content)
    with pytest.raises(UserError, match=message):
        CharDataModule(path=str(p))


def test_missing_path_names_the_fix(tmp_path):
    with pytest.raises(UserError, match="is not a file"):
        CharDataModule(path=str(tmp_path / "nope.txt"))


def test_sha1_mismatch_is_refused(tmp_path, monkeypatch):
    (tmp_path / "timemachine.txt").write_text("not the book\n")
    monkeypatch.setenv("GRUEXP_DATA_DIR", str(tmp_path))
    with pytest.raises(UserError, match="SHA-1 .* expected d2l's 090b5e7e"):
        corpora.resolve(CORPORA["timemachine"])


def test_offline_without_file_says_where_to_put_it(tmp_path, monkeypatch):
    (tmp_path / "d").mkdir()
    monkeypatch.setenv("GRUEXP_DATA_DIR", str(tmp_path / "d"))
    spec = CORPORA["timemachine"]
    monkeypatch.setitem(CORPORA, "timemachine", data.Corpus(**{**spec.__dict__, "url": "http://127.0.0.1:9/tm.txt"}))
    with pytest.raises(
        UserError,
        match=f"no timemachine.txt and no network: download http://127.0.0.1:9/tm.txt and put it in {tmp_path}/d/",
    ):
        CharDataModule()


def test_download_verifies_and_caches(tmp_path, monkeypatch, corpus_path):
    served = tmp_path / "www"
    served.mkdir()
    shutil.copy(corpus_path, served / "timemachine.txt")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.delenv("GRUEXP_DATA_DIR")
        url = f"http://127.0.0.1:{server.server_port}/timemachine.txt"
        spec = data.Corpus(**{**CORPORA["timemachine"].__dict__, "url": url})
        got = corpora.resolve(spec)
        assert got == tmp_path / "cache" / "gruexp" / "timemachine.txt"
        assert data.file_digest(got, "sha1") == spec.digest.removeprefix("sha1:")
        (served / "timemachine.txt").write_text("tampered\n")
        assert corpora.resolve(spec) == got  # the cached copy is used, not the server
    finally:
        server.shutdown()


def d2l_seq_data_iter_sequential(corpus, batch_size, num_steps, offset):
    """d2l 0.17's seq_data_iter_sequential with its random offset passed in: the reference."""
    num_tokens = ((len(corpus) - offset - 1) // batch_size) * batch_size
    Xs = torch.tensor(corpus[offset : offset + num_tokens])
    Ys = torch.tensor(corpus[offset + 1 : offset + 1 + num_tokens])
    Xs, Ys = Xs.reshape(batch_size, -1), Ys.reshape(batch_size, -1)
    num_batches = Xs.shape[1] // num_steps
    for i in range(0, num_steps * num_batches, num_steps):
        yield Xs[:, i : i + num_steps], Ys[:, i : i + num_steps]


def batches(ids, sampler):
    """The batches as the DataModule builds them: one gather per batch (Windows.__getitems__)."""
    ds = data.Windows(np.asarray(ids, dtype=np.int64), sampler.T)
    loader = torch.utils.data.DataLoader(
        ds, batch_size=sampler.rows, sampler=sampler, drop_last=True, collate_fn=data.datamodule._batch
    )
    got = list(loader)
    # and the same as one window at a time through torch's default collate
    per_item = torch.utils.data.DataLoader(ds, batch_size=sampler.rows, sampler=sampler, drop_last=True)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(got, per_item, strict=True))
    return got


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sequential_matches_d2l(seed):
    ids = list(range(1000))
    s = StreamSampler(len(ids), num_steps=7, batch_size=4, seed=seed)
    ours = batches(ids, s)
    offset = ours[0][0][0, 0].item()
    assert 0 <= offset <= 7
    ref = list(d2l_seq_data_iter_sequential(ids, 4, 7, offset))
    assert len(ours) == len(ref) > 0
    for (x, y), (rx, ry) in zip(ours, ref, strict=True):
        assert torch.equal(x, rx) and torch.equal(y, ry)


def test_sequential_rows_continue_per_rank_under_ddp():
    ids = list(range(2000))
    full = batches(ids, StreamSampler(len(ids), 5, 8, seed=3))
    ranks = [batches(ids, StreamSampler(len(ids), 5, 8, rank=r, world_size=2, seed=3)) for r in range(2)]
    for r, rank_batches in enumerate(ranks):
        assert len(rank_batches) == len(full)
        for t, (x, y) in enumerate(rank_batches):
            assert torch.equal(x, full[t][0][4 * r : 4 * r + 4])  # each rank owns its rows of the global batch
            assert torch.equal(y[:, :-1], x[:, 1:])
            if t:
                assert torch.equal(x[:, 0], rank_batches[t - 1][0][:, -1] + 1)  # row i continues row i


def test_random_partition_is_a_shuffle_of_disjoint_windows():
    ids = list(range(500))
    s = StreamSampler(len(ids), 6, 4, partition="random", seed=5)
    got = batches(ids, s)
    starts = sorted(x[i, 0].item() for x, _ in got for i in range(x.shape[0]))
    offset = starts[0] % 6
    windows = (500 - offset - 1) // 6  # d2l drops the windows that do not fill a last batch of 4
    assert len(set(starts)) == len(starts) == windows // 4 * 4
    assert all(s % 6 == offset and s + 6 < 500 for s in starts)
    assert [x[:, 0].tolist() for x, _ in got] != [sorted(x[:, 0].tolist()) for x, _ in got]
    s.set_epoch(1)
    assert [x[:, 0].tolist() for x, _ in batches(ids, s)] != [x[:, 0].tolist() for x, _ in got]
    s.set_epoch(0)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches(ids, s), got, strict=True))


def test_datamodule_splits_head_and_tail(corpus_path):
    """d2l_classic still trains on the first 10,000 tokens; the old 10 % tail is now validation, then test."""
    dm = CharDataModule(max_tokens=10000)
    assert dm.split_len("train") == 10000 and np.array_equal(dm.split("train"), dm.ids[:10000])
    assert np.array_equal(dm.split("val"), dm.ids[-17058:-8529])
    assert np.array_equal(dm.split("test"), dm.ids[-8529:])
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == y.shape == (32, 35)
    head = torch.from_numpy(dm.ids[:80].astype(np.int64))
    assert any(torch.equal(x[0], head[k : k + 35]) and torch.equal(y[0], head[k + 1 : k + 36]) for k in range(36))
    assert len(dm.val_dataloader()) == len(dm.test_dataloader()) == 8  # ceil(ceil(8528 / 32) / 35): whole splits
    first_val, _ = next(iter(dm.val_dataloader()))
    assert first_val[0, 0].item() == dm.ids[len(dm.ids) - 17058]  # read from the split's start


def test_val_tokens_caps_validation_only(corpus_path):
    dm = CharDataModule(val_tokens=2000, batch_size=4, num_steps=10)
    assert dm.split_len("val") == 2000 and dm.split_len("test") == 8529
    # ceil(ceil(1999 / 4) / 10) and ceil(ceil(8528 / 4) / 10): rows of the whole split, the last batch narrower
    assert len(dm.val_dataloader()) == 50 and len(dm.test_dataloader()) == 214


@pytest.mark.parametrize("partition", ["sequential", "random"])
def test_a_90m_token_stream_is_never_a_list(partition):
    """len() and the first batches of a 90M-token split allocate kilobytes, not a list of 90M / T starts."""
    s = StreamSampler(90_000_000, 256, 128, partition=partition, rank=1, world_size=2, seed=1)
    tracemalloc.start()
    try:
        n = len(s)
        it = iter(s)
        first = [next(it) for _ in range(64)]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert n == s.num_batches() * 64 and len(first) == 64
    # random keeps one permutation tensor of n/T int64 (8 bytes per window, not a Python list of ints)
    assert peak < (90_000_000 // 256 * 8 + 1_000_000 if partition == "random" else 100_000)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_steps": 200000}, "num_steps=200000 needs at least 200001 tokens"),
        ({"max_tokens": 10}, "data.max_tokens=10 leaves the training split 10: raise data.max_tokens"),
        ({"val_fraction": 0.5, "test_fraction": 0.5}, "leaves nothing to train on"),
        ({"corpus": "text9"}, "data.corpus=text9 is unknown: choose one of timemachine, tinyshakespeare, text8"),
        ({"tokenizer": "words"}, "data.tokenizer=words is unknown: choose one of d2l, chars, bytes"),
        ({"num_steps": 0}, "data.num_steps must be a positive integer, got 0"),
        ({"batch_size": -1}, "data.batch_size must be a positive integer, got -1"),
        ({"partition": "shuffled"}, "data.partition=shuffled is unknown"),
        ({"max_tokens": 50, "batch_size": 32}, "holds no batch of 32 rows"),
    ],
)
def test_datamodule_bad_options(corpus_path, kwargs, message):
    with pytest.raises(UserError, match=message):
        CharDataModule(**kwargs).train_dataloader()


def test_seeded_offsets_repeat():
    rng = random.Random(0)
    n = rng.randint(500, 900)
    a, b = StreamSampler(n, 5, 4, seed=9), StreamSampler(n, 5, 4, seed=9)
    assert a.batches() == b.batches()
    assert a.batches() != StreamSampler(n, 5, 4, seed=10).batches()


@pytest.mark.parametrize("n, rows, world", [(8529, 32, 1), (2000, 4, 1), (1001, 8, 2), (37, 4, 2), (36, 3, 1)])
def test_a_held_out_split_scores_every_token_after_its_first_once(n, rows, world):
    """Read row by row, the real targets of all ranks are the split's ids[1:], each once, and every batch continues
    the row the batch before it left (the carried state's assumption); padding only after a row's real tokens."""
    ids = np.random.default_rng(n).integers(0, 50, n).astype(np.uint8)
    T, per = 10, rows // world
    shares = [HeldOut(ids, T, rows, (r * per, per)) for r in range(world)]
    assert sum(s.targets for s in shares) == n - 1
    streams = [[] for _ in range(rows)]  # (input, target) along each row
    for r, share in enumerate(shares):
        assert len(share) == -(-share.row_len // T)
        for t in range(len(share)):
            x, y = share[t]
            assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape and x.shape[0] == per
            assert x.shape[1] == min(T, share.row_len - t * T)
            for i in range(per):
                streams[r * per + i] += list(zip(x[i].tolist(), y[i].tolist(), strict=True))
    real = []
    for row in streams:
        targets = [y for _, y in row]
        k = targets.index(PAD) if PAD in targets else len(targets)
        assert all(y == PAD for y in targets[k:])  # padding only at the row's end
        real += row[:k]
    assert [y for _, y in real] == ids[1:].tolist()
    assert [x for x, _ in real] == ids[:-1].tolist()


def test_evaluate_and_the_end_of_run_test_read_the_whole_split(corpus_path):
    dm = CharDataModule()
    held_out = dm.test_dataloader().dataset
    assert held_out.targets == dm.split_len("test") - 1 == 8528

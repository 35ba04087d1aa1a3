"""Corpus loading, d2l tokenization and vocabulary, the two partitions, and the DataModule's errors."""

from __future__ import annotations

import functools
import http.server
import random
import shutil
import threading

import pytest
import torch

from gruexp import UserError, data
from gruexp.data import StreamSampler, TimeMachineDataModule, Vocab, load_corpus, read_lines


def test_d2l_corpus_and_vocab(corpus_path):
    corpus, vocab = load_corpus(corpus_path)
    # d2l 0.17, section 8.2: len(corpus), len(vocab) == (170580, 28) and the ten most frequent tokens.
    assert (len(corpus), len(vocab)) == (170580, 28)
    assert vocab.idx_to_token[:10] == ["<unk>", " ", "e", "t", "a", "i", "n", "o", "s", "h"]
    assert vocab.decode(corpus[:14].tolist()) == "the time machi"


def test_tokenization_keeps_letters_lowercased(tmp_path):
    p = tmp_path / "t.txt"
    p.write_text("Hello, World!\n\n  It's 1898...  \n")
    assert read_lines(p) == ["hello world", "", "it s"]
    assert Vocab("aab").idx_to_token == ["<unk>", "a", "b"]
    assert Vocab("ab")["z"] == Vocab.unk


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "no letters"),
        (b"1234 !!\n", "no letters"),
        (b"abc\x00\x01def", "binary"),
        (b"caf\xe9 au lait", "not UTF-8"),
    ],
)
def test_bad_corpus_is_refused(tmp_path, content, message):
    p = tmp_path / "bad.txt"
    p.write_bytes(content)
    with pytest.raises(UserError, match=message):
        TimeMachineDataModule(path=str(p))


def test_missing_path_names_the_fix(tmp_path):
    with pytest.raises(UserError, match="is not a file"):
        data.resolve_corpus(tmp_path / "nope.txt")


def test_sha1_mismatch_is_refused(tmp_path, monkeypatch):
    (tmp_path / "timemachine.txt").write_text("not the book\n")
    monkeypatch.setenv("GRUEXP_DATA_DIR", str(tmp_path))
    with pytest.raises(UserError, match="SHA-1 .* expected d2l's 090b5e7e"):
        data.resolve_corpus()


def test_offline_without_file_says_where_to_put_it(tmp_path, monkeypatch):
    monkeypatch.setenv("GRUEXP_DATA_DIR", str(tmp_path / "d"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(data, "URL", "http://127.0.0.1:9/timemachine.txt")  # nothing listens on port 9
    with pytest.raises(UserError, match=f"no network: put d2l's timemachine.txt .* at {tmp_path}/d/timemachine.txt"):
        data.resolve_corpus()


def test_download_verifies_and_caches(tmp_path, monkeypatch, corpus_path):
    served = tmp_path / "www"
    served.mkdir()
    shutil.copy(corpus_path, served / "timemachine.txt")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.delenv("GRUEXP_DATA_DIR")
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
        monkeypatch.setattr(data, "URL", f"http://127.0.0.1:{server.server_port}/timemachine.txt")
        got = data.resolve_corpus()
        assert got == tmp_path / "cache" / "gruexp" / "timemachine.txt"
        assert data.sha1(got) == data.SHA1
        (served / "timemachine.txt").write_text("tampered\n")
        assert data.resolve_corpus() == got  # the cached copy is used, not the server
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
    ds = data.Windows(torch.tensor(ids), sampler.T)
    loader = torch.utils.data.DataLoader(ds, batch_size=sampler.rows, sampler=sampler, drop_last=True)
    return list(loader)


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
    dm = TimeMachineDataModule(max_tokens=10000, val_fraction=0.1)
    assert len(dm.train_ids) == 10000 and torch.equal(dm.train_ids, dm.corpus[:10000])
    assert torch.equal(dm.val_ids, dm.corpus[-17058:])
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == y.shape == (32, 35)
    assert len(dm.val_dataloader()) == (17058 - 1) // (32 * 35)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_steps": 200000}, "num_steps=200000 needs at least 200001 tokens"),
        ({"num_steps": 0}, "data.num_steps must be a positive integer, got 0"),
        ({"batch_size": -1}, "data.batch_size must be a positive integer, got -1"),
        ({"partition": "shuffled"}, "data.partition=shuffled is unknown"),
        ({"max_tokens": 50, "batch_size": 32}, "holds no batch of 32 rows"),
    ],
)
def test_datamodule_bad_options(corpus_path, kwargs, message):
    with pytest.raises(UserError, match=message):
        TimeMachineDataModule(**kwargs).train_dataloader()


def test_seeded_offsets_repeat():
    rng = random.Random(0)
    n = rng.randint(500, 900)
    a, b = StreamSampler(n, 5, 4, seed=9), StreamSampler(n, 5, 4, seed=9)
    assert a.batches() == b.batches()
    assert a.batches() != StreamSampler(n, 5, 4, seed=10).batches()

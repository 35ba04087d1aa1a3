"""Corpora, tokenizers, checksums, downloads and the token-file cache, on files the tests build.

No machine here can download: text8- and enwik8-shaped zips and a Shakespeare-like text are made here, a local
HTTP server stands in for the download, and one test reads the real tiny Shakespeare from $GRUEXP_DATA_DIR.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import http.server
import logging
import math
import os
import re
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest

from gruexp import UserError
from gruexp.data import CORPORA, CharDataModule, cache, corpora, load_corpus, split_bounds, tokenizers
from gruexp.data.tokenizers import Vocab

SHAKESPEARE_LIKE = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
    "First Citizen:\nYou are all resolved rather to die than to famish?\n\nAll:\nResolved. resolved.\n\n"
) * 40


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """Each test encodes into its own user cache."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def d2l_reference(text: str) -> str:
    """d2l 0.17's read_time_machine + load_corpus_time_machine, written as d2l writes it (lines via readlines)."""
    import io

    lines = io.StringIO(text, newline=None).readlines()
    return "".join(re.sub("[^A-Za-z]+", " ", line).strip().lower() for line in lines)


def encode_text(raw: bytes, tokenizer: str, chunk: int, monkeypatch, tmp_path) -> tuple[np.ndarray, Vocab]:
    monkeypatch.setattr(tokenizers, "CHUNK", chunk)
    p = tmp_path / f"in-{tokenizer}-{chunk}.txt"
    p.write_bytes(raw)
    ids, vocab = load_corpus(None, p, tokenizer)
    return np.asarray(ids), vocab


TRICKY = "  It's 1898...\r\nThe Time--Traveller (for so\n\n it will be convenient), café; naïve — ok!\r\rend.  \n"


@pytest.mark.parametrize("chunk", [3, 5, 64, 1 << 20])
def test_d2l_tokenizer_matches_d2l_across_chunk_boundaries(chunk, monkeypatch, tmp_path):
    text = TRICKY * 7
    ids, vocab = encode_text(text.encode(), "d2l", chunk, monkeypatch, tmp_path)
    expected = d2l_reference(text)
    assert vocab.decode(ids) == expected
    assert vocab.idx_to_token == Vocab(list(expected)).idx_to_token  # <unk>, then by frequency, ties first seen


@pytest.mark.parametrize("chunk", [2, 7, 1 << 20])
def test_chars_tokenizer_keeps_every_character_sorted_like_nanogpt(chunk, monkeypatch, tmp_path):
    text = SHAKESPEARE_LIKE + "Ünïcödé — ‘quotes’ 𝄞\n"  # 2-, 3- and 4-byte characters straddle small chunks
    ids, vocab = encode_text(text.encode(), "chars", chunk, monkeypatch, tmp_path)
    assert vocab.idx_to_token == sorted(set(text))  # nanoGPT's chars = sorted(list(set(data)))
    assert vocab.decode(ids) == text
    assert ids.dtype == np.uint8


def test_bytes_tokenizer_reads_any_file(monkeypatch, tmp_path):
    raw = bytes(range(256)) * 3 + b"\x00\xff caf\xc3\xa9"
    ids, vocab = encode_text(raw, "bytes", 100, monkeypatch, tmp_path)
    assert len(vocab) == 256 and bytes(ids.tolist()) == raw
    assert vocab.encode("café") == list("café".encode()) and vocab.decode(vocab.encode("café")) == "café"


def test_split_bounds_give_nanogpt_and_benchmark_splits():
    n = 1_115_394
    assert split_bounds(n, 0.1, 0.0) == (int(n * 0.9), n)  # nanoGPT: train_data = data[:int(n*0.9)]
    assert split_bounds(n, 0.05, 0.05)[0] == int(n * 0.9)  # the same train head for 90/5/5
    assert split_bounds(100_000_000, 0.05, 0.05) == (90_000_000, 95_000_000)  # text8 / enwik8: 90M/5M/5M
    assert split_bounds(170_580, 0.05, 0.05) == (153_522, 162_051)  # the book: train head as before (90 %)


def zipped(tmp_path: Path, member: str, payload: bytes, name: str) -> Path:
    z = tmp_path / name
    with zipfile.ZipFile(z, "w", compression=zipfile.ZIP_DEFLATED) as f:
        f.writestr(member, payload)
    return z


def text8_like(n: int) -> bytes:
    rng = np.random.default_rng(0)
    letters = np.frombuffer(b" abcdefghijklmnopqrstuvwxyz", np.uint8)
    return letters[rng.integers(0, 27, n)].tobytes()


def test_text8_shaped_zip_from_data_path_gives_27_symbols_and_90_5_5(tmp_path):
    payload = text8_like(20_000)
    z = zipped(tmp_path, "text8", payload, "text8.zip")
    dm = CharDataModule(corpus="text8", path=str(z), batch_size=4, num_steps=8)
    assert dm.vocab.idx_to_token == list(" abcdefghijklmnopqrstuvwxyz")
    assert dm.vocab.decode(dm.ids) == payload.decode()
    assert [dm.split_len(s) for s in ("train", "val", "test")] == [18_000, 1_000, 1_000]
    assert dm.vocab.decode(dm.split("test")) == payload[-1000:].decode()


def test_enwik8_shaped_zip_is_raw_bytes(tmp_path):
    payload = b"<mediawiki>\n  <page>caf\xc3\xa9 \xe2\x80\x94 [[link]]</page>\n\xff\xfe" * 300
    z = zipped(tmp_path, "enwik8", payload, "enwik8.zip")
    dm = CharDataModule(corpus="enwik8", path=str(z), batch_size=2, num_steps=8)
    assert len(dm.vocab) == 256 and bytes(np.asarray(dm.ids).tolist()) == payload
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (2, 8) and int(x.max()) < 256


def test_checksum_path_accepts_the_pinned_file_and_refuses_another(tmp_path, monkeypatch):
    payload = text8_like(5_000)
    data = tmp_path / "data"
    data.mkdir()
    z = zipped(data, "text8", payload, "text8.zip")
    digest = hashlib.sha256(z.read_bytes()).hexdigest()
    pinned = dataclasses.replace(CORPORA["text8"], digest=f"sha256:{digest}", size=z.stat().st_size)
    monkeypatch.setitem(CORPORA, "text8", pinned)
    monkeypatch.setenv("GRUEXP_DATA_DIR", str(data))
    assert corpora.resolve(pinned, download=False) == z
    ids, vocab = load_corpus("text8")
    assert vocab.decode(ids) == payload.decode()
    zipped(data, "text8", text8_like(5_001), "text8.zip")  # another file in its place
    with pytest.raises(UserError, match=r"has \d[\d,]* bytes, expected Mahoney's|SHA-256 .* expected Mahoney's"):
        load_corpus("text8")


@pytest.fixture
def server(tmp_path):
    """A local HTTP server over tmp_path/www: the download without a network."""
    www = tmp_path / "www"
    www.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(www))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield www, f"http://127.0.0.1:{httpd.server_port}"
    httpd.shutdown()


def test_download_is_verified_then_renamed_and_a_bad_one_leaves_nothing(tmp_path, monkeypatch, server):
    www, url = server
    payload = SHAKESPEARE_LIKE.encode()
    (www / "input.txt").write_bytes(payload)
    spec = dataclasses.replace(
        CORPORA["tinyshakespeare"],
        url=f"{url}/input.txt",
        digest=f"sha256:{hashlib.sha256(payload).hexdigest()}",
        size=len(payload),
    )
    monkeypatch.setitem(CORPORA, "tinyshakespeare", spec)
    monkeypatch.delenv("GRUEXP_DATA_DIR", raising=False)
    got = corpora.resolve(spec)
    assert got == tmp_path / "cache" / "gruexp" / "tinyshakespeare.txt" and got.read_bytes() == payload
    assert [p.name for p in got.parent.iterdir() if p.name.endswith(".part")] == []
    got.unlink()
    (www / "input.txt").write_bytes(payload[:-1] + b"?")  # same size, another digest
    with pytest.raises(UserError, match="SHA-256 .* expected char-rnn's"):
        corpora.resolve(spec)
    assert list(got.parent.iterdir()) == []  # neither the file nor a temporary one


def test_offline_names_the_url_and_the_folder(tmp_path, monkeypatch):
    spec = dataclasses.replace(CORPORA["enwik8"], url="http://127.0.0.1:9/enwik8.zip")  # nothing listens on 9
    monkeypatch.setitem(CORPORA, "enwik8", spec)
    monkeypatch.setenv("GRUEXP_DATA_DIR", str(tmp_path))
    with pytest.raises(UserError) as e:
        load_corpus("enwik8")
    assert str(e.value) == (
        f"no enwik8.zip and no network: download http://127.0.0.1:9/enwik8.zip and put it in {tmp_path}/ "
        "(or set GRUEXP_DATA_DIR to the folder holding it, or pass data.path=<file>)"
    )


def test_missing_data_dir_is_warned_about(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("GRUEXP_DATA_DIR", str(tmp_path / "typo"))
    monkeypatch.setattr(corpora, "_warned_data_dir", set())
    with caplog.at_level(logging.WARNING, logger="gruexp.data.corpora"):
        assert corpora.data_dir() is None
    assert f"GRUEXP_DATA_DIR={tmp_path / 'typo'} is not a folder" in caplog.text


def test_token_file_is_encoded_once_and_memory_mapped(tmp_path, caplog):
    p = tmp_path / "s.txt"
    p.write_text(SHAKESPEARE_LIKE)
    with caplog.at_level(logging.INFO, logger="gruexp.data.cache"):
        first = CharDataModule(corpus=None, path=str(p), tokenizer="chars", batch_size=4, num_steps=8)
        second = CharDataModule(corpus=None, path=str(p), tokenizer="chars", batch_size=4, num_steps=8)
        by_bytes = CharDataModule(corpus=None, path=str(p), tokenizer="bytes", batch_size=4, num_steps=8)
    assert caplog.text.count("encoded ") == 2  # chars once, bytes once: the second chars run maps the file
    assert isinstance(second.ids, np.memmap) and second.ids.dtype == np.uint8
    assert second.tokens.path == first.tokens.path != by_bytes.tokens.path
    assert second.tokens.path.stat().st_size == len(SHAKESPEARE_LIKE)  # one byte per token
    p.write_text(SHAKESPEARE_LIKE + "x")  # another content: another key
    assert CharDataModule(corpus=None, path=str(p), batch_size=4, num_steps=8).tokens.path != first.tokens.path


def test_a_partial_token_file_is_encoded_again(tmp_path):
    p = tmp_path / "s.txt"
    p.write_text(SHAKESPEARE_LIKE)
    tokens = cache.encoded(p, None, "chars")
    with open(tokens.path, "r+b") as f:
        f.truncate(10)  # a run killed mid-write, or a disk that lost the tail
    again = cache.encoded(p, None, "chars")
    assert again.vocab.decode(again.ids()) == SHAKESPEARE_LIKE


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("time machine\n".encode("utf-16"), "is UTF-16 text, not UTF-8: convert it with `iconv -f UTF-16 -t UTF-8"),
        ("time machine\n".encode("utf-16-le"), "is UTF-16 text"),
        (b"abc\x00\x01def\x02", r"looks binary \(it holds NUL bytes\)"),
        (b"caf\xe9 au lait", r"is not UTF-8 text \(byte 3\)"),
    ],
)
@pytest.mark.parametrize("tokenizer", ["d2l", "chars"])
def test_text_that_is_not_utf8_is_named(tmp_path, content, message, tokenizer):
    p = tmp_path / "bad.txt"
    p.write_bytes(content)
    with pytest.raises(UserError, match=message):
        CharDataModule(corpus=None, path=str(p), tokenizer=tokenizer)


def test_max_tokens_too_small_blames_max_tokens(corpus_path):
    with pytest.raises(UserError) as e:
        CharDataModule(max_tokens=10)
    assert "data.max_tokens=10 leaves the training split 10" in str(e.value)
    assert "raise data.max_tokens" in str(e.value)


def test_data_path_that_is_not_a_readable_file_is_named(tmp_path):
    link = tmp_path / "dangling.txt"
    os.symlink(tmp_path / "gone.txt", link)
    with pytest.raises(UserError, match=f"data.path={link} is not a file"):
        CharDataModule(corpus=None, path=str(link))


def test_real_tiny_shakespeare(corpus_path):
    """karpathy/char-rnn's input.txt from $GRUEXP_DATA_DIR: size, digest, 65 symbols, nanoGPT's 90/10 split."""
    src = corpora.resolve(CORPORA["tinyshakespeare"], download=False)
    assert src.stat().st_size == 1_115_394
    dm = CharDataModule(corpus="tinyshakespeare", val_fraction=0.1, test_fraction=0.0, batch_size=32, num_steps=64)
    assert len(dm.vocab) == 65 and len(dm.ids) == 1_115_394
    assert dm.vocab.decode(dm.ids[:14]) == "First Citizen:"
    assert (dm.split_len("train"), dm.split_len("val"), dm.split_len("test")) == (1_003_854, 111_540, 0)
    assert dm.test_dataloader() == []
    x, y = next(iter(dm.val_dataloader()))
    assert dm.vocab.decode(x[0].tolist()) == src.read_text()[1_003_854 : 1_003_854 + 64]


@pytest.mark.parametrize("experiment", ["text8_gru", "enwik8_gru"])
def test_gpu_experiments_run_on_a_built_zip(experiment, tmp_path, make_cfg):
    """The GPU configs compose and train (shrunk, on the CPU) on a zip of their corpus's shape: the val_tokens cap
    and val_check_interval act, and the test reads its whole split."""
    import csv

    from gruexp.train import train

    member = experiment.split("_")[0]
    z = zipped(tmp_path, member, text8_like(40_000), f"{member}.zip")
    cfg = make_cfg(
        f"experiment={experiment}",
        f"data.path={z}",
        "trainer.accelerator=cpu",
        "model.hidden_size=8",
        "model.num_layers=2",
        "data.batch_size=4",
        "data.num_steps=16",
        "data.val_tokens=300",
        "trainer.max_epochs=1",
        "trainer.val_check_interval=0.5",
        "logger=csv",
        out=tmp_path / "run",
    )
    summary = train(cfg)
    assert summary["status"] == "completed" and summary["epochs"] == 1
    rows = list(csv.DictReader(open(tmp_path / "run" / "csv" / "metrics.csv")))
    assert len([r for r in rows if r.get("val/ppl")]) == 2  # twice in the epoch
    assert math.isfinite(summary["test_ppl"]) and summary["test_bpc"] == pytest.approx(math.log2(summary["test_ppl"]))


@pytest.mark.parametrize("experiment", ["shakespeare_quick", "shakespeare_gru"])
def test_shakespeare_experiments_decay_their_rate_to_zero_over_the_run(experiment, tmp_path, make_cfg):
    """The nanoGPT-comparison recipes compose and train (shrunk) on the real file; the warmup + cosine schedule is
    stepped every step and reaches 0 at the run's last step, whatever max_epochs is."""
    import torch

    from gruexp.train import train

    cfg = make_cfg(
        f"experiment={experiment}",
        "model.hidden_size=8",
        "data.max_tokens=6000",
        "data.val_tokens=500",
        "scheduler.warmup_steps=2",
        "trainer.max_epochs=2",
        "logger=csv",
        out=tmp_path / "run",
    )
    summary = train(cfg)
    assert summary["status"] == "completed" and summary["sample"].startswith("ROMEO:")
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["lr_schedulers"][0]["last_epoch"] == ckpt["global_step"] > 100  # stepped every step of both epochs
    assert ckpt["optimizer_states"][0]["param_groups"][0]["lr"] == pytest.approx(0.0, abs=1e-12)

"""The token cache: a damaged cache or a killed encoder's partial file is encoded again and said, a read-only
cache folder is one line naming it."""

from __future__ import annotations

import json
import logging
import subprocess

import pytest

from gruexp import UserError
from gruexp.data import cache

TEXT = "the time traveller for so it will be convenient to speak of him\n" * 50


@pytest.fixture
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    p = tmp_path / "corpus.txt"
    p.write_text(TEXT)
    return p


@pytest.mark.parametrize("damage", ["same-size bytes", "an id past the vocabulary"])
def test_a_damaged_token_cache_is_encoded_again_with_a_line(own_cache, caplog, damage):
    tokens = cache.encoded(own_cache, None, "chars")
    meta = tokens.path.with_suffix(".json")
    if damage == "same-size bytes":  # a disk error, a stray write: the size still fits
        with open(tokens.path, "r+b") as f:
            f.seek(100)
            f.write(bytes([tokens.vocab["e"]]) * 20)
        why = "its bytes differ from those encoded (sha256)"
    else:  # the vocabulary beside it lost a token (the ids' digest still matches)
        m = json.loads(meta.read_text())
        m["vocab"] = m["vocab"][:-1]
        meta.write_text(json.dumps(m))
        why = f"token id {len(m['vocab'])} past its vocabulary of {len(m['vocab'])}"
    with caplog.at_level(logging.INFO, logger="gruexp"):
        again = cache.encoded(own_cache, None, "chars")
    assert f"token cache {tokens.path} is damaged ({why}): encoding {own_cache} again" in caplog.text
    assert again.vocab.decode(again.ids()) == TEXT  # trained on what the corpus says, not on the damage
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="gruexp"):
        cache.encoded(own_cache, None, "chars")
    assert "damaged" not in caplog.text and "encoded" not in caplog.text  # whole again: mapped, not re-encoded


def test_a_partial_token_file_of_a_killed_encoder_is_removed_by_the_next_run(own_cache, caplog):
    tokens = cache.encoded(own_cache, None, "chars")
    tokens.path.with_suffix(".json").unlink()  # as if the encoder was killed (kill -9) before it finished
    tokens.path.unlink()
    stale = tokens.path.with_name(f".{tokens.path.name}.x1y2z3.part")
    stale.write_bytes(b"\\0" * 1000)
    with caplog.at_level(logging.INFO, logger="gruexp"):
        again = cache.encoded(own_cache, None, "chars")
    assert not stale.exists() and f"removing {stale}, left by an encoding that was killed" in caplog.text
    assert again.vocab.decode(again.ids()) == TEXT
    assert [p.name for p in tokens.path.parent.iterdir() if p.name.endswith(".part")] == []


def test_a_read_only_cache_folder_is_one_line_naming_it_and_the_way_elsewhere(tmp_path, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(ro)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs here ({r.stderr.decode().strip()}): needs root")
    try:
        monkeypatch.setenv("XDG_CACHE_HOME", str(ro))
        corpus = tmp_path / "c.txt"
        corpus.write_text(TEXT)
        with pytest.raises(UserError) as e:
            cache.encoded(corpus, None, "chars")
        assert str(e.value) == (
            f"cannot write the token cache {ro / 'gruexp' / 'tokens'} (Read-only file system): make it writable, or "
            "point gruexp at another cache folder with XDG_CACHE_HOME=<folder>"
        )
    finally:
        subprocess.run(["umount", str(ro)], check=True)

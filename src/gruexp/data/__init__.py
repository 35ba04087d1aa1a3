"""Corpora, tokenizers, the token-file cache and the DataModule (see each module's docstring)."""

from gruexp.data.corpora import CORPORA, Corpus, file_digest, resolve
from gruexp.data.datamodule import (
    CharDataModule,
    StreamLoader,
    StreamSampler,
    Windows,
    encoded_corpus,
    load_corpus,
    split_bounds,
)
from gruexp.data.tokenizers import TOKENIZERS, Vocab

__all__ = [
    "CORPORA",
    "TOKENIZERS",
    "CharDataModule",
    "Corpus",
    "StreamLoader",
    "StreamSampler",
    "Vocab",
    "Windows",
    "encoded_corpus",
    "file_digest",
    "load_corpus",
    "resolve",
    "split_bounds",
]

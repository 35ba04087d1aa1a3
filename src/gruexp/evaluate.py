"""Perplexity and bits per character of a checkpoint on any split of its corpus.

python -m gruexp.evaluate ckpt_path=<file.ckpt | run folder | last> split=test [data.path=...]

The corpus, tokenizer and split fractions come from the checkpoint (Lightning stores the DataModule's arguments in
it); a `data.*` key given here replaces the checkpoint's. The whole split is read (no data.val_tokens cap), with
the hidden state carried from batch to batch as in validation.
"""

from __future__ import annotations

import logging
import math
import sys
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from omegaconf import DictConfig

from gruexp import UserError
from gruexp.checkpoints import resolve_ckpt_path, vocab_difference
from gruexp.data import CharDataModule
from gruexp.errors import user_error
from gruexp.generate import load
from gruexp.preflight import check_overrides

log = logging.getLogger("gruexp.evaluate")

SPLITS = ("train", "val", "test")


def data_options(ckpt_path: str | Path, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The DataModule arguments the checkpoint's run used, with `overrides` (non-null values) applied."""
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    options = dict(ckpt.get(CharDataModule.CHECKPOINT_HYPER_PARAMS_KEY) or {})
    if not options:
        raise UserError(
            f"{ckpt_path} does not record its corpus (a checkpoint from before gruexp.evaluate): "
            "name it with data.corpus=<name> or data.path=<file>"
        )
    options.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return options


def evaluate(ckpt_path: str | Path, split: str = "test", device: str = "cpu", **data: Any) -> dict[str, float]:
    """{"ppl", "bpc", "loss", "tokens"} of the checkpoint (a file, a run folder or `last`) on the whole `split`."""
    if split not in SPLITS:
        raise UserError(f"split={split} is unknown: choose one of {', '.join(SPLITS)}")
    ckpt_path = resolve_ckpt_path(str(ckpt_path))  # data_options reads the file itself
    model = load(ckpt_path, device)
    options = data_options(ckpt_path, data)
    options.update(max_tokens=None, val_tokens=None)  # the whole split
    dm = CharDataModule(**options)
    if dm.vocab.idx_to_token != model.vocab.idx_to_token:
        a, b = model.vocab.idx_to_token, dm.vocab.idx_to_token
        raise UserError(
            f"{ckpt_path} was trained on a vocabulary of {len(a)} tokens that is not this corpus's ({len(b)} tokens, "
            f"{dm.describe().split(':')[0]}; {vocab_difference(a, b)}): evaluate it on the corpus and "
            "data.tokenizer it was trained with"
        )
    loader = dm.eval_dataloader(split)
    if not loader:
        raise UserError(f"the {split} split of {dm.describe()} is empty: choose another split")
    trainer = L.Trainer(
        accelerator=device,
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    result = trainer.test(model, dataloaders=loader, verbose=False)[0]
    ppl = float(result["test/ppl"])
    tokens = loader.dataset.targets  # every token of the split after its first
    return {"ppl": ppl, "bpc": math.log2(ppl), "loss": math.log(ppl), "tokens": tokens}


@hydra.main(version_base="1.3", config_path="../../conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    """Print `<split>: ppl … | bpc … | loss … nats | N tokens | <checkpoint>`; bad input: one line, exit 2."""
    try:
        # `last` searches the sibling folders of a run's own folder: a name inside runs_dir makes them its runs
        ckpt = resolve_ckpt_path(str(cfg.ckpt_path), Path(cfg.runs_dir) / "evaluate" if cfg.runs_dir else None)
        data = {k: v for k, v in cfg.data.items() if v is not None}
        r = evaluate(ckpt, str(cfg.split), str(cfg.device), **data)
    except Exception as e:
        user = user_error(e)
        if user is None:
            raise
        log.error("%s", user)
        sys.exit(2)
    print(
        f"{cfg.split}: ppl {r['ppl']:.4f} | bpc {r['bpc']:.4f} | loss {r['loss']:.4f} nats | {r['tokens']:,} tokens"
        f" | {ckpt}"
    )


if __name__ == "__main__":
    check_overrides(sys.argv[1:], Path(__file__).resolve().parents[2] / "conf", "evaluate")
    main()

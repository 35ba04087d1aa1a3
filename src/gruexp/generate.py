"""Continue a prefix with a trained model: python -m gruexp.generate ckpt_path=<last | run folder | file> prefix=..."""

from __future__ import annotations

import logging
import math
import pickle
import sys
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

from gruexp import UserError
from gruexp.checkpoints import check_checkpoint, resolve_ckpt_path
from gruexp.module import CharLM
from gruexp.preflight import check_generate_config, check_overrides

log = logging.getLogger("gruexp.generate")


def load(ckpt_path: str | Path, device: str = "cpu") -> CharLM:
    """Load a CharLM checkpoint of any variant: `last`, a run folder or a file (the resolver train uses).

    A missing, damaged or foreign file is one UserError line (gruexp.checkpoints.check_checkpoint), never a traceback.
    """
    p = Path(resolve_ckpt_path(str(ckpt_path)))
    check_checkpoint(p)
    try:
        model = CharLM.load_from_checkpoint(p, map_location=device, weights_only=True)
    except (RuntimeError, KeyError, TypeError, EOFError, ValueError, pickle.UnpicklingError) as e:
        raise UserError(f"{p} is not a gruexp checkpoint ({type(e).__name__}: {str(e).splitlines()[0]})") from e
    return model.eval()


def generate(model: CharLM, prefix: str, num_chars: int = 50, temperature: float = 0.0, seed: int = 0) -> str:
    """The prefix and its continuation; unknown characters -> <unk>. A vocabulary without capitals (d2l's
    letters-only, lower-cased tokens) gets the prefix lower-cased; a chars or bytes vocabulary gets it as typed."""
    if isinstance(num_chars, bool) or not isinstance(num_chars, int) or num_chars < 0:
        raise UserError(f"num_chars must be an integer >= 0, got {num_chars!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 <= temperature < math.inf:
        raise UserError(f"temperature must be a finite number >= 0, got {temperature!r}")  # nan would act as greedy
    if not any(t.isupper() for t in model.vocab.idx_to_token):
        prefix = prefix.lower()
    unknown = sorted({c for c in prefix if c not in model.vocab.token_to_idx})
    if not prefix or len(unknown) == len(set(prefix)):
        raise UserError(
            f"prefix {prefix!r} has no character of the vocabulary {''.join(model.vocab.idx_to_token[1:])!r}:"
            " give a prefix with letters"
        )
    if unknown:
        log.warning("characters %s are not in the vocabulary and map to <unk>", "".join(unknown))
    return model.predict(prefix, num_chars, temperature, generator=torch.Generator().manual_seed(seed))


@hydra.main(version_base="1.3", config_path="../../conf", config_name="generate")
def main(cfg: DictConfig) -> None:
    """Entry point: print the continuation; a user error is one line and exit status 2."""
    try:
        check_generate_config(cfg)
        text = generate(load(cfg.ckpt_path, cfg.device), str(cfg.prefix), cfg.num_chars, cfg.temperature, cfg.seed)
    except UserError as e:
        log.error("%s", e)
        sys.exit(2)
    print(text)


if __name__ == "__main__":
    check_overrides(sys.argv[1:], Path(__file__).resolve().parents[2] / "conf", "generate")
    main()

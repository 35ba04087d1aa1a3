"""Continue a prefix with a trained checkpoint: python -m gruexp.generate ckpt_path=<file.ckpt> prefix="..."."""

from __future__ import annotations

import logging
import pickle
import sys
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

from gruexp import UserError
from gruexp.module import CharLM

log = logging.getLogger("gruexp.generate")


def load(ckpt_path: str | Path, device: str = "cpu") -> CharLM:
    """Load a CharLM checkpoint of any variant; a missing or foreign file is a UserError."""
    p = Path(ckpt_path)
    if not p.is_file():
        raise UserError(f"checkpoint {p} does not exist: pass ckpt_path=<run>/checkpoints/last.ckpt")
    try:
        model = CharLM.load_from_checkpoint(p, map_location=device)
    except RuntimeError as e:
        if "size mismatch" in str(e):
            raise UserError(_mismatch(p)) from e
        raise UserError(f"{p} is not a gruexp checkpoint ({type(e).__name__}: {str(e).splitlines()[0]})") from e
    except (KeyError, TypeError, EOFError, ValueError, pickle.UnpicklingError) as e:
        raise UserError(f"{p} is not a gruexp checkpoint ({type(e).__name__}: {str(e).splitlines()[0]})") from e
    return model.eval()


def _mismatch(p: Path) -> str:
    """Name the first weight whose shape disagrees with the vocabulary / hidden size the checkpoint declares."""
    ckpt = torch.load(p, map_location="cpu", weights_only=False)
    hp = ckpt["hyper_parameters"]
    expected = CharLM(**hp).state_dict()
    V, H = len(hp["vocab"]), hp["hidden_size"]
    for k, w in ckpt["state_dict"].items():
        if k in expected and expected[k].shape != w.shape:
            dims = set(w.shape)
            which = "vocabulary" if V not in dims else "hidden size" if H not in dims else "shape"
            return (
                f"{p}: its weights do not fit its {which} (vocabulary of {V} tokens, hidden size {H}): {k} is "
                f"{list(w.shape)}, expected {list(expected[k].shape)}; the file mixes two runs, use the run's own "
                "checkpoints/last.ckpt"
            )
    return f"{p}: its weights do not fit its hyper-parameters; use the run's own checkpoints/last.ckpt"


def generate(model: CharLM, prefix: str, num_chars: int = 50, temperature: float = 0.0, seed: int = 0) -> str:
    """The prefix and its continuation; the prefix is lower-cased like the corpus, unknown characters -> <unk>."""
    if num_chars < 0:
        raise UserError(f"num_chars must be >= 0, got {num_chars}")
    if temperature < 0:
        raise UserError(f"temperature must be >= 0, got {temperature}")
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
    try:
        text = generate(load(cfg.ckpt_path, cfg.device), str(cfg.prefix), cfg.num_chars, cfg.temperature, cfg.seed)
    except UserError as e:
        log.error("%s", e)
        sys.exit(2)
    print(text)


if __name__ == "__main__":
    main()

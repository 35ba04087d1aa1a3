"""The user-facing error type, and how any error becomes the one line a user reads (or stays a bug's traceback).

- UserError: a mistake in the user's input (`from gruexp import UserError`), printed as one line naming the fix.
- user_error: the user's mistake inside an exception chain (Hydra wraps what a _target_ raises), or None for a bug.
- no_space: a full disk or quota as one line naming the file; first_line: an error as summary.json's `error`.

Only the standard library at import: `import gruexp` stays free of torch and Lightning.
"""

from __future__ import annotations

import errno
import os
import re
import traceback

NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


class UserError(ValueError):
    """A mistake in the user's input: printed as one line that names the fix, never as a traceback."""


UserError.__module__ = "gruexp"  # its public name, the one tracebacks and `gpu_check.sh` print


def user_error(exc: BaseException) -> UserError | None:
    """The user's mistake inside `exc` (Hydra wraps whatever a _target_ raises), or None for a real bug.

    A full disk is the user's to fix too: one line naming the folder, not the chain of tracebacks it causes.
    """
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    e: BaseException | None = exc
    while e is not None:
        if isinstance(e, UserError):
            return e
        if isinstance(e, MisconfigurationException):
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            about_devices = re.search(r"accelerator|device|gpu|cuda|mps|tpu|hpu|strategy", first, re.IGNORECASE)
            return UserError(
                f"trainer: {first}" + (" (check trainer.accelerator and trainer.devices)" if about_devices else "")
            )
        if no_space(e):
            return UserError(no_space(e))
        called = _library_refused(e)
        if called is not None:
            return called
        if isinstance(e, OSError) and e.filename and e.errno in (errno.EACCES, errno.EPERM):
            return UserError(f"cannot open {e.filename} ({e.strerror}): fix its permissions or give another file")
        e = e.__cause__  # Hydra raises InstantiationException(...) from the error
    return None


def first_line(e: BaseException) -> str:
    """An error as summary.json's one-line `error`: the user's mistake inside it if any, else its own first line."""
    user = user_error(e)
    text = str(user or e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _library_refused(e: BaseException) -> UserError | None:
    """Hydra's `Error in call to target ...` when the target (Lightning, torch) refused a config value with a
    ValueError or TypeError of its own: one line naming the config node. Raised inside gruexp it stays a bug."""
    from hydra.errors import InstantiationException

    cause = e.__cause__
    if not isinstance(e, InstantiationException) or not isinstance(cause, (ValueError, TypeError)):
        return None
    frames = traceback.extract_tb(cause.__traceback__)
    if frames and f"{os.sep}gruexp{os.sep}" in frames[-1].filename:
        return None
    key = re.search(r"^full_key: (\S+)$", str(e), re.MULTILINE)
    node = key[1] if key else "the config"
    first = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
    return UserError(f"{node}: {first} (check the {node}.* values given)")


def no_space(e: BaseException) -> str | None:
    """'no space left on device writing <file>: ...' when `e` is (or was caused by) a full disk or quota, else None."""
    full = find_no_space(e)
    if full is None:
        return None
    where = f" writing {full.filename}" if full.filename else ""
    return f"no space left on device{where}: free space there or set hydra.run.dir to another disk"


def find_no_space(e: BaseException | None) -> OSError | None:
    """The full-disk OSError in `e`'s chain of causes and contexts, or None."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in NO_SPACE:
            return e
        e = e.__cause__ or e.__context__  # torch.save's RuntimeError carries the OSError as its context
    return None

"""A study's storage and pruner, as the sweeper and its jobs both open them (hparams_search=optuna).

Apart from gruexp.search, which holds the job's Lightning callback: Hydra imports every sweeper plugin to list them
(`--help` included), so what the sweeper needs must not import torch or Lightning.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import optuna

from gruexp import UserError

TRIAL_ENV = "GRUEXP_OPTUNA_TRIAL"
PRUNERS = ("median", "hyperband", "none")


def open_storage(spec: str) -> optuna.storages.BaseStorage | str:
    """An Optuna storage from a URL (sqlite:///..., postgresql://..., passed to Optuna as is) or a journal file path.

    A journal file (JournalFileBackend) needs no database server and locks the file for every write, so parallel
    jobs and sweepers on one filesystem can share it.
    """
    if "://" in spec:
        return spec
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    return JournalStorage(JournalFileBackend(os.path.abspath(spec)))


def check_storage(spec: str, key: str = "hydra.sweeper.storage") -> None:
    """Refuse in one line (UserError) a storage Optuna would fail on once the search has begun to write.

    A URL: its scheme must be a database SQLAlchemy knows, its driver installed, a sqlite file's folder there. A
    journal path: its folder must exist, and the journal itself must be whole (check_journal).
    """
    if "://" not in spec:
        path = Path(spec).expanduser()
        if not path.parent.is_dir():
            raise UserError(f"{key}={spec}: the folder {path.parent} does not exist: create it or give another path")
        check_journal(path)
        return
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    try:
        url = make_url(spec)
        dialect = url.get_dialect()
    except (ArgumentError, NoSuchModuleError, ValueError):
        raise UserError(
            f"{key}={spec} is not a storage Optuna can open: give a journal file path, sqlite:///<file>.db, "
            "postgresql://... or mysql://..."
        ) from None
    try:
        dialect.import_dbapi()
    except ImportError as e:
        why = f"needs the database driver {e.name or e}: pip install it, or use sqlite"
        raise UserError(f"{key}={spec} {why}") from None
    if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
        folder = Path(url.database).expanduser().parent
        if not folder.is_dir():
            raise UserError(f"{key}={spec}: the folder {folder} does not exist: create it or give another path")


def check_journal(path: Path) -> None:
    """Refuse a journal Optuna cannot read to its end: a record cut off by a crash mid-write or a full disk.

    Optuna's reader skips a partial last line, but its next write lands on that line and makes the whole journal
    unreadable for good; so nothing is written into it, and the line says how to keep its whole records. Read
    under the journal's own lock: a sharing sweeper's half-written record is not damage.
    """
    if not path.is_file():
        return
    from optuna.storages.journal import JournalFileSymlinkLock

    lock = JournalFileSymlinkLock(os.path.abspath(path))  # the lock JournalFileBackend takes to write
    locked = lock.acquire()
    try:
        data = path.read_bytes()
    finally:
        if locked:
            lock.release()
    offset = records = 0
    for line in data.splitlines(keepends=True):
        try:
            whole = line.endswith(b"\n") and isinstance(json.loads(line), dict)
        except ValueError:
            whole = False
        if not whole:
            where = "its last record is cut off" if offset + len(line) == len(data) else f"record {records + 1} is"
            raise UserError(
                f"{path} is damaged ({where} not whole at byte {offset} of {len(data)}: a crash mid-write or a full"
                f" disk): nothing was written into it; keep its {records} whole records with `truncate -s {offset}"
                f" {path}` (Optuna reads the trials they hold) and run again, or give another hydra.sweeper.storage"
            )
        offset, records = offset + len(line), records + 1


def make_pruner(spec: Any) -> optuna.pruners.BasePruner:
    """`median`, `hyperband`, `none` (Optuna's defaults), or a mapping with `_target_` and its arguments."""
    if isinstance(spec, dict) or hasattr(spec, "items"):
        from hydra.errors import InstantiationException
        from hydra.utils import instantiate

        try:
            pruner = instantiate(dict(spec))
        except InstantiationException as e:
            raise UserError(
                f"hydra.sweeper.pruner={dict(spec)} does not build a pruner ({str(e).strip().splitlines()[0]}): "
                "give {_target_: optuna.pruners.<Name>, ...} with that pruner's arguments"
            ) from None
        if not isinstance(pruner, optuna.pruners.BasePruner):
            raise UserError(f"hydra.sweeper.pruner._target_={spec.get('_target_')} is not an Optuna pruner")
        return pruner
    name = "none" if spec is None else str(spec).lower()
    if name == "median":
        return optuna.pruners.MedianPruner()
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner()
    if name == "none":
        return optuna.pruners.NopPruner()
    raise UserError(
        f"hydra.sweeper.pruner={spec} is not a pruner: use one of {', '.join(PRUNERS)} "
        "or {_target_: optuna.pruners.<Name>, ...}"
    )

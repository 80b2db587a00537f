"""Where Optuna studies live and how workers share one: an SQLite file, a journal file (several
workers on one machine) or PostgreSQL (workers on several machines), and the lock under which a
worker claims a trial."""

from __future__ import annotations

import hashlib
from contextlib import contextmanager
from pathlib import Path

from seqlab import files, schema


def storage_url(storage="", workers=1):
    """The study's storage: given, else an SQLite file under outputs/ for one worker and a journal
    file for several on this machine."""
    if storage:
        return files.with_secret("tune_storage", storage)  # the password kept out of the notebook
    if workers > 1:
        return str(files.outputs() / "optuna.journal")
    return f"sqlite:///{(files.outputs() / 'optuna.db').resolve()}"


def _is_url(storage):
    return "://" in storage


def _driver_url(storage):
    """SQLAlchemy 2.1 reads a bare postgresql:// as psycopg 3; the pinned driver is psycopg2."""
    return storage.replace("postgresql://", "postgresql+psycopg2://", 1)


def _engine_kwargs(storage):
    """A PostgreSQL server that does not answer fails in seconds, not after the OS's TCP timeout."""
    return {"connect_args": {"connect_timeout": 5}} if storage.startswith("postgresql") else {}


@contextmanager
def study_lock(storage, study_name):
    """One worker at a time claims a trial: a PostgreSQL advisory lock for a database that workers
    on several machines share, else a file lock beside the SQLite or journal file."""
    if storage.startswith("postgresql"):
        import sqlalchemy

        key = int(
            hashlib.sha1(study_name.encode()).hexdigest()[:15], 16
        )  # fits PostgreSQL's bigint
        engine = sqlalchemy.create_engine(
            _driver_url(storage), poolclass=sqlalchemy.pool.NullPool, **_engine_kwargs(storage)
        )
        with engine.connect() as conn:
            conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": key})
            try:
                yield
            finally:
                conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
        return
    if _is_url(storage) and not storage.startswith("sqlite:///"):
        raise files.SetupError(
            f"tune coordinates workers through PostgreSQL, SQLite or a journal file, not "
            f"{files.masked(storage)}"
        )
    from filelock import FileLock

    with FileLock(f"{storage.removeprefix('sqlite:///')}.{study_name}.lock"):
        yield


def open_storage(storage):
    """Optuna's storage for `storage`: an SQLAlchemy URL (RDBStorage), else a journal file
    (JournalStorage on a JournalFileBackend). A database that does not answer fails here."""
    import optuna
    from sqlalchemy.exc import SQLAlchemyError

    if not _is_url(storage):
        Path(storage).parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(storage))
    if storage.startswith("sqlite:///"):
        files.check_outputs(Path(storage.removeprefix("sqlite:///")).parent)
    try:
        with study_lock(storage, "(tables)"):  # first workers on a new database race creating them
            return optuna.storages.RDBStorage(
                _driver_url(storage), engine_kwargs=_engine_kwargs(storage)
            )
    except (SQLAlchemyError, ImportError, ValueError) as e:
        raise files.SetupError(
            f"the study storage {files.masked(storage)} cannot be used: "
            f"{files.masked(str(e).splitlines()[0])}"
        ) from None


def check_study(name, storage=""):
    """A report's tune_study must be in its storage (the Tuning section reads it)."""
    if not name:
        return
    import optuna

    names = optuna.study.get_all_study_names(open_storage(storage_url(storage)))
    if name not in names:
        raise schema.ParamError(
            f"parameter tune_study = {name!r}: no such study in "
            f"{files.masked(storage_url(storage))}; the studies there are {names}"
        )

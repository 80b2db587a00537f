"""Tracking: every call to MLflow lives here (Tracker), so another backend is this one file; the
identity of a run (its parameters, data and code: run_key)."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import socket
import sqlite3
import subprocess
import tempfile
import time
from functools import partial
from pathlib import Path

import pytorch_lightning as pl
import yaml

from seqlstm import ImageData
from seqlab import files, plan

STATUS, KEY, LAST_EPOCH = "seqlstm.status", "seqlstm.key", "seqlstm.last_epoch"  # tags
PID, HOST = "seqlstm.pid", "seqlstm.host"  # the process that runs it: a dead one left it RUNNING
DEFAULT_PORTS = {"http": 80, "https": 443, "postgresql": 5432, "mysql": 3306, "mssql": 1433}


def tracking_uri():
    """$MLFLOW_TRACKING_URI, else an SQLite store under outputs/ (MLflow's file store is
    deprecated)."""
    return (
        os.environ.get("MLFLOW_TRACKING_URI")
        or f"sqlite:///{(files.outputs() / 'mlflow.db').resolve()}"
    )


SCHEMES = ("http", "https", "sqlite", "postgresql", "mysql", "mssql", "file", "databricks")


def _check_scheme(uri: str, scheme: str):
    """A tracking URI MLflow can use, with its database driver installed: one line otherwise."""
    if scheme.split("+")[0] not in SCHEMES:
        raise files.SetupError(
            f"MLFLOW_TRACKING_URI {files.masked(uri)}: scheme {scheme!r} is not one MLflow "
            f"tracks to: use http(s)://HOST:PORT (an MLflow server), "
            f"postgresql+psycopg2://USER@HOST/DB, sqlite:///PATH, or unset it"
        )
    if scheme.split("+")[0] in ("postgresql", "mysql", "mssql"):
        import sqlalchemy

        try:
            sqlalchemy.engine.make_url(uri).get_dialect().import_dbapi()
        except ImportError as e:
            raise files.SetupError(
                f"MLFLOW_TRACKING_URI {files.masked(uri)}: its database driver is not installed "
                f"({e}): write postgresql+psycopg2:// (psycopg2-binary is in requirements.txt)"
            ) from None


def check_tracking(uri=None, timeout=5.0):
    """A tracking URI that MLflow cannot use (a scheme it does not know, a database driver that
    is not installed) is one line; a server that does not answer is found in `timeout` seconds,
    not after MLflow's retries (minutes); a local SQLite store needs a writable folder."""
    from urllib.parse import urlparse

    uri = uri or tracking_uri()
    url = urlparse(uri)
    _check_scheme(uri, url.scheme)
    if url.scheme == "sqlite":
        return files.check_outputs(Path(url.path).parent) if url.path not in ("", "/") else None
    port = url.port or DEFAULT_PORTS.get(url.scheme.split("+")[0])
    if not url.hostname or not port:
        return None
    print(
        f"MLflow tracking: connecting to {url.hostname}:{port} ({files.masked(uri)}, "
        f"{timeout:.0f} s "
        "timeout) ...",
        flush=True,
    )
    try:
        socket.create_connection((url.hostname, port), timeout=timeout).close()
    except OSError as e:
        raise files.SetupError(
            f"MLflow tracking server {files.masked(uri)} does not answer ({e}): start it, or "
            f"unset MLFLOW_TRACKING_URI to track in outputs/mlflow.db"
        ) from None


def _sqlite_file(uri):
    """The database file of an `sqlite:///PATH` tracking URI, else None."""
    path = uri.removeprefix("sqlite:///").split("?")[0] if uri.startswith("sqlite:///") else ""
    return Path(path) if path else None


def _half_made(db: Path) -> bool:
    """A database whose creation was cut short (a SIGKILL during MLflow's migrations): not an
    SQLite file, or holding no run and not at MLflow's schema. One with runs is MLflow's to judge
    (an older MLflow's database asks for `mlflow db upgrade`)."""
    from mlflow.store.db.utils import _get_latest_schema_revision

    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:
            listed = con.execute("select name from sqlite_master where type='table'")
            tables = {r[0] for r in listed}
            if "runs" in tables and con.execute("select count(*) from runs").fetchone()[0]:
                return False
            version = (
                con.execute("select version_num from alembic_version").fetchone()
                if "alembic_version" in tables
                else None
            )
    except sqlite3.DatabaseError:
        return True
    return version is None or version[0] != _get_latest_schema_revision()


def _relocate(db: Path):
    """Artifacts follow a moved outputs folder: experiments whose artifacts were in the
    `mlartifacts` folder beside the database where it was before (and their runs) point to the
    one beside it now, so that finished runs are reused, not retrained."""
    root = (db.parent / "mlartifacts").resolve().as_uri()
    with sqlite3.connect(db) as con:
        moved = con.execute(
            "select experiment_id, artifact_location from experiments where artifact_location "
            "like 'file://%/mlartifacts' and artifact_location != ?",
            (root,),
        ).fetchall()
        for experiment_id, old in moved:
            con.execute(
                "update runs set artifact_uri = ? || substr(artifact_uri, ?) where "
                "experiment_id = ? and substr(artifact_uri, 1, ?) = ?",
                (root, len(old) + 1, experiment_id, len(old), old),
            )
            con.execute(
                "update experiments set artifact_location = ? where experiment_id = ?",
                (root, experiment_id),
            )
    if moved:
        print(
            f"note: the outputs folder moved: its MLflow artifacts are read from {root}",
            flush=True,
        )


def ensure_store(uri: str):
    """An SQLite store is created whole: MLflow's migrations run on `mlflow.db.tmp-PID` beside it,
    which is then renamed, so a process killed meanwhile leaves no half-made database on which
    every later start fails (`duplicate column name`). One found half-made is set aside as
    NAME.broken-TIME and made again. The caller holds the `mlflow` lock."""
    db = _sqlite_file(uri)
    if db is None:
        return
    for stale in db.parent.glob(f"{db.name}.tmp-*"):  # left by a creation that was killed
        stale.unlink(missing_ok=True)
    if db.exists() and not _half_made(db):
        return _relocate(db)
    if db.exists():
        broken = db.with_name(f"{db.name}.broken-{int(time.time())}")
        os.replace(db, broken)
        print(
            f"note: {db} was half made (its creation was cut short): set aside as "
            f"{broken.name}; making it again",
            flush=True,
        )
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    db.parent.mkdir(parents=True, exist_ok=True)
    tmp = db.with_name(f"{db.name}.tmp-{os.getpid()}")
    store = SqlAlchemyStore(f"sqlite:///{tmp}", (db.parent / "mlartifacts").resolve().as_uri())
    store.engine.dispose()
    os.replace(tmp, db)


def _quiet_mlflow():
    """MLflow (re)configures its loggers when imported: keep their start-up notes (database
    creation, alembic migrations) out of reports."""
    os.environ.setdefault(
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false"
    )  # no tqdm bars in reports
    import mlflow  # noqa: F401

    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)


# ---- the identity of a run


def _code_files() -> dict:
    package = Path(__file__).resolve().parent
    return {
        "seqlstm_py": files.ROOT / "seqlstm.py",
        "report_ipynb": files.NOTEBOOK,
        **{f"seqlab_{p.stem}": p for p in sorted(package.glob("*.py"))},
    }


@functools.lru_cache(maxsize=None)
def code_version() -> dict:
    """The code that runs: sha256 of seqlstm.py, report.ipynb and the package's files together
    (sha256_seqlab); the git commit and whether the work tree differs from it, in a repository."""
    found = {k: p.read_bytes() for k, p in _code_files().items() if p.exists()}
    version = {
        f"sha256_{k}": hashlib.sha256(v).hexdigest()
        for k, v in found.items()
        if not k.startswith("seqlab_")
    }
    version["sha256_seqlab"] = hashlib.sha256(
        b"".join(
            k.encode() + hashlib.sha256(v).digest()
            for k, v in found.items()
            if k.startswith("seqlab_")
        )
    ).hexdigest()
    git = partial(subprocess.run, cwd=files.ROOT, capture_output=True, text=True, timeout=10)
    try:
        commit = git(["git", "rev-parse", "HEAD"])
        if commit.returncode == 0:
            dirty = git(["git", "status", "--porcelain", "--untracked-files=no"]).stdout.strip()
            version.update(git_commit=commit.stdout.strip(), git_dirty=bool(dirty))
    except (OSError, subprocess.SubprocessError):
        pass
    return version


def code_tags() -> dict:
    """code_version() as tags: seqlstm.code.*"""
    return {f"seqlstm.code.{k}": str(v) for k, v in code_version().items()}


def data_fingerprint(data: ImageData) -> str:
    """sha256 of a loaded dataset's images, labels and split; computed once per load."""
    if not getattr(data, "_fingerprint", None):
        h = hashlib.sha256(data.source.encode())
        for t in (data.train_x, data.train_y, data.val_x, data.val_y, data.test_x, data.test_y):
            h.update(t.contiguous().numpy())
        data._fingerprint = h.hexdigest()
    return data._fingerprint


def run_key(p: dict, data: ImageData) -> str:
    """Identity of a run: its parameters, its data and the code's file hashes. A finished run
    with the same key is reused; a killed one is resumed."""
    ident = plan.run_identity(p)
    ident.update(
        data=data_fingerprint(data), code={k: v for k, v in code_version().items() if "sha256" in k}
    )
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:32]


# ---- the tracking server


def _param(key, value):
    from mlflow.entities import Param

    return Param(key, str(value)[:6000])


class Tracker:
    """One experiment of the tracking server (MLflow), and every call made to it: runs found by
    tag, opened, logged to, finished. Created under an inter-process lock: two reports started
    together otherwise race creating MLflow's tables."""

    def __init__(self, experiment: str):
        _quiet_mlflow()
        from mlflow.tracking import MlflowClient

        with files.lock("mlflow"):
            ensure_store(tracking_uri())
            self.client = MlflowClient(tracking_uri())
            found = self.client.get_experiment_by_name(experiment)
            self.experiment_id = (
                found.experiment_id
                if found is not None
                else self.client.create_experiment(
                    experiment,
                    artifact_location=(files.outputs() / "mlartifacts").resolve().as_uri(),
                )
            )
        self.experiment = experiment

    def mlflow(self):
        """(MlflowClient, experiment id): to read back what runs logged (tests, notebooks)."""
        return self.client, self.experiment_id

    def _search(self, query, max_results=1000):
        return self.client.search_runs(
            [self.experiment_id],
            query,
            max_results=max_results,
            order_by=["attributes.start_time DESC"],
        )

    def finished(self, tag: str, value: str):
        """The id of the newest run tagged `tag` = `value` that finished with results, or None."""
        found = self._search(f"tags.`{tag}` = '{value}' and tags.`{STATUS}` = 'ok'", 1)
        return found[0].info.run_id if found else None

    def open(self, key: str, title: str, resume: bool, tags=None):
        """(run id, checkpoint to resume from or None). The caller holds the key's lock, so a run of
        this key still RUNNING died without a word (SIGKILL, a lost kernel): it is marked KILLED.
        With `resume`, the newest killed run that left a last checkpoint continues. `tags` go with
        a new run (a tuning trial's parent run and trial number)."""
        previous = self._search(f"tags.`{KEY}` = '{key}'")
        for r in previous:
            if r.info.status == "RUNNING":
                self.client.set_terminated(r.info.run_id, "KILLED")
        for r in previous if resume else []:
            last = files.checkpoint_dir(r.info.run_id) / "last.ckpt"
            whose = f"MLflow run {r.info.run_id}"
            if (
                r.info.status in ("RUNNING", "KILLED")
                and last.exists()
                and files.readable_checkpoint(last, whose)  # else set aside: a fresh run
            ):
                self.client.update_run(r.info.run_id, status="RUNNING")
                self.tag(r.info.run_id, owner())
                done = r.data.tags.get(LAST_EPOCH, "?")
                print(
                    f"resuming MLflow run {r.info.run_id} after epoch {done} from its last "
                    f"checkpoint",
                    flush=True,
                )
                return r.info.run_id, last
        return self.create(title, {KEY: key, **(tags or {})}), None

    def create(self, name: str, tags=None) -> str:
        """A new run, tagged with the code version; its id."""
        run = self.client.create_run(
            self.experiment_id, run_name=name, tags={**code_tags(), **owner(), **(tags or {})}
        )
        return run.info.run_id

    def end_dead_runs(self):
        """Runs left RUNNING by a process of this host that no longer exists (SIGKILL, a lost
        kernel, a full disk) are marked KILLED, so that no run says it is running when none is."""
        import psutil

        for r in self._search("attributes.status = 'RUNNING'"):
            tags = r.data.tags
            if tags.get(HOST) != socket.gethostname() or not tags.get(PID, "").isdigit():
                continue
            if not psutil.pid_exists(int(tags[PID])):
                self.client.set_terminated(r.info.run_id, "KILLED")
                print(
                    f"note: MLflow run {r.info.run_id} ({r.info.run_name}) was left RUNNING by "
                    f"process {tags[PID]}, which no longer exists: marked KILLED",
                    flush=True,
                )

    def reopen(self, run_id: str):
        self.client.update_run(run_id, status="RUNNING")
        self.tag(run_id, owner())

    def tag(self, run_id: str, tags: dict):
        for name, value in tags.items():
            self.client.set_tag(run_id, name, files.masked(str(value)))

    def log_params(self, run_id: str, params: dict):
        params = files.masked(params)
        self.client.log_batch(run_id, params=[_param(k, v) for k, v in params.items()])

    def log_metrics(self, run_id: str, metrics: dict, step=0):
        for name, value in metrics.items():
            self.client.log_metric(run_id, name, value, step=step)

    def log_file(self, run_id: str, path):
        self.client.log_artifact(run_id, str(path))

    def download(self, run_id: str, artifact: str, folder) -> Path:
        return Path(self.client.download_artifacts(run_id, artifact, str(folder)))

    def end(self, run_id: str, status="FINISHED"):
        """FINISHED, FAILED or KILLED."""
        self.client.set_terminated(run_id, status)

    def logged_steps(self, run_id: str) -> dict:
        """{metric: the steps at which the run logged it}."""
        history = partial(self.client.get_metric_history, run_id)
        return {k: {m.step for m in history(k)} for k in self.client.get_run(run_id).data.metrics}

    def lightning_logger(self, run_id: str, with_metrics=True):
        """Lightning's logger for the run; it leaves the run's status to the runner, and the
        metrics to epoch_marks unless `with_metrics`."""
        from pytorch_lightning.loggers import MLFlowLogger

        class RunLogger(MLFlowLogger):
            def finalize(self, status="success"):
                pass

            def log_metrics(self, metrics, step=None):
                if with_metrics:
                    super().log_metrics(metrics, step)

            @property
            def experiment(self):  # mlflow.set_tracking_uri there sets $MLFLOW_TRACKING_URI:
                before = os.environ.get("MLFLOW_TRACKING_URI")  # keep it out of later processes
                try:
                    return super().experiment
                finally:
                    if before is None:
                        os.environ.pop("MLFLOW_TRACKING_URI", None)
                    else:
                        os.environ["MLFLOW_TRACKING_URI"] = before

        return RunLogger(
            experiment_name=self.experiment, run_id=run_id, tracking_uri=tracking_uri()
        )

    def epoch_marks(self, run_id: str, resumed=False) -> list:
        """Callbacks logging each epoch's metrics, then its number as a tag (so a run killed
        without warning says how far it got), before its checkpoint is written (Lightning runs
        checkpoints last). A resumed run skips what it logged before its kill: each epoch is
        logged once, whether the kill fell before or after the epoch's checkpoint."""
        return [MarkEpoch(self, run_id, self.logged_steps(run_id) if resumed else {})]

    def log_result(self, run_id: str, result: dict, params: dict, figures: dict):
        """A finished run: its result (result.json, read back by `read_result`), its params
        (params.yaml), its classification report, figures (name.png -> figure), status ok."""
        result, params = files.masked(result), files.masked(params)
        self.client.log_dict(run_id, result["report"], "classification_report.json")
        self.client.log_text(run_id, yaml.safe_dump(params, sort_keys=False), "params.yaml")
        self.client.log_dict(run_id, result, "result.json")
        for name, fig in figures.items():  # one that cannot be drawn costs that figure alone
            if fig is not None:
                attempt(f"figure {name}", self.client.log_figure, run_id, fig, name)
        self.tag(run_id, {STATUS: "ok"})
        self.end(run_id)

    def read_result(self, run_id: str) -> dict:
        with tempfile.TemporaryDirectory() as tmp:
            return json.loads(self.download(run_id, "result.json", tmp).read_text())

    def fail(self, run_id: str, message: str, traceback: str):
        """FAILED first, then the reason as a tag and the traceback as failure.txt, each on its own:
        a full disk or a lost server costs what it cannot write, never the status."""
        for what, write in (
            ("status FAILED", partial(self.end, run_id, "FAILED")),
            ("reason", partial(self.tag, run_id, {"seqlstm.failure": message[:5000]})),
            ("status tag", partial(self.tag, run_id, {STATUS: "failed"})),
            ("failure.txt", partial(self.client.log_text, run_id, traceback, "failure.txt")),
        ):
            attempt(f"MLflow run {run_id}: its {what}", write)


def owner() -> dict:
    """Tags naming the process that runs a run: its pid and host."""
    return {PID: str(os.getpid()), HOST: socket.gethostname()}


def attempt(what: str, write, *args):
    """`write(*args)`; if it fails (a full disk, a lost server), a note names what was not
    written and the caller goes on."""
    try:
        return write(*args)
    except Exception as e:  # noqa: BLE001 (what cannot be written is said, not raised)
        print(f"note: {what} could not be written ({type(e).__name__}: {e})", flush=True)


class MarkEpoch(pl.Callback):
    def __init__(self, tracker: Tracker, run_id: str, logged: dict):
        self.tracker, self.run_id, self.logged = tracker, run_id, logged

    def on_train_epoch_end(self, trainer, module):
        epoch, step = trainer.current_epoch + 1, trainer.global_step - 1  # Lightning's steps
        record = module.history[-1] if module.history else {}
        if record.get("epoch") == epoch:
            fresh = {k: v for k, v in record.items() if step not in self.logged.get(k, ())}
            self.tracker.log_metrics(self.run_id, fresh, step)
        self.tracker.tag(self.run_id, {LAST_EPOCH: epoch})

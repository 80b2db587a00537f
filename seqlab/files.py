"""Where a report's files live and how processes share them: the outputs folder, its checkpoints,
inter-process locks, and whole-file writes (a temporary name, then a rename)."""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # the repository: seqlstm.py, report.ipynb, params/
NOTEBOOK = ROOT / "report.ipynb"


class SetupError(RuntimeError):
    """The outputs folder or the tracking server cannot be used."""


def outputs() -> Path:
    """$SEQLSTM_OUTPUTS, else outputs/ of the repository; read at every call, so a test or a
    report's kernel can point it elsewhere."""
    return Path(os.environ.get("SEQLSTM_OUTPUTS") or ROOT / "outputs")


def checkpoint_dir(run_id: str) -> Path:
    return outputs() / "checkpoints" / run_id


def set_aside(path: Path, said: str, then: str):
    """Rename a broken file to NAME.broken (kept for a look, out of the way) and say so: `said`
    names it and what is wrong, `then` what happens instead."""
    broken = path.with_name(path.name + ".broken")
    os.replace(path, broken)
    print(f"note: {said}: set aside as {broken.name}; {then}", flush=True)


def readable_checkpoint(path: Path, whose: str) -> bool:
    """Whether a checkpoint loads (as tensors: weights_only); one that does not (truncated by a
    kill, a full disk) is named, set aside as NAME.broken and its run starts afresh."""
    import torch

    try:
        torch.load(path, map_location="cpu", weights_only=True)
        return True
    except Exception as e:  # noqa: BLE001 (any unreadable file: the run starts afresh)
        why = f"cannot be read ({type(e).__name__}: {str(e)[:200]})"
        set_aside(path, f"the last checkpoint {path} of {whose} {why}", "the run starts afresh")
        return False


def lock(name, folder=None):
    """An inter-process lock under `folder`, else outputs/.locks (released by the OS if its holder
    dies). A lock guarding a shared cache lives beside it, so every outputs/ that shares the cache
    shares the lock."""
    from filelock import FileLock

    folder = Path(folder) if folder else outputs() / ".locks"
    folder.mkdir(parents=True, exist_ok=True)
    return FileLock(str(folder / f"{name}.lock"))


def check_outputs(path=None):
    path = Path(path or outputs())
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path):
            pass
    except OSError as e:
        raise SetupError(
            f"the outputs folder {path} is not writable ({e.strerror or e}): make it "
            f"writable or set $SEQLSTM_OUTPUTS to a folder that is"
        ) from None


def write_text(path, text: str) -> Path:
    """`text` into `path` whole: written under a temporary name beside it, then renamed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


_PASSWORD = re.compile(r"(?P<head>\b[a-zA-Z][a-zA-Z0-9+.-]*://[^:/@\s]+:)(?P<password>[^@\s]+)@")


def masked(value):
    """`value` with the password of every URL in it masked (`user:***@host`), at any depth of
    lists and mappings: what is printed, logged or written down never holds a password."""
    if isinstance(value, str):
        return _PASSWORD.sub(lambda m: f"{m['head']}***@", value)
    if isinstance(value, dict):
        return {k: masked(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(masked(v) for v in value)
    return value


def without_password(url: str) -> str:
    """The URL with its password dropped (`user@host`): the driver then reads it from its own
    store (PostgreSQL: $PGPASSWORD or ~/.pgpass)."""
    return _PASSWORD.sub(lambda m: m["head"][:-1] + "@", url)


SECRET = "SEQLSTM_SECRET_"  # + a parameter's name: its value as given, password and all


def secrets_apart(params: dict) -> tuple[dict, dict]:
    """(the parameters with every URL's password dropped, {environment variable: the value as
    given}): papermill writes the first into the notebook's injected cell, so no executed notebook
    or HTML holds a password; the kernel gets the second through its environment (with_secret)."""
    shown, env = dict(params), {}
    for name, value in params.items():
        if isinstance(value, str) and masked(value) != value:
            shown[name], env[SECRET + name.upper()] = without_password(value), value
    return shown, env


def with_secret(name: str, value: str) -> str:
    """`value` of parameter `name` with the password secrets_apart took out, if it took one."""
    given = os.environ.get(SECRET + name.upper(), "")
    return given if given and without_password(given) == value else value

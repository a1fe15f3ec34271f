"""What a failed store call means, and what the user reads then.

A store (the Optuna storage, the MLflow store, a file under mlruns/) can fail for reasons no
retry cures: the disk is full, it gave an I/O error, the database file is damaged, the folder
is read-only, another program holds the database locked. :func:`classify` finds such a cause
anywhere in an exception's chain (SQLite, PostgreSQL and OS errors, however Optuna, MLflow or
SQLAlchemy wrapped them); :func:`store_failure` turns it into the one line that names the store,
the cause and the way out. A network outage is none of these: the tracking module retries it.

Imports neither Optuna nor MLflow: the library a failure came from is read off the traceback.
"""

from __future__ import annotations

import errno
import importlib.util
import logging
import os
import sqlite3
import threading
from collections.abc import Iterator, Mapping
from contextlib import closing
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from types import TracebackType

from lstm_sweep.config import ConfigError, mask_secrets

EXIT_STORE = 74  # sysexits.h EX_IOERR: a store failed; neither bad input (2) nor a crash (1)

FULL, IO, DAMAGED, READ_ONLY, LOCKED = "full", "io", "damaged", "read-only", "locked"
# kind -> OS error numbers, PostgreSQL SQLSTATEs, phrases of SQLite's and the OS's messages
_RULES: dict[str, tuple[set[int], set[str], tuple[str, ...]]] = {
    FULL: (
        {errno.ENOSPC, errno.EDQUOT},
        {"53100"},  # disk_full
        ("database or disk is full", "no space left on device", "disk quota exceeded"),
    ),
    DAMAGED: (
        set(),
        {"XX001", "XX002"},  # data_corrupted, index_corrupted
        ("database disk image is malformed", "file is not a database", "malformed database"),
    ),
    READ_ONLY: (
        {errno.EROFS, errno.EACCES, errno.EPERM},
        {"25006"},  # read_only_sql_transaction
        ("readonly database", "read-only file system"),
    ),
    IO: ({errno.EIO}, {"58030"}, ("disk i/o error", "input/output error")),  # io_error
    LOCKED: (set(), set(), ("database is locked",)),
}
WHAT = {
    FULL: "out of space",
    IO: "an I/O error",
    DAMAGED: "the database file is damaged",
    READ_ONLY: "not writable",
    LOCKED: "locked by another program",
}
OWN = "lstm_sweep"  # a failure in a write of this package's own (see _library)
STORES = {  # library -> the store it writes, and the key that points at it
    "optuna": ("the Optuna storage", "study.storage"),
    "mlflow": ("the MLflow store", "tracking.uri"),
}


@dataclass(frozen=True)
class Fault:
    """Why a store call failed: ``kind`` (FULL, IO, DAMAGED, READ_ONLY, LOCKED), the driver's own
    words for it, the library whose call failed (optuna, mlflow, or None for this package's own
    writes) and the file at fault when the OS named one."""

    kind: str
    cause: str
    library: str | None = None
    filename: str | None = None

    def describe(self, key: str) -> str:
        """What happened and what to do, ``key`` naming the setting that points at the store."""
        return f"{WHAT[self.kind]} ({self.cause}); {self.way_out(key)}"

    def way_out(self, key: str) -> str:
        again = "then run the same command again: every finished trial is kept"
        return {
            FULL: f"free some space there, {again}",
            IO: f"check that disk (dmesg shows its errors), {again}",
            DAMAGED: f"restore the file from a backup, or point {key} at a new store",
            READ_ONLY: f"make it writable, or point {key} at a writable place",
            LOCKED: f"close the program that holds it, {again}",
        }[self.kind]


class StoreFailed(RuntimeError):
    """A store failed for a reason no retry cures; the message is the line the user reads."""

    def __init__(self, line: str, fault: Fault | None = None) -> None:
        super().__init__(line)
        self.fault = fault


def classify(exc: BaseException) -> Fault | None:
    """The store fault behind ``exc``, found anywhere in its chain of causes, or None: the
    first found (causes before contexts), in the words of the innermost error that still says
    it (the driver's or the OS's own, not a wrapper's)."""
    for error, library in _chain(exc):
        kind = _kind(error)
        while kind is not None:
            inner = error.__cause__ or getattr(error, "orig", None)
            if not isinstance(inner, BaseException) or _kind(inner) is None:
                filename = getattr(error, "filename", None)
                owner = None if library == OWN else library
                return Fault(kind, mask_secrets(first_line(error)), owner, filename)
            error, kind = inner, _kind(inner)
            library = _library(error.__traceback__) or library
    return None


def _chain(exc: BaseException) -> Iterator[tuple[BaseException, str | None]]:
    """Each exception behind ``exc``, with the library that called into the failing code:
    outermost first, and all that caused one (its cause, the DB-API error SQLAlchemy wraps)
    before what it was raised while handling (its context)."""
    seen: set[int] = set()
    todo: list[tuple[BaseException | None, str | None]] = [(exc, None)]
    while todo:
        error, library = todo.pop()
        if error is None or id(error) in seen:
            continue
        seen.add(id(error))
        library = _library(error.__traceback__) or library
        yield error, library
        orig = getattr(error, "orig", None)
        inner = orig if isinstance(orig, BaseException) else None
        todo += [(error.__context__, library), (inner, library), (error.__cause__, library)]


def _library(tb: TracebackType | None) -> str | None:
    """Whose call failed, read from the raise outwards: optuna's or mlflow's, or OWN when this
    package's code comes first (a figure or a report file it writes itself); None when the
    traceback holds none of them (the DB-API error a wrapper caught)."""
    frames = []
    while tb is not None:
        frames.append(tb.tb_frame.f_code.co_filename)
        tb = tb.tb_next
    for filename in reversed(frames):
        for name, root in _roots().items():
            if filename.startswith(root):
                return name
    return None


@cache
def _roots() -> dict[str, str]:
    """Where this package, optuna and mlflow are installed (found without importing them)."""
    roots = {OWN: os.path.join(os.path.dirname(os.path.abspath(__file__)), "")}
    for name in STORES:
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.submodule_search_locations:
            roots[name] = os.path.join(next(iter(spec.submodule_search_locations)), "")
    return roots


def _kind(error: BaseException) -> str | None:
    if isinstance(error, ConfigError | StoreFailed):
        return None  # our own words, which may quote a store's
    text = str(error).lower()
    number = getattr(error, "errno", None)
    state = getattr(error, "sqlstate", None) or getattr(error, "pgcode", None)
    for kind, (numbers, states, phrases) in _RULES.items():
        if isinstance(error, OSError) and number in numbers:
            return kind
        if state in states or any(phrase in text for phrase in phrases):
            return kind
    return None


def store_failure(exc: BaseException, urls: Mapping[str, str]) -> StoreFailed | None:
    """The one line for a store fault behind ``exc``: which store (``urls`` maps optuna and
    mlflow to their URLs, and ``files`` to the folder of the sweep's own files), what happened,
    what to do; None when ``exc`` is no store fault."""
    if isinstance(exc, StoreFailed):
        return exc
    fault = classify(exc)
    if fault is None:
        return None
    key = "tracking.uri / study.storage"
    if fault.library is not None:
        key = STORES[fault.library][1]
    if fault.filename is not None:  # the OS named the file: nothing names it better
        where = fault.filename
    elif fault.library is not None and fault.library in urls:
        where = f"{STORES[fault.library][0]} {mask_secrets(urls[fault.library])}"
    else:
        where = f"the sweep's files under {urls.get('files', os.getcwd())}"
    return StoreFailed(f"{where}: {fault.describe(key)}", fault)


def refused_at_start(exc: BaseException, source: str, key: str, url: str) -> Exception:
    """What a store's failure to open becomes: a full disk or an I/O error, a StoreFailed (the
    machine's fault: free space and run again); a damaged, read-only or locked store, a
    ConfigError naming the key (point it elsewhere, or mend it); anything else, unreachable."""
    library = "optuna" if key == "study.storage" else "mlflow"
    failure = store_failure(exc, {library: url})
    if failure is None or failure.fault is None:
        return ConfigError(source, key, url, f"unreachable: {first_line(exc)}")
    if failure.fault.kind in (FULL, IO):
        return failure
    return ConfigError(source, key, url, failure.fault.describe(key))


def first_line(exc: BaseException) -> str:
    """An exception's message as one line (its type's name when it has none)."""
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


def check_local_store(url: str, source: str, key: str) -> None:
    """Before a client opens a local SQLite store: ConfigError at once, naming the file and
    what to do, when the file is damaged or its folder is not writable. MLflow's client would
    retry a damaged file for a minute, and both clients call any of these "unreachable"."""
    if not url.startswith("sqlite:///"):
        return
    path = Path(url.removeprefix("sqlite:///"))
    fault = local_store_fault(path)
    if fault is not None:
        raise ConfigError(source, key, url, fault.describe(key))


def local_store_fault(path: Path) -> Fault | None:
    """Why the SQLite file at ``path`` cannot serve as a store, or None. The integrity check
    reads every page (milliseconds for a sweep's store; 0.08 s for 100 MB, measured)."""
    folder = path.parent if path.parent.exists() else path.parent.parent
    for place in (folder, path):
        if place.exists() and not os.access(place, os.W_OK):
            return Fault(READ_ONLY, f"{place} is not writable", filename=str(place))
    if not path.exists() or path.stat().st_size == 0:
        return None  # the client creates it
    try:
        with closing(sqlite3.connect(path, timeout=5)) as connection:
            verdict = connection.execute("PRAGMA quick_check").fetchone()[0]
    except sqlite3.DatabaseError as exc:
        fault = classify(exc)
        return Fault(fault.kind if fault else DAMAGED, str(exc), filename=str(path))
    if verdict != "ok":
        return Fault(DAMAGED, f"integrity check: {verdict}", filename=str(path))
    return None


def quiet_store_faults_in_threads() -> None:
    """A helper thread (Optuna's heartbeat) that meets a store fault ends without a traceback:
    the main thread meets the same fault on its next write and says it once."""
    threading.excepthook = _quiet_store_faults


def _quiet_store_faults(args: threading.ExceptHookArgs) -> None:
    if args.exc_value is None or classify(args.exc_value) is None:
        threading.__excepthook__(args)


class DropStoreFaults(logging.Filter):
    """Drops a library's log record of a store fault (MLflow logs each failed commit with its
    traceback before raising it): the sweep says the fault once, in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return error is None or classify(error) is None

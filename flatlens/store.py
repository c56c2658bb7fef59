"""The HDF5 analysis file: one file per analysis, one group per measure, every number with its provenance.

Schema (``SCHEMA_VERSION`` 1):

* root attributes: ``format`` = ``"flatlens-analysis"``, ``schema_version``, ``flatlens_version``,
  ``checkpoint_sha256``, ``checkpoint`` (path when written), ``config`` (resolved config, JSON),
  ``created``;
* one group per measure (``/hessian``, ``/landscape/<name>``, ``/quant/<layer>``, ...) with its
  parameters as attributes (split, n_samples, space, seed, tolerances, costs, the perturbed parameter
  names and shapes...) and its raw results as datasets.

Writing is safe against kills. Anything that changes the file's structure (creating the file, adding
or replacing a group) is done on a copy that is fsynced and renamed over the original
(:func:`write_group`), so the file on disk is always a complete, valid file. Long grid computations
(:class:`GridDatasets`) pre-allocate their datasets (NaN-filled, space allocated up front) and then
only overwrite raw data in place, flushing per block and writing a block's ``done`` flags after its
values: a kill can at worst lose the block in flight, never the file. One process (rank 0) writes.

Several processes may write one file (a sharpness job and a landscape job on the same checkpoint both
default to ``analysis.h5`` beside it): every write transaction holds an exclusive lock of the file
(:func:`write_lock`, POSIX ``flock`` on a hidden ``.NAME.lock`` beside it), so their copies and renames
cannot overlap. Without it the second writer's rename dropped the first one's group, and one writer's
clean-up of "stale" temporary copies deleted the other's copy in flight (crashes deep in h5py).
On a file system without locks (an NFS mount without lockd, some Lustre and FUSE mounts: ``flock`` and
HDF5's own lock fail with ENOLCK, ENOSYS or EOPNOTSUPP) both locks are skipped with one warning per
folder, as ``HDF5_USE_FILE_LOCKING=FALSE`` would do by hand; one writer per file at a time is then the
user's to ensure.

:func:`read` returns plain dicts of numpy arrays and attributes, which is all figure scripts need.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import numpy as np

from flatlens import __version__
from flatlens.atomic import temp_file_beside
from flatlens.errors import StoreError

FORMAT = "flatlens-analysis"
SCHEMA_VERSION = 1


def _h5py():
    import h5py

    return h5py


def attr_value(value: Any) -> Any:
    """A value h5py can store as an attribute: dicts and mixed lists become JSON strings."""
    if value is None:
        return "null"
    if isinstance(value, (bool, np.bool_)):
        return np.bool_(value)
    if isinstance(value, (int, float, str, np.integer, np.floating)):
        return value
    if isinstance(value, np.ndarray):
        return value
    if isinstance(value, (list, tuple)):
        if all(isinstance(v, str) for v in value) and value:
            return np.array(value, dtype=_h5py().string_dtype())
        if value and all(isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) for v in value):
            return np.asarray(value)
    return json.dumps(value, sort_keys=True, default=str)


def _decode(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.ndarray) and value.dtype.kind in ("O", "S"):
        return [v.decode("utf-8") if isinstance(v, bytes) else v for v in value.tolist()]
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, np.generic):
        return value.item()
    return value


def _one_line(exc: BaseException) -> str:
    """An OS/h5py error as one line (h5py's messages span several)."""
    text = exc.strerror if isinstance(exc, OSError) and exc.strerror and exc.filename else str(exc)
    return " ".join(str(text).split())


_NO_LOCKS = frozenset(e for e in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, getattr(errno, "ENOTSUP", None)) if e)
"""Errors of a lock request on a file system that has no locks (NFS without lockd, some Lustre/FUSE mounts)."""

_BUSY = frozenset((errno.EAGAIN, errno.EWOULDBLOCK))
"""Errors of a non-blocking lock request that another process's lock refused."""

_WARNED_NO_LOCKS: set[str] = set()


def _warn_no_locks(folder: Path, detail: str) -> None:
    """Say once per folder that its file system has no locks and flatlens goes on without them."""
    key = str(folder.resolve())
    if key not in _WARNED_NO_LOCKS:
        _WARNED_NO_LOCKS.add(key)
        warnings.warn(f"the file system of {folder} has no file locks ({detail}): flatlens reads and writes its "
                      "analysis files there without them, so run one writer per file at a time", stacklevel=3)


def _hdf5_lock_errno(exc: OSError) -> int | None:
    """The errno of HDF5's failed file lock (its message says ``unable to lock file, errno = 37, ...``; a message
    without the number counts as busy, as before), or None for any other error."""
    m = re.search(r"unable to lock file(?:, errno = (\d+))?", str(exc))
    if m is None:
        return None
    return int(m.group(1)) if m.group(1) else (exc.errno or errno.EAGAIN)


def h5_file(path: str | Path, mode: str) -> Any:
    """``h5py.File(path, mode)``; on a file system without locks, the same without HDF5's lock (warned once)."""
    h5py = _h5py()
    try:
        return h5py.File(path, mode)
    except OSError as exc:
        code = _hdf5_lock_errno(exc)
        if code not in _NO_LOCKS:
            raise
        _warn_no_locks(Path(path).parent, f"HDF5: {os.strerror(code)}")
    try:
        return h5py.File(path, mode, locking=False)
    except ValueError as exc:  # an HDF5 build older than 1.10.7 / 1.12.1 cannot switch its lock off per file
        raise StoreError(f"{path}: this file system has no file locks and this HDF5 build cannot open a file without "
                         f"them ({_one_line(exc)}); set HDF5_USE_FILE_LOCKING=FALSE in the environment and rerun") from None


_HELD: dict[str, list[Any]] = {}
"""Locks this process holds: lock file -> [descriptor, exclusive]. A nested request is served by the
outer holder (which releases it), upgrading a shared lock to exclusive for its duration."""

HDF5_LOCK_WAIT = 60.0
"""Seconds :func:`open_h5` waits for a file that HDF5 reports locked by another process."""


@contextmanager
def _file_lock(path: str | Path, exclusive: bool) -> Iterator[None]:
    """An advisory ``flock`` on ``.NAME.lock`` beside ``path``: exclusive for writers, shared for
    readers (see :func:`write_lock`). A reader that cannot open the lock file (a read-only folder of
    someone else's results) reads without it."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    p = Path(path)
    key = str(p.parent.resolve() / f".{p.name}.lock")
    held = _HELD.get(key)
    if held is not None:
        upgrade = exclusive and not held[1]
        if upgrade:
            fcntl.flock(held[0], fcntl.LOCK_EX)
            held[1] = True
        try:
            yield
        finally:
            if upgrade:
                fcntl.flock(held[0], fcntl.LOCK_SH)
                held[1] = False
        return
    if not exclusive and not p.is_file():  # nothing to read (an error follows): no lock file for it
        yield
        return
    fd = None
    try:
        if exclusive:
            p.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(key, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as exc:
        if exclusive:
            raise StoreError(f"cannot write {p}: {_one_line(exc)}; choose another --out") from None
        try:
            fd = os.open(key, os.O_RDONLY)  # flock works on a read-only descriptor too
        except OSError:
            fd = None
    if fd is None:
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        except OSError as exc:
            if exc.errno not in _NO_LOCKS:
                raise
            _warn_no_locks(p.parent, f"flock: {exc.strerror}")
            yield
            return
        _HELD[key] = [fd, exclusive]
        try:
            yield
        finally:
            del _HELD[key]
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def write_lock(path: str | Path):
    """Hold the exclusive write lock of analysis file ``path`` (blocks while another process holds it).

    An advisory ``flock`` on ``.NAME.lock`` in the same directory (left in place: it is empty, and the
    kernel releases the lock of a killed process). Reentrant within one process. flatlens' own readers
    take it shared (:func:`open_h5`), so they never open the file while a grid block is written in
    place. Where ``fcntl`` does not exist (Windows) there is no lock, and one writer at a time is the
    user's to ensure.
    """
    return _file_lock(path, exclusive=True)


def _locked_by_another(exc: OSError) -> bool:
    return _hdf5_lock_errno(exc) in _BUSY


@contextmanager
def open_h5(path: str | Path, mode: str = "r") -> Iterator[Any]:
    """``h5py.File(path, mode)`` of an analysis file, under its lock: shared for ``"r"``, exclusive for
    ``"r+"``.

    HDF5 locks a file while it is open, so a reader holding it (a notebook's ``h5py.File(...)``, a plot)
    made a landscape job's in-place block write fail with ``BlockingIOError: unable to lock file``, and a
    read during a write failed the same way. flatlens' readers and writers exclude each other through
    :func:`write_lock`; a file still held by another program is retried for :data:`HDF5_LOCK_WAIT`
    seconds, then a one-line StoreError says what holds it.
    """
    with _file_lock(path, exclusive=mode != "r"):
        deadline = time.monotonic() + HDF5_LOCK_WAIT
        delay = 0.05
        while True:
            try:
                f = h5_file(path, mode)
                break
            except OSError as exc:
                if not _locked_by_another(exc):
                    raise
                if time.monotonic() > deadline:
                    raise StoreError(f"{path} is held open by another program (HDF5 file lock), e.g. a notebook's "
                                     "h5py.File(...); close it, then rerun" + (" (the run resumes)" if mode != "r"
                                                                                else "")) from None
                time.sleep(delay)
                delay = min(2 * delay, 1.0)
        try:
            yield f
        finally:
            f.close()


def _remove_stale_copies(path: Path) -> None:
    """Temporary copies exist only while their writer holds the lock; under the lock, any left over
    belongs to a killed writer."""
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        stale.unlink(missing_ok=True)


def _fsync_replace(tmp: Path, path: Path) -> None:
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


@contextmanager
def _h5_replacing(path: Path, *, copy: bool) -> Iterator[Any]:
    """Context: an h5py File on a temporary file beside ``path`` (a copy of it when ``copy`` and it exists) that
    is fsynced and renamed over ``path`` on success, and removed on failure."""
    try:
        fd, tmp = temp_file_beside(path)  # with the mode of the file it replaces (not mkstemp's 0600)
    except OSError as exc:
        raise StoreError(f"cannot write {path}: {_one_line(exc)}; choose another --out") from None
    os.close(fd)
    try:
        if copy and path.exists():
            shutil.copyfile(path, tmp)
            f = h5_file(tmp, "r+")
        else:
            f = h5_file(tmp, "w")
        try:
            yield f
        finally:
            f.close()
        _fsync_replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def new_h5(path: str | Path) -> Iterator[Any]:
    """Context: an h5py File for a NEW file at ``path``, written whole or not at all (a temporary file beside
    it, fsynced and renamed over ``path``; a kill leaves the old file, or none, never a half-written one).
    For exports in other tools' layouts; analysis files go through :func:`write_group`."""
    with _h5_replacing(Path(path), copy=False) as f:
        yield f


@contextmanager
def _copy_on_write(path: Path) -> Iterator[Any]:
    """Context: yields an h5py File on a temporary copy of ``path``; on success it replaces ``path``.
    The whole transaction holds :func:`write_lock`."""
    with write_lock(path):
        _remove_stale_copies(path)
        with _h5_replacing(path, copy=True) as f:
            yield f


def check_file(path: str | Path, checkpoint_sha256: str | None = None, *, writing: bool = False) -> None:
    """Raise StoreError unless ``path`` is a flatlens analysis file (of this checkpoint, when given). The fix
    named is another ``--out`` when ``writing``, else a file written by flatlens (a reader's mistake)."""
    p = Path(path)
    fix = "choose another --out" if writing else "give an analysis .h5 file written by flatlens sharpness or landscape"
    try:
        with open_h5(p, "r") as f:
            fmt = _decode(f.attrs.get("format", ""))
            sha = _decode(f.attrs.get("checkpoint_sha256", ""))
            version = int(f.attrs.get("schema_version", 0))
    except OSError as exc:
        raise StoreError(f"{p} is not a readable HDF5 file ({_one_line(exc)}); {fix}") from None
    if fmt != FORMAT:
        raise StoreError(f"{p} is an HDF5 file but not a flatlens analysis file; {fix}")
    if version > SCHEMA_VERSION:
        raise StoreError(f"{p} has schema {version}, newer than this flatlens ({__version__}); upgrade flatlens")
    if checkpoint_sha256 and sha and sha != checkpoint_sha256:
        raise StoreError(f"{p} holds results of another checkpoint (sha256 {sha[:12]}…, this one {checkpoint_sha256[:12]}…); "
                         "write to another --out")


def checkpoint_provenance(run: Any | None) -> dict[str, Any]:
    """The root attributes that tie an analysis file to its checkpoint (``flatlens.checkpoint.Run``);
    empty identifiers when the measured model did not come from a checkpoint."""
    if run is None:
        return {"checkpoint_sha256": "", "checkpoint": "", "config": "{}"}
    return {"checkpoint_sha256": run.sha256, "checkpoint": str(Path(run.path).resolve()),
            "config": json.dumps(run.config.to_dict(), sort_keys=True), "checkpoint_step": run.step,
            "checkpoint_kind": run.kind, "quantized": run.quantized}


def default_path(checkpoint: str | Path) -> Path:
    """Where ``flatlens sharpness``/``landscape`` write without ``--out``: ``analysis.h5`` beside a run's
    ``model.pt``, ``<stem>_analysis.h5`` beside any other checkpoint (``last_analysis.h5``,
    ``step_000200_analysis.h5``). A file belongs to one checkpoint, so one name for all of them made the
    second checkpoint of a run directory (or of a trajectory) fail until given its own ``--out``."""
    p = Path(checkpoint).resolve()
    return p.parent / ("analysis.h5" if p.name == "model.pt" else f"{p.stem}_analysis.h5")


def ensure_file(path: str | Path, provenance: Mapping[str, Any]) -> Path:
    """Create the analysis file with its root attributes if missing; otherwise check it belongs to the
    same checkpoint. ``provenance``: checkpoint_sha256, checkpoint, config (dict), and anything else.
    Temporary copies left next to it by a killed writer are removed (under the write lock, so never a
    live writer's)."""
    p = Path(path)
    if p.is_dir():
        raise StoreError(f"{p} is a directory; give --out a file path such as {p / 'analysis.h5'}")
    with write_lock(p):  # two processes creating the file at once: the second finds the first's
        _remove_stale_copies(p)
        if p.exists():
            check_file(p, str(provenance.get("checkpoint_sha256", "")) or None, writing=True)
            return p
        with _copy_on_write(p) as f:
            f.attrs["format"] = FORMAT
            f.attrs["schema_version"] = SCHEMA_VERSION
            f.attrs["flatlens_version"] = __version__
            f.attrs["created"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            for key, value in provenance.items():
                f.attrs[key] = attr_value(value)
    return p


def _write_into(group, datasets: Mapping[str, Any], attrs: Mapping[str, Any]) -> None:
    h5py = _h5py()
    for key, value in attrs.items():
        group.attrs[key] = attr_value(value)
    for key, value in datasets.items():
        if isinstance(value, Mapping):
            sub = group.require_group(key)
            _write_into(sub, {k: v for k, v in value.items() if k != "attrs"}, value.get("attrs", {}))
            continue
        if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
            group.create_dataset(key, data=np.array(value, dtype=h5py.string_dtype()))
        else:
            group.create_dataset(key, data=np.asarray(value))


def write_group(path: str | Path, name: str, datasets: Mapping[str, Any], attrs: Mapping[str, Any] | None = None,
                replace: bool = True) -> None:
    """Write (or replace) group ``name`` with ``datasets`` (nested mappings become subgroups; a
    mapping's ``attrs`` key gives its attributes) and ``attrs``, atomically. Other groups are untouched."""
    p = Path(path)
    if not p.exists():
        raise StoreError(f"{p} does not exist; create it with ensure_file first")
    with _copy_on_write(p) as f:
        if name in f:
            if not replace:
                raise StoreError(f"{p} already holds /{name}; pass replace=True to overwrite it")
            del f[name]
        group = f.require_group(name)
        _write_into(group, datasets, attrs or {})


def _same_attr(stored: Any, new: Any) -> bool:
    a, b = _decode(stored), _decode(attr_value(new))
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        a, b = np.asarray(a), np.asarray(b)
        return a.shape == b.shape and bool(np.all(a == b))
    return a == b


def differing_attrs(a: Mapping[str, Any], b: Mapping[str, Any], keys: Iterable[str]) -> list[str]:
    """The ``keys`` whose values differ between two attribute mappings as the file would store them
    (a key present in one only counts as differing)."""
    return [k for k in keys if (k in a) != (k in b) or (k in a and not _same_attr(attr_value(a[k]), b[k]))]


def merge_group(path: str | Path, name: str, datasets: Mapping[str, Any], attrs: Mapping[str, Any], *,
                match: Iterable[str], drop: Iterable[str] = (), drop_attr_prefixes: Iterable[str] = (),
                finalize: Any = None) -> bool:
    """Add or replace part of group ``name``, atomically, keeping the rest of it.

    Several measures can share one group (``/hessian`` holds eigenvalues, traces and a density). When
    the group exists and every attribute named in ``match`` (the shared provenance: split, samples,
    parameter set, space, checkpoint...) equals the new ``attrs`` value, only the entries in ``drop``
    (datasets or subgroups this measure owns, present or not in ``datasets``) and the attributes
    starting with one of ``drop_attr_prefixes`` are removed before ``datasets`` and ``attrs`` are
    written; everything else stays. Otherwise (no group, or different provenance) the whole group is
    replaced. ``finalize(group)`` runs last inside the same transaction (e.g. to recompute totals).
    Returns True when merged into an existing group, False when the group was (re)created.
    """
    p = Path(path)
    if not p.exists():
        raise StoreError(f"{p} does not exist; create it with ensure_file first")
    keys = list(match)
    merged = False
    with _copy_on_write(p) as f:
        if name in f:
            g = f[name]
            if all(k in g.attrs and k in attrs and _same_attr(g.attrs[k], attrs[k]) for k in keys):
                merged = True
                for key in set(drop) | set(datasets):
                    if key in g:
                        del g[key]
                prefixes = tuple(drop_attr_prefixes)
                for key in [k for k in g.attrs if prefixes and k.startswith(prefixes)]:
                    del g.attrs[key]
            else:
                del f[name]
        group = f.require_group(name)
        _write_into(group, datasets, attrs)
        if finalize is not None:
            finalize(group)
    return merged


def delete_group(path: str | Path, name: str) -> None:
    with _copy_on_write(Path(path)) as f:
        if name in f:
            del f[name]


def _read_node(node) -> dict[str, Any]:
    h5py = _h5py()
    out: dict[str, Any] = {"attrs": {k: _decode(v) for k, v in node.attrs.items()}}
    for key, item in node.items():
        if isinstance(item, h5py.Group):
            out[key] = _read_node(item)
        else:
            data = item[()]
            out[key] = _decode(data) if isinstance(data, (bytes, np.ndarray)) and getattr(data, "dtype", None) is not None \
                and data.dtype.kind in ("O", "S") else (data.decode() if isinstance(data, bytes) else data)
    return out


def read(path: str | Path, group: str | None = None) -> dict[str, Any]:
    """The whole file (or one group) as nested dicts: ``{"attrs": {...}, name: array | dict, ...}``."""
    p = Path(path)
    if not p.exists():
        raise StoreError(f"analysis file not found: {p}")
    check_file(p)
    with open_h5(p, "r") as f:
        if group is None:
            return _read_node(f)
        if group not in f:
            raise StoreError(f"{p} has no /{group}; it holds: {', '.join(f.keys()) or 'nothing yet'}")
        return _read_node(f[group])


def groups(path: str | Path) -> list[str]:
    """Top-level and nested group paths that carry a ``measure`` attribute (what was measured)."""
    h5py = _h5py()
    found: list[str] = []
    with open_h5(Path(path), "r") as f:
        def visit(name, obj):
            if isinstance(obj, h5py.Group) and "measure" in obj.attrs:
                found.append(name)
        f.visititems(visit)
    return found


class GridDatasets:
    """Pre-allocated, resumable datasets for values computed block by block (e.g. landscape grids).

    ``create`` writes the group with NaN-filled float64 datasets of ``shape`` plus a boolean ``done``
    mask (all copy-on-write, with space allocated up front); afterwards :meth:`write_block` overwrites
    raw values in place and sets the block's ``done`` flags last, then flushes. A kill during a block
    leaves its ``done`` flags false, so a resumed run recomputes only that block.
    """

    def __init__(self, path: str | Path, name: str) -> None:
        self.path = Path(path)
        self.name = name

    def create(self, shape: tuple[int, ...], names: Iterable[str], datasets: Mapping[str, Any],
               attrs: Mapping[str, Any]) -> None:
        h5py = _h5py()
        p = self.path
        with _copy_on_write(p) as f:
            if self.name in f:
                del f[self.name]
            g = f.require_group(self.name)
            _write_into(g, datasets, attrs)
            for key in names:
                d = g.create_dataset(key, shape=shape, dtype="f8", fillvalue=np.nan,
                                     dcpl=_alloc_early_dcpl(h5py))
                d[...] = np.nan
            done = g.create_dataset("done", shape=shape, dtype="bool", dcpl=_alloc_early_dcpl(h5py))
            done[...] = False

    def exists(self) -> bool:
        if not self.path.exists():
            return False
        with open_h5(self.path, "r") as f:
            return self.name in f and "done" in f[self.name]

    def attrs(self) -> dict[str, Any]:
        with open_h5(self.path, "r") as f:
            return {k: _decode(v) for k, v in f[self.name].attrs.items()}

    def done(self) -> np.ndarray:
        with open_h5(self.path, "r") as f:
            return f[self.name]["done"][()]

    def write_block(self, index: Any, values: Mapping[str, np.ndarray]) -> None:
        """Write ``values[key][...]`` at ``index`` (a numpy index), then mark it done, then flush."""
        with open_h5(self.path, "r+") as f:
            g = f[self.name]
            for key, v in values.items():
                g[key][index] = v
            f.flush()
            g["done"][index] = True
            f.flush()

    def write_points(self, index: tuple[np.ndarray, ...], values: Mapping[str, np.ndarray],
                     attrs: Mapping[str, Any] | None = None) -> None:
        """Write scattered points (``index`` = one integer array per axis, as ``np.unravel_index``
        gives), then their ``done`` flags, then ``attrs``, flushing after each step (one file open).

        Each dataset's bounding box of the points is read, updated and written back; the other points
        in the box get their own unchanged values back (one writer), so a kill mid-write loses nothing
        else. Used for coarse-to-fine blocks, whose points are strided over the grid.
        """
        idx = tuple(np.asarray(i, dtype=np.int64) for i in index)
        box = tuple(slice(int(i.min()), int(i.max()) + 1) for i in idx)
        local = tuple(i - int(i.min()) for i in idx)
        with open_h5(self.path, "r+") as f:
            g = f[self.name]
            for key, v in values.items():
                part = g[key][box]
                part[local] = v
                g[key][box] = part
            f.flush()
            done = g["done"][box]
            done[local] = True
            g["done"][box] = done
            f.flush()
            for k, v in (attrs or {}).items():
                g.attrs[k] = attr_value(v)
            f.flush()

    def set_attrs(self, attrs: Mapping[str, Any]) -> None:
        """Update attributes in place (small, fixed-size metadata such as running costs)."""
        with open_h5(self.path, "r+") as f:
            for k, v in attrs.items():
                f[self.name].attrs[k] = attr_value(v)
            f.flush()


def _alloc_early_dcpl(h5py):
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    return dcpl

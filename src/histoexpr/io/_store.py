"""Crash-safe writes of single elements into a SpatialData zarr store, and their recovery.

Every histoexpr writer that puts an element into a user's store goes through :func:`write_element`:

1. Under an exclusive lock on the store, leftovers of an interrupted earlier write are recovered
   (:func:`recover_store`).
2. The element is written, with spatialdata's own writers and in the store's own format (zarr v2 or
   v3, SpatialData container format 0.1 or 0.2), into a tiny SpatialData store inside the hidden
   staging folder ``<store>/.histoexpr_staging/<transaction>/`` where :func:`spatialdata.read_zarr`
   never looks; that folder is on the same file system, so the final move is a rename.
3. A small journal (``journal.json``, written atomically) records the intent. The journal is the
   commit point: from here on, recovery finishes the write instead of undoing it.
4. The element is renamed into place in one atomic step. An existing element of the same name is
   swapped with the new one atomically (Linux ``renameat2(RENAME_EXCHANGE)``) or, where that is not
   available, first moved aside into the staging folder and then replaced.
5. Consolidated metadata, where the store has it, is rewritten the way spatialdata does it; the
   staging folder (holding the replaced element, if any) is deleted.

A crash before the journal leaves the store as it was; a crash after it leaves the old element in
the store until the next histoexpr write or :func:`recover_store` completes the write.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import stat
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: Hidden folder at the store root holding in-flight writes; spatialdata never reads it.
STAGING_DIR = ".histoexpr_staging"
ELEMENT_TYPES = ("images", "labels", "points", "shapes", "tables")
_JOURNAL = "journal.json"
_LOCK = "lock"
_MINI = "store.zarr"
#: zarr's own atomic writes leave ``<name>.<32 hex>.partial`` files when killed mid-write.
_PARTIAL = re.compile(r".*\.[0-9a-f]{32}\.partial$")
#: Test hook: ``HISTOEXPR_CRASH_AT=<step>`` kills the writing process (SIGKILL) at that named step.
CRASH_ENV = "HISTOEXPR_CRASH_AT"
#: Set to ``1`` to force the two-rename overwrite path even where ``RENAME_EXCHANGE`` works.
NO_EXCHANGE_ENV = "HISTOEXPR_NO_RENAME_EXCHANGE"

#: In-process hook for tests: called with the step name at every crash point.
_crash_hook: Any = None


class StoreFormatError(ValueError):
    """The store's format cannot hold the element, or the store is not a SpatialData zarr store."""


@dataclass(frozen=True)
class StoreInfo:
    """What a SpatialData zarr store is made of (read from its root metadata only)."""

    root: Path
    zarr_format: int
    version: str
    consolidated: bool

    @property
    def metadata_files(self) -> list[Path]:
        """Root metadata files that consolidation rewrites."""
        if self.zarr_format == 3:
            return [self.root / "zarr.json"]
        return [self.root / ".zmetadata"] if self.consolidated else []


def store_info(path: str | os.PathLike) -> StoreInfo:
    """Zarr format, SpatialData container format version and consolidation of the store at ``path``."""
    root = Path(path)
    if (root / "zarr.json").is_file():
        meta = _read_json(root / "zarr.json")
        if meta.get("node_type") != "group":
            raise StoreFormatError(f"{root} is a zarr array, not a SpatialData store (a zarr group)")
        attrs = meta.get("attributes") or {}
        consolidated = bool(meta.get("consolidated_metadata"))
        zarr_format = 3
    elif (root / ".zgroup").is_file():
        attrs = _read_json(root / ".zattrs") if (root / ".zattrs").is_file() else {}
        consolidated = (root / ".zmetadata").is_file()
        zarr_format = 2
    else:
        raise StoreFormatError(
            f"{root} is not a SpatialData zarr store (no zarr.json or .zgroup at its root); nothing was written"
        )
    version = str((attrs.get("spatialdata_attrs") or {}).get("version", "0.1"))
    return StoreInfo(root=root, zarr_format=zarr_format, version=version, consolidated=consolidated)


def container_format(info: StoreInfo):
    """The spatialdata container format that writes elements the way this store holds them.

    Raises
    ------
    StoreFormatError
        When the installed spatialdata cannot write the store's format.
    """
    import spatialdata
    from spatialdata._io.format import SpatialDataContainerFormats

    fmt = SpatialDataContainerFormats.get(info.version)
    if fmt is None:
        raise StoreFormatError(
            f"the store {info.root} uses SpatialData format {info.version!r}, which spatialdata "
            f"{spatialdata.__version__} cannot write (it writes {sorted(SpatialDataContainerFormats)}); nothing was "
            "written. Upgrade spatialdata, or write into a new store: sdata.write('new.zarr')."
        )
    if int(fmt.zarr_format) != info.zarr_format:
        raise StoreFormatError(
            f"the store {info.root} is zarr v{info.zarr_format} but declares SpatialData format {info.version!r}, "
            f"which is stored as zarr v{fmt.zarr_format}; elements written into it would not be readable. Nothing "
            "was written. Convert it first: spatialdata.read_zarr(path).write('converted.zarr')."
        )
    return fmt


# ---------------------------------------------------------------------------------------- permissions
def _writable(path: Path) -> bool:
    # permission bits are checked as well as access(): root passes access() on read-only folders
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return True
    return bool(mode & stat.S_IWUSR) and os.access(path, os.W_OK)


def check_writable(root: Path, element_type: str | None = None, name: str | None = None) -> None:
    """Raise :class:`PermissionError`, before anything is written, if a folder or file the write needs is read-only.

    Checked: the store root, ``<element_type>/``, the element's own folder (replaced by a rename),
    the staging folder and the consolidated-metadata file.
    """
    root = Path(root)
    if not _writable(root):
        raise PermissionError(
            f"the SpatialData store {root} is read-only; nothing was written. Write a copy first "
            "(sdata.write('copy.zarr')) or work in memory (spatialdata.read_zarr(...) then sdata.path = None)."
        )
    paths = [root / STAGING_DIR, root / STAGING_DIR / _LOCK]
    if element_type is not None:
        paths.append(root / element_type)
        if name is not None:
            paths.append(root / element_type / name)
    with contextlib.suppress(StoreFormatError):
        paths += store_info(root).metadata_files
    bad = [p for p in paths if p.exists() and not _writable(p)]
    if bad:
        listed = ", ".join(str(p.relative_to(root)) for p in bad)
        raise PermissionError(
            f"cannot write into the SpatialData store {root}: {listed} read-only; nothing was written. "
            f"Make them writable (chmod -R u+w on them) or write a copy first (sdata.write('copy.zarr'))."
        )


# ---------------------------------------------------------------------------------------- small helpers
def _read_json(path: Path) -> dict:
    with open(path) as fh:
        return json.load(fh)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_tree(path: Path) -> None:
    for dirpath, _, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                fd = os.open(os.path.join(dirpath, f), os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        _fsync_dir(Path(dirpath))


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex}.partial")  # removed by recovery if left behind
    with open(tmp, "w") as fh:
        json.dump(data, fh, indent=2)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _crash_point(step: str) -> None:
    """A named step of the write; tests kill the process (or raise) here."""
    if _crash_hook is not None:
        _crash_hook(step)
    if os.environ.get(CRASH_ENV) == step:
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    if os.environ.get(NO_EXCHANGE_ENV) == "1" or not hasattr(os, "uname") or os.uname().sysname != "Linux":
        return False
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd = -100
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    return False  # EINVAL/ENOSYS (file system without exchange): fall back to two renames


def _ino(path: Path) -> int | None:
    try:
        return os.lstat(path).st_ino
    except FileNotFoundError:
        return None


# ---------------------------------------------------------------------------------------- locking
@contextlib.contextmanager
def _store_lock(root: Path) -> Iterator[Path]:
    """Exclusive lock of the store's staging folder (one histoexpr writer at a time); yields that folder."""
    staging = root / STAGING_DIR
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: no inter-process lock
        staging.mkdir(exist_ok=True)
        yield staging
        _remove_staging_if_empty(staging)
        return
    while True:
        staging.mkdir(exist_ok=True)
        try:
            fd = os.open(staging / _LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:  # another process removed the staging folder meanwhile
            continue
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            same = os.fstat(fd).st_ino == os.stat(staging / _LOCK).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the lock file was removed by its previous holder: lock the new one
    try:
        yield staging
    finally:
        _remove_staging_if_empty(staging)
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _remove_staging_if_empty(staging: Path) -> None:
    with contextlib.suppress(OSError):
        if any(p.name != _LOCK for p in staging.iterdir()):
            return
        with contextlib.suppress(FileNotFoundError):
            (staging / _LOCK).unlink()
        staging.rmdir()


# ---------------------------------------------------------------------------------------- transaction
def write_element(
    element: Any,
    root: str | os.PathLike,
    *,
    element_type: str,
    name: str,
    overwrite: bool = False,
) -> dict:
    """Write one SpatialData element into the store at ``root`` crash-safely (see the module docstring).

    Parameters
    ----------
    element
        A parsed SpatialData element (image/labels DataArray or DataTree, points, shapes, or table).
    root
        The SpatialData zarr store.
    element_type
        ``"images"``, ``"labels"``, ``"points"``, ``"shapes"`` or ``"tables"``.
    name
        Element name.
    overwrite
        Replace an element of that name already in the store.

    Returns
    -------
    What was done: ``{"element": "tables/x", "replaced": bool, "recovered": <recover_store report>}``.
    """
    from spatialdata import SpatialData

    root = Path(root)
    if element_type not in ELEMENT_TYPES:
        raise ValueError(f"element_type must be one of {ELEMENT_TYPES}, not {element_type!r}")
    info = store_info(root)
    fmt = container_format(info)  # refuse formats the installed spatialdata cannot write, before anything
    check_writable(root, element_type, name)
    with _store_lock(root) as staging:
        recovered = _recover_locked(root, staging)
        info = store_info(root)
        target = root / element_type / name
        replaced = target.exists()
        if replaced and not overwrite:
            raise ValueError(f"element {element_type}/{name} already exists in {root}; pass overwrite=True to replace it")
        txn = staging / uuid.uuid4().hex
        txn.mkdir()
        try:
            _crash_point("begin")
            mini_path = txn / _MINI
            SpatialData().write(mini_path, sdata_formats=[fmt], consolidate_metadata=False)
            _crash_point("stage_root")
            with warnings.catch_warnings():
                # the one-element staging object is not the user's store: a table in it annotates shapes
                # that live in the real store, and zarr's notes on its own defaults say nothing to act on
                warnings.filterwarnings("ignore", message="The table is annotating", category=UserWarning)
                warnings.filterwarnings("ignore", message="zarr v3 autosharding", category=UserWarning)
                mini = SpatialData(**{element_type: {name: element}})
                mini.path = mini_path
                mini.write_element(name, sdata_formats=[fmt])
            if (root / element_type).is_dir():
                src, dst = mini_path / element_type / name, target
            else:  # the store has no group of this type yet: move the whole group in
                src, dst = mini_path / element_type, root / element_type
            _fsync_tree(src)
            _crash_point("staged")
            journal = {
                "version": 1,
                "element": f"{element_type}/{name}",
                "overwrite": bool(replaced),
                "src": str(src.relative_to(root)),
                "dst": str(dst.relative_to(root)),
                "aside": str((txn / "replaced").relative_to(root)),
                "new_inode": os.stat(src).st_ino,
            }
            _write_json_atomic(txn / _JOURNAL, journal)
            _crash_point("journaled")
            _commit(root, journal)
            _crash_point("committed")
            if info.consolidated:
                _consolidate(root)
            _crash_point("consolidated")
            shutil.rmtree(txn)
            _crash_point("cleaned")
        except BaseException:
            with contextlib.suppress(Exception):
                _recover_txn(root, txn)
                if store_info(root).consolidated:
                    _consolidate(root)
            raise
    return {"element": f"{element_type}/{name}", "replaced": bool(replaced), "recovered": recovered}


def _commit(root: Path, journal: dict) -> str:
    """Put the staged element in place; idempotent. Returns what happened."""
    src, dst, aside = root / journal["src"], root / journal["dst"], root / journal["aside"]
    new = int(journal["new_inode"])
    if _ino(dst) == new:
        return "done"
    if _ino(src) != new:
        raise RuntimeError(f"staged element for {journal['element']} is missing")
    if dst.exists():
        if not journal["overwrite"]:
            raise FileExistsError(f"{journal['dst']} appeared in the store while histoexpr was writing it")
        if _exchange(src, dst):
            _fsync_dir(src.parent)
            _fsync_dir(dst.parent)
            _crash_point("exchanged")
            return "exchanged"
        # readers of a consolidated store must not find the name listed while it is missing
        _unlist_from_consolidated(root, journal["dst"])
        _crash_point("unlisted")
        os.rename(dst, aside)
        _fsync_dir(dst.parent)
        _crash_point("old_aside")
    os.rename(src, dst)
    _fsync_dir(dst.parent)
    _fsync_dir(src.parent)
    _crash_point("renamed")
    return "renamed"


def _unlist_from_consolidated(root: Path, element_path: str) -> None:
    """Remove one element from the store's consolidated metadata (if any), so readers skip it."""
    try:
        info = store_info(root)
    except StoreFormatError:
        return
    if not info.consolidated:
        return
    prefix = element_path.strip("/")
    meta_file = info.metadata_files[0]
    meta = _read_json(meta_file)
    entries = meta["consolidated_metadata"]["metadata"] if info.zarr_format == 3 else meta["metadata"]
    for key in [k for k in entries if k == prefix or k.startswith(prefix + "/")]:
        del entries[key]
    _write_json_atomic(meta_file, meta)


def _consolidate(root: Path) -> None:
    from spatialdata._io.io_zarr import _write_consolidated_metadata

    _write_consolidated_metadata(root)


# ---------------------------------------------------------------------------------------- recovery
def _recover_txn(root: Path, txn: Path) -> tuple[str, str | None]:
    """Finish (journal present) or undo (no journal) one transaction, then delete its folder."""
    journal_path = txn / _JOURNAL
    element = None
    action = "rolled_back"
    journal = None
    if journal_path.is_file():
        try:
            journal = _read_json(journal_path)
        except (OSError, ValueError):
            journal = None  # a journal is written atomically; an unreadable one means no commit intent
    if journal is not None:
        element = journal.get("element")
        try:
            _commit(root, journal)
            action = "rolled_forward"
        except (RuntimeError, FileExistsError):
            action = "rolled_back"
            dst, aside = root / journal["dst"], root / journal["aside"]
            if aside.exists() and not dst.exists():
                os.rename(aside, dst)  # put the replaced element back
    shutil.rmtree(txn, ignore_errors=True)
    return action, element


def _recover_locked(root: Path, staging: Path) -> dict:
    report: dict[str, Any] = {"store": str(root), "rolled_forward": [], "rolled_back": [], "removed": []}
    for txn in sorted(p for p in staging.iterdir() if p.is_dir()):
        action, element = _recover_txn(root, txn)
        report[action].append(element or txn.name)
        report["removed"].append(str(txn.relative_to(root)))
    for p in staging.iterdir():
        if p.name != _LOCK and p.is_file():  # stray temporary files
            p.unlink()
            report["removed"].append(str(p.relative_to(root)))
    for p in root.iterdir():  # zarr's temporary files from a killed metadata write
        if p.is_file() and _PARTIAL.match(p.name):
            p.unlink()
            report["removed"].append(p.name)
    report["reconsolidated"] = False
    if report["removed"]:
        with contextlib.suppress(StoreFormatError):
            if store_info(root).consolidated:
                _consolidate(root)
                report["reconsolidated"] = True
    return report


def recover_store(path: str | os.PathLike) -> dict:
    """Finish or undo any histoexpr write into a SpatialData store that was interrupted.

    histoexpr writes each element into a hidden staging folder (``<store>/.histoexpr_staging``),
    records its intent in a small journal, then renames the element into place. After a crash
    (``kill -9``, power loss, an exception) this function completes a write whose journal was
    written (roll forward) and discards one whose journal was not (roll back; the store keeps its
    previous content), deletes the staging folder and rewrites consolidated metadata. Every
    histoexpr write runs it first, so calling it by hand is only needed to tidy a store that
    histoexpr will not write to again. It is safe to run at any time, also while another histoexpr
    process writes to the store (it waits for that write to finish).

    Parameters
    ----------
    path
        The SpatialData zarr store.

    Returns
    -------
    A dict: ``store`` (the path), ``rolled_forward`` (elements whose interrupted write was completed),
    ``rolled_back`` (elements or transaction ids that were discarded), ``removed`` (staging paths
    deleted) and ``reconsolidated`` (whether consolidated metadata was rewritten). The lists are
    empty when there was nothing to do.

    Examples
    --------
    >>> import histoexpr as hx
    >>> hx.io.recover_store("sample.zarr")  # doctest: +SKIP
    {'store': 'sample.zarr', 'rolled_forward': [], 'rolled_back': [], 'removed': [], 'reconsolidated': False}

    From a shell: ``python -c "import histoexpr as hx; print(hx.io.recover_store('sample.zarr'))"``.
    """
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"no SpatialData store at {root}")
    staging = root / STAGING_DIR
    partials = [p for p in root.iterdir() if p.is_file() and _PARTIAL.match(p.name)]
    if not staging.exists() and not partials:
        return {"store": str(root), "rolled_forward": [], "rolled_back": [], "removed": [], "reconsolidated": False}
    check_writable(root)
    with _store_lock(root) as staging:
        return _recover_locked(root, staging)

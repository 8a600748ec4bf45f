"""The workspace on disk: where stage outputs, manifests and scratch live, and whether a stage
is up to date. Pure Python — it must never import torch (`status` and `run --dry-run` stay fast).

It reads the workspace and writes nothing but manifests; running stages is `runtime/executor.py`.

    WORKDIR/locks/<safe id>.lock            flock'd by the process running that stage; names it
    WORKDIR/stages/<id>/...                 a stage's outputs (ids contain '/', so these nest)
    WORKDIR/stages/<id>/manifest.json       written last: its presence means "complete"
    WORKDIR/stages/.tmp-<safe id>@<host>-<pid>/  outputs being written (renamed into place)
    WORKDIR/scratch/<id>/                   step checkpoints of an unfinished stage
    WORKDIR/cache/                          tokenised data shared by all stages
    WORKDIR/cache/digests.sqlite            (path, size, mtime_ns) -> sha256 of data files

A stage that reads data files records each file's sha256 in its manifest (`data_files`); it is
out of date when one of them changes, and `status` names the file. Deciding that nothing
changed costs one `stat` per file: a file is re-read only when its (size, mtime_ns) moved.

Locks are per stage, so independent stages run at once from one workspace (several `cascadec
run --only` in Slurm jobs on several nodes of a shared filesystem). Whoever holds a stage's
lock owns its temporary and scratch directories; nobody else deletes them, and `status` reports
the stage as running there rather than interrupted. A stage reads its ancestors only from their
manifests, which exist only once an ancestor is complete. See docs/runtime.md, Concurrency.

A stage that reads a hub model records the commit its revision resolved to (`hub_revisions`);
it is out of date when the revision now names another commit (`hub.py` says how `run` and
`status` resolve a branch), and `status` names the model and both commits.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import hashlib
import json
import os
import re
import socket
import sqlite3
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from .hub import Revisions

MANIFEST = "manifest.json"
LOCKS = "locks"
SCRATCH_MARK = ".cascadec-stage-hash"  # in scratch/<id>/: the stage hash the checkpoints belong to
MANIFEST_KEYS = ("stage", "hash", "kind", "config", "launch", "inputs", "input_hashes", "outputs", "file_stats")

RUN, SKIP, BUSY = "run", "skip", "busy"  # busy: another process is running the stage now
# Why a stage runs or is skipped. `evaluate` checks them in this order.
CORRUPT = "corrupt manifest"
NEW = "new"
RUNNING = "running on"  # detail: HOST (pid N)
INTERRUPTED = "interrupted"
FORCED = "forced"
CONFIG_CHANGED = "config changed"
INPUT_CHANGED = "input changed"
OUTPUT_MODIFIED = "output modified"
UP_TO_DATE = "up to date"
DIGESTS = "cache/digests.sqlite"


class WorkspaceError(Exception):
    """A problem with the plan or the workspace, as one line for the user (no traceback)."""


class ManifestError(WorkspaceError):
    """A manifest that is not valid JSON or lacks a required key."""


@dataclass(frozen=True)
class Verdict:
    """What the executor will do with one stage, and why (``detail`` says which key/file/input)."""

    state: str  # RUN | SKIP
    why: str
    detail: str = ""
    manifest: dict | None = field(default=None, repr=False)
    fresh_stats: dict | None = field(default=None, repr=False)
    # Set when the outputs matched but some file's (size, mtime) moved: the cache to store back.


# ---------------------------------------------------------------- paths


def stage_dir(workdir: Path, stage_id: str) -> Path:
    return Path(workdir) / "stages" / stage_id


def scratch_dir(workdir: Path, stage_id: str) -> Path:
    return Path(workdir) / "scratch" / stage_id


def safe_id(stage_id: str) -> str:
    """A stage id as one path component: `distill/a/short` -> `distill--a--short`."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", stage_id.replace("/", "--"))


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", socket.gethostname()) or "localhost"


def temp_dir(workdir: Path, stage_id: str, tag: str = "tmp") -> Path:
    """This process's temporary (`tmp`) or displaced (`old`) directory for a stage (host and pid
    in the name: pids repeat across the nodes that share a workspace)."""
    return Path(workdir) / "stages" / f".{tag}-{safe_id(stage_id)}@{_host()}-{os.getpid()}"


def leftovers(workdir: Path, stage_id: str) -> list[Path]:
    """Temporary directories an earlier run of this stage left behind (killed or crashed); only
    the holder of the stage's lock may take them for leftovers (`stage_lock`)."""
    root = Path(workdir) / "stages"
    pattern = re.compile(rf"\.(tmp|old)-{re.escape(safe_id(stage_id))}(@[A-Za-z0-9_.-]+)?-\d+")
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if pattern.fullmatch(p.name))


def scratch_hash(workdir: Path, stage_id: str) -> str | None:
    """The stage hash the step checkpoints in scratch/<id>/ were written for, if any."""
    try:
        return (scratch_dir(workdir, stage_id) / SCRATCH_MARK).read_text().strip()
    except OSError:
        return None


# ---------------------------------------------------------------- per-stage locks

# flock errors meaning "this filesystem cannot lock" (Lustre mounted without -o flock: ENOSYS;
# some FUSE and SMB mounts: EOPNOTSUPP; NFS without a lock manager: ENOLCK).
NO_FLOCK = (errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOLCK)


def lock_path(workdir: Path, stage_id: str) -> Path:
    return Path(workdir) / LOCKS / f"{safe_id(stage_id)}.lock"


def _no_flock(path: Path, e: OSError) -> WorkspaceError:
    return WorkspaceError(
        f"cannot lock {path}: its filesystem does not support flock ({errno.errorcode.get(e.errno, e.errno)}: "
        f"{e.strerror}); stages that share a workspace need it to stay apart. Mount the filesystem with the "
        "`flock` option (Lustre: `mount -t lustre -o flock ...`; NFS: not `nolock`), or put --workdir on one that has it"
    )


def _holder(fd: int) -> str:
    host, _, pid = os.pread(fd, 256, 0).decode(errors="replace").strip().partition(" ")
    return f"{host or 'an unknown host'} (pid {pid or '?'})"


def running(workdir: Path, stage_id: str) -> str | None:
    """`HOST (pid N)` of the process running the stage now (holding its lock), else None.

    Probes with a shared lock, released at once (see `stage_lock` for the race this leaves).
    Where the filesystem has no flock, nobody can be running a stage under cascadec: None.
    """
    path = lock_path(workdir, stage_id)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return None  # closing the descriptor releases it
    except BlockingIOError:
        return _holder(fd)
    except OSError as e:
        if e.errno in NO_FLOCK:
            return None
        raise
    finally:
        os.close(fd)


@contextlib.contextmanager
def stage_lock(workdir: Path, stage_id: str, *, attempts: int = 20):
    """Hold `locks/<safe id>.lock` (flock, exclusive) while running a stage; it names this host and
    pid. Yields None when another process holds it (`running` says who).

    The kernel (or the cluster filesystem's lock manager) drops a flock when its process dies, so
    a `kill -9` or a cancelled Slurm job never leaves a stale lock. A busy lock is tried again for
    about a second: `running` probes with a momentary shared lock and must not be taken for a run.
    No flock on the filesystem: a WorkspaceError that names the mount option.
    """
    path = lock_path(workdir, stage_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        for attempt in range(attempts):
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if attempt == attempts - 1:
                    yield None
                    return
                time.sleep(0.05)
            except OSError as e:
                if e.errno in NO_FLOCK:
                    raise _no_flock(path, e) from None
                raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{_host()} {os.getpid()}\n".encode(), 0)
        yield path
    finally:
        os.close(fd)  # releases the flock


def validate_plan(plan: dict) -> list[dict]:
    """The plan's stages, after checking what the executor relies on to touch only the workspace:
    unique ids that are safe relative paths and do not nest (`a/b` next to `a/b/c` would put
    one stage's directory inside another's), topological order, outputs under `stages/<id>/`."""
    stages = plan.get("stages") if isinstance(plan, dict) else None
    if not isinstance(stages, list):
        raise WorkspaceError("plan has no 'stages' list")
    seen: set[str] = set()
    for i, st in enumerate(stages):
        missing = [k for k in ("id", "kind", "hash", "outputs") if not isinstance(st, dict) or k not in st]
        if missing:
            raise WorkspaceError(f"plan stage #{i} lacks {', '.join(map(repr, missing))}")
        sid = st["id"]
        parts = PurePosixPath(sid).parts if isinstance(sid, str) else ()
        if not parts or sid.startswith("/") or "\\" in sid or any(p in (".", "..") or p.startswith(".") for p in parts):
            raise WorkspaceError(f"plan stage id {sid!r} is not a safe relative path")
        if sid in seen:
            raise WorkspaceError(f"plan stage id {sid!r} appears twice")
        for other in seen:
            if sid.startswith(other + "/") or other.startswith(sid + "/"):
                raise WorkspaceError(f"plan stage ids {other!r} and {sid!r} nest; one stage's directory would hold the other's")
        for need in st.get("needs", []):
            if need not in seen:
                raise WorkspaceError(f"plan stage {sid!r} needs {need!r}, which is not an earlier stage")
        prefix = f"stages/{sid}/"
        for o in st["outputs"]:
            rest = o[len(prefix):] if isinstance(o, str) and o.startswith(prefix) else ""
            if rest in ("", MANIFEST) or ".." in PurePosixPath(rest).parts:
                raise WorkspaceError(f"plan stage {sid!r}: output {o!r} must lie under {prefix} and not be its {MANIFEST}")
        seen.add(sid)
    return stages


# ---------------------------------------------------------------- manifests and hashes


def read_manifest(workdir: Path, stage_id: str) -> dict | None:
    """The stage's manifest, None when there is none; ManifestError when it is unreadable."""
    path = stage_dir(workdir, stage_id) / MANIFEST
    rel = f"stages/{stage_id}/{MANIFEST}"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as e:
        raise ManifestError(f"{rel}: cannot be read ({e})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ManifestError(f"{rel}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ManifestError(f"{rel}: not a JSON object")
    missing = [k for k in MANIFEST_KEYS if k not in data]
    if missing:
        raise ManifestError(f"{rel}: missing {', '.join(map(repr, missing))}")
    if not all(isinstance(data[k], dict) for k in ("outputs", "file_stats", "input_hashes")):
        raise ManifestError(f"{rel}: 'outputs', 'file_stats' and 'input_hashes' must be objects")
    return data


def atomic_write_json(path: Path, obj) -> None:
    """Write JSON so that readers see the old file or the whole new one, never a torn one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _files(where: Path, stage: dict):
    """(workspace-relative path, absolute path) of every file of a stage's outputs, sorted;
    ``where`` is the directory standing for `stages/<id>/` (the real one or a temporary one)."""
    prefix = f"stages/{stage['id']}/"
    for out in stage["outputs"]:
        top = Path(where) / out[len(prefix):]
        if top.is_file():
            yield out, top
            continue
        for dirpath, dirnames, filenames in os.walk(top):
            dirnames.sort()
            for name in sorted(filenames):
                full = Path(dirpath) / name
                yield f"{out}/{full.relative_to(top).as_posix()}", full


def hash_outputs(where: Path, stage: dict, known: dict | None = None) -> tuple[dict, dict]:
    """sha256 of every file of the stage's outputs: ({path: sha256}, {path: [size, mtime_ns]}),
    paths workspace-relative as in the plan (`stages/<id>/model/config.json`).

    Checkpoints are tens of GB and `status` must stay fast, so a file is re-hashed only when
    its (path, size, mtime_ns) differs from what ``known`` (the previous manifest) recorded:
    the trade git's index makes — a rewrite that keeps both size and mtime_ns goes unnoticed.
    Renaming the temporary directory into place keeps mtimes, so the cache survives it.
    """
    cached, stats = (known or {}).get("outputs", {}), (known or {}).get("file_stats", {})
    hashes, new_stats = {}, {}
    for rel, full in _files(where, stage):
        st = full.stat()
        stat = [st.st_size, st.st_mtime_ns]
        hashes[rel] = cached[rel] if stats.get(rel) == stat and rel in cached else _sha256(full)
        new_stats[rel] = stat
    return hashes, new_stats


def missing_outputs(where: Path, stage: dict) -> list[str]:
    """The stage's declared outputs that do not exist under ``where`` (as for `_files`)."""
    cut = len(f"stages/{stage['id']}/")
    return [o for o in stage["outputs"] if not (Path(where) / o[cut:]).exists()]


def _digest(manifest: dict | None, path: str) -> str | None:
    """One hash for everything a stage's manifest records under ``path`` (a file or a folder)."""
    if manifest is None:
        return None
    items = sorted((k, v) for k, v in manifest["outputs"].items() if k == path or k.startswith(path + "/"))
    return hashlib.sha256(json.dumps(items).encode()).hexdigest()


def input_hashes(stage: dict, workdir: Path) -> dict:
    """For each input produced by an earlier stage: that stage's hash and a digest of the
    input's file hashes, as its manifest records them now. A stage is out of date when these
    differ from what its own manifest recorded (e.g. an upstream stage was rerun with --force
    and came out different); an upstream rerun that reproduces the same bytes changes nothing."""
    result = {}
    for inp in stage.get("inputs", []):
        if "stage" in inp:
            try:
                up = read_manifest(workdir, inp["stage"])
            except ManifestError:
                up = None
            result[inp["role"]] = {
                "stage": inp["stage"],
                "hash": up and up["hash"],
                "sha256": _digest(up, inp["path"]),
            }
    return result


# ---------------------------------------------------------------- data files


def resolve_source(source: dict, base_dir: Path) -> dict:
    """A plan data source with its `paths` globs expanded (relative to ``base_dir``, sorted)."""
    patterns = source.get("paths") or []
    files = sorted({Path(f) for p in patterns for f in glob.glob(str(Path(base_dir) / p), recursive=True)})
    return {**source, "paths": files}


def data_files(plan: dict, name: str, base_dir: Path) -> list[tuple[str, Path]]:
    """(stable name, path) of every file data source ``name`` reads, in reading order; a mix
    lists its sources' files, each name prefixed by its source (`web:shard-0.jsonl`).

    The listing is the readers' (`runtime/data/readers.py`, imported here lazily: it needs no
    torch), so `status` and the runtime agree on which files a source is."""
    from .runtime.data.readers import source_files

    source = (plan.get("data") or {}).get(name)
    if not isinstance(source, dict):
        raise WorkspaceError(f"data {name!r} is not in the plan")
    if source.get("kind") == "mix":
        return [(f"{part}:{stable}", path) for part in sorted(source.get("mix") or {})
                for stable, path in data_files(plan, part, base_dir)]
    resolved = resolve_source(source, base_dir)
    if source.get("paths") and not resolved["paths"]:
        raise WorkspaceError(f"data {name!r}: no file matches {', '.join(source['paths'])} in {base_dir}")
    return source_files(resolved)


class Digests:
    """sha256 of data files, cached in `WORKDIR/cache/digests.sqlite` under (path, size,
    mtime_ns): the trade `hash_outputs` makes (a rewrite that keeps both goes unnoticed), so
    deciding that nothing changed in a corpus is one `stat` per file, and a changed or new file
    is read once. SQLite, not JSON: a corpus of a million files is one small indexed table that
    concurrent stages may share. The table is opened on first use and only in a workspace that
    exists (a dry run of a new workspace creates nothing); a read-only one only loses the cache."""

    def __init__(self, workdir: Path):
        self.workdir, self.memo, self._db = Path(workdir), {}, False

    @property
    def db(self) -> sqlite3.Connection | None:
        if self._db is False:
            self._db = None
            if self.workdir.is_dir():
                try:
                    (self.workdir / DIGESTS).parent.mkdir(exist_ok=True)
                    self._db = sqlite3.connect(self.workdir / DIGESTS, timeout=30)
                    self._db.execute("CREATE TABLE IF NOT EXISTS digests "
                                     "(path TEXT PRIMARY KEY, size INTEGER, mtime_ns INTEGER, sha256 TEXT)")
                except (OSError, sqlite3.Error):
                    self._db = None
        return self._db

    def sha256(self, path: Path) -> str:
        path = Path(path).resolve()
        st = path.stat()
        key = (str(path), st.st_size, st.st_mtime_ns)
        if key in self.memo:
            return self.memo[key]
        row = None
        if self.db is not None:
            with contextlib.suppress(sqlite3.Error):
                row = self.db.execute("SELECT sha256 FROM digests WHERE path = ? AND size = ? AND mtime_ns = ?", key).fetchone()
        digest = row[0] if row else _sha256(path)
        if row is None and self.db is not None:
            with contextlib.suppress(sqlite3.Error), self.db:
                self.db.execute("INSERT OR REPLACE INTO digests VALUES (?, ?, ?, ?)", (*key, digest))
        self.memo[key] = digest
        return digest

    def files(self, plan: dict, name: str, base_dir: Path) -> dict[str, str]:
        """{stable name: sha256} of every file of data source ``name``."""
        try:
            return {stable: self.sha256(path) for stable, path in data_files(plan, name, base_dir)}
        except (OSError, ValueError) as e:  # a source whose files cannot be listed or read
            raise WorkspaceError(f"data {name!r}: {e}") from None


def data_names(stage: dict) -> list[str]:
    """The data sources a stage reads files of (its `data` inputs), sorted."""
    return sorted({inp["data"] for inp in stage.get("inputs", []) if "data" in inp})


def data_changes(old: dict, new: dict) -> list[str]:
    """`data 'web': a.jsonl changed` lines between two {name: {file: sha256}} records."""
    out = []
    for name in sorted(set(old) | set(new)):
        before, after = old.get(name) or {}, new.get(name) or {}
        for f in sorted(set(before) | set(after)):
            if before.get(f) != after.get(f):
                what = "added" if f not in before else "removed" if f not in after else "changed"
                out.append(f"data {name!r}: {f} {what}")
    return out


# ---------------------------------------------------------------- the verdict


def _changed_keys(old, new, prefix: str) -> list[str]:
    """Dotted names of the leaves that differ between two JSON values."""
    if isinstance(old, dict) and isinstance(new, dict):
        keys = sorted(set(old) | set(new))
        return [c for k in keys for c in _changed_keys(old.get(k), new.get(k), f"{prefix}.{k}")]
    return [] if old == new else [prefix]


def _names(items: list[str], most: int = 3) -> str:
    more = f" (+{len(items) - most} more)" if len(items) > most else ""
    return ", ".join(items[:most]) + more


def evaluate(stage: dict, workdir: Path, *, pending: set[str] | frozenset = frozenset(), forced: bool = False,
             plan: dict | None = None, base_dir: Path | None = None, digests: Digests | None = None,
             locked: bool = False, revisions: Revisions | None = None) -> Verdict:
    """Decide whether one stage runs, given ``pending``: the earlier stages that will run first.

    In order: another process running it now (BUSY; not asked when ``locked``, i.e. the caller
    holds the stage's lock); an unreadable manifest; no manifest (new, or interrupted when a scratch/temp
    directory of this stage hash is left); --force; a different stage hash (config changed when
    the stage's own kind/config/launch differ from the manifest's, else input changed); an
    upstream stage that reruns or whose outputs differ from those this stage was built from;
    a hub model whose revision now names another commit than the manifest's `hub_revisions`
    (checked when ``revisions`` is given);
    a data file whose sha256 differs from the manifest's `data_files` (checked when ``plan`` and
    ``base_dir`` are given, where the data globs are relative to); an output file whose sha256 changed or that was added or removed; else up to date.
    """
    sid = stage["id"]
    if not locked and (who := running(workdir, sid)):
        return Verdict(BUSY, RUNNING, who)
    try:
        manifest = read_manifest(workdir, sid)
    except ManifestError as e:
        return Verdict(RUN, CORRUPT, str(e))
    if manifest is None or manifest["hash"] != stage["hash"]:
        resumes = scratch_hash(workdir, sid) == stage["hash"]
        if resumes or leftovers(workdir, sid):
            return Verdict(RUN, INTERRUPTED, f"resumes from scratch/{sid}" if resumes else "starts over")
        if manifest is None:
            return Verdict(RUN, NEW)
    if forced:
        return Verdict(RUN, FORCED)
    if manifest["hash"] != stage["hash"]:
        changed = [c for k in ("kind", "config", "launch") for c in _changed_keys(manifest[k], stage.get(k), k)]
        if changed:
            return Verdict(RUN, CONFIG_CHANGED, _names(changed))
    reruns = [n for n in stage.get("needs", []) if n in pending]
    if reruns:
        return Verdict(RUN, INPUT_CHANGED, f"{_names(reruns)} reruns")
    now = input_hashes(stage, workdir)
    moved = sorted({v["stage"] for r, v in now.items() if manifest["input_hashes"].get(r) != v})
    if moved or manifest["hash"] != stage["hash"]:
        if not moved:  # the plan now names other models/data: say which roles
            old, new = ({i.get("role"): i for i in m} for m in (manifest["inputs"] or [], stage.get("inputs", [])))
            moved = [f"input {r!r}" for r in sorted(set(old) | set(new), key=str) if old.get(r) != new.get(r)]
        return Verdict(RUN, INPUT_CHANGED, f"{_names(moved)} changed" if moved else "")
    if revisions is not None and manifest.get("hub_revisions") is not None:
        changes = revisions.changes(stage, manifest["hub_revisions"])
        if changes:
            return Verdict(RUN, INPUT_CHANGED, _names(changes))
    if plan is not None and base_dir is not None and data_names(stage) and manifest.get("data_files") is not None:
        digests = digests or Digests(workdir)
        try:
            now_files = {name: digests.files(plan, name, base_dir) for name in data_names(stage)}
        except WorkspaceError as e:
            return Verdict(RUN, INPUT_CHANGED, str(e))
        changes = data_changes(manifest["data_files"], now_files)
        if changes:
            return Verdict(RUN, INPUT_CHANGED, _names(changes))
    where = stage_dir(workdir, sid)
    hashes, stats = hash_outputs(where, stage, manifest)
    recorded = manifest["outputs"]
    changed = sorted(k for k in set(hashes) | set(recorded) if hashes.get(k) != recorded.get(k))
    missing = missing_outputs(where, stage)
    if missing or changed:
        what = [f"{m} removed" for m in missing] or [
            f"{k} {'added' if k not in recorded else 'removed' if k not in hashes else 'changed'}" for k in changed
        ]
        return Verdict(RUN, OUTPUT_MODIFIED, _names(what))
    fresh = stats if stats != manifest["file_stats"] else None
    return Verdict(SKIP, UP_TO_DATE, manifest=manifest, fresh_stats=fresh)


def plan_verdicts(plan: dict, workdir: Path, *, force: set[str] | frozenset = frozenset(),
                  base_dir: Path | None = None, revisions: Revisions | None = None) -> dict[str, Verdict]:
    """Every stage's verdict, predicting that a stage downstream of one that runs runs too.
    ``base_dir``: what the plan's data globs are relative to; None skips the data-file check.
    ``revisions``: how hub revisions resolve; None skips the hub check."""
    verdicts: dict[str, Verdict] = {}
    digests = Digests(workdir) if base_dir is not None else None
    for st in validate_plan(plan):
        pending = {sid for sid, v in verdicts.items() if v.state != SKIP}
        verdicts[st["id"]] = evaluate(st, workdir, pending=pending, forced=st["id"] in force,
                                      plan=plan, base_dir=base_dir, digests=digests, revisions=revisions)
    return verdicts


def status_table(plan: dict, workdir: Path, base_dir: Path | None = None,
                 revisions: Revisions | None = None) -> list[dict]:
    """One row per stage for `cascadec status`: {stage, kind, state, why, detail}.

    Hub revisions resolve from the local cache only (``revisions``, by default a local-only
    `hub.Revisions`): `status` never goes online. Raises WorkspaceError for a plan the executor
    could not run; a corrupt manifest is a row.
    """
    revisions = revisions or Revisions(plan, local_only=True)
    verdicts = plan_verdicts(plan, workdir, base_dir=base_dir, revisions=revisions)
    rows = []
    for st in plan["stages"]:
        v = verdicts[st["id"]]
        rows.append({"stage": st["id"], "kind": st["kind"], "state": v.state, "why": v.why, "detail": v.detail})
    return rows


def status_lines(plan: dict, workdir: Path, base_dir: Path | None = None) -> list[str]:
    """What `cascadec status` prints: the commit each hub model resolves to (one `hub` line per
    model, from the local cache), one `format_row` line per stage, then a count.

    Raises WorkspaceError for a plan the executor could not run (print it as `error: ...`).
    """
    revisions = Revisions(plan, local_only=True)
    rows = status_table(plan, workdir, base_dir, revisions)
    width = max((len(r["stage"]) for r in rows), default=0)
    todo, busy = (sum(r["state"] == state for r in rows) for state in (RUN, BUSY))
    return revisions.lines() + [format_row(r, width) for r in rows] + [
        summary(todo, len(rows) - todo - busy, done=False, busy=busy)]


def summary(ran: int, skipped: int, *, done: bool, busy: int = 0, waiting: int = 0) -> str:
    more = (f", {busy} running elsewhere" if busy else "") + (f", {waiting} waiting for them" if waiting else "")
    return f"{ran} {'run' if done else 'to run'}, {skipped} up to date{more}."


def format_row(row: dict, width: int = 0) -> str:
    """`run   distill/x/short  (config changed: config.optimizer.lr)` — the line `run` prints;
    `busy  distill/x/short  (running on node7 (pid 4242))` for a stage another process runs."""
    sep = " " if row["why"] == RUNNING else ": "
    why = f"{row['why']}{sep}{row['detail']}" if row.get("detail") else row["why"]
    return f"{row['state']:<6}{row['stage']:<{width}}  ({why})"


# ---------------------------------------------------------------- saved plans


def check_saved_plan(plan: dict, spec_bytes: bytes, *, advice: bool = True) -> str | None:
    """None when ``plan`` was made from exactly ``spec_bytes``; else why it must not be run.

    Terraform's rule for saved plans: running a plan applies what was reviewed, so a plan made
    from an older version of the spec is refused rather than silently re-planned (`run`), and
    reported as stale where it is only read (`status`, `report`, `run --replan`).
    The message has no "error:" prefix; the caller adds it. ``advice=False`` leaves out the
    closing sentence on how to re-plan, for callers that give their own.
    """
    now = hashlib.sha256(spec_bytes).hexdigest()
    then = plan.get("spec_sha256") if isinstance(plan, dict) else None
    how = "Re-plan with `cascadec plan SPEC -o PLAN`, or pass --replan to plan again before running." if advice else ""
    if not isinstance(then, str):
        return f"saved plan records no spec_sha256, so it cannot be checked against the spec. {how}".rstrip()
    if then != now:
        return (
            f"saved plan is stale: the spec changed since the plan was made "
            f"(plan from spec sha256 {then[:12]}, spec is now {now[:12]}). {how}"
        ).rstrip()
    return None

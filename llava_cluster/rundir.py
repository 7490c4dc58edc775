"""The run directory: the only interface between stages and the only output of a run.

    <storage>/runs/<name>/
      spec.yaml                 frozen spec (what actually ran)
      state/<stage>.json        pending|running|preempted|succeeded|failed|cancelled, attempts, job ids, timings
      state/<stage>.heartbeat.json  pid, host, time of the running stage's rank 0, rewritten every minute
      state/run.lock            held by a live local submit (flock: released when its holder dies)
      train/checkpoint-<step>/  resumable checkpoints (adapter + projector + trainer state)
      train/final/              the final adapter + projector + metadata
      merged/                   standard HF checkpoint + processor
      validate/                 predictions.jsonl, metrics.json, report.html, loss.png
      logs/                     <stage>.log and TensorBoard events

Every shared file is written atomically (temp file + rename) and only by global rank 0.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import socket
import stat
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from llava_cluster.launch.topology import is_rank0

STAGES = ("train", "merge", "validate")
STATUSES = ("pending", "running", "preempted", "succeeded", "failed", "cancelled")
FINISHED = frozenset({"succeeded", "failed", "cancelled"})  # no job will change it unless resubmitted
UNSUCCESSFUL = frozenset({"failed", "cancelled"})  # finished without the stage's output
AWAITING_JOB = frozenset({"pending", "running"})  # a scheduler job is to move it on (or died without a word)
COMPLETE_MARKER = "COMPLETE"
PREEMPTED_EXIT = 75  # EX_TEMPFAIL: a stage stopped on request after saving; run it again to resume
STOP_FILE = "STOP"  # in train/: its presence asks every rank to checkpoint and stop
HEARTBEAT_SECONDS = 60.0  # how often rank 0 of a running stage rewrites state/<stage>.heartbeat.json
STALE_AFTER_SECONDS = 600.0  # no heartbeat for this long: the stage's process is taken for dead


def current_umask() -> int:
    """The process umask, read without setting it (`os.umask` can only swap it, racing other threads)."""
    with contextlib.suppress(OSError, ValueError), open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def honour_umask(path: str | Path) -> None:
    """Give `path` (a file, or a folder and all it holds) the modes plain open()/mkdir() get under the
    umask. Writers that go through private temp files — safetensors' `save_file`, `tempfile` — leave
    0600 files and 0700 folders, which teammates on shared storage cannot read. Executables stay executable."""
    path = Path(path)
    mask = current_umask()
    for p in [path, *(path.rglob("*") if path.is_dir() and not path.is_symlink() else ())]:
        info = p.lstat()
        if stat.S_ISDIR(info.st_mode):  # setgid kept: group-shared project folders rely on it
            os.chmod(p, (0o777 & ~mask) | (info.st_mode & stat.S_ISGID))
        elif stat.S_ISREG(info.st_mode):
            os.chmod(p, (0o777 if info.st_mode & 0o111 else 0o666) & ~mask)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write to a temp file in the same folder, fsync, then rename: readers never see half a file.
    The temp file is created 0666 so the umask decides its mode (mkstemp would make it 0600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


@contextlib.contextmanager
def atomic_dir(final: str | Path) -> Iterator[Path]:
    """Yield a temp folder beside `final`; on success it replaces `final` in one rename.

    A crash leaves only a `.tmp-*` folder, never a half-written `final`. What appears has the umask's
    modes, whatever library wrote into it (see `honour_umask`).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{secrets.token_hex(6)}"
    tmp.mkdir()
    try:
        yield tmp
        honour_umask(tmp)
        if final.exists():
            old = final.with_name(f".old-{final.name}-{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def complete_checkpoints(train_dir: Path) -> list[Path]:
    """`checkpoint-<step>` folders holding their COMPLETE marker, oldest first."""
    found = []
    if train_dir.is_dir():
        for p in train_dir.glob("checkpoint-*"):
            step = p.name.removeprefix("checkpoint-")
            if step.isdigit() and (p / COMPLETE_MARKER).is_file():
                found.append((int(step), p))
    return [p for _, p in sorted(found)]


@dataclass
class StageState:
    stage: str
    status: str = "pending"
    attempts: int = 0
    job_ids: list[str] = field(default_factory=list)
    started_at: float | None = None
    finished_at: float | None = None
    host: str | None = None
    error: str | None = None

    @property
    def elapsed(self) -> float | None:
        if self.started_at is None:
            return None
        return (self.finished_at or time.time()) - self.started_at


class RunDir:
    """Paths and stage state of one run. Cheap to construct; creates nothing until written to."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser().resolve()

    spec_path = property(lambda self: self.root / "spec.yaml")
    state_dir = property(lambda self: self.root / "state")
    train_dir = property(lambda self: self.root / "train")
    final_dir = property(lambda self: self.root / "train" / "final")
    merged_dir = property(lambda self: self.root / "merged")
    validate_dir = property(lambda self: self.root / "validate")
    logs_dir = property(lambda self: self.root / "logs")
    checkpoint_scores = property(lambda self: self.root / "train" / "checkpoint_scores.json")  # and the best one

    def log_path(self, stage: str) -> Path:
        return self.logs_dir / f"{stage}.log"

    def checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first. A checkpoint without its marker was cut short."""
        return complete_checkpoints(self.train_dir)

    def last_checkpoint(self) -> Path | None:
        ckpts = self.checkpoints()
        return ckpts[-1] if ckpts else None

    def read_state(self, stage: str) -> StageState:
        path = self.state_dir / f"{stage}.json"
        if not path.exists():
            return StageState(stage=stage)
        data = json.loads(path.read_text())
        known = StageState.__dataclass_fields__
        return StageState(**{k: v for k, v in data.items() if k in known})

    def write_state(self, state: StageState) -> None:
        if is_rank0():
            atomic_write_json(self.state_dir / f"{state.stage}.json", asdict(state))

    def update_state(self, stage: str, **changes: Any) -> StageState:
        state = self.read_state(stage)
        for key, value in changes.items():
            setattr(state, key, value)
        self.write_state(state)
        return state

    def mark_running(self, stage: str) -> StageState:
        state = self.read_state(stage)
        job = os.environ.get("SLURM_JOB_ID")
        if job and job not in state.job_ids:
            state.job_ids.append(job)
        state.status, state.attempts = "running", state.attempts + 1
        state.started_at, state.finished_at, state.error = time.time(), None, None
        state.host = socket.gethostname()
        self.write_state(state)
        return state

    def heartbeat_path(self, stage: str) -> Path:
        return self.state_dir / f"{stage}.heartbeat.json"

    def beat(self, stage: str) -> None:
        """Say that `stage` is alive: this process's pid, host and the time, written atomically."""
        atomic_write_json(self.heartbeat_path(stage),
                          {"pid": os.getpid(), "host": socket.gethostname(), "time": time.time()})

    def read_heartbeat(self, stage: str) -> dict[str, Any] | None:
        try:
            return json.loads(self.heartbeat_path(stage).read_text())
        except (OSError, ValueError):
            return None

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold this run for one submit: a second one is refused while the first lives. The kernel drops
        the lock when its holder dies (kill -9 included), so a dead submit never blocks the next."""
        import fcntl

        from llava_cluster.errors import UserError

        path = self.state_dir / "run.lock"
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as err:
            raise UserError(f"cannot take the run lock {path}: {err.strerror}") from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                try:
                    holder = json.loads(os.pread(fd, 4096, 0) or b"{}")
                except ValueError:
                    holder = {}
                since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("time", 0)))
                raise UserError(f"run {self.root.name} is already being run by pid {holder.get('pid', '?')} on "
                                f"host {holder.get('host', '?')} (since {since}, lock {path}); wait for it to "
                                f"finish or stop that process, then submit again") from None
            except OSError as err:  # a filesystem without locks (ENOLCK): run, but say it is unguarded
                from llava_cluster.console import err_console

                err_console.print(f"[yellow]cannot lock {path} ({err.strerror}): a second submit of this run "
                                  f"would not be refused[/]")
            with contextlib.suppress(OSError):  # who holds it is a courtesy; the flock is the lock
                os.ftruncate(fd, 0)
                os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                          "time": time.time()}).encode(), 0)
            yield
        finally:
            os.close(fd)

    def mark_done(self, stage: str, error: str | None = None) -> StageState:
        return self.update_state(
            stage, status="failed" if error else "succeeded", finished_at=time.time(), error=error
        )

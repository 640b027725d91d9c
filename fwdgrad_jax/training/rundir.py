"""A run directory that nothing can corrupt: its lock, checkpoints, metrics and JSON files.

What :func:`fwdgrad_jax.training.run.train` keeps in ``run_dir`` and how each piece survives
what clusters and people do to a run:

* :func:`lock` — one run per directory: a second one is refused at once, naming the
  directory; the lock is released on exit, and the lock file of a run that died
  (``kill -9``, a lost node) is taken over.
  :func:`check_lock` notices a lock file removed or replaced under a live run
  (``rm .lock``), which then stops before another run can mix records with it.
* :class:`Checkpoints` — orbax checkpoints in ``checkpoints/``. Restore falls back to
  the newest readable step, saying which one it skipped and why (a truncated file, an
  empty step directory) and moving it aside; a save that fails (a full disk) raises
  :class:`RunDirError` at once, naming the directory.
* :class:`MetricsLog` — ``metrics.jsonl``: a half-written last line is dropped with a
  note, and a resumed run rewrites the file to exactly the records up to the restored
  step, so nothing is duplicated or out of order; a line that is not a record is dropped
  with a note. A failed write (a full disk) is undone, so no line is torn, and a file
  replaced under the run stops it.
* :func:`write_json` — ``config.json`` and ``summary.json``, replaced atomically.

Every error message names the path it is about.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import shutil
import socket
from collections.abc import Collection, Iterator, Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"
METRICS_NAME = "metrics.jsonl"
CHECKPOINTS_NAME = "checkpoints"
# Where unreadable checkpoints are moved: out of orbax's sight, kept for inspection.
UNREADABLE_NAME = "checkpoints_unreadable"


class RunDirError(RuntimeError):
  """A run directory cannot be used as asked; the message names the path."""


class RunDirLocked(RunDirError):
  """Another live run holds the run directory."""


class RunDirLost(RunDirError):
  """This run's lock file or metrics file was removed or replaced while it ran.

  Another run may now own the directory: the run stops and writes nothing more there.
  """


def _disk_full(error: BaseException) -> bool:
  """Whether ``error`` or anything it was raised from says the disk is full.

  TensorStore reports ENOSPC as a ValueError whose text carries the OS's words.
  """
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
      return True
    if "No space left on device" in str(error):
      return True
    error = error.__cause__ or error.__context__
  return False


def _reason(error: BaseException) -> str:
  """The first line of an error, for a one-line message."""
  if _disk_full(error):
    return "disk full: No space left on device"
  if isinstance(error, OSError) and error.strerror:
    return error.strerror
  text = str(error).strip().splitlines()
  if not text:
    return type(error).__name__
  # TensorStore appends the repr of a bound method to its one useful sentence.
  first = text[0].split(" See full TensorStore details")[0]
  return f"{type(error).__name__}: {first[:200]}"


# --------------------------------------------------------------------------------------
# Lock
# --------------------------------------------------------------------------------------


def _owner() -> str:
  return f"pid {os.getpid()} on {socket.gethostname()}"


def _acquire(path: Path) -> int:
  while True:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
      os.close(fd)
      raise RunDirLocked(
        f"{path.parent}: in use by another run ({holder}); wait for it to finish or use "
        "another run directory"
      ) from None
    # A releasing holder unlinks the file before unlocking it: if it did so between our
    # open and flock, we hold a lock on a file nobody else can see. Start again.
    if _same_file(path, fd):
      break
    os.close(fd)
  stale = os.pread(fd, 200, 0).decode(errors="replace").strip()
  if stale:
    log.warning("%s: took over the lock of a run that is gone (%s)", path.parent, stale)
  os.ftruncate(fd, 0)
  os.pwrite(fd, _owner().encode(), 0)
  return fd


# run directory -> the descriptor of the lock file this process holds on it.
_held: dict[Path, int] = {}


def _same_file(path: Path, fd: int) -> bool:
  try:
    return os.stat(path).st_ino == os.fstat(fd).st_ino
  except FileNotFoundError:
    return False


def check_lock(run_dir: str | os.PathLike[str]) -> None:
  """Raises when the lock this process holds on ``run_dir`` is no longer its lock file.

  An advisory lock cannot stop ``rm``: once ``.lock`` is deleted or replaced, a second
  run can take the directory. A run that checks before each write stops instead of
  mixing its records with another run's.

  Raises:
    RunDirLost: ``.lock`` was removed or replaced (one line naming it).
  """
  path = Path(run_dir) / LOCK_NAME
  fd = _held.get(Path(run_dir).absolute())
  if fd is not None and not _same_file(path, fd):
    raise RunDirLost(
      f"{path}: removed or replaced while this run held it; stopped so that no other run "
      "shares the directory (nothing written after this point)"
    )


@contextlib.contextmanager
def lock(run_dir: str | os.PathLike[str]) -> Iterator[Path]:
  """Holds ``run_dir`` for this process; creates the directory.

  An advisory ``flock`` on ``run_dir/.lock``, which the kernel releases when the process
  dies, so a lock file left by a killed run is stale by construction and is taken over.
  The file records its holder (pid and host) for the message of a refused run.

  Args:
    run_dir: the run directory.

  Yields:
    ``run_dir`` as a Path.

  Raises:
    RunDirLocked: another live run holds it (one line naming the directory).
    RunDirError: the directory cannot be created or written.
  """
  run_dir = Path(run_dir)
  path = run_dir / LOCK_NAME
  try:
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = _acquire(path)
  except RunDirError:
    raise
  except OSError as e:
    raise RunDirError(f"{e.filename or run_dir}: {_reason(e)}") from e
  _held[run_dir.absolute()] = fd
  try:
    yield run_dir
  finally:
    del _held[run_dir.absolute()]
    # Before unlocking (see _acquire), and only our own file: after an `rm .lock` the
    # path may be another run's lock.
    if _same_file(path, fd):
      path.unlink(missing_ok=True)
    os.close(fd)


# --------------------------------------------------------------------------------------
# JSON files
# --------------------------------------------------------------------------------------


def write_json(path: Path, payload: Any) -> None:
  """Writes ``payload`` to ``path`` atomically (a reader sees the old or the new file).

  Raises:
    RunDirError: the file cannot be written (one line naming it).
  """
  tmp = path.with_name(f".{path.name}.tmp")
  try:
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, path)
  except OSError as e:
    with contextlib.suppress(OSError):
      tmp.unlink(missing_ok=True)
    raise RunDirError(f"{path}: {_reason(e)}") from e


def read_json(path: Path) -> Any:
  """The JSON content of ``path``, or None when it is missing or unreadable."""
  try:
    return json.loads(path.read_text())
  except (OSError, ValueError):
    return None


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, Mapping) and value:
      flat.update(_flatten(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = value
  return flat


def changed_key(
  old: Mapping[str, Any],
  new: Mapping[str, Any],
  may_change: Collection[str],
  defaults: Mapping[str, Any] | None = None,
) -> tuple[str, Any, Any] | None:
  """The first dotted key whose value differs between two nested configs.

  Args:
    old: the config recorded in the run directory.
    new: the config of this run.
    may_change: dotted keys allowed to differ (e.g. ``train.steps``).
    defaults: the schema's defaults (nested like the configs): a key that ``old`` lacks
      (it was recorded before the key existed) counts as its default, so a run directory
      of an older version resumes when the new key keeps that default.

  Returns:
    ``(key, old value, new value)``, or None when only ``may_change`` keys differ.
  """
  a, b = _flatten(old), _flatten(new)
  d = _flatten(defaults or {})
  for key in sorted(set(a) | set(b)):
    before = a.get(key, d.get(key))
    if key not in may_change and before != b.get(key):
      return key, before, b.get(key)
  return None


# --------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------


class Checkpoints:
  """The orbax checkpoints of a run directory, robust to damage and full disks.

  Saves are synchronous, so a failing save surfaces at the step that failed instead of
  at the next save (orbax's background saves report errors late); checkpoint time is
  not counted as training time anyway.

  Args:
    run_dir: the run directory; checkpoints live in ``run_dir/checkpoints``.
    max_to_keep: how many of the newest checkpoints to keep.
  """

  def __init__(self, run_dir: Path, *, max_to_keep: int = 2):
    import orbax.checkpoint as ocp

    self._ocp = ocp
    self.run_dir = Path(run_dir).absolute()
    self.directory = self.run_dir / CHECKPOINTS_NAME
    self._max_to_keep = max_to_keep
    self._manager = self._open()

  def _open(self):
    ocp = self._ocp
    options = ocp.CheckpointManagerOptions(
      max_to_keep=self._max_to_keep,
      create=True,
      enable_async_checkpointing=False,
      cleanup_tmp_directories=True,  # half-written saves of a killed run
    )
    try:
      return ocp.CheckpointManager(self.directory, options=options)
    except OSError as e:
      raise RunDirError(f"{e.filename or self.directory}: {_reason(e)}") from e

  def steps(self) -> list[int]:
    """The saved steps, oldest first."""
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    """The newest saved step (None when there is none)."""
    return self._manager.latest_step()

  def restore(self, target: Any) -> tuple[Any, int | None]:
    """The newest readable checkpoint, restored with the structure of ``target``.

    Unreadable newer checkpoints are skipped with one line each saying why, and moved
    to ``run_dir/checkpoints_unreadable/`` (so that later saves at those steps work).

    Args:
      target: a state of the shapes and dtypes to restore (e.g. the initial state).

    Returns:
      ``(state, step)``, or ``(None, None)`` when there is no checkpoint.

    Raises:
      RunDirError: there are checkpoints but none is readable (one line).
    """
    import jax

    ocp = self._ocp
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    skipped = []
    while self.steps():
      step = self.steps()[-1]
      try:
        return self._manager.restore(step, args=ocp.args.StandardRestore(abstract)), step
      except Exception as e:  # noqa: BLE001 - orbax/TensorStore raise many types for damage
        # Out of orbax's sight at once: an empty step directory makes it misread the
        # layout of every other step.
        aside = self._set_aside(step)
        log.warning(
          "%s/%d: skipped, not readable (%s); moved to %s", self.directory, step, _reason(e), aside
        )
        skipped.append(step)
    if skipped:
      raise RunDirError(
        f"{self.directory}: no readable checkpoint (steps {', '.join(map(str, skipped))} "
        f"moved to {self.run_dir / UNREADABLE_NAME}); remove the run directory to start afresh"
      )
    return None, None

  def _set_aside(self, step: int) -> Path:
    self._manager.close()
    aside = self.run_dir / UNREADABLE_NAME / str(step)
    aside.parent.mkdir(exist_ok=True)
    if aside.exists():
      shutil.rmtree(aside)
    shutil.move(self.directory / str(step), aside)
    self._manager = self._open()
    return aside

  def save(self, step: int, state: Any) -> None:
    """Saves ``state`` as ``step`` and waits until it is on disk (no-op if it exists).

    Raises:
      RunDirError: the save failed, e.g. the disk is full (one line naming the
        directory).
    """
    if step in self._manager.all_steps():
      return
    ocp = self._ocp
    # orbax logs a failing save's error from each of its threads (absl ERROR lines, with
    # the TensorStore spec): the RunDirError below says it once.
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.CRITICAL)
    try:
      self._manager.save(step, args=ocp.args.StandardSave(state), force=True)
      self._manager.wait_until_finished()
    except Exception as e:  # noqa: BLE001 - TensorStore reports I/O errors as ValueError
      raise RunDirError(
        f"{self.directory}: saving the checkpoint of step {step} failed ({_reason(e)})"
      ) from e
    finally:
      absl.setLevel(level)

  def close(self) -> None:
    """Waits for pending work and closes orbax's manager (errors are not raised here)."""
    with contextlib.suppress(Exception):
      self._manager.close()


# --------------------------------------------------------------------------------------
# metrics.jsonl
# --------------------------------------------------------------------------------------


def read_metrics(path: Path) -> list[dict[str, Any]]:
  """The records of a ``metrics.jsonl``, without a torn line (noted in one line).

  A run killed while writing leaves half a line at the end; a line that does not parse
  is dropped with a warning naming the file and the line.
  """
  records = []
  try:
    lines = path.read_text().splitlines()
  except FileNotFoundError:
    return records
  for number, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except ValueError:
      where = "half-written last line" if number == len(lines) else f"unreadable line {number}"
      log.warning("%s: dropped a %s", path, where)
      continue
    # Valid JSON is not yet a record: a list or a number written by hand or another tool
    # would fail every reader that looks up its step.
    if not isinstance(record, dict):
      log.warning("%s: dropped line %d (not a record: %.40s)", path, number, line.strip())
      continue
    records.append(record)
  return records


class MetricsLog:
  """``metrics.jsonl`` (and TensorBoard scalars when tensorboardX is installed).

  Args:
    run_dir: the run directory.
    resume_step: the step the run restarts from (0 for a fresh run). The file is
      rewritten to exactly the records up to that step — records past it belong to
      steps that will run again, and a torn line or a duplicate would otherwise
      survive every later resume.
    write: False for the processes of a multi-process run other than process 0: the
      records are kept in memory (for the summary) and no file is touched.
  """

  def __init__(self, run_dir: Path, resume_step: int, *, write: bool = True):
    self.path = Path(run_dir) / METRICS_NAME
    self._write = write
    self._fd = None
    self._tb = None
    kept: list[dict[str, Any]] = []
    if resume_step > 0:
      for r in read_metrics(self.path):
        # In step order, one record per step; a diverged marker is not a log point.
        if r.get("diverged") or not isinstance(r.get("step"), int) or r["step"] > resume_step:
          continue
        if kept and r["step"] <= kept[-1]["step"]:
          continue
        kept.append(r)
    self.records = kept
    if not write:
      return
    tmp = self.path.with_name(f".{METRICS_NAME}.tmp")
    try:
      tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
      os.replace(tmp, self.path)
      # Unbuffered: a failed write is undone at once (no torn line, nothing left in a
      # buffer to fail again at close).
      self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
    except OSError as e:
      with contextlib.suppress(OSError):
        tmp.unlink(missing_ok=True)
      raise RunDirError(f"{self.path}: {_reason(e)}") from e
    try:
      from tensorboardX import SummaryWriter  # the [tensorboard] extra
    except ImportError:
      pass
    else:
      self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))

  def _check_same_file(self) -> None:
    # Another run (after an `rm .lock`) or a user replaced or deleted the file: records
    # appended to the old one would be lost without a word.
    try:
      same = os.stat(self.path).st_ino == os.fstat(self._fd).st_ino
    except FileNotFoundError:
      same = False
    if not same:
      raise RunDirLost(
        f"{self.path}: removed or replaced by another process while this run wrote it; "
        f"stopped (the records up to step {self.last_step} were in the file it had open)"
      )

  @property
  def last_step(self) -> int:
    """The step of the last record written (0 when none)."""
    return self.records[-1]["step"] if self.records else 0

  def write(self, record: dict[str, Any]) -> None:
    """Appends one whole record (written at once: a killed run keeps what it logged).

    Raises:
      RunDirError: the file was replaced or deleted under the run, or the write failed
        (e.g. the disk is full); the file is left without a torn line. One line naming it.
    """
    if not self._write:
      self.records.append(record)
      return
    self._check_same_file()
    data = (json.dumps(record) + "\n").encode()
    size = os.fstat(self._fd).st_size
    try:
      written = 0
      while written < len(data):
        written += os.write(self._fd, data[written:])
    except OSError as e:
      with contextlib.suppress(OSError):
        os.ftruncate(self._fd, size)  # no half record for the next resume to drop
      raise RunDirError(
        f"{self.path}: writing the record of step {record.get('step')} failed ({_reason(e)})"
      ) from e
    self.records.append(record)
    if self._tb is not None and not _tensorboard_alive(self._tb):
      # Its writer thread died (a full disk): events would fill its queue and the next
      # put would block the run forever.
      log.warning(
        "%s: TensorBoard's writer stopped; scalars are no longer written there (metrics.jsonl "
        "has them all)",
        self.path.parent / "tensorboard",
      )
      _close_tensorboard(self._tb, self.path.parent / "tensorboard", dead=True)
      self._tb = None
    if self._tb is not None:
      for key, value in record.items():
        if key != "step" and isinstance(value, int | float) and not isinstance(value, bool):
          self._tb.add_scalar(key, value, record["step"])

  def close(self) -> None:
    """Closes the file (and the TensorBoard writer)."""
    if self._fd is None:
      return
    with contextlib.suppress(OSError):
      os.close(self._fd)
    if self._tb is not None:
      _close_tensorboard(self._tb, self.path.parent / "tensorboard")


def _event_writers(writer: Any) -> list[Any]:
  return [w.event_writer for w in (getattr(writer, "all_writers", None) or {}).values()]


def _tensorboard_alive(writer: Any) -> bool:
  """Whether every writer thread of a tensorboardX writer still runs."""
  workers = [getattr(events, "_worker", None) for events in _event_writers(writer)]
  return all(w is None or not hasattr(w, "is_alive") or w.is_alive() for w in workers)


def _close_tensorboard(writer: Any, directory: Path, dead: bool = False) -> None:
  """Closes a tensorboardX writer; on a full disk, drops its unwritten events in one line.

  The scalars are a copy of metrics.jsonl's. tensorboardX retries a failed flush in its
  writer thread and at exit, each time with a traceback: both are stopped here.
  """
  try:
    if dead:
      raise OSError(errno.EIO, "its writer thread stopped")
    writer.close()
  except OSError as e:
    if not dead:
      log.warning("%s: the last TensorBoard events were not written (%s)", directory, _reason(e))
    for events in _event_writers(writer):
      worker = events._worker
      if worker is not None and worker.is_alive():
        with contextlib.suppress(Exception):
          worker.stop()
      events._closed = True  # its atexit cleanup then does nothing

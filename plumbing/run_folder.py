"""
The run folder (--out-dir) on disk: one writer at a time, writes that fail cleanly, starting over only on purpose.

    lock = RunFolderLock(out_dir).acquire()   # RunFolderBusy (names the holder's PID) if another process writes
    atomic_write(path, data)                  # temp file, fsync, rename; WriteError (one line) if it fails,
                                              #   with the temp file removed and the old file intact
    append_line(path, text)                   # a metrics row; a failed append leaves the file as it was
    check_new_run(out_dir, overwrite, ...)    # may a new run start here? RunFolderTaken (one line) if not
    metrics_problem(metrics_path, size)       # --resume: is metrics.jsonl still what the checkpoint saw?
    take_over(out_dir, metrics_kept)          # after the first step: clear the old run, or cut metrics back
    lock.release()

The lock is fcntl.flock on out_dir/.lock: the kernel drops it when the process ends, however it ends (kill -9
included), so a crash never leaves a stale lock. The file holds the holder's PID, for the refusal message.
It keeps other processes out; within one process (e.g. tests that build several trainers) it is shared.
"""

import contextlib
import errno
import fcntl
import json
import os
import shutil

LOCK_NAME = ".lock"
RUN_FILES = ("checkpoint.pt", "metrics.jsonl", "config.json")  # what --overwrite replaces
TEMPORARIES = tuple(name + ".tmp" for name in RUN_FILES)
_HELD = {}  # real path of a folder -> [fd, users]: the locks this process holds


class RunFolderBusy(Exception):
    """Another live process writes this run folder."""


class RunFolderTaken(Exception):
    """The folder holds files a new run may not replace; the message says what to do."""


class WriteError(Exception):
    """A file of the run could not be written (disk full, no permission); the message says which and why."""


class RunFolderLock:
    """An exclusive, kernel-released lock on one run folder."""

    def __init__(self, folder):
        self.folder = folder
        self.path = os.path.join(folder, LOCK_NAME)
        self.fd = None
        self.created_folder = False

    def acquire(self):
        """Take the lock or raise RunFolderBusy. Creates the folder if needed (release() removes it again if
        nothing else was written into it)."""
        try:
            if not os.path.isdir(self.folder):
                os.makedirs(self.folder)
                self.created_folder = True
            self.key = os.path.realpath(self.folder)
            if self.key in _HELD:  # this process holds it already
                _HELD[self.key][1] += 1
                self.fd = _HELD[self.key][0]
                return self
            while True:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    holder = os.read(fd, 64).decode("ascii", "replace").strip() or "?"
                    os.close(fd)
                    raise RunFolderBusy(f"{self.folder} is being written by another process (pid {holder}); wait "
                                        f"for it to end or stop it, or choose another --out-dir") from None
                # A holder that cleaned up may have unlinked the file between our open and flock: then we hold
                # a lock on a file nobody else will see, so start again with the current one.
                try:
                    if os.fstat(fd).st_ino == os.stat(self.path).st_ino:
                        break
                except FileNotFoundError:
                    pass
                os.close(fd)
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        except OSError as e:
            raise WriteError(f"cannot write into {self.folder}: {e.strerror}; choose another --out-dir") from None
        self.fd = fd
        _HELD[self.key] = [fd, 1]
        return self

    def release(self):
        """Drop the lock. A folder that acquire() created and that holds nothing but the lock file is removed:
        a run refused at the start leaves no trace."""
        if self.fd is None:
            return
        _HELD[self.key][1] -= 1
        if _HELD[self.key][1] > 0:  # another user in this process still holds it
            self.fd = None
            return
        del _HELD[self.key]
        if self.created_folder:
            with contextlib.suppress(OSError):
                if os.listdir(self.folder) == [LOCK_NAME]:
                    os.unlink(self.path)
                    os.rmdir(self.folder)
        os.close(self.fd)
        self.fd = None


def _write_error(path, error, nbytes=None, existed=True):
    """WriteError naming the file, the reason and, when known, the bytes needed and free; then what is left
    (the previous file, if there was one) and what to do next: --resume only if the folder has a checkpoint."""
    need = ""
    if nbytes is not None:
        try:
            free = shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free
            need = f" ({nbytes:,} bytes needed, {free:,} free)"
        except OSError:
            need = f" ({nbytes:,} bytes needed)"
    hint = "free some disk space" if error.errno in (errno.ENOSPC, errno.EDQUOT) else "check the folder"
    kept = "the previous file is intact" if existed else "nothing was written"
    if os.path.exists(os.path.join(os.path.dirname(os.path.abspath(path)), "checkpoint.pt")):
        then = "continue with --resume"
    else:
        then = "start the run again (with --overwrite: no checkpoint was saved yet)"
    return WriteError(f"could not write {path}: {error.strerror or error}{need}; {kept}: {hint}, then {then}")


def atomic_write(path, data):
    """Replace `path` by `data` (bytes) all at once: a temporary file, fsync, rename. On failure the temporary
    file is removed, `path` keeps its old content, and WriteError says what happened."""
    tmp = path + ".tmp"
    existed = os.path.exists(path)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise _write_error(path, e, len(data), existed) from None


def append_line(path, text):
    """Append text (one line, with its newline) to path; on failure the file is cut back to its old length."""
    data = text.encode()
    size = os.path.getsize(path) if os.path.exists(path) else 0
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.truncate(path, size)
        raise _write_error(path, e, len(data), existed=size > 0) from None


def leftover_run_files(folder):
    """The RUN_FILES that exist in folder."""
    return [name for name in RUN_FILES if os.path.exists(os.path.join(folder, name))]


def written_by_a_run(path, is_run_checkpoint):
    """True if path is a file a training run writes: a metrics.jsonl or config.json as a run writes them (rows
    with "step" and "split"; the resolved settings with "model_name", "model_config" and "out_dir"; an empty
    file holds nothing to lose), or a checkpoint.pt for which is_run_checkpoint(path) says so (the checkpoint
    module knows its format)."""
    if os.path.basename(path) == "checkpoint.pt":
        return is_run_checkpoint(path)
    try:
        with open(path, "rb") as f:
            if os.path.basename(path) == "metrics.jsonl":
                first = f.readline(1 << 20)
                return not first or _has_keys(first, ("step", "split"))
            data = f.read(1 << 26)
            return not data or _has_keys(data, ("model_name", "model_config", "out_dir"))
    except OSError:
        return False


def check_new_run(folder, overwrite, auto, is_run_checkpoint):
    """May a new run start in folder? Yes if it holds no run files, or with --overwrite if each is a file a run
    wrote (never, e.g., a convert_hf.py export's config.json). --resume auto (auto) restarts its own attempt that
    saved no checkpoint (a requeued job). Returns a line to print, or None; RunFolderTaken otherwise.
    Deletes nothing: take_over() does, after the new run's first step."""
    leftover = leftover_run_files(folder)
    foreign = [name for name in leftover if not written_by_a_run(os.path.join(folder, name), is_run_checkpoint)]
    if foreign:
        raise RunFolderTaken(f"{folder} holds {' and '.join(foreign)} that no training run wrote (or that cannot "
                             f"be read); a run replaces only its own files: move them away or choose another "
                             f"--out-dir")
    if "checkpoint.pt" in leftover and not overwrite:
        raise RunFolderTaken(f"{folder} already holds a run (checkpoint.pt); add --resume to continue it, "
                             f"--overwrite to start over, or choose another --out-dir")
    if leftover and not overwrite:
        if not auto:
            raise RunFolderTaken(f"{folder} holds {' and '.join(leftover)} of a run that saved no checkpoint; add "
                                 f"--overwrite to start over, or choose another --out-dir")
        return f"--resume auto: replacing {' and '.join(leftover)} of the attempt that saved no checkpoint"
    return None


def take_over(folder, metrics_kept=None):
    """Make folder the new run's (call while holding the lock): remove a crash's temporaries; then a resumed
    run (metrics_kept: the metrics.jsonl bytes its checkpoint saw) drops the rows the interrupted process logged
    after its checkpoint, and a new run clears the old run's files (check_new_run allowed each)."""
    remove_stale_temporaries(folder)  # only our own *.tmp names (TEMPORARIES)
    metrics = os.path.join(folder, "metrics.jsonl")
    if metrics_kept is None:
        clear_run_files(folder)
    elif os.path.exists(metrics):
        os.truncate(metrics, metrics_kept)  # metrics_problem made sure the file is not shorter


def _has_keys(text, keys):
    try:
        value = json.loads(text)
    except ValueError:
        return False
    return isinstance(value, dict) and all(k in value for k in keys)


def remove_stale_temporaries(folder):
    """Delete the temporary files a crash may have left (call while holding the lock)."""
    for name in TEMPORARIES:
        with contextlib.suppress(FileNotFoundError, IsADirectoryError):
            os.unlink(os.path.join(folder, name))


def clear_run_files(folder):
    """Delete a previous run's checkpoint, metrics and config (--overwrite), once the new run has made its first
    step; check_new_run made sure before that each is a run's own file."""
    for name in RUN_FILES + TEMPORARIES:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(folder, name))


def metrics_problem(metrics_path, expected_size):
    """None if metrics_path holds at least the expected_size bytes a checkpoint recorded, else why not."""
    size = os.path.getsize(metrics_path) if os.path.exists(metrics_path) else 0
    if size >= expected_size:
        return None
    return (f"{metrics_path} holds {size:,} bytes but the checkpoint was saved after {expected_size:,}: the "
            f"metrics were replaced or cut since; restore them, or start over with --overwrite")

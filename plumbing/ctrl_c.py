"""
Ctrl-C in a script a user runs ends with one line, "interrupted", and exit code 130 (what a shell shows for
Ctrl-C) wherever the script does not catch it, never with a KeyboardInterrupt traceback:

- while the script's own imports run (torch, numpy, matplotlib: the first second or two) it stops at once. A
  KeyboardInterrupt raised inside an import can come out as another error (numpy turns it into an ImportError
  traceback), so none is raised there;
- later, KeyboardInterrupt is raised as usual: code that catches it works as before (the trainer saves a
  checkpoint, the data preparer stops its workers) and `finally` blocks run (temporary files are removed). Only
  the report of one that nothing catches changes: this line instead of a traceback.

Every script a user runs imports it first:

    from plumbing import ctrl_c  # noqa: F401  (first: Ctrl-C during the imports below is one line, exit 130)
"""

import os
import signal
import sys
import threading


def _stop():
    try:
        sys.stdout.flush()
    except (OSError, ValueError):  # a closed or broken stdout: the line still goes to stderr
        pass
    print("interrupted", file=sys.stderr, flush=True)
    os._exit(130)  # Python itself would end killed by SIGINT: exit -2 for the process that started it


def _importing_at_top_level(frame):
    """True while the script's top-level code imports a module: the frame just above the script's own (the
    outermost) belongs to importlib. Once main() runs, that frame is main's."""
    frames = []
    while frame is not None:
        frames.append(frame)
        frame = frame.f_back
    return len(frames) > 1 and frames[-2].f_code.co_filename.startswith("<frozen importlib")


def _on_sigint(signum, frame):
    if _importing_at_top_level(frame):
        _stop()
    signal.default_int_handler(signum, frame)  # raises KeyboardInterrupt, as Python's own handler does


def _on_uncaught(kind, value, traceback):
    if issubclass(kind, KeyboardInterrupt):
        _stop()
    _python_hook(kind, value, traceback)


_python_hook = sys.excepthook
sys.excepthook = _on_uncaught
# Only in the main thread (signal handlers live there), and not where SIGINT is ignored (e.g. started with nohup).
if threading.current_thread() is threading.main_thread() and \
        signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    signal.signal(signal.SIGINT, _on_sigint)

"""Work functions that misbehave on purpose, for the executor tests: a module that Ray's workers can
import (the tests put this folder on their PYTHONPATH) and a local pool's processes too (they inherit
``sys.path``). Each takes the keyword arguments of ``runs.ensure_run``."""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from decoflow_core import files
from decoflow_core.analysis import runs


def killed_after_first_task(doomed: str, **job):
    """``ensure_run``, except that the worker training the run named ``doomed`` is killed (SIGKILL, as
    the kernel's OOM killer does) right after its first task is committed to progress.json."""
    if runs.run_dir(**{k: v for k, v in job.items() if k != "progress_bar"}).name == doomed:
        write_json = files.write_json

        def write_then_die(path, obj):
            write_json(path, obj)
            if Path(path).name == "progress.json":
                os.kill(os.getpid(), signal.SIGKILL)

        files.write_json = write_then_die  # only in this worker, which does not survive it
    return runs.ensure_run(**job)


def train_nothing(*, progress_bar: bool, **job) -> Path:
    """Claims success without writing the run: as a worker writing to a run root the driver cannot see."""
    return runs.run_dir(**job)


def sleep_forever(pid_file: str, *, progress_bar: bool, **job) -> None:
    """Writes this worker's process id to ``pid_file``, then sleeps until it is stopped."""
    Path(pid_file).write_text(str(os.getpid()))
    time.sleep(3600)

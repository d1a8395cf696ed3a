"""Lightning's ``fast_dev_run`` (a smoke test of a few batches) with the tracker attached.

The smoke test should find what the tracker refuses (its checks at the fit's start and first step run as in a real
fit), but it is not the run: Lightning writes no checkpoint and no logger output then. The tracker writes its log into
a temporary folder, deleted when the fit ends, so ``log_dir`` is left as it was: a smoke test neither replaces a log
there (``overwrite=True``) nor makes the real fit that follows refuse ``log_dir`` as already holding a log.
"""

from __future__ import annotations

import shutil
import tempfile
from typing import Any

from lightning.pytorch.utilities import rank_zero_info


class DevRun:
    """Swaps the tracker's ``log_dir`` for a temporary folder during a ``fast_dev_run`` fit, and back at its end."""

    def __init__(self) -> None:
        self._kept: tuple[str, str] | None = None  # (the tracker's log_dir, the temporary folder)

    def start(self, trainer: Any, tracker: Any) -> None:
        """At ``on_fit_start``: under ``fast_dev_run``, point ``tracker.log_dir`` at a temporary folder (rank 0's,
        shared by every process)."""
        if not getattr(trainer, "fast_dev_run", False):
            return
        folder = tempfile.mkdtemp(prefix="influence-fast-dev-run-") if trainer.is_global_zero else None
        folder = trainer.strategy.broadcast(folder)
        self._kept = (tracker.log_dir, folder)
        tracker.log_dir = folder
        rank_zero_info(f"InfluenceTracker: fast_dev_run: the log is written to a temporary folder, deleted at the end; "
                       f"{self._kept[0]} is left as it was")

    def end(self, trainer: Any, tracker: Any) -> None:
        """At ``teardown`` or ``on_exception``: ``log_dir`` back, the temporary log deleted (by rank 0)."""
        if self._kept is None:
            return
        tracker.log_dir, folder = self._kept
        self._kept = None
        if trainer.is_global_zero:
            shutil.rmtree(folder, ignore_errors=True)

"""Recorded steps on their way to the log writer: their device-to-host copies in flight, handed on a few at a time.

Up to :data:`IN_FLIGHT` steps stay in flight, so training never waits for the device at a step, and steps are handed
on a few at a time (on the CPU: ``IN_FLIGHT + 1`` at once, whose checks then run back to back, on warm caches: far
cheaper than one step at a time between two training steps). A fit's first step is handed on at once, so whatever it
would refuse is refused at the first step. Each step's ids are checked when it is handed on (``check_ids``: not batch
by batch).
"""

from __future__ import annotations

from collections import deque
from typing import Any

from lightning_influence.capture.transfer import HostCopy
from lightning_influence.data import check_ids
from lightning_influence.log.writer import CheckpointRecord, LogWriter, StepRecord
from lightning_influence.step.pending import fill_record

IN_FLIGHT = 2  # steps whose device-to-host copies may still be running before the tracker waits for the oldest


class InFlight:
    """The steps recorded but not yet handed to the writer, oldest first."""

    def __init__(self) -> None:
        self._steps: deque[tuple[StepRecord, CheckpointRecord | None, HostCopy]] = deque()

    def add(self, record: StepRecord, checkpoint: CheckpointRecord | None, copy: HostCopy) -> None:
        """Queue a step (handed on by :meth:`land`: at once for a fit's first step, else keeping :data:`IN_FLIGHT`)."""
        self._steps.append((record, checkpoint, copy))

    def land(self, writer: LogWriter, ids_key: str, dataset_size: int | None, live: Any = None, keep: int = 0) -> None:
        """Once more than ``keep`` steps are in flight, hand them to ``writer``, oldest first: all whose copies are
        done, and any beyond ``keep`` (``live``: a live TensorBoard told of each)."""
        if len(self._steps) <= keep:
            return
        while self._steps and (len(self._steps) > keep or self._steps[0][2].ready()):
            record, checkpoint, copy = self._steps.popleft()
            fill_record(record, checkpoint, copy.wait())
            check_ids(record.ids, ids_key, dataset_size)
            writer.add_step(record, checkpoint)  # validates: a non-finite value raises, naming step and sample ids
            if live is not None:
                live.on_step(record.step, record, writer.bytes_written)

    def drop_from(self, step: int) -> None:
        """Forget the steps from ``step`` on (a step refused after it was recorded)."""
        self._steps = deque(entry for entry in self._steps if entry[0].step < step)

    def clear(self) -> None:
        self._steps.clear()

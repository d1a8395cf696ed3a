"""The micro-batches of a logged step as they ran: ids, random states and stored inputs, checked against the
step's CRC-32 (``docs/log-format.md``, version 2; :meth:`lightning_influence.log.reader.InfluenceLog.micro_batches`)."""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from lightning_influence.log.format import MICRO_COLUMNS, LogFormatError, reading, restore_hint

if TYPE_CHECKING:
    from lightning_influence.log.reader import InfluenceLog

__all__ = ["MicroBatchRecord", "read_micro_batches"]


@dataclass
class MicroBatchRecord:
    """One micro-batch of a step as it ran (format version 2; a version-1 step is one micro-batch of all its ids).

    Attributes:
        ids: its sample ids.
        cpu_rng: the CPU generator state at its forward (``uint8``), ``None`` if it drew no CPU number.
        cuda_rng: ``(n_devices, 16)`` ``uint8`` CUDA generator states, ``None`` if it drew on no GPU.
        inputs: ``torch.save`` bytes of the batch fed to ``training_step``, ``None`` if not stored.
    """

    ids: np.ndarray
    cpu_rng: np.ndarray | None = None
    cuda_rng: np.ndarray | None = None
    inputs: bytes | None = None


def drew_random_numbers(log: "InfluenceLog", step: int) -> bool:
    """Whether a micro-batch of ``step`` recorded a generator state (its forward drew random numbers), from the
    micro-batch table alone (no states or stored inputs are read; a version-1 log records none)."""
    for seg, row in log._locs(step):
        s = log._segs[seg]
        off, n = int(s.table["micro_offset"][row]), int(s.table["micro_batches"][row])
        if off >= 0 and any((np.asarray(log._rows(seg, f"micro/{c}", off, n)) >= 0).any()
                            for c in ("cpu_rng", "cuda_rng")):
            return True
    return False


def read_micro_batches(log: "InfluenceLog", step: int) -> list[MicroBatchRecord]:
    """The micro-batches of ``step`` of ``log`` in the order they ran (ranks in rank order)."""
    out = []
    for seg, row in log._locs(step):
        s = log._segs[seg]
        ids = log._read(seg, row, "id")
        off, n = int(s.table["micro_offset"][row]), int(s.table["micro_batches"][row])
        if off < 0:  # version 1
            out.append(MicroBatchRecord(ids))
            continue
        with reading(s.path, f"the micro-batches of step {step}"):
            cols = {c: np.array(log._rows(seg, f"micro/{c}", off, n)) for c in MICRO_COLUMNS}
            f = log._file(seg)
            crc, start = 0, 0
            for i in range(n):
                size = int(cols["size"][i])
                rec = MicroBatchRecord(ids[start:start + size])
                start += size
                if cols["cpu_rng"][i] >= 0:
                    rec.cpu_rng = f["rng/cpu"][int(cols["cpu_rng"][i])]
                    crc = zlib.crc32(rec.cpu_rng, crc)
                if cols["cuda_rng"][i] >= 0:
                    flat = f["rng/cuda"][int(cols["cuda_rng"][i])]
                    crc = zlib.crc32(flat, crc)
                    rec.cuda_rng = flat.reshape(-1, 16)
                if cols["input_offset"][i] >= 0:
                    o, k = int(cols["input_offset"][i]), int(cols["input_length"][i])
                    rec.inputs = f["inputs/bytes"][o:o + k].tobytes()
                    crc = zlib.crc32(rec.inputs, crc)
                crc = zlib.crc32(np.asarray([size, cols["cpu_rng"][i] >= 0, cols["cuda_rng"][i] >= 0,
                                             cols["input_length"][i]], np.int64), crc)
                out.append(rec)
        if crc != int(s.table["micro_crc32"][row]) or start != len(ids):
            raise LogFormatError(s.path, f"the micro-batch rows of step {step} fail their CRC-32 or do not cover "
                                         f"its samples: the file is corrupted. {restore_hint(s.path)}")
    return out

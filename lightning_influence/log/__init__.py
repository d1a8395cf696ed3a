"""Storage: the versioned HDF5 influence-log format, its writer and its reader."""

from lightning_influence.log.format import FORMAT_VERSION, LogFormatError
from lightning_influence.log.reader import InfluenceLog, StepBatch
from lightning_influence.log.writer import CheckpointRecord, LogWriteError, LogWriter, StepRecord

__all__ = ["FORMAT_VERSION", "CheckpointRecord", "InfluenceLog", "LogFormatError", "LogWriteError", "LogWriter",
           "StepBatch", "StepRecord"]

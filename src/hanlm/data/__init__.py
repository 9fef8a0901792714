"""The data layer: every stage reads its records through here (see loader.py)."""

from hanlm.data.loader import (
    DataStats,
    LoadedData,
    load,
    or_demo,
    stream,
    stream_with_stats,
    to_dataset,
)
from hanlm.data.sources import DataError, Location
from hanlm.stage import Command

__all__ = [
    "DataError",
    "DataStats",
    "LoadedData",
    "Location",
    "load",
    "or_demo",
    "stream",
    "stream_with_stats",
    "to_dataset",
]

COMMANDS = (
    Command(
        "data check",
        "hanlm.data.check",
        "DataCheckConfig",
        "detect the format of data files, count and list bad records, show lengths and samples",
        positional="paths",
        usage="PATH [PATH ...]",
    ),
    Command(
        "data prepare",
        "hanlm.data.prepare",
        "DataPrepareConfig",
        "clean, dedup, mix and split data into train/valid JSONL with counts in hanlm.json",
        positional="data.paths",
        usage="PATH [PATH ...]",
    ),
)

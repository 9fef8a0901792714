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

"""hanlm: build Chinese and bilingual chat language models end to end."""

from pathlib import Path

__version__ = "0.1.0"

# The small embedded default data (demo corpora, SFT/preference sets, benchmarks): one place.
ASSETS = Path(__file__).resolve().parent / "assets" / "demo"

# Label value the loss ignores (prompt tokens, padding); defined once for every stage.
IGNORE_INDEX = -100

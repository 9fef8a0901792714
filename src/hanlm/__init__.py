"""hanlm: build Chinese and bilingual chat language models end to end."""

__version__ = "0.1.0"

# Label value the loss ignores (prompt tokens, padding); defined once for every stage.
IGNORE_INDEX = -100

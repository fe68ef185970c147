"""The data path: file -> rows (``readers``) -> ``Example`` (``formats``) -> ``TokenizedExample``
(``tokenize``) -> batches (``collate``). :func:`load_dataset` runs the first three in one call.
"""

from preftune.data.errors import DataError
from preftune.data.formats import chosen_as_sft, pairs_to_unpaired, to_example
from preftune.data.load import load_dataset
from preftune.data.readers import read_rows
from preftune.data.records import Example, Location, TokenizedExample
from preftune.data.report import DataReport
from preftune.data.tokenize import tokenize_example

__all__ = [
    "DataError", "DataReport", "Example", "Location", "TokenizedExample", "chosen_as_sft", "load_dataset",
    "pairs_to_unpaired", "read_rows", "to_example", "tokenize_example",
]

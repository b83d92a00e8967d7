"""Data: the unlearning benchmark, MIA documents, MMLU, and training tokenization."""

from unlearn_search.data.benchmark import Benchmark, Item, item_kind, load_benchmark, load_set
from unlearn_search.data.locate import DataPaths, fetch, resolve_data
from unlearn_search.data.mia import Document, load_documents
from unlearn_search.data.mmlu import Question, load_mmlu
from unlearn_search.data.tokenize import Encoded, collate, encode, length_bucketed_batches, separator

__all__ = [
    "Benchmark",
    "DataPaths",
    "Document",
    "Encoded",
    "Item",
    "Question",
    "collate",
    "encode",
    "fetch",
    "item_kind",
    "length_bucketed_batches",
    "load_benchmark",
    "load_documents",
    "load_mmlu",
    "load_set",
    "resolve_data",
    "separator",
]

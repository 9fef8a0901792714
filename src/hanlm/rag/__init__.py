"""Retrieval: chunking, a faiss + BM25 index of a model's own embeddings, grounded answers."""

from hanlm.stage import Command

COMMANDS = (
    Command(
        "rag index",
        "hanlm.rag.index",
        "RagIndexConfig",
        "chunk documents and index them with a model's embeddings (faiss) and BM25",
        positional="docs",
        usage="DOC [DOC ...]",
        func="run_index",
    ),
    Command(
        "rag add",
        "hanlm.rag.index",
        "RagAddConfig",
        "add documents to a rag index with the model and settings it records",
        positional="docs",
        usage="DOC [DOC ...]",
        func="run_add",
    ),
    Command(
        "rag search",
        "hanlm.rag.index",
        "RagSearchConfig",
        "print the passages a rag index ranks highest for a query, with their sources",
        positional="args",
        usage="IDX QUERY [QUERY ...]",
        func="run_search",
    ),
    Command(
        "rag ask",
        "hanlm.rag.answer",
        "RagAskConfig",
        "answer from retrieved passages, citing them as [1], [2]; sources listed",
        positional="args",
        usage="IDX MODEL_DIR QUESTION [QUESTION ...]",
    ),
)

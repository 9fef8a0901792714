"""Retrieval: chunking, a faiss + BM25 index of a model's own embeddings, grounded answers."""

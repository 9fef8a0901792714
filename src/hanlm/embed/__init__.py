"""Sentence embeddings from a decoder: pooling (`hanlm embed`) and contrastive training."""

"""Data generation against a model: self-instruct and self-chat (`hanlm data self-instruct`)."""

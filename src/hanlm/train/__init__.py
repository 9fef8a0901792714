"""Training a model on text and conversations: `hanlm pretrain` and `hanlm sft`."""

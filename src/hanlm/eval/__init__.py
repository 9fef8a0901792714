"""Evaluation: `hanlm eval` (benchmarks, perplexity, probes, samples) and the contamination
audit."""

"""Tokenizer training, data preprocessing, benchmarks."""

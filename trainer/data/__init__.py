"""Tokenizers, datasets and the embedded corpus."""

"""Data sources, tokenizers and token streams for training stages."""

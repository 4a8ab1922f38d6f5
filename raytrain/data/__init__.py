"""Data curation: read, extract, normalize, filter, dedup, split, tokenize, pack."""

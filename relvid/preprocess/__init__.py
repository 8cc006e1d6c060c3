"""Exemplar videos -> clip cache: sources, decoding, subject masks, encoding, the pipeline."""

"""Compression methods. Importing the package registers the decoder of every stored kind."""

from . import factors, raw, rows  # noqa: F401  (register the "svd-mixed", "raw", "rows" decoders)

"""Everything that reads or writes a file: model checkpoints (folders, shards, GGUF) and the
transformers helpers around them, the delta artifact and its manifest schema, added vocabulary,
calibration and evaluation text."""

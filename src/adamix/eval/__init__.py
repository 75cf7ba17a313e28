"""Measuring and showing a delta: held-out error and embedding agreement (heldout), the summaries that
`compress` and `inspect` print (report), and the end-to-end demo on the real MiniLM pair (demo)."""

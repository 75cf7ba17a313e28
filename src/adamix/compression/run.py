"""`compress`: one run, in this process (compression.pipeline) or as Ray tasks (compression.ray_executor,
`executor="ray"`)."""

from __future__ import annotations

import os

from . import pipeline, ray_executor


def compress(base: str | os.PathLike, finetuned: str | os.PathLike, out: str | os.PathLike, **options) -> dict:
    return (ray_executor.compress_ray if options.get("executor", "local") == "ray" else pipeline.compress)(
        base, finetuned, out, **options)


compress.__doc__ = pipeline.compress.__doc__ + """
    executor="ray" (workers=N, ray_address=ADDR) runs the run's N shards as Ray tasks and assembles
    them (compression.ray_executor): the same artifact."""

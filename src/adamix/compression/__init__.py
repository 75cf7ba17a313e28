"""The compression path: options, planning (pairing and shapes), preflight checks, calibration,
encoding, the work folder (resume), and the pipeline that runs them (`compress`)."""

from .options import Options
from .run import compress

__all__ = ["Options", "compress"]

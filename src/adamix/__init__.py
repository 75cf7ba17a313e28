"""adamix: store a fine-tuned model as a tiny mixed-precision delta against its base (ADAMIX).

    adamix.compress(base, finetuned, out, ratio="1/16")   # -> manifest dict; writes the delta folder
    adamix.merge(base, delta, out)                         # -> restored Hugging Face checkpoint
    adamix.load(delta)                                     # -> Artifact (manifest, per-tensor D^)
"""

__version__ = "0.1.0"

from .errors import AdamixError  # noqa: E402
from .artifact import Artifact, load  # noqa: E402
from .merge import merge  # noqa: E402
from .pipeline import compress  # noqa: E402

__all__ = ["AdamixError", "Artifact", "compress", "merge", "load", "__version__"]

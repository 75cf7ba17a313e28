"""adamix: store a fine-tuned model as a tiny mixed-precision delta against its base (ADAMIX).

    adamix.compress(base, finetuned, out, ratio="1/16")   # -> manifest dict; writes the delta folder
    adamix.merge(base, delta, out)                         # -> restored Hugging Face checkpoint
    adamix.load(delta)                                     # -> Artifact (manifest, per-tensor D^)
    adamix.MultiTenantModel(base).attach("alice", delta)   # serve many deltas on one base
    adamix.export_peft(base, delta, out)                   # -> PEFT LoRA adapter folder

The packages follow the data flow: compression/ (the pipeline) -> methods/ (the Method registry) ->
quant/ (grids, GPTQ, packing); io/ reads and writes every file; serve/ and export/ use what
compress wrote. docs/architecture.md draws it.
"""

from .version import __version__
from .errors import AdamixError
from .io.artifact import Artifact, load
from .compression import Options, compress
from .export.merge import merge
from .export.peft import export_peft
from .serve import MultiTenantModel

__all__ = ["AdamixError", "Artifact", "MultiTenantModel", "Options", "compress", "export_peft", "load", "merge",
           "__version__"]

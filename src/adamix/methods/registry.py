"""The Method protocol and the registry of methods.

A method is one module of this package that subclasses `Method`, sets what it declares and
registers an instance (`register(MyMethod())`); `methods/__init__.py` imports the module, which is
the method's one registration line. Everything outside methods/ asks the registry (`get`, `names`)
and the instance: nothing there names a method or branches on one.

What a method declares:
  name, help        its `--method` name and one line of help;
  unit              what one kept item is, for messages ("singular triplet or row");
  options           the method-specific compression options it accepts (compression.options marks
                    which options are method-specific; any other method refuses them in one line);
  needs_calibration whether it refuses the data-free mode (`--calib none`);
  kinds             the stored kinds it writes (methods.kinds: each with its registered decoder);
  joint             whether it can join a shared allocation (`--budget-scope block`: one allocation
                    over the linears of a transformer block; `--budget-scope model`: one over every
                    matrix of the model, in two passes): then the methods of the "shared allocation"
                    section below are implemented;
and implements:
  check(settings)                        refuse settings it cannot meet (one AdamixError);
  item_bits(m, n, settings)              its size model: stored bits of the cheapest item it can
                                         keep of an m x n delta (None: a fixed size, no ratio check);
  stored_alpha(settings)                 the ratio its matrices take (default: alpha asked);
  compress(D, H, settings, overhead_bits) -> Encoded, within budget_bits(m, n, alpha, overhead_bits);
  whole_model_step(options)              a step over the whole compressed model after every tensor
                                         is encoded (BitDelta's scale distillation), or None.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch
from torch import nn

from ..errors import AdamixError
from .kinds import DECODERS, Encoded


@dataclass(frozen=True)
class Settings:
    """What the methods are told, and where the compression options' defaults are written.
    method: a registered name (`names()`); alpha: compressed bits / fp16 bits of the delta;
    widths: the bit-widths a singular triplet (or row) may take, 0 = dropped."""
    method: str = "adamix"
    alpha: float = 1 / 16
    widths: tuple[int, ...] = (0, 2, 3, 4, 8)
    group_size: int = 128
    damp: float = 0.01
    fit_damp: float = 1e-4
    whiten: bool = True           # SVD of D H^1/2: truncation optimal in the output error, the error table exact for drops
    budget_scope: str = "tensor"  # "tensor": alpha per tensor; "block": one ILP per block; "model": one over the model
    correct_target: bool = True   # U step re-fitted to the original outputs (ADAMIX) or U S kept (Delta-CoMe)
    max_rank: int | None = None   # at most this many triplets (rank-1 terms) kept per matrix (vLLM's LoRA slots)
    value_bits: int | None = None  # bits per kept value of the sparse peers (16: fp16; 1..8; None: the method's default)
    quantize: bool = False        # ImPart-Qt: the kept factor values quantized by mixed-precision GPTQ
    seed: int = 0                 # mixed into the seeds of the random masks (the result is deterministic)
    svd: str = "gram"             # the SVD's algorithm (quant.linalg.SVD_ALGORITHMS): smaller Gram's eigh, or LAPACK's SVD
    grid: str = "uniform"         # GRIDS: per-group uniform grids, or a Hadamard rotation and quant.normal's Gaussian grid


GRIDS = ("uniform", "normal")


def budget_bits(m: int, n: int, alpha: float, overhead_bits: float = 0.0) -> float:
    """Bits an m x n delta's stored tensors may take: alpha * 16 * m * n less its share of the
    artifact's header and manifest (`overhead_bits`)."""
    return alpha * 16 * m * n - overhead_bits


@dataclass
class ModelContext:
    """What a whole-model step may use, given by the pipeline so that methods need no file or model
    code: the fine-tune (teacher) and the base with some tensors replaced (student), built on `device`;
    param_names(model) maps checkpoint tensor names to the model's parameter names."""
    teacher: Callable[[], nn.Module]
    student: Callable[[Callable[[str], torch.Tensor]], nn.Module]
    base_tensor: Callable[[str], torch.Tensor]
    param_names: Callable[[nn.Module], dict[str, str]]
    windows: list[torch.Tensor]
    device: str = "cpu"
    progress: bool = True


ModelStep = Callable[[dict[str, tuple[Encoded, bool]], ModelContext], dict]


class Method:
    """Base class of a compression method (see the module doc for what a subclass declares)."""
    name: ClassVar[str] = ""
    help: ClassVar[str] = ""
    unit: ClassVar[str] = "item"
    options: ClassVar[frozenset[str]] = frozenset()
    needs_calibration: ClassVar[bool] = False
    kinds: ClassVar[tuple[str, ...]] = ()
    joint: ClassVar[bool] = False
    # compress runs on the device of D and H (a CUDA GPU with --device cuda) and returns its stored
    # tensors on the CPU; False: the pipeline gives it D and H on the CPU whatever --device says
    device_resident: ClassVar[bool] = False

    def check(self, settings: Settings) -> None:
        """Refuse settings this method cannot meet (one AdamixError). Default: accept."""

    def item_bits(self, m: int, n: int, settings: Settings) -> float | None:
        """Stored bits of the cheapest item this method can keep of an m x n delta (either
        orientation); None where the size is fixed (nothing to check against the ratio)."""
        raise NotImplementedError

    def stored_alpha(self, settings: Settings) -> float:
        """The ratio this method's matrices take (the budget of the row-sparse alternative of a
        data-free matrix, see compression.encode)."""
        return settings.alpha

    def compress(self, D: torch.Tensor, H: torch.Tensor | None, settings: Settings, overhead_bits: float = 0.0,
                 factors: tuple[torch.Tensor, ...] | None = None, analysis: Any = None) -> Encoded:
        """Encode one delta D (m x n, y = W x) with input Gram H (n x n, None = data-free) within
        budget_bits(m, n, settings.alpha, overhead_bits). factors: svd(D) and analysis: a precomputed
        `analyse`, where the method uses them and a caller (a benchmark) already has them."""
        raise NotImplementedError

    # --- a shared allocation (joint = True) ----------------------------------------------------

    def analyse(self, D: torch.Tensor, H: torch.Tensor | None, settings: Settings, overhead_bits: float = 0.0) -> Any:
        raise NotImplementedError

    def compress_joint(self, analyses: list, settings: Settings) -> list[Encoded]:
        raise NotImplementedError

    # the two-pass form (`--budget-scope model`): pass 1 analyses each matrix and stashes it on disk
    # (stash), one allocation over the stashed tables decides (allocate_joint), pass 2 unstashes and
    # completes each matrix; compress_joint(analyses) == [complete_joint(a, c) for a, c in
    # zip(analyses, allocate_joint([(a's table, costs, budget) for a in analyses]))], byte for byte.

    def allocate_joint(self, parts: list, settings: Settings, weights: list[float] | None = None) -> list:
        """One allocation over several (error table (r, B), costs (B,), budget in bits): minimise
        sum_l weights[l] * error_l within the sum of the budgets; one decision per part."""
        raise NotImplementedError

    def complete_joint(self, analysis: Any, decision: Any, settings: Settings) -> Encoded:
        raise NotImplementedError

    def stash(self, analysis: Any) -> dict[str, torch.Tensor]:
        """The analysis as CPU tensors to keep on disk (without D and H), among them "table" (r, B),
        "costs" (B,) and "budget" (1,): the allocation reads these three alone."""
        raise NotImplementedError

    def unstash(self, tensors: dict[str, torch.Tensor], D: torch.Tensor, H: torch.Tensor | None) -> Any:
        raise NotImplementedError

    def joint_reserve_bits(self, settings: Settings) -> float:
        """Bits each tensor of a shared allocation sets aside (e.g. byte padding of its streams)."""
        return 0.0

    # --- a staged compression (staged = True) --------------------------------------------------
    # compress(D, H, settings, overhead_bits) == complete(p, decide(p, settings), settings) with
    # p = prepare(D, H, settings, overhead_bits), byte for byte. decide does no torch work (the ILP): the
    # pipeline runs it in a worker thread while the next matrix is prepared (compression.encode).
    staged: ClassVar[bool] = False

    def prepare(self, D: torch.Tensor, H: torch.Tensor | None, settings: Settings, overhead_bits: float = 0.0) -> Any:
        raise NotImplementedError

    def decide(self, prepared: Any, settings: Settings) -> Any:
        raise NotImplementedError

    def complete(self, prepared: Any, decision: Any, settings: Settings) -> Encoded:
        raise NotImplementedError

    # --- a whole-model step --------------------------------------------------------------------

    def whole_model_step(self, options: Any) -> ModelStep | None:
        """The step to run over every encoded tensor with these options (compression.options.Options),
        or None. It changes the Encoded in place and returns what to record in the manifest."""
        return None


_METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add `method` to the registry under method.name (a new name: registering twice is a bug). The
    kinds it declares must have their decoders registered first (methods.kinds.register_decoder)."""
    if not method.name or method.name in _METHODS:
        raise ValueError(f"method name {method.name!r} is empty or already registered")
    if missing := [k for k in method.kinds if k not in DECODERS]:
        raise ValueError(f"method {method.name!r} stores kinds with no registered decoder: {missing}")
    _METHODS[method.name] = method
    return method


def unregister(name: str) -> None:
    """Remove a method (for tests that register a toy method)."""
    _METHODS.pop(name, None)


def names() -> tuple[str, ...]:
    """Registered method names, in registration order (the default first)."""
    return tuple(_METHODS)


def get(name: str) -> Method:
    """The registered method `name`; one AdamixError naming the choices otherwise."""
    try:
        return _METHODS[name]
    except (KeyError, TypeError):
        raise AdamixError(f"--method {name!r} is not one of {', '.join(_METHODS)}") from None


def accepting(option: str) -> list[str]:
    """Names of the methods that accept the method-specific option `option`."""
    return [n for n, m in _METHODS.items() if option in m.options]

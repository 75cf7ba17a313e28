"""Every compression option in one place: its default, its help text and its checks.

`Options` is what `adamix.compress(..., **options)` takes and what `adamix compress` parses (cli.py
builds its flags from the fields below). The defaults of what the methods see (ratio, widths, group
size, ...) are those of methods.Settings, written once there. `Options.settings()` checks
everything that can be checked without reading a model, and returns the methods' Settings.

Method-specific options (metadata `method_specific`) are accepted only by the methods that list
them in their `options` (methods.registry); another method refuses them in one line.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from fractions import Fraction
from typing import Any

import torch

from ..errors import AdamixError
from ..methods import Settings, registry
from ..quant.linalg import SVD_ALGORITHMS
from .shards import parse_shard
from ..threads import available_cores

_DEFAULT = Settings()
SCOPES = ("tensor", "block", "model")
EXECUTORS = ("local", "ray")


def option(default: Any, help: str, **meta: Any):
    """A field of Options with its help text and CLI metadata: flag (default --<name>), short,
    type, choices (a callable for choices known at run time), metavar, method_specific,
    needs_calibration, cli_value (a function mapping the CLI string to the API value), negate
    (a store_false flag whose presence sets the field to False), both_ways (a switch spelled --x and
    --no-x)."""
    return field(default=default, metadata={"help": help, **meta})


def parse_ratio(value: str | float) -> float:
    """'1/16', '0.0625' or a float -> alpha in (0, 1]."""
    try:
        alpha = float(Fraction(value)) if isinstance(value, str) else float(value)
    except (ValueError, ZeroDivisionError):
        raise AdamixError(f"--ratio {value!r} is not a number or fraction such as 1/16") from None
    if not 0 < alpha <= 1:
        raise AdamixError(f"--ratio must be in (0, 1], got {value}")
    return alpha


def parse_widths(value: str | tuple | list) -> tuple[int, ...]:
    """'0,2,3,4,8' -> (0, 2, 3, 4, 8); 0 (dropping a triplet) is always allowed."""
    try:
        widths = sorted({int(b) for b in (value.split(",") if isinstance(value, str) else value)} | {0})
    except ValueError:
        raise AdamixError(f"--bits {value!r} must be comma-separated integers such as 0,2,3,4,8") from None
    if any(not 0 <= b <= 8 for b in widths) or len(widths) < 2:
        raise AdamixError(f"--bits must list widths between 1 and 8 (0 is implied), got {value!r}")
    return tuple(widths)


CALIB_HELP = ("calibration text file; 'default' uses gensim's lee_background.cor (ships with gensim, "
              "a few hundred news paragraphs); 'none' = data-free (H = I, RTN)")


@dataclass(frozen=True)
class Options:
    """The options of a compression (see the module doc); field help is the CLI's."""
    method: str = option(_DEFAULT.method, "compression method; the peers compress to the same size and format",
                         choices=registry.names)
    ratio: str | float = option(str(Fraction(_DEFAULT.alpha)), "alpha = compressed bits / fp16 bits of the delta "
                                f"(default {Fraction(_DEFAULT.alpha)})")
    calib: str | None = option("default", CALIB_HELP, cli_value=lambda v: None if v == "none" else v)
    samples: int = option(128, "calibration windows (default 128)", type=int)
    seqlen: int = option(256, "tokens per calibration window (default 256)", type=int)
    bits: str | tuple = option(",".join(map(str, _DEFAULT.widths)), "allowed bit-widths per singular vector "
                               f"(default {','.join(map(str, _DEFAULT.widths))})")
    group_size: int = option(_DEFAULT.group_size, f"entries per quantization group (default {_DEFAULT.group_size})",
                             type=int)
    device: str = option("cpu", "cpu or cuda[:N]: calibration and, for adamix and deltacome, the per-matrix "
                                "linear algebra (default cpu)")
    threads: int | None = option(None, "CPU threads for the linear algebra (default: OMP_NUM_THREADS if set, else "
                                 "every core this process may use; give fewer when other work shares the cores)", type=int, metavar="N")
    seed: int = option(_DEFAULT.seed, "mixed into the seeds of the random masks (dare, impart, ultradelta); the "
                       "result is deterministic for a given seed (default 0)", type=int)
    whiten: bool = option(_DEFAULT.whiten, "SVD of D H^1/2 instead of D: truncation optimal in the output error, "
                          "the error model exact for dropped triplets (default on; --no-whiten: the SVD of D)",
                          method_specific=True, both_ways=True)
    budget_scope: str = option(_DEFAULT.budget_scope, "tensor: every matrix gets alpha of its own size; block: one "
                               "ILP per transformer block shares the block's budget among its linears; model: one "
                               "over every matrix of the model, each error weighted by its measured effect on the "
                               "model's output (two passes; default tensor)",
                               choices=lambda: SCOPES, method_specific=True)
    slope_power: float = option(1.0, "with --budget-scope model: the weight of a calibrated linear's error is its "
                                "slope c shrunk toward the slopes' geometric mean g, c^P g^(1-P): 1 = the measured "
                                "slopes (the model's output divergence), 0 = equal weights (the pooled layer error) "
                                "(default 1)", type=float, metavar="P")
    token_rows: bool | None = option(None, "with --budget-scope model: the rows of the input embedding that the "
                                     "calibration text reads join the allocation beside its low-rank part, each "
                                     "weighted by its token count (stored kind <kind>+rows; default on with "
                                     "--budget-scope model unless --max-rank is given; --no-token-rows: the low-rank "
                                     "part alone)", both_ways=True)
    distill_steps: int = option(0, "train the per-matrix scales this many steps to match the fine-tune's hidden "
                                "states on the calibration text (holds both models in memory; default 0)",
                                type=int, method_specific=True, needs_calibration=True)
    max_rank: int | None = option(None, "at most R singular triplets (the LoRA rank) kept per matrix, a constraint "
                                  "of the allocation itself, so the bits it frees widen the kept ones (default: "
                                  "no cap)", type=int, metavar="R", method_specific=True)
    value_bits: int | None = option(_DEFAULT.value_bits, "bits per kept value: 16 stores fp16, 1..8 quantize "
                                    "(default: dare 16, ultradelta 4)", type=int, metavar="B", method_specific=True)
    quantize: bool = option(_DEFAULT.quantize, "ImPart-Qt: quantize the kept values with mixed-precision GPTQ "
                            "(8/3/2 bits) instead of storing them in fp16", method_specific=True)
    svd: str = option(_DEFAULT.svd, "how the delta's SVD is computed: gram = eigendecomposition of the smaller "
                      "Gram D^T D (several times faster), full = LAPACK's SVD (default gram)",
                      choices=lambda: SVD_ALGORITHMS, method_specific=True)
    grid: str = option(_DEFAULT.grid, "uniform: an fp16 scale and offset per group of --group-size entries; normal: "
                       "the delta rotated by a seeded random Hadamard transform, its vectors on the Gaussian "
                       "(Lloyd-Max) grid with one fp16 scale each (stored kind svd-rotated; the runtime applies it "
                       "de-quantized; default uniform)", choices=lambda: registry.GRIDS, method_specific=True)
    shard: str | None = option(None, "compress only share K of N of the blocks and data-free tensors into a shard "
                               "folder; `adamix assemble` joins the N shards into the artifact", metavar="K/N")
    executor: str = option("local", "local: this process; ray: the run's shards as Ray tasks, on this machine or "
                           "the cluster at --ray-address (pip install 'adamix[ray]'; default local)",
                           choices=lambda: EXECUTORS)
    ray_address: str | None = option(None, "with --executor ray: the address of a running Ray cluster (default: "
                                     "start Ray on this machine)", metavar="ADDR")
    workers: int | None = option(None, "with --executor ray: how many shards run as tasks at once (default 1); "
                                 "each uses --threads cores (default: the cores / N here)", type=int, metavar="N")
    overwrite: bool = option(False, "replace OUT if it exists, and discard the work an interrupted run left")
    resume: bool = option(False, "continue an interrupted run from the blocks it finished (same inputs and "
                          "options; the result is byte-identical to an uninterrupted run)")
    progress: bool = option(True, "no progress bars", flag="--quiet", short="-q", negate=True)

    @classmethod
    def from_kwargs(cls, kwargs: dict) -> "Options":
        """Options(**kwargs), refusing an unknown name in one line."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise AdamixError(f"unknown compression option {unknown[0]!r} (options: {', '.join(sorted(known))})")
        return cls(**kwargs)

    def settings(self) -> Settings:
        """Check the options (one AdamixError for the first problem) and return what the methods see."""
        alpha = parse_ratio(self.ratio)
        widths = parse_widths(self.bits)
        if self.group_size < 1 or self.samples < 1 or self.seqlen < 4:
            raise AdamixError("--group-size and --samples must be >= 1 and --seqlen >= 4")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise AdamixError(f"--device {self.device}: no CUDA device is available")
        cores = available_cores()
        if self.threads is not None and (isinstance(self.threads, bool) or not isinstance(self.threads, int)
                                         or not 1 <= self.threads <= cores):
            raise AdamixError(f"--threads must be an integer from 1 to {cores} (the cores this process may use), "
                              f"got {self.threads!r}")
        if self.svd not in SVD_ALGORITHMS:
            raise AdamixError(f"--svd must be one of {', '.join(SVD_ALGORITHMS)}, got {self.svd!r}")
        if self.grid not in registry.GRIDS:
            raise AdamixError(f"--grid must be one of {', '.join(registry.GRIDS)}, got {self.grid!r}")
        if self.grid == "normal" and self.group_size != _DEFAULT.group_size:
            raise AdamixError("--group-size applies to --grid uniform (the normal grid has one scale per vector)")
        if self.budget_scope not in SCOPES:
            raise AdamixError(f"--budget-scope must be one of {', '.join(SCOPES)}, got {self.budget_scope!r}")
        if self.budget_scope == "model":
            if self.calib is None:
                raise AdamixError("--budget-scope model needs calibration text (not --calib none): its layer weights "
                                  "are measured on it")
            if self.shard is not None or self.executor != "local":
                raise AdamixError(f"--budget-scope model runs in one process (its one allocation needs every block's "
                                  f"table): drop {'--shard' if self.shard is not None else '--executor ray'}")
        if isinstance(self.slope_power, bool) or not isinstance(self.slope_power, (int, float)) \
                or not 0.0 <= self.slope_power <= 1.0:
            raise AdamixError(f"--slope-power must be a number from 0 to 1, got {self.slope_power!r}")
        if self.slope_power != 1.0 and self.budget_scope != "model":
            raise AdamixError("--slope-power applies to --budget-scope model only")
        if self.token_rows is not None and not isinstance(self.token_rows, bool):
            raise AdamixError(f"token_rows must be True, False or None (on with --budget-scope model), got {self.token_rows!r}")
        if self.token_rows and self.budget_scope != "model":
            raise AdamixError("--token-rows applies to --budget-scope model only")
        if self.token_rows and self.max_rank is not None:
            raise AdamixError("--token-rows cannot be combined with --max-rank (the cap counts triplets, not rows)")
        if self.max_rank is not None and (isinstance(self.max_rank, bool) or not isinstance(self.max_rank, int)
                                          or self.max_rank < 1):
            raise AdamixError(f"--max-rank must be a positive integer, got {self.max_rank!r}")
        if self.executor not in EXECUTORS:
            raise AdamixError(f"--executor must be one of {', '.join(EXECUTORS)}, got {self.executor!r}")
        if self.executor != "ray" and (self.ray_address is not None or self.workers is not None):
            raise AdamixError(f"{'--ray-address' if self.ray_address is not None else '--workers'} applies to "
                              "--executor ray only")
        if self.workers is not None and (isinstance(self.workers, bool) or not isinstance(self.workers, int)
                                         or self.workers < 1):
            raise AdamixError(f"--workers must be a positive integer, got {self.workers!r}")
        if self.executor == "ray":
            if self.shard is not None:
                raise AdamixError("--executor ray makes its own shards: drop --shard")
            if self.distill_steps:
                raise AdamixError("--executor ray cannot split --distill-steps: its training step needs the whole "
                                  "model at once")
        if parse_shard(self.shard) and self.distill_steps:
            raise AdamixError("--shard cannot split --distill-steps: its training step needs the whole model at once")
        if self.distill_steps < 0:
            raise AdamixError(f"--distill-steps must be >= 0, got {self.distill_steps}")
        method = registry.get(self.method)
        if self.value_bits is not None and (isinstance(self.value_bits, bool) or not isinstance(self.value_bits, int)
                                            or not (self.value_bits == 16 or 1 <= self.value_bits <= 8)):
            raise AdamixError(f"--value-bits must be 16 (fp16) or 1..8, got {self.value_bits!r}")
        settings = Settings(method=self.method, alpha=alpha, widths=widths, group_size=self.group_size,
                            whiten=self.whiten, budget_scope=self.budget_scope, max_rank=self.max_rank,
                            value_bits=self.value_bits, quantize=self.quantize, seed=self.seed, svd=self.svd,
                            grid=self.grid)
        for f in fields(self):
            value = getattr(self, f.name)
            if value == f.default:
                continue
            if f.metadata.get("method_specific") and f.name not in method.options:
                shown = "" if isinstance(value, bool) else f" {value}"
                raise AdamixError(f"{spelled(f, value)}{shown} applies to --method {' / '.join(registry.accepting(f.name))} "
                                  f"only, not {self.method}")
            if f.metadata.get("needs_calibration") and self.calib is None:
                raise AdamixError(f"{flag(f)} needs calibration text (not --calib none)")
        if method.needs_calibration and self.calib is None:
            raise AdamixError(f"--method {self.method} needs calibration text (not --calib none)")
        method.check(settings)
        return settings

    def run_record(self) -> dict:
        """The options, other than the methods' Settings, that the result depends on (recorded in the
        manifest and the work folder's key); calibration is filled in by the pipeline."""
        record = {"samples": self.samples, "seqlen": self.seqlen, "device": self.device, "seed": self.seed}
        if self.distill_steps:
            record["distill_steps"] = self.distill_steps
        if self.slope_power != 1.0:
            record["slope_power"] = float(self.slope_power)
        if self.uses_token_rows:
            record["token_rows"] = True
        return record

    @property
    def uses_token_rows(self) -> bool:
        """--token-rows as given; by default on with --budget-scope model, unless --max-rank caps the rank."""
        if self.token_rows is not None:
            return bool(self.token_rows)
        return self.budget_scope == "model" and self.max_rank is None

    def replace(self, **changes) -> "Options":
        return dataclasses.replace(self, **changes)


def flag(f: dataclasses.Field) -> str:
    """The CLI flag of an Options field: --group-size for group_size."""
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def spelled(f: dataclasses.Field, value: Any) -> str:
    """The flag that sets `value`: --no-whiten for a two-way switch set to False, else flag(f)."""
    return "--no-" + flag(f)[2:] if f.metadata.get("both_ways") and value is False else flag(f)

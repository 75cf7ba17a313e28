"""--budget-scope model: one allocation over every matrix of the model, in two passes.

    min  sum_l w_l sum_i e_li(b_li)   s.t.   sum_li cost(b_li) <= sum_l (alpha 16 m_l n_l - overhead_l - reserve)

over the calibrated linears of every block and the data-free matrices (embeddings, heads), where
e_li(b) is matrix l's error table (Method.analyse) and w_l the weight of its error in the model's
output: the slope c_l of the end divergence (compression.sensitivity), per unit of the table (c_l / T
for a calibrated linear, whose table sums over the T calibration tokens; c_l for a data-free one).
--slope-power P < 1 shrinks the calibrated linears' slopes toward their geometric mean (layer_weights).

Pass 1 streams the blocks as the one-pass run does and stashes each matrix's analysis (its SVD and
error table, Method.stash) in the work folder (`pass1/table-block-0003`, `pass1/table-rest-<name>`);
then the slopes (`pass1/slopes`, compression.sensitivity.fisher_slopes: a few backward passes of
the fine-tune, the whole model in memory) and the allocation (`pass1/allocation`, one Method.allocate_joint over every table).
Pass 2 streams the blocks again (the Grams recomputed: the same forward passes) and completes each
matrix (Method.complete_joint) into the usual chunks. Memory holds one block and the tables (small);
disk holds every matrix's factors until the run ends. --resume continues within either pass: every
step's result is a chunk, read back rather than recomputed. Data-free matrices join the allocation
with the method's own form only (no row-sparse alternative), and with --token-rows the input
embedding also with the rows of the tokens seen in calibration (methods.token_rows: one item per
row, weighted by its token count and the input slope, `pass1/slopes`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from ..memory import release_freed_memory
from ..methods import Encoded, Settings, get
from ..methods import token_rows
from ..timing import phase
from .encode import encode_tensor, placed
from .partial import PartialRun, block_chunk, rest_chunk
from .plan import extra_entry_bits, is_svd_shape
from .sensitivity import SLOPE_WINDOWS, fisher_slopes, input_slope


@dataclass
class Run:
    """What both passes use: the work folder, the deltas (load: name -> D in the checkpoint's layout),
    make_runner() -> a fresh calibrate.BlockRunner, the data-free names, store(chunk, covered,
    encoded) that writes a final chunk, names: every paired tensor, and build_finetune() -> the fine-tune (float32, on the device)
    with param_names(model) -> {parameter name: checkpoint name}."""
    work: PartialRun
    load: Callable[[str], torch.Tensor]
    make_runner: Callable[[], object]
    data_free: list[str]
    store: Callable[[str, list[str], dict], None]
    build_finetune: Callable[[], torch.nn.Module]
    param_names: Callable[[torch.nn.Module], dict[str, str]]
    windows: list[torch.Tensor]
    names: set[str]
    settings: Settings
    overhead: float
    device: torch.device
    seed: int = 0
    progress: bool = True
    slope_power: float = 1.0  # layer_weights' P
    token_rows: bool = False  # the input embedding's seen rows join the allocation (methods.token_rows)


def compress_model_scope(run: Run) -> dict:
    """Both passes (module doc); returns what to record in the manifest: the divergence's kind, the
    windows and tokens it was measured on and the slopes c_l (compression.sensitivity)."""
    tables = first_pass(run)
    kind, slopes, embedding = layer_slopes_of(run, tables)
    tokens = sum(int(w.numel()) for w in run.windows)  # the calibrated tables sum over every window's tokens
    weights = layer_weights(slopes, list(tables), set(run.data_free), tokens, run.slope_power)
    rows = seen_rows(run, embedding, weights) if run.token_rows else None
    record = {"end_divergence": kind, "slope_windows": min(SLOPE_WINDOWS, len(run.windows)),
              "calibration_tokens": tokens, "slope_power": run.slope_power,
              "slopes": {n: slopes[n] for n in sorted(slopes)}}
    if run.token_rows:
        record["token_rows"] = {"embedding": embedding["name"], "input_slope": embedding["slope"],
                                "candidates": 0 if rows is None else int(rows.candidates.numel())}
    extra = {"model_scope": record}
    # the record joins the manifest (a slope per matrix): its bytes come out of the budget too
    choices = allocation(run, tables, weights, rows, 8.0 * len(json.dumps(extra, separators=(",", ":"))))
    second_pass(run, tables, choices, rows)
    return extra


def layer_weights(slopes: dict[str, float], names: list[str], data_free: set[str], tokens: int,
                  power: float = 1.0) -> dict[str, float]:
    """w_l of the model-wide knapsack for each of `names`: c_l for a data-free matrix (its table is
    in ||dW||_F^2), c'_l / T for a calibrated linear (its table sums over T = `tokens` tokens), with

        c'_l = c_l^P g^(1-P),   g = exp(mean over the calibrated linears with c_l > 0 of log c_l),

    the slope shrunk toward the calibrated slopes' geometric mean: P = 1 weighs each linear by its
    measured effect on the model's output, P = 0 weighs them equally (the pooled layer error), and
    g keeps the calibrated linears' weight against the data-free matrices'. A name without a slope
    (a stashed tensor the built model does not use) and a slope of 0 weigh 0."""
    positive = [math.log(slopes[n]) for n in names if n not in data_free and slopes.get(n, 0.0) > 0]
    g = math.exp(sum(positive) / len(positive)) if positive else 0.0
    weights = {}
    for n in names:
        c = slopes.get(n, 0.0)
        if n in data_free:
            weights[n] = c
        else:
            weights[n] = (c if power == 1.0 else c ** power * g ** (1.0 - power)) / tokens if c > 0 else 0.0
    return weights


def first_pass(run: Run) -> dict[str, tuple[str, bool]]:
    """Stash the analysis of every non-zero matrix that can take the method's form; returns
    {name: (its pass-1 chunk, transposed)} in allocation order (blocks, then data-free)."""
    stash = run.work.pass1
    runner = run.make_runner()
    final_done = lambda i: run.work.done(block_chunk(i)) is not None  # noqa: E731
    table_done = lambda i: stash.done("table-" + block_chunk(i)) is not None  # noqa: E731
    skip = frozenset(i for i in range(len(runner.blocks)) if final_done(i) or table_done(i))
    bar = tqdm(runner.run(skip), total=len(runner.blocks), initial=len(skip), unit="block",
               desc="pass 1 of 2: calibrate+analyse blocks", disable=not run.progress)
    for i, infos, grams in bar:
        record, tensors = {}, {}
        for info in (info for info in infos if info.name in run.names):
            H = grams.pop(info.name)
            analysed = analyse(run, info.name, H, info.transposed)
            if analysed is not None:
                record[info.name] = info.transposed
                tensors.update({f"{info.name}:{k}": v for k, v in analysed.items()})
            del H
        grams.clear()
        stash.write("table-" + block_chunk(i), record, tensors)
        release_freed_memory()
    for name in tqdm(run.data_free, desc="pass 1 of 2: analyse data-free tensors", unit="tensor",
                     disable=not run.progress or not run.data_free):
        chunk = "table-" + rest_chunk(name)
        if stash.done(chunk) is None and run.work.done(rest_chunk(name)) is None:
            analysed = analyse(run, name, None, False)
            stash.write(chunk, {name: False} if analysed is not None else {}, {} if analysed is None else
                        {f"{name}:{k}": v for k, v in analysed.items()})
            release_freed_memory()
    out = {}
    for i in range(len(runner.blocks)):
        out.update({n: ("table-" + block_chunk(i), t) for n, t in (stash.done("table-" + block_chunk(i)) or {}).items()})
    for name in run.data_free:
        out.update({n: ("table-" + rest_chunk(name), t) for n, t in (stash.done("table-" + rest_chunk(name)) or {}).items()})
    return out


def analyse(run: Run, name: str, H: torch.Tensor | None, transposed: bool) -> dict[str, torch.Tensor] | None:
    """The stashed analysis of one matrix, or None where it is zero or not a matrix (pass 2 encodes it
    alone, as the one-pass run does)."""
    method = get(run.settings.method)
    D = run.load(name)
    if not bool(D.any()) or not is_svd_shape(tuple(D.shape)):
        return None
    Dp, Hp = placed(D, H, method, run.device)
    a = method.analyse(Dp.T if transposed else Dp, Hp, run.settings, run.overhead * D.numel())
    return method.stash(a)


def layer_slopes_of(run: Run, tables: dict[str, tuple[str, bool]]) -> tuple[str, dict[str, float], dict]:
    """(the divergence's kind, {name: c_l} for the stashed matrices, {"name": the input embedding's
    stashed data-free matrix or None, "slope": its input slope c_in} (measured with --token-rows
    only)), measured once (pass1/slopes)."""
    stash = run.work.pass1
    done = stash.done("slopes")
    if done is not None:
        return done["kind"], done["slopes"], done.get("embedding", {"name": None, "slope": 0.0})
    with phase("layer weights"):
        model = run.build_finetune()
        names = run.param_names(model)
        params = {ck: p for p, ck in names.items() if ck in tables}
        kind, slopes = fisher_slopes(model, params, set(run.data_free), run.windows[:SLOPE_WINDOWS], run.seed,
                                     progress=run.progress)
        embedding = {"name": None, "slope": 0.0}
        if run.token_rows:
            weight = model.get_input_embeddings().weight
            owned = dict(model.named_parameters(remove_duplicate=False))
            found = [names[p] for p in names if owned.get(p) is weight and names[p] in tables and names[p] in run.data_free]
            if found:
                embedding = {"name": found[0], "slope": input_slope(model, run.windows[:SLOPE_WINDOWS], run.seed,
                                                                    progress=run.progress)}
        del model
    stash.write("slopes", {"kind": kind, "slopes": slopes, "embedding": embedding}, {})
    return kind, slopes, embedding


@dataclass
class SeenRows:
    """The input embedding's rows that join the allocation: the matrix `name`, its rows seen in
    calibration `candidates` (r,) int64 and their weights w_r (r,) (token_rows.row_weights); once
    `tabulate`d with the low-rank part's rank k, their error table (r, B) and costs (B,)."""
    name: str
    candidates: torch.Tensor
    weights: torch.Tensor
    table: np.ndarray | None = None
    costs: np.ndarray | None = None

    def tabulate(self, D: torch.Tensor, k: int, settings: Settings) -> None:
        """token_rows.row_table of the candidates' residual after D's rank-k truncation."""
        x = token_rows.residual_rows(D.float(), self.candidates, k)
        self.table, self.costs = token_rows.row_table(x, self.weights, settings.widths, settings.group_size)


def seen_rows(run: Run, embedding: dict, weights: dict[str, float]) -> SeenRows | None:
    """The rows of the input embedding that calibration reads (token count > 0), weighted by
    token_rows.row_weights; None where no stashed data-free matrix is the input embedding."""
    name = embedding["name"]
    if name is None:
        return None
    ids = torch.cat([w.reshape(-1) for w in run.windows]).long()
    counts = torch.bincount(ids)  # every id indexes the embedding: the calibration passes ran through it
    candidates = torch.nonzero(counts).flatten()
    w = token_rows.row_weights(weights[name], embedding["slope"], counts[candidates], int(ids.numel()))
    return SeenRows(name, candidates, w)


def allocation(run: Run, tables: dict[str, tuple[str, bool]], weights: dict[str, float],
               rows: SeenRows | None = None, reserve_bits: float = 0.0) -> dict[str, np.ndarray]:
    """{name: width index per triplet} of the one allocation over every stashed table, and with `rows`
    {ROWS + name: width index per seen row} (pass1/allocation), within the tables' budgets less
    `reserve_bits`. With `rows`, the allocation is solved twice: first without them, for the rank k
    that the matrix's low-rank part keeps, then with the rows' residual after that rank (SeenRows.tabulate;
    k is stashed with the allocation, so that a resumed run tabulates the same rows)."""
    stash = run.work.pass1
    if stash.done("allocation") is not None:
        done = {k: v.numpy() for k, v in stash.read("allocation").items()}
        if rows is not None:
            rows.tabulate(run.load(rows.name), int(done.pop(RANK + rows.name)[0]), run.settings)
        return done
    method = get(run.settings.method)
    names = list(tables)
    parts = []
    for name in names:
        t = stash.read(tables[name][0], [f"{name}:table", f"{name}:costs", f"{name}:budget"])
        parts.append((t[f"{name}:table"].numpy(), t[f"{name}:costs"].numpy(), float(t[f"{name}:budget"][0])))
    scale = [weights[n] for n in names]
    if parts:  # the reserve comes out of the model's one budget
        table, costs, budget = parts[0]
        parts[0] = (table, costs, budget - reserve_bits)
    extra = {}
    if rows is not None:  # the rows' table is weighted already; they draw on the model's budget, less the
        # header and manifest their entry adds (the run's overhead counts the method's own suffixes)
        with phase("ILP"):
            alone_all = method.allocate_joint(parts, run.settings, scale)
        k = int((np.asarray(alone_all[names.index(rows.name)]) != run.settings.widths.index(0)).sum())
        rows.tabulate(run.load(rows.name), k, run.settings)
        header = extra_entry_bits(rows.name, len(token_rows.ROW_TENSORS), token_rows.META_BYTES)
        names, parts, scale = names + [ROWS + rows.name], parts + [(rows.table, rows.costs, -header)], scale + [1.0]
        extra[RANK + rows.name] = np.array([k])
    with phase("ILP"):
        choices = method.allocate_joint(parts, run.settings, scale)
    if rows is not None and not (np.asarray(choices[-1]) != run.settings.widths.index(0)).any():
        choices = [*alone_all, choices[-1]]  # no row kept: the allocation without rows (nor their header)
    out = {n: np.asarray(c) for n, c in zip(names, choices)}
    stash.write("allocation", {"matrices": len(out)},
                {n: torch.from_numpy(c.astype(np.int64)) for n, c in {**out, **extra}.items()})
    return out


ROWS = "rows:"  # the allocation's key of the seen rows of a matrix
RANK = "rows-rank:"  # the allocation's key of the rank its seen rows' residual was tabulated after


def second_pass(run: Run, tables: dict[str, tuple[str, bool]], choices: dict[str, np.ndarray],
                rows: SeenRows | None = None) -> None:
    """Complete every matrix at its allocated widths into the final chunks, block by block."""
    runner = run.make_runner()
    skip = frozenset(i for i in range(len(runner.blocks)) if run.work.done(block_chunk(i)) is not None)
    bar = tqdm(runner.run(skip), total=len(runner.blocks), initial=len(skip), unit="block",
               desc="pass 2 of 2: calibrate+quantize blocks", disable=not run.progress)
    for i, infos, grams in bar:
        encoded, covered = {}, [info.name for info in infos if info.name in run.names]
        for name, transposed in ((info.name, info.transposed) for info in infos if info.name in run.names):
            H = grams.pop(name)
            enc = complete(run, name, H, transposed, tables, choices)
            if enc is not None:
                encoded[name] = (enc, transposed)
            del H
        grams.clear()
        run.store(block_chunk(i), covered, encoded)
        release_freed_memory()
    for name in tqdm(run.data_free, desc="pass 2 of 2: quantize data-free tensors", unit="tensor",
                     disable=not run.progress or not run.data_free):
        if run.work.done(rest_chunk(name)) is None:
            enc = complete(run, name, None, False, tables, choices, rows)
            run.store(rest_chunk(name), [name], {name: (enc, False)} if enc is not None else {})
            release_freed_memory()


def complete(run: Run, name: str, H: torch.Tensor | None, transposed: bool, tables: dict[str, tuple[str, bool]],
             choices: dict[str, np.ndarray], rows: SeenRows | None = None) -> Encoded | None:
    """One matrix's stored form: its stashed analysis at its allocated widths (with its seen rows'
    residual where `rows` are of this matrix), or (not stashed: zero or not a matrix) the one-pass
    encoding."""
    D = run.load(name)
    if name not in tables:
        return encode_tensor(D, H, transposed, run.settings, run.overhead, device=run.device)
    method = get(run.settings.method)
    prefix = name + ":"
    stashed = run.work.pass1.read(tables[name][0], prefix=prefix)
    Dp, Hp = placed(D, H, method, run.device)
    a = method.unstash({k[len(prefix):]: v for k, v in stashed.items() if k.startswith(prefix)},
                       Dp.T if transposed else Dp, Hp)
    enc = method.complete_joint(a, choices[name], run.settings)
    if rows is None or rows.name != name:
        return enc
    picked = choices[ROWS + name]
    budget = float(rows.costs[picked].sum()) + method.joint_reserve_bits(run.settings)
    return token_rows.with_rows(enc, D, rows.candidates, picked, rows.table, run.settings.widths,
                                run.settings.group_size, budget)

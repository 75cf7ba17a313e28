"""Layer weights of a model-wide budget: how much each matrix's error moves the model's output.

The linearity theorem of HIGGS (arXiv 2411.17525): for small independent errors, the divergence of
the model's outputs from the fine-tune's grows about linearly in each layer's error,

    div(W^) ~= sum_l c_l E_l,      E_l = mean_t ||(W^_l - W_l) x_lt||^2   (per token t),

with a slope c_l per layer. For a calibrated linear E_l is its output error on the calibration tokens
(the error table's unit, divided by the token count); for a data-free matrix (an embedding, a head)
E_l = ||W^_l - W_l||_F^2, its table's unit.

Two estimates of the slope, with the same meaning and units:
- layer_slopes, by perturbation: add a Gaussian perturbation d_l = sigma G (G ~ N(0, 1), seeded by
  the matrix's name) to one matrix of the fine-tune at a time, with sigma such that ||d_l||_F^2 =
  rho ||D_l||_F^2 (D_l the matrix's delta), run the windows, and take c_l = div / E_l(d_l), with
  E_l(d_l) measured on the same forward pass (a hook on the layer: its input is the fine-tune's,
  as only this layer is perturbed). One forward pass per matrix.
- fisher_slopes, the expectation of the same over G to second order, from the gradients of all
  matrices at once: a few backward passes in all. The pipeline uses this one; the tests check the
  two against each other.
div is the mean over tokens of KL(p_ft || p) of the next-token distributions for a model with
logits (causal LMs), else of ||h_ft - h||^2 of the final hidden states (encoders). Both are second
order in the perturbation, so c_l does not depend on its size where the model is linear (the
benchmark checks the prediction on whole compressed models).
"""

from __future__ import annotations

import hashlib
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

from ..io.hf import is_conv1d

SLOPE_WINDOWS = 8   # calibration windows the slopes are measured on (the first ones)
SLOPE_RHO = 0.1     # ||perturbation||^2 / ||delta||^2 of the matrix perturbed (layer_slopes)
SLOPE_PROBES = 2    # sampled outputs per window (fisher_slopes)


def end_output(model: nn.Module, ids: torch.Tensor) -> tuple[str, torch.Tensor]:
    """("kl", the next-token logits (L, V)) for a model with logits, else ("hidden", the final hidden
    states (L, d)); float32, for one window ids (1, L)."""
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids))
    logits = getattr(out, "logits", None)
    if logits is not None:
        return "kl", logits[0].float()
    hidden = getattr(out, "last_hidden_state", None)
    return "hidden", (hidden if hidden is not None else out[0])[0].float()


def divergence(kind: str, ref: torch.Tensor, out: torch.Tensor) -> float:
    """Sum over the tokens of KL(p_ref || p_out) (kind "kl": logits (L, V), the softmax taken in
    float64, so that a tiny change is not lost to rounding) or of ||ref - out||^2 (kind "hidden":
    hidden states (L, d)), in float64; never negative."""
    if kind == "kl":
        total = 0.0
        for start in range(0, ref.shape[0], 64):  # 64 tokens at a time: float64 rows of the vocabulary
            r = F.log_softmax(ref[start:start + 64].double(), dim=-1)
            o = F.log_softmax(out[start:start + 64].double(), dim=-1)
            total += float((r.exp() * (r - o)).sum())
        return max(total, 0.0)
    return float(((ref - out).double() ** 2).sum())


def end_divergence(model: nn.Module, windows: list[torch.Tensor], refs: list[torch.Tensor]) -> float:
    """Mean per token of `model`'s divergence from the reference outputs `refs` (end_output's) of the
    same windows."""
    total, tokens = 0.0, 0
    with torch.no_grad():
        for ids, ref in zip(windows, refs):
            kind, out = end_output(model, ids.to(ref.device))
            total += divergence(kind, ref, out)
            tokens += ids.shape[1]
    return total / max(tokens, 1)


def seeded_normal(shape: torch.Size, seed: int, name: str) -> torch.Tensor:
    """G ~ N(0, 1) of `shape`, float32 on the CPU, the same for the same (seed, name)."""
    gen = torch.Generator().manual_seed((seed * 1_000_003 + int(hashlib.sha256(name.encode()).hexdigest()[:12], 16)) % 2**63)
    return torch.randn(tuple(shape), generator=gen, dtype=torch.float32)


def layer_slopes(model: nn.Module, params: dict[str, str], delta: Callable[[str], torch.Tensor],
                 data_free: set[str], windows: list[torch.Tensor], seed: int = 0, rho: float = SLOPE_RHO,
                 progress: bool = False) -> tuple[str, dict[str, float]]:
    """(the divergence's kind, "kl" or "hidden"; {checkpoint name: c_l}) (module doc) for the matrices `params` {checkpoint name: parameter
    name of `model`, the fine-tune, float32}; delta(name): D_l in the parameter's layout. Names in
    `data_free` are measured in ||d||_F^2, the others by their layer's output error. `model` is left
    as it was (each parameter restored from a copy)."""
    model.eval()
    device = next(model.parameters()).device
    with torch.no_grad():
        refs, kind = [], "hidden"
        for ids in windows:
            kind, ref = end_output(model, ids.to(device))
            refs.append(ref)
    tokens = sum(ids.shape[1] for ids in windows)
    owned = dict(model.named_parameters(remove_duplicate=False))
    slopes = {}
    for name, pname in tqdm(sorted(params.items()), desc="layer weights (one perturbed pass per matrix)",
                            disable=not progress, unit="matrix"):
        p = owned[pname]
        D = delta(name).float()
        dn = float(D.norm()) if D.numel() else 0.0
        if dn == 0.0:
            slopes[name] = 0.0
            continue
        G = seeded_normal(p.shape, seed, name)
        d = (G * (rho ** 0.5 * dn / float(G.norm()))).to(device)
        energy: dict[str, float] = {}
        hooks = [] if name in data_free else [error_hook(model, pname, d, energy, name)]
        original = p.detach().clone()
        try:
            with torch.no_grad():
                p.add_(d)
            div = end_divergence(model, windows, refs)
        finally:
            with torch.no_grad():
                p.copy_(original)
            for h in hooks:
                h.remove()
        E = float((d.double() ** 2).sum()) if name in data_free else energy.get(name, 0.0) / tokens
        slopes[name] = div / E if E > 0 else 0.0
    return kind, slopes


def error_hook(model: nn.Module, pname: str, change: torch.Tensor, energy: dict[str, float], key: str):
    """A forward hook on the layer of parameter `pname` that adds sum_t ||change x_t||^2 of its inputs
    x_t to energy[key] (change in the parameter's layout: (out, in), or (in, out) for a Conv1D)."""
    module = model.get_submodule(pname.rsplit(".", 1)[0])
    conv = is_conv1d(module)

    def measure(_mod, inp, _out):
        x = inp[0].float()
        y = x @ change if conv else F.linear(x, change)
        energy[key] = energy.get(key, 0.0) + float((y.double() ** 2).sum())
    return module.register_forward_hook(measure)


def layer_errors(model: nn.Module, changes: dict[str, tuple[str, torch.Tensor]], data_free: set[str],
                 windows: list[torch.Tensor]) -> dict[str, float]:
    """{name: E_l} (module doc) of the weight changes {checkpoint name: (parameter name of `model`,
    W^_l - W_l in the parameter's layout)}, with the inputs of `model` (the fine-tune) on `windows`:
    the mean per token of ||(W^_l - W_l) x||^2, or ||W^_l - W_l||_F^2 for names in `data_free`."""
    device = next(model.parameters()).device
    energy: dict[str, float] = {}
    hooks = [error_hook(model, p, d.float().to(device), energy, n) for n, (p, d) in changes.items() if n not in data_free]
    try:
        with torch.no_grad():
            for ids in windows:
                model(input_ids=ids.to(device), attention_mask=torch.ones_like(ids).to(device))
    finally:
        for h in hooks:
            h.remove()
    tokens = sum(ids.shape[1] for ids in windows)
    return {n: float((d.double() ** 2).sum()) if n in data_free else energy.get(n, 0.0) / tokens
            for n, (_, d) in changes.items()}


def fisher_slopes(model: nn.Module, params: dict[str, str], data_free: set[str], windows: list[torch.Tensor],
                  seed: int = 0, probes: int = SLOPE_PROBES, progress: bool = False) -> tuple[str, dict[str, float]]:
    """The slopes of layer_slopes (same meaning, same units) in expectation over its Gaussian
    perturbations, from `probes` backward passes per window for all matrices at once.

    To second order the divergence of outputs o_t perturbed by d_t is 1/2 sum_ts d_t^T F_ts d_s (KL:
    F the Fisher, E_y[g g^T] with g = grad_o log p(y), y sampled from the model) or sum_ts d_t^T
    J_t^T J_s d_s (hidden states h: J = dh/do, J^T J = E_r[g g^T] with g = grad_o (r . h), r ~ N(0, I)).
    For d_t = G x_t with G ~ N(0, sigma^2) (m x n) this is, in expectation over G,

        k sigma^2 E ||grad_W l||_F^2      (k = 1/2 for KL, 1 for hidden states; W = the matrix),

    while E_l = sigma^2 m sum_t |x_t|^2 / T (calibrated) or sigma^2 m n (data-free). So

        c_l = k E||grad_W l||^2 / (m sum_t |x_t|^2)     or     k E||grad_W l||^2 / (T m n),

    the expectation estimated over `probes` draws per window (windows are independent: their cross
    terms vanish in expectation, so the squared gradients of the windows add). Only the matrices'
    own gradients are computed; `model` is left as it was.
    """
    model.eval()
    device = next(model.parameters()).device
    owned = dict(model.named_parameters(remove_duplicate=False))
    wanted = {ck: owned[p] for ck, p in params.items()}
    flags = {id(p): p.requires_grad for p in model.parameters()}
    squares = {ck: 0.0 for ck in wanted}
    inputs: dict[str, float] = {}
    hooks = [input_hook(model, params[ck], inputs, ck) for ck in wanted if ck not in data_free]
    gen = torch.Generator().manual_seed(seed)
    kind = "hidden"
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for p in wanted.values():
            p.requires_grad_(True)
        for k in tqdm(range(probes), desc="layer weights (Fisher probes)", disable=not progress, unit="probe"):
            for ids in windows:
                out = model(input_ids=ids.to(device), attention_mask=torch.ones_like(ids).to(device))
                kind, loss = probe_loss(out, gen)
                grads = torch.autograd.grad(loss, list(wanted.values()), allow_unused=True)
                for ck, g in zip(wanted, grads):
                    if g is not None:
                        squares[ck] += float((g.double() ** 2).sum())
            for h in hooks:  # the inputs' energy once
                h.remove()
            hooks = []
    finally:
        for h in hooks:
            h.remove()
        for p in model.parameters():
            p.requires_grad_(flags[id(p)])
    factor = 0.5 if kind == "kl" else 1.0
    tokens = sum(ids.shape[1] for ids in windows)
    slopes = {}
    for ck, p in wanted.items():
        mean = factor * squares[ck] / probes
        if ck in data_free:
            slopes[ck] = mean / (tokens * p.numel())
        else:
            module = model.get_submodule(params[ck].rsplit(".", 1)[0])
            m = p.shape[1] if is_conv1d(module) else p.shape[0]
            slopes[ck] = mean / (m * inputs[ck]) if inputs.get(ck, 0.0) > 0 else 0.0
    return kind, slopes


def probe_loss(out, gen: torch.Generator) -> tuple[str, torch.Tensor]:
    """(kind, the scalar whose gradient is one probe g of fisher_slopes' module doc) for one window's
    model output: log p(y) of y sampled from the model (kind "kl"), or r . h with r ~ N(0, I) of the
    final hidden states h (kind "hidden")."""
    logits = getattr(out, "logits", None)
    if logits is not None:
        logp = F.log_softmax(logits[0].float(), dim=-1)
        y = torch.multinomial(logp.detach().exp().cpu(), 1, generator=gen).to(logp.device)
        return "kl", logp.gather(1, y).sum()
    hidden = getattr(out, "last_hidden_state", None)
    h = (hidden if hidden is not None else out[0])[0].float()
    return "hidden", (torch.randn(h.shape, generator=gen).to(h.device) * h).sum()


def input_slope(model: nn.Module, windows: list[torch.Tensor], seed: int = 0, probes: int = SLOPE_PROBES,
                progress: bool = False) -> float:
    """c_in: the divergence per token (module doc) per unit of squared change of one position's input
    embedding, per entry, in expectation over the change's direction:

        c_in = k E sum_t |g_t|^2 / (T n),

    g_t = the probe's gradient with respect to the embedding output at position t (n wide), k as in
    fisher_slopes, T the windows' tokens. A change d of the embedding row of a token seen count times
    in T tokens then adds, to second order, c_in count |d|^2 / T (methods.token_rows). Estimated over
    `probes` draws per window, as fisher_slopes; `model` is left as it was."""
    model.eval()
    device = next(model.parameters()).device
    embedding = model.get_input_embeddings()
    flags = {id(p): p.requires_grad for p in model.parameters()}
    held: list[torch.Tensor] = []

    def keep(_mod, _inp, out):  # the embedding output, made a leaf of the probe's graph
        out = out.detach().requires_grad_(True)
        held.append(out)
        return out
    hook = embedding.register_forward_hook(keep)
    gen = torch.Generator().manual_seed(seed)
    total, kind, width = 0.0, "hidden", int(embedding.weight.shape[1])
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for _ in tqdm(range(probes), desc="input slope (Fisher probes)", disable=not progress, unit="probe"):
            for ids in windows:
                held.clear()
                out = model(input_ids=ids.to(device), attention_mask=torch.ones_like(ids).to(device))
                kind, loss = probe_loss(out, gen)
                (g,) = torch.autograd.grad(loss, held[:1])
                total += float((g.double() ** 2).sum())
    finally:
        hook.remove()
        for p in model.parameters():
            p.requires_grad_(flags[id(p)])
    tokens = sum(ids.shape[1] for ids in windows)
    return (0.5 if kind == "kl" else 1.0) * total / probes / (max(tokens, 1) * width)


def input_hook(model: nn.Module, pname: str, energy: dict[str, float], key: str):
    """A forward hook on the layer of parameter `pname` that adds sum_t |x_t|^2 of its inputs to energy[key]."""
    def measure(_mod, inp, _out):
        energy[key] = energy.get(key, 0.0) + float((inp[0].detach().double() ** 2).sum())
    return model.get_submodule(pname.rsplit(".", 1)[0]).register_forward_hook(measure)

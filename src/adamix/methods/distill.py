"""BitDelta scale distillation: train each bitdelta matrix's scale to match the fine-tune's outputs.

The student is the compressed model, W = W_base + D^ for every stored tensor, where each bitdelta
matrix is W_base + a_l sign(D_l) with a_l = a0_l (1 + t_l) and t_l trainable (a multiplicative
parametrisation, so one learning rate suits scales of any magnitude). The teacher is the fine-tune.
Loss, on the calibration windows: mean squared difference of the last hidden states,
|| h_student(x) - h_teacher(x) ||^2 (BitDelta matches the logits; the last hidden state is what every
architecture has and avoids the vocabulary projection). Adam, one window per step.

Both models are held in memory (float32), so this option is for models that fit twice. The models
come from the pipeline (registry.ModelContext): this module only trains.
"""

from __future__ import annotations

from typing import Callable

import torch
from tqdm import tqdm

from ..errors import AdamixError
from .kinds import Encoded, decode
from .registry import ModelContext


def last_hidden(model: torch.nn.Module, ids: torch.Tensor, params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """The model's last hidden states (1, L, hidden) for token ids (1, L)."""
    kwargs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "output_hidden_states": True}
    if params is None:
        out = model(**kwargs)
    else:
        out = torch.func.functional_call(model, params, args=(), kwargs=kwargs, tie_weights=True, strict=False)
    return out.hidden_states[-1]


def distill_scales(encoded: dict[str, tuple[Encoded, bool]], ctx: ModelContext, steps: int, kind: str,
                   sign_matrix: Callable[[tuple[int, int], torch.Tensor], torch.Tensor], lr: float = 1e-2) -> dict:
    """Train the scales of the entries of `kind` in `encoded` in place (their fp16 `scale` tensors),
    `steps` Adam steps on ctx.windows; sign_matrix(shape, signs) gives such an entry's D^ / scale.

    Returns {"loss_before", "loss_after"}: mean over the windows of the hidden-state MSE.
    """
    dev, windows = torch.device(ctx.device), ctx.windows
    bit = {n: (e, t) for n, (e, t) in encoded.items() if e.kind == kind}
    if not bit:
        raise AdamixError(f"--distill-steps: no tensor was stored as {kind}")
    others = {}
    for n, (e, t) in encoded.items():
        if n not in bit:
            d = decode(e.kind, e.shape, e.meta, e.tensors)
            others[n] = d.T if t else d
    teacher = ctx.teacher()
    student = ctx.student(lambda n: ctx.base_tensor(n).float() + others[n] if n in others else ctx.base_tensor(n))
    for p in student.parameters():
        p.requires_grad_(False)
    pname = {c: p for p, c in ctx.param_names(student).items()}
    params = dict(student.named_parameters())
    signs, a0 = {}, {}
    for n, (e, t) in bit.items():
        s = sign_matrix(e.shape, e.tensors["signs"])
        signs[n] = (s.T if t else s).to(dev)
        a0[n] = float(e.tensors["scale"])
    t_param = torch.zeros(len(bit), device=dev, requires_grad=True)
    order = list(bit)

    def weights() -> dict[str, torch.Tensor]:
        return {pname[n]: params[pname[n]] + a0[n] * (1 + t_param[i]) * signs[n] for i, n in enumerate(order)}

    with torch.no_grad():
        targets = [last_hidden(teacher, w.to(dev)) for w in windows]
    del teacher

    def mean_loss() -> float:
        with torch.no_grad():
            w = weights()
            return sum(float(((last_hidden(student, x.to(dev), w) - y) ** 2).mean()) for x, y in zip(windows, targets)) / len(windows)

    before = mean_loss()
    opt = torch.optim.Adam([t_param], lr=lr)
    for step in tqdm(range(steps), desc="distill bitdelta scales", disable=not ctx.progress, unit="step"):
        k = step % len(windows)
        loss = ((last_hidden(student, windows[k].to(dev), weights()) - targets[k]) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = mean_loss()
    for i, n in enumerate(order):
        e = bit[n][0]
        e.tensors["scale"] = torch.tensor([a0[n] * (1 + float(t_param[i].detach()))], dtype=torch.float16)
        e.stats = {"scale_distilled": True}  # the calibration error stats no longer describe it
    return {"loss_before": before, "loss_after": after}

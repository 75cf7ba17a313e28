"""Calibration: text -> token windows; block-by-block runner that accumulates input Gram matrices.

The runner builds the fine-tune's module tree with empty (meta) parameters, loads only the modules
outside the repeated blocks (embeddings, rotary tables, ...), captures the inputs of block 0, then
for each block in turn loads its weights, runs every window through it with hooks on its linear
layers accumulating H = sum_t x_t x_t^T (n x n) per layer, and passes the block's outputs on.
Peak memory: one block plus the hidden states of the calibration windows, whatever the depth.
The blocks and their linears are found generically (io.hf.find_blocks, io.hf.linears).
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch import nn

from ..errors import AdamixError, all_finite
from ..io.checkpoint import Checkpoint
from ..io.hf import LinearInfo, find_blocks, linears, load_state, model_skeleton, state_name_map
from ..quant.linalg import GramSum
from ..timing import phase


def token_windows(text: str, tokenizer, samples: int | None, seqlen: int) -> list[torch.Tensor]:
    """Up to `samples` (None: all) token windows of at most `seqlen` tokens, one document (non-empty line) at a
    time: a document longer than a window is cut into consecutive windows, and each window is
    wrapped with the tokenizer's own special tokens (e.g. [CLS] ... [SEP]), as the model sees text.

    Returns a list of (1, L) int64 tensors, L <= seqlen.
    """
    head, tail = special_tokens(tokenizer)
    body = max(1, seqlen - len(head) - len(tail))
    windows = []
    for doc in (line.strip() for line in text.splitlines()):
        if not doc:
            continue
        ids = tokenizer(doc, add_special_tokens=False, verbose=False)["input_ids"]
        for start in range(0, len(ids), body):
            windows.append(torch.tensor([head + ids[start:start + body] + tail]))
            if len(windows) == samples:
                return windows
    if not windows:
        raise AdamixError("the calibration text is empty after tokenization")
    return windows


def special_tokens(tokenizer) -> tuple[list[int], list[int]]:
    """The ids the tokenizer puts before and after a text (e.g. [CLS] / [SEP]; <s> / none)."""
    probe = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    for i in range(len(full) - len(probe) + 1):
        if full[i:i + len(probe)] == probe:
            return full[:i], full[i + len(probe):]
    return [], []


def _move(module: nn.Module, device: torch.device) -> None:
    """Move the materialised tensors of `module` to `device`, leaving meta (not yet loaded) ones."""
    module._apply(lambda t: t if t.device.type == "meta" else t.to(device))


class _Catch(Exception):
    pass


class BlockRunner:
    """Runs calibration windows through a checkpoint one block at a time (see module doc)."""

    def __init__(self, ckpt: Checkpoint, windows: list[torch.Tensor], device: str = "cpu", grams_on_device: bool = False):
        self.ckpt, self.device = ckpt, torch.device(device)
        self.grams_on = self.device if grams_on_device else torch.device("cpu")
        self.model = model_skeleton(ckpt.folder)
        self.names = state_name_map(self.model, ckpt.keys())
        self.blocks_name, self.blocks = find_blocks(self.model)
        block_prefix = self.blocks_name + "."
        outside = {k: v for k, v in self.names.items() if not k.startswith(block_prefix)}
        self._load(self.model, outside, "")
        _move(self.model, self.device)
        self.windows = windows
        self.inputs, self.kwargs = self._capture()

    def _load(self, module: nn.Module, names: dict[str, str], strip: str) -> None:
        """Materialise `module`'s parameters from the checkpoint (names relative to the model);
        refuses non-finite weights (they would turn every later activation into NaN)."""
        state = {}
        for full, ck in names.items():
            w = self.ckpt.get(ck).float()
            if not all_finite(w):
                raise AdamixError(f"tensor {ck} of the fine-tune contains NaN or Inf")
            state[full[len(strip):]] = w
        # the whole model: tie lm_head to embed_tokens (unused heads may stay on meta); a block: complete
        whole = module is self.model
        load_state(module, state, self.ckpt.source, tie=whole, complete=not whole)

    def _capture(self) -> tuple[list[torch.Tensor], list[dict]]:
        first = self.blocks[0]
        inputs, kwargs = [], []

        class Catcher(nn.Module):
            def __init__(self):
                super().__init__()

            def forward(self, hidden, *args, **kw):
                inputs.append(hidden.detach())
                kwargs.append({"args": args, **kw})
                raise _Catch

        self.blocks[0] = Catcher()
        try:
            with torch.no_grad():
                for ids in self.windows:
                    try:
                        self.model(input_ids=ids.to(self.device), attention_mask=torch.ones_like(ids).to(self.device),
                                   use_cache=False)
                    except _Catch:
                        pass
        finally:
            self.blocks[0] = first
        if len(inputs) != len(self.windows):
            raise AdamixError("could not capture the inputs of the first transformer block")
        return inputs, kwargs

    def linear_names(self) -> set[str]:
        """The checkpoint names of every block's linear weights (from the module tree: nothing is run)."""
        return {info.name for i, block in enumerate(self.blocks) for info in linears(block, f"{self.blocks_name}.{i}.")}

    def run(self, skip: frozenset[int] = frozenset(), stop: int | None = None
            ) -> Iterator[tuple[int, list[LinearInfo], dict[str, torch.Tensor]]]:
        """For each block i < stop (default: all): (i, its linears, {weight name: H (n x n float32), on
        the runner's device with grams_on_device, else on the CPU}). The
        block's outputs become the next block's inputs. Blocks in `skip` (already compressed by an
        interrupted run, or another shard's) are only run forward, without Grams, and not yielded. A
        block's weights are freed before it is yielded, so the caller's work on it shares memory with
        the hidden states only."""
        for i, block in enumerate(self.blocks[:stop]):
            with phase("calibration"):
                prefix = f"{self.blocks_name}.{i}."
                names = {k: v for k, v in self.names.items() if k.startswith(prefix)}
                self._load(block, names, prefix)
                _move(block, self.device)
                infos = linears(block, prefix)
                grams: dict = {}  # name -> GramSum, then H
                seen: dict[int, tuple[torch.Tensor, str]] = {}  # this window's inputs -> first linear fed it
                alias: dict[str, str] = {}
                hooks = [] if i in skip else [info.module.register_forward_hook(self._gram_hook(grams, seen, alias, info.name))
                                              for info in infos]
                outs = []
                with torch.no_grad():
                    for x, kw in zip(self.inputs, self.kwargs):
                        kw = dict(kw)
                        args = kw.pop("args", ())
                        out = block(x, *args, **kw)
                        outs.append(out[0] if isinstance(out, (tuple, list)) else out)
                        seen.clear()
                for h in hooks:
                    h.remove()
                grams = {name: g.result() for name, g in grams.items()}
                for name, g in grams.items():
                    if not all_finite(g):
                        raise AdamixError(f"calibration: the inputs of {name} overflow float32 (NaN or Inf)")
                self.inputs = outs
                block.to("meta")
                grams = {k: v.to(self.grams_on) for k, v in grams.items()}
                grams.update({k: grams[v] for k, v in alias.items()})
            if i not in skip:
                yield i, infos, grams

    @staticmethod
    def _gram_hook(grams: dict[str, GramSum], seen: dict, alias: dict[str, str], name: str):
        """Accumulate H += X^T X for linear `name`. Linears fed the very same tensor (q, k and v
        projections) share the first one's H: computed once, held once."""
        def hook(_mod, inp, _out):
            x = inp[0]  # the very tensor the block passed (a detached view would be a new object per call)
            first = seen.get(id(x))
            if first is not None and first[0] is x:
                alias[name] = first[1]
                return
            seen[id(x)] = (x, name)
            x = x.detach().reshape(-1, x.shape[-1]).float()
            # in place (no n x n temporaries: 2 x 0.5 GB at n = 11008), the upper half, many windows per product
            grams.setdefault(name, GramSum()).add(x)
        return hook

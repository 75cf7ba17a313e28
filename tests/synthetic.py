"""Tiny synthetic base / fine-tune pairs written as Hugging Face folders (BERT, Llama, GPT-2 shapes).

The fine-tune is the base plus, for every float tensor, a delta = low-rank part + small noise, so the
pair has the structure of a real fine-tune while the whole thing takes well under a second to build.
"""

from __future__ import annotations

from pathlib import Path

import torch

WORDS = ("the of and to in a is that for it as was with be by on not he this are or his from at which "
         "but have an they you were her she there been one all we their has would when if so no will "
         "model delta base tuned weight layer compress bits vector singular value error budget").split()

TEXT = " ".join(WORDS[(i * 7 + i // 3) % len(WORDS)] for i in range(3000))


def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                   cls_token="[CLS]", sep_token="[SEP]")


def config(arch: str, layers: int = 2):
    from transformers import BertConfig, GPT2Config, LlamaConfig
    vocab = len(WORDS) + 4
    if arch == "bert":
        return BertConfig(vocab_size=vocab, hidden_size=128, num_hidden_layers=layers, num_attention_heads=4,
                          intermediate_size=256, max_position_embeddings=128, architectures=["BertModel"])
    if arch == "llama":
        return LlamaConfig(vocab_size=vocab, hidden_size=128, intermediate_size=256, num_hidden_layers=layers,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                           tie_word_embeddings=False, architectures=["LlamaForCausalLM"])
    if arch == "gpt2":
        return GPT2Config(vocab_size=vocab, n_embd=128, n_layer=layers, n_head=4, n_positions=128,
                          bos_token_id=2, eos_token_id=3, architectures=["GPT2LMHeadModel"])
    raise ValueError(arch)


def perturb(state: dict[str, torch.Tensor], seed: int, scale: float = 0.05, rank: int = 4) -> dict[str, torch.Tensor]:
    """A fine-tune-like change of every float tensor: low-rank (rank) + 10% noise, |delta| ~ scale |W|."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, w in state.items():
        if not w.is_floating_point():
            out[name] = w.clone()
            continue
        if w.ndim == 2:
            m, n = w.shape
            low = torch.randn(m, rank, generator=g) @ torch.randn(rank, n, generator=g)
            d = low / low.norm() + 0.1 * torch.randn(m, n, generator=g) / (m * n) ** 0.5
        else:
            d = torch.randn(w.shape, generator=g)
            d = d / d.norm()
        out[name] = w + scale * w.norm().clamp_min(1e-3) * d
    return out


def make_pair(root: Path, arch: str = "bert", layers: int = 2, seed: int = 0) -> tuple[Path, Path]:
    """Write base/ and finetuned/ folders under root; returns their paths."""
    from transformers import AutoModel, AutoModelForCausalLM
    torch.manual_seed(seed)
    cfg = config(arch, layers)
    cls = AutoModel if arch == "bert" else AutoModelForCausalLM
    model = cls.from_config(cfg)
    tok = tokenizer()
    base, ft = root / f"{arch}-base", root / f"{arch}-ft"
    model.save_pretrained(base)
    tok.save_pretrained(base)
    model.load_state_dict(perturb(model.state_dict(), seed + 1))
    model.save_pretrained(ft)
    tok.save_pretrained(ft)
    return base, ft


def write_text(root: Path) -> Path:
    p = root / "calib.txt"
    p.write_text(TEXT)
    return p


def make_grown_pair(root: Path, added: int = 8, layers: int = 2, seed: int = 0) -> tuple[Path, Path]:
    """A Llama pair whose fine-tune adds `added` tokens (resize_token_embeddings: embed_tokens and
    lm_head get `added` more rows, filled with fresh values); returns (base, finetuned)."""
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config("llama", layers))
    tok = tokenizer()
    base, ft = root / "llama-base", root / "llama-grown"
    model.save_pretrained(base)
    tok.save_pretrained(base)
    model.load_state_dict(perturb(model.state_dict(), seed + 1))
    tok.add_tokens([f"newword{i}" for i in range(added)])
    model.resize_token_embeddings(len(tok), mean_resizing=False)
    g = torch.Generator().manual_seed(seed + 2)
    with torch.no_grad():
        for w in (model.get_input_embeddings().weight, model.get_output_embeddings().weight):
            w[-added:] = 0.02 * torch.randn(added, w.shape[1], generator=g)
    model.save_pretrained(ft)
    tok.save_pretrained(ft)
    return base, ft


def delta_and_gram(m: int = 96, n: int = 80, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A delta (m x n) of rank 24 plus noise, and the Gram X^T X (n x n) of 400 random inputs."""
    g = torch.Generator().manual_seed(seed)
    D = (torch.randn(m, 24, generator=g) @ torch.randn(24, n, generator=g)) * 1e-2 + 1e-3 * torch.randn(m, n, generator=g)
    X = torch.randn(400, n, generator=g)
    return D, X.T @ X

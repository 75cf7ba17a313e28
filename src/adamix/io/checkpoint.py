"""Open models tensor by tensor: Hugging Face folders (single or sharded safetensors) and GGUF files.

A GGUF file is de-quantized once by transformers (`gguf_file=`) and cached as a safetensors folder
under $ADAMIX_CACHE (default ~/.cache/adamix), keyed by the file's sha256; after that it is read
like any folder. Tensors are read lazily with `safe_open`, never all at once.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import AdamixError
from ..timing import timed
from .cache import cache_dir
from .dtypes import TORCH

CONFIG_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "vocab.txt", "vocab.json", "merges.txt", "tokenizer.model",
    "added_tokens.json", "chat_template.jinja", "modules.json", "sentence_bert_config.json",
    "config_sentence_transformers.json",
)


def file_sha256(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class Checkpoint:
    """A model on disk: tensor names, shapes, dtypes, and tensors read one at a time.

    path: a folder with config.json and model.safetensors or model.safetensors.index.json,
    or a .gguf file (converted once, see module doc).
    """

    def __init__(self, path: str | os.PathLike):
        self.source = Path(path)
        if not self.source.exists():
            raise AdamixError(f"{self.source}: no such file or folder")
        self.folder = gguf_to_folder(self.source) if self.source.is_file() else self.source
        self._handles: dict[str, object] = {}
        self._layouts: dict[Path, tuple[int, dict]] = {}
        self._where = self._index()

    def _index(self) -> dict[str, Path]:
        folder = self.folder
        if not (folder / "config.json").is_file():
            raise AdamixError(f"{folder}: not a model folder (no config.json)")
        self.config()  # refuses a config.json that is not a JSON object now, not at the end of compress
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                    raise ValueError("weight_map is not a {tensor: file} table")
            except (ValueError, KeyError, TypeError) as e:
                raise AdamixError(f"{index}: unreadable shard index ({e})") from None
            return {name: folder / shard for name, shard in weight_map.items()}
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise AdamixError(f"{folder}: no .safetensors weights (pickled .bin checkpoints are not read)")
        where = {}
        for f in files:
            for name in self._open(f).keys():
                where[name] = f
        return where

    def _open(self, f: Path):
        key = str(f)
        if key not in self._handles:
            try:
                self._handles[key] = safe_open(key, framework="pt")
            except Exception as e:  # safetensors raises its own error types for corrupt files
                raise AdamixError(f"{f}: cannot read safetensors ({e})") from None
        return self._handles[key]

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def slice_info(self, name: str) -> tuple[tuple[int, ...], str]:
        """(shape, dtype string as in safetensors, e.g. 'F32') without reading the data."""
        sl = self._open(self._where[name]).get_slice(name)
        return tuple(sl.get_shape()), sl.get_dtype()

    @timed("read")
    def get(self, name: str) -> torch.Tensor:
        """The tensor `name`, read with plain file reads rather than through safetensors' memory map:
        pages of a memory map stay mapped, so a run that reads a whole model once would end with the
        whole model counted in its resident memory. (The file was validated by safe_open in _open.)"""
        f = self._where[name]
        info = self._layout(f)[1].get(name)
        dtype = TORCH.get(info["dtype"]) if isinstance(info, dict) else None
        if dtype is None:  # a dtype read by safetensors only (e.g. float8)
            return self._open(f).get_tensor(name)
        start, end = info["data_offsets"]
        if end == start:
            return torch.empty(info["shape"], dtype=dtype)
        buf = bytearray(end - start)
        with open(f, "rb") as fh:
            fh.seek(self._layout(f)[0] + start)
            if fh.readinto(buf) != len(buf):
                raise AdamixError(f"{f}: truncated (tensor {name} is cut short)")
        return torch.frombuffer(buf, dtype=dtype).reshape(info["shape"])

    def _layout(self, f: Path) -> tuple[int, dict]:
        """(offset of the data section, header) of a safetensors file."""
        if f not in self._layouts:
            self._open(f)  # validates the file
            with open(f, "rb") as fh:
                n = struct.unpack("<Q", fh.read(8))[0]
                self._layouts[f] = (8 + n, json.loads(fh.read(n)))
        return self._layouts[f]

    def config(self) -> dict:
        """config.json as a dict (AdamixError if it is not a JSON object)."""
        path = self.folder / "config.json"
        try:
            config = json.loads(path.read_bytes().decode("utf-8"))
        except (OSError, ValueError) as e:
            raise AdamixError(f"{path}: unreadable ({e})") from None
        if not isinstance(config, dict):
            raise AdamixError(f"{path}: not a JSON object")
        return config

    def config_files(self) -> list[Path]:
        """The config and tokenizer files of this model (copied into artifacts and merged models)."""
        return [self.folder / n for n in CONFIG_FILES if (self.folder / n).is_file()]

    def fingerprint(self) -> str:
        """sha256 over every tensor's name, shape, dtype and bytes, in name order."""
        h = hashlib.sha256()
        for name in sorted(self._where):
            t = self.get(name)
            h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
            h.update(t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        return h.hexdigest()


def config_fingerprint(ckpt: Checkpoint) -> str:
    return hashlib.sha256(json.dumps(ckpt.config(), sort_keys=True).encode()).hexdigest()


def gguf_to_folder(path: Path) -> Path:
    """De-quantize a GGUF file with transformers into a cached safetensors folder (once)."""
    if path.suffix.lower() != ".gguf":
        raise AdamixError(f"{path}: expected a model folder or a .gguf file")
    out = cache_dir() / "gguf" / file_sha256(path)[:16]
    if (out / "config.json").is_file():
        return out
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except ImportError as e:
        raise AdamixError(f"reading GGUF needs the 'gguf' package ({e}); pip install gguf") from None
    except Exception as e:
        raise AdamixError(f"{path}: transformers cannot load this GGUF file ({e})") from None
    # transformers de-quantizes every layer to float32 but leaves its GGUF quantizer attached, which
    # refuses save_pretrained: check that nothing is still packed, then drop it.
    if {p.dtype for p in model.parameters()} != {torch.float32}:
        raise AdamixError(f"{path}: transformers did not de-quantize every tensor of this GGUF file")
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out

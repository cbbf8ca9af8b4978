"""A tiny, randomly initialised, Llama-shaped causal LM for the CPU demo and the tests.

Build it (offline, deterministic, a few seconds on CPU)::

    python -m humpback_runtime.tiny_model OUT_DIR [--force]

The result is an ordinary Hugging Face model directory (``config.json``, ``model.safetensors``,
``generation_config.json``, ``tokenizer.json``, ``tokenizer_config.json``, ``README.md``) that
``AutoModelForCausalLM.from_pretrained(OUT_DIR)`` and ``AutoTokenizer.from_pretrained(OUT_DIR)``
load without extra code, and that vLLM's Llama loader accepts (head_dim 32).

* Tokenizer: byte-level BPE trained with ``tokenizers`` on the text of the shipped samples
  (``examples/data/oasst1_sample.jsonl`` and ``examples/data/c4_sample.jsonl``), special tokens
  ``<s>``, ``</s>``, ``<unk>``, ``<pad>``. Any byte sequence tokenizes without ``<unk>`` and decoding
  round-trips. Like Llama's tokenizer it prepends ``<s>`` when encoding with special tokens. It has no
  chat template: :mod:`humpback_runtime.prompts` owns every template.
* Model: ``LlamaForCausalLM`` from a ``LlamaConfig`` with ``torch.manual_seed(seed)`` random init,
  float32, untied input/output embeddings. Its outputs are meaningless.

A marker file (:data:`MARKER_NAME`, written last) records the build arguments; a later call with the
same arguments returns at once, a call with different arguments (or ``force=True``) rebuilds.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

__all__ = ["MARKER_NAME", "SPECIAL_TOKENS", "build_tiny_model", "default_text_files", "main"]

MARKER_NAME = ".humpback-tiny-model.json"
MARKER_VERSION = 1
SPECIAL_TOKENS = ["<s>", "</s>", "<unk>", "<pad>"]
BOS, EOS, UNK, PAD = SPECIAL_TOKENS

# Files whose presence (with the marker) makes a directory a complete model.
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")

# Upper bound on the text the BPE trainer sees (characters); keeps a build at a few seconds.
MAX_TRAIN_CHARS = 4_000_000

_REPO_ROOT = Path(__file__).resolve().parent.parent
_DEFAULT_TEXT_FILES = ("examples/data/oasst1_sample.jsonl", "examples/data/c4_sample.jsonl")

_INSTALL_HINT = "pip install 'humpback[train]'"

MODEL_CARD = """\
---
library_name: transformers
pipeline_tag: text-generation
tags:
- humpback
- tiny
- random-weights
- test-only
---

# humpback tiny Llama (random weights)

A tiny Llama-shaped causal language model **with randomly initialised weights**, built offline by
`python -m humpback_runtime.tiny_model` for humpback's CPU demo and tests.

**For tests and demos only. It was never trained: its outputs are meaningless.**

| setting | value |
|---|---|
| architecture | `LlamaForCausalLM` |
| hidden size | {hidden_size} |
| layers | {num_layers} |
| attention heads (= key/value heads) | {num_heads} |
| head dim | {head_dim} |
| intermediate size | {intermediate_size} |
| vocabulary | {vocab_size} (byte-level BPE, {trained_vocab} tokens trained) |
| max positions | {max_position_embeddings} |
| parameters | {num_parameters:,} |
| dtype | float32 |
| seed | {seed} |

The tokenizer is a byte-level BPE trained with the `tokenizers` library on the text of the sample
files shipped with humpback ({text_sources}); special tokens `<s>`, `</s>`, `<unk>`, `<pad>`. It has
no chat template: humpback's prompts module owns every template.
"""


def _require(module: str) -> Any:
    """Import a heavy optional dependency, or explain how to install it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - exercised only without the extra installed
        raise ImportError(
            f"building the tiny model needs {module!r}, which is not installed: {_INSTALL_HINT}"
        ) from exc


def default_text_files() -> list[Path]:
    """The shipped sample files the tokenizer is trained on (relative to the repository root)."""
    return [_REPO_ROOT / p for p in _DEFAULT_TEXT_FILES]


def _intermediate_size(hidden_size: int) -> int:
    """Llama's ~8/3 * hidden MLP width, rounded up to a multiple of 32 (352 for hidden 128)."""
    return -(-(8 * hidden_size) // (3 * 32)) * 32


def _read_texts(files: list[Path], max_chars: int = MAX_TRAIN_CHARS) -> list[str]:
    """The ``text`` field of every JSON line, in file order, up to ``max_chars`` characters.

    Files are read alternately line by line so that a limit still samples every file.
    """
    per_file: list[list[str]] = []
    budget = max_chars // max(len(files), 1)
    for path in files:
        if not path.is_file():
            raise FileNotFoundError(
                f"tokenizer training text {path} not found (the default files ship in the "
                "repository's examples/data; pass text_files=... elsewhere)"
            )
        texts: list[str] = []
        used = 0
        with path.open("r", encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                line = line.strip()
                if not line:
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{lineno}: not a JSON line: {exc}") from exc
                text = record.get("text") if isinstance(record, dict) else None
                if not isinstance(text, str) or not text:
                    continue
                texts.append(text)
                used += len(text)
                if used >= budget:
                    break
        per_file.append(texts)
    merged: list[str] = []
    for i in range(max((len(t) for t in per_file), default=0)):
        for texts in per_file:
            if i < len(texts):
                merged.append(texts[i])
    if not merged:
        raise ValueError(f"no 'text' fields found in {[str(p) for p in files]}")
    return merged


def _texts_digest(texts: list[str]) -> str:
    h = hashlib.sha256()
    for t in texts:
        data = t.encode("utf-8")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


def _train_tokenizer(texts: list[str], vocab_size: int) -> Any:
    """Byte-level BPE over ``texts``; deterministic for the same input (see the tests)."""
    tokenizers = _require("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    tok = tokenizers.Tokenizer(models.BPE(unk_token=UNK, fuse_unk=False, byte_fallback=False))
    # No normalizer: any normalisation (NFC, lowercasing, ...) would break the round trip.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        # All 256 byte symbols are in the vocabulary, so no input ever maps to <unk>.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    bos_id, eos_id = tok.token_to_id(BOS), tok.token_to_id(EOS)
    # Llama convention: prepend <s> when special tokens are added (no </s>).
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A",
        pair=f"{BOS} $A {BOS} $B",
        special_tokens=[(BOS, bos_id), (EOS, eos_id)],
    )
    return tok


def _marker_args(
    *,
    text_files: list[Path] | None,
    texts_digest: str,
    vocab_size: int,
    hidden_size: int,
    num_layers: int,
    num_heads: int,
    seed: int,
    max_position_embeddings: int,
) -> dict[str, Any]:
    return {
        "marker_version": MARKER_VERSION,
        "text_files": None if text_files is None else [str(Path(p).resolve()) for p in text_files],
        "texts_sha256": texts_digest,
        "max_train_chars": MAX_TRAIN_CHARS,
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "num_layers": num_layers,
        "num_heads": num_heads,
        "seed": seed,
        "max_position_embeddings": max_position_embeddings,
    }


def _is_complete(out_dir: Path, args: dict[str, Any]) -> bool:
    marker = out_dir / MARKER_NAME
    if not marker.is_file() or not all((out_dir / f).is_file() for f in REQUIRED_FILES):
        return False
    try:
        recorded = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(recorded, dict) and recorded.get("args") == args


def _save_model(model: Any, directory: Path) -> None:
    params = inspect.signature(model.save_pretrained).parameters
    kwargs: dict[str, Any] = {}
    if "safe_serialization" in params:  # transformers 4.x; 5.x always writes safetensors
        kwargs["safe_serialization"] = True
    model.save_pretrained(str(directory), **kwargs)


def build_tiny_model(
    out_dir: str | Path,
    *,
    text_files: list[Path] | None = None,
    vocab_size: int = 4096,
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    seed: int = 0,
    max_position_embeddings: int = 2048,
    force: bool = False,
) -> Path:
    """Build the tiny random Llama model + byte-level BPE tokenizer into ``out_dir``; return it.

    Same arguments give byte-identical ``model.safetensors`` and ``tokenizer.json``. When
    ``out_dir`` already holds a complete build with the same arguments (marker file written last),
    it is returned untouched unless ``force``. Files are written into a temporary sibling directory
    and moved in one by one, the marker last, so a half-written build is never taken for a finished
    one.
    """
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size {vocab_size} is smaller than the byte alphabet + specials")
    out_dir = Path(out_dir)
    files = default_text_files() if text_files is None else [Path(p) for p in text_files]
    texts = _read_texts(files)
    args = _marker_args(
        text_files=text_files,
        texts_digest=_texts_digest(texts),
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_layers=num_layers,
        num_heads=num_heads,
        seed=seed,
        max_position_embeddings=max_position_embeddings,
    )
    if not force and _is_complete(out_dir, args):
        return out_dir

    torch = _require("torch")
    transformers = _require("transformers")
    started = time.monotonic()

    raw_tok = _train_tokenizer(texts, vocab_size)
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=raw_tok,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        model_max_length=max_position_embeddings,
        clean_up_tokenization_spaces=False,
        padding_side="right",
    )
    bos_id, eos_id, pad_id = (raw_tok.token_to_id(t) for t in (BOS, EOS, PAD))

    head_dim = hidden_size // num_heads
    intermediate_size = _intermediate_size(hidden_size)
    config = transformers.LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        head_dim=head_dim,
        hidden_act="silu",
        max_position_embeddings=max_position_embeddings,
        initializer_range=0.02,
        rms_norm_eps=1e-5,
        use_cache=True,
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
    )
    config.architectures = ["LlamaForCausalLM"]
    # transformers 5 names it `dtype`, 4.x `torch_dtype`; both spell float32 in config.json.
    if hasattr(config, "dtype"):
        config.dtype = "float32"
    else:  # pragma: no cover - transformers 4.x
        config.torch_dtype = "float32"

    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = transformers.LlamaForCausalLM(config).to(torch.float32)
    finally:
        torch.random.set_rng_state(state)
    model.eval()
    model.generation_config = transformers.GenerationConfig(
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
    )
    num_parameters = sum(p.numel() for p in model.parameters())

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        _save_model(model, tmp)
        tokenizer.save_pretrained(str(tmp))
        # Declare the generic fast tokenizer (what Llama 3 checkpoints do): transformers 4.x loads
        # it as PreTrainedTokenizerFast, 5.x as TokenizersBackend; never the Metaspace LlamaTokenizer.
        tc_path = tmp / "tokenizer_config.json"
        tc = json.loads(tc_path.read_text(encoding="utf-8"))
        tc["tokenizer_class"] = "PreTrainedTokenizerFast"
        tc.pop("chat_template", None)
        tc_path.write_text(json.dumps(tc, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        for stray in ("chat_template.jinja", "chat_template.json"):
            (tmp / stray).unlink(missing_ok=True)

        card = MODEL_CARD.format(
            hidden_size=hidden_size,
            num_layers=num_layers,
            num_heads=num_heads,
            head_dim=head_dim,
            intermediate_size=intermediate_size,
            vocab_size=vocab_size,
            trained_vocab=raw_tok.get_vocab_size(),
            max_position_embeddings=max_position_embeddings,
            num_parameters=num_parameters,
            seed=seed,
            text_sources=", ".join(f"`{p.name}`" for p in files),
        )
        (tmp / "README.md").write_text(card, encoding="utf-8")

        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / MARKER_NAME).unlink(missing_ok=True)  # invalid from here until the end
        umask = os.umask(0)
        os.umask(umask)
        for item in sorted(tmp.iterdir()):
            if item.is_file():
                # Some writers use mkstemp (mode 0600); give every file ordinary permissions.
                os.chmod(item, 0o666 & ~umask)
                os.replace(item, out_dir / item.name)
        marker = {
            "args": args,
            "num_parameters": num_parameters,
            "trained_vocab_size": raw_tok.get_vocab_size(),
            "build_seconds": round(time.monotonic() - started, 3),
            "versions": {
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "tokenizers": _require("tokenizers").__version__,
            },
        }
        marker_tmp = tmp / MARKER_NAME
        marker_tmp.write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        os.chmod(marker_tmp, 0o666 & ~umask)
        os.replace(marker_tmp, out_dir / MARKER_NAME)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    """Build the tiny demo model.

    Usage::

        python -m humpback_runtime.tiny_model OUT_DIR [--force] [--seed N]
    """
    parser = argparse.ArgumentParser(
        prog="python -m humpback_runtime.tiny_model",
        description="Build humpback's tiny, randomly initialised Llama-shaped model (tests/demo only).",
    )
    parser.add_argument("out_dir", type=Path, help="model directory to create")
    parser.add_argument("--force", action="store_true", help="rebuild even if already complete")
    parser.add_argument("--seed", type=int, default=0, help="weight initialisation seed (default 0)")
    ns = parser.parse_args(argv)
    started = time.monotonic()
    out = build_tiny_model(ns.out_dir, seed=ns.seed, force=ns.force)
    print(f"tiny model ready in {out} ({time.monotonic() - started:.1f}s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The demo's tiny Llama-shaped model: loads as a plain HF directory, deterministic, idempotent."""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from humpback_runtime import tiny_model  # noqa: E402
from humpback_runtime.tiny_model import MARKER_NAME, build_tiny_model  # noqa: E402

ROUND_TRIP_TEXTS = [
    "The quick brown fox jumps over the lazy dog. It's 3:45 p.m., isn't it?",
    "Grüße aus Köln! Äpfel, Öl und Übermaß kosten 5 € – schön, oder?",
    "Emoji: 🐋🚀 family 👩\u200d👩\u200d👧 flags 🇩🇪 skin 👍🏽",
    "中文文本测试：你好，世界。机器学习很有趣！",
    "  leading spaces, trailing space \n\ttabs\r\nand\x00control\x7fbytes\u00a0nbsp ",
    "日本語とかな、한국어, Ελληνικά, русский, עברית, العربية",
]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def test_directory_layout(model_dir: Path) -> None:
    for name in (
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "README.md",
        MARKER_NAME,
    ):
        assert (model_dir / name).is_file(), name
    assert not (model_dir / "pytorch_model.bin").exists()
    assert not (model_dir / "chat_template.jinja").exists()
    config = json.loads((model_dir / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert config["architectures"] == ["LlamaForCausalLM"]
    tok_config = json.loads((model_dir / "tokenizer_config.json").read_text())
    assert "chat_template" not in tok_config
    card = (model_dir / "README.md").read_text()
    assert "randomly initialised" in card
    assert "meaningless" in card
    # No stray temporary directories left beside the model.
    assert [p.name for p in model_dir.parent.iterdir()] == ["model"]


def test_loads_with_auto_classes_and_runs_forward(model_dir: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(model_dir)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    assert head_dim >= 32
    assert config.hidden_size == 128
    assert config.num_hidden_layers == 2
    assert config.num_key_value_heads == config.num_attention_heads == 4
    assert config.vocab_size == 4096

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    model.eval()
    assert model.dtype == torch.float32
    assert tokenizer.chat_template is None
    assert len(tokenizer) <= config.vocab_size
    assert tokenizer.bos_token == "<s>" and tokenizer.eos_token == "</s>"
    assert tokenizer.unk_token == "<unk>" and tokenizer.pad_token == "<pad>"
    assert config.bos_token_id == tokenizer.bos_token_id
    assert config.eos_token_id == tokenizer.eos_token_id
    assert config.pad_token_id == tokenizer.pad_token_id
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id

    enc = tokenizer("Write a haiku about whales.", return_tensors="pt")
    n = enc["input_ids"].shape[1]
    assert enc["input_ids"][0, 0].item() == tokenizer.bos_token_id
    with torch.no_grad():
        out = model(**enc, labels=enc["input_ids"])
    assert tuple(out.logits.shape) == (1, n, config.vocab_size)
    loss = out.loss.item()
    assert math.isfinite(loss)
    # Random init: the loss is close to uniform over the vocabulary.
    assert abs(loss - math.log(config.vocab_size)) < 1.0

    # Batched, padded input works too (what training and the transformers engine do).
    batch = tokenizer(["short", "a somewhat longer piece of text"], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape[:2] == batch["input_ids"].shape
    assert torch.isfinite(logits).all()

    # Greedy generation runs (and stops at max_new_tokens at the latest).
    with torch.no_grad():
        gen = model.generate(**enc, max_new_tokens=4, do_sample=False)
    assert gen.shape[1] <= n + 4


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_tokenizer_round_trips_without_unk(model_dir: Path, text: str) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    plain = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(plain) == text


def test_build_is_deterministic(model_dir: Path, tmp_path: Path) -> None:
    other = build_tiny_model(tmp_path / "again")
    for name in ("model.safetensors", "tokenizer.json", "config.json", "tokenizer_config.json"):
        assert _sha256(model_dir / name) == _sha256(other / name), name


def test_build_is_idempotent_and_force_rebuilds(tmp_path: Path) -> None:
    out = build_tiny_model(tmp_path / "m")
    files = [p for p in out.iterdir() if p.is_file()]
    old = 1_000_000_000  # 2001: anything rewritten afterwards is newer
    for p in files:
        os.utime(p, (old, old))

    assert build_tiny_model(out) == out
    assert all(p.stat().st_mtime == old for p in files), "a complete build was rewritten"

    build_tiny_model(out, force=True)
    assert all(p.stat().st_mtime > old for p in files), "force=True did not rewrite every file"


def test_changed_arguments_rebuild(tmp_path: Path) -> None:
    out = build_tiny_model(tmp_path / "m")
    weights = _sha256(out / "model.safetensors")
    tokenizer = _sha256(out / "tokenizer.json")
    build_tiny_model(out, seed=1)
    assert _sha256(out / "model.safetensors") != weights
    assert _sha256(out / "tokenizer.json") == tokenizer
    marker = json.loads((out / MARKER_NAME).read_text())
    assert marker["args"]["seed"] == 1


def test_incomplete_directory_is_rebuilt(tmp_path: Path) -> None:
    out = tmp_path / "m"
    out.mkdir()
    (out / "config.json").write_text("{}")  # a leftover from a crashed build, no marker
    build_tiny_model(out)
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama"
    assert (out / MARKER_NAME).is_file()


def test_custom_text_files(tmp_path: Path) -> None:
    data = tmp_path / "texts.jsonl"
    lines = [{"text": f"sample number {i}: humpback whales sing long songs."} for i in range(200)]
    lines.append({"other": "no text field here"})
    data.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    out = build_tiny_model(tmp_path / "m", text_files=[data], vocab_size=512, hidden_size=64, num_heads=2)
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == 512 and config["hidden_size"] == 64
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out)
    for text in ROUND_TRIP_TEXTS:  # bytes never seen in training still round-trip
        ids = tokenizer(text)["input_ids"]
        assert tokenizer.unk_token_id not in ids
        assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_missing_text_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        build_tiny_model(tmp_path / "m", text_files=[tmp_path / "nope.jsonl"])


def test_missing_dependency_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ImportError, match=r"pip install 'humpback\[train\]'"):
        build_tiny_model(tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_main_cli_reuses_a_complete_build(model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = (model_dir / MARKER_NAME).stat().st_mtime_ns
    assert tiny_model.main([str(model_dir)]) == 0
    assert (model_dir / MARKER_NAME).stat().st_mtime_ns == before
    assert "python -m humpback_runtime.tiny_model OUT_DIR" in (tiny_model.main.__doc__ or "")

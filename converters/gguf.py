"""GGUF → Hugging Face folder: dequantise any GGUF quantisation with transformers."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path

from ortllm.errors import ConversionFailed, MissingDependency, first_line


def gguf_key(gguf: Path) -> str:
    """A cache key for a GGUF file: its name, size and modification time."""
    st = gguf.stat()
    return hashlib.sha256(f"{gguf.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]


def dequantised_dir(gguf: Path, cache: Path) -> Path:
    """Where `dequantise` keeps the float32 folder of `gguf` under `cache`."""
    return cache / "gguf-hf" / f"{gguf.stem}-{gguf_key(gguf)}"


def dequantise(gguf: Path, cache: Path) -> Path:
    """Return a float32 Hugging Face folder for `gguf`, built once and cached under `cache`."""
    out = dequantised_dir(gguf, cache)
    if (out / "config.json").is_file():
        _copy_special_token_flags(gguf, out)  # a folder cached before the flags were recorded gets them now
        return out
    try:
        import transformers
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    except ImportError as exc:
        raise MissingDependency(
            "Reading GGUF needs the convert extra: pip install torch==2.13.0 && pip install 'ortllm[convert]'"
        ) from exc
    # our own progress display replaces transformers' tqdm bars
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    tmp = out.with_name(f".{out.name}-{uuid.uuid4().hex[:8]}")
    try:
        kwargs = {"gguf_file": gguf.name}
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), **kwargs)
        config = AutoConfig.from_pretrained(str(gguf.parent), **kwargs)
        # llama.cpp writes no output.weight for a tied model: without this its LM head would be left random
        config.get_text_config().tie_word_embeddings = not has_output_weight(gguf)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), config=config, **kwargs)
        # the dequantised weights are plain float tensors; drop the GGUF quantiser so they serialise
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None  # type: ignore[assignment]  # transformers types it non-optional
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        _copy_chat_template(tokenizer, tmp)
        _copy_special_token_flags(gguf, tmp)
    except MissingDependency:
        raise
    except Exception as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ConversionFailed(f"Could not read GGUF '{gguf.name}': {first_line(exc, None)}") from exc
    os.replace(tmp, out) if not out.exists() else shutil.rmtree(tmp, ignore_errors=True)
    return out


def has_output_weight(gguf: Path) -> bool:
    """Whether the GGUF carries its own LM head (`output.weight`); llama.cpp omits it for tied models."""
    from gguf import GGUFReader

    return any(t.name == "output.weight" for t in GGUFReader(str(gguf)).tensors)


def _copy_special_token_flags(gguf: Path, folder: Path) -> None:
    """Record whether the tokenizer adds BOS/EOS (GGUF metadata) where onnxruntime-genai and ortllm read it."""
    from gguf import GGUFReader

    fields = GGUFReader(str(gguf)).fields
    cfg_path = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
    changed = False
    for key in ("add_bos_token", "add_eos_token"):
        field = fields.get(f"tokenizer.ggml.{key}")
        if field is not None and key not in cfg:
            cfg[key] = bool(field.parts[-1][0])
            changed = True
    if changed:
        cfg_path.write_text(json.dumps(cfg, indent=2))


def _copy_chat_template(tokenizer, folder: Path) -> None:
    """Keep the GGUF's chat template next to the tokenizer where the genai builder looks for it."""
    template = getattr(tokenizer, "chat_template", None)
    if not template or (folder / "chat_template.jinja").exists():
        return
    cfg_path = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
    cfg.setdefault("chat_template", template)
    cfg_path.write_text(json.dumps(cfg, indent=2))

"""The `optimum` backend: export with optimum in its own environment (transformers < 4.58).

Causal LMs: optimum's ONNX export with past key/values (`text-generation-with-past`), the MatMuls
quantised with onnxruntime's MatMulNBits quantiser (int4/int8, block 32, symmetric), and a
`genai_config.json` so onnxruntime-genai serves the graph like one of its builder's. Embedding
models (any non-generative architecture, e.g. a sentence-transformers BERT): optimum's
`feature-extraction` export plus an `embedding_config.json` (pooling, normalisation, max length)
that `ortllm.runtime.embedder` serves with plain onnxruntime.

Everything here runs in-process in the optimum environment (`make optimum-env`); nothing in the
main environment imports it except `require_optimum()`, which says what to install.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ortllm.errors import (
    ConversionFailed,
    InvalidBuildOptions,
    MissingDependency,
    UnsupportedArchitecture,
    first_line,
)

INSTALL_COMMAND = (
    "python3 -m venv .venv-optimum && .venv-optimum/bin/pip install torch==2.13.0 "
    "&& .venv-optimum/bin/pip install -e '.[optimum]'"
)
OPTIMUM_HINT = (
    "The optimum backend needs its own environment (optimum pins transformers<4.58, which the genai "
    f"builder cannot use): run `make optimum-env` (or: {INSTALL_COMMAND}), "
    "then `.venv-optimum/bin/ortllm convert --backend optimum ...`"
)
PRECISIONS = ("int4", "int8", "fp32")
DEFAULT_BLOCK_SIZE = 32
# genai's generic decoder-only type: a DecoderOnly model driven by the input/output names given here
GENAI_MODEL_TYPE = "decoder"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
)
EMBEDDING_FILES = (
    "config.json",
    "sentence_bert_config.json",
    "modules.json",
    "config_sentence_transformers.json",
)
EMBEDDING_CONFIG = "embedding_config.json"
GENERATIVE_SUFFIXES = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")

LIBRARY_LOGGERS = ("transformers", "optimum", "torch", "onnxruntime", "py.warnings", "ortllm")

log = logging.getLogger("ortllm.optimum")


def require_optimum() -> None:
    """Fail with the exact install command unless optimum's exporter can be imported here."""
    missing = [m for m in ("optimum", "torch", "transformers", "onnx") if importlib.util.find_spec(m) is None]
    if missing or importlib.util.find_spec("optimum.exporters.onnx") is None:
        raise MissingDependency(OPTIMUM_HINT)


def build(
    hf_dir: Path,
    out_dir: Path,
    *,
    precision: str,
    log_path: Path,
    ep: str = "cpu",
    block_size: int | None = None,
    accuracy_level: int | None = None,
    trust_remote_code: bool = False,
    task: str | None = None,
) -> dict[str, object]:
    """Export `hf_dir` into `out_dir` (ONNX, config, tokenizer); return the build facts for the manifest."""
    require_optimum()
    if ep != "cpu":
        raise InvalidBuildOptions(
            f"The optimum backend builds cpu variants only (asked for {ep}); use --ep cpu"
        )
    if precision not in PRECISIONS:
        raise InvalidBuildOptions(
            f"The optimum backend builds {', '.join(PRECISIONS)} on cpu (asked for {precision})"
        )
    bits = {"int4": 4, "int8": 8}.get(precision)
    block_size = block_size or DEFAULT_BLOCK_SIZE
    accuracy_level = 4 if accuracy_level is None else accuracy_level
    task = task or detect_task(hf_dir)
    check_tokenizer(hf_dir)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix=".optimum-", dir=out_dir.parent) as scratch, _captured(log_path):
        scratch_dir = Path(scratch)
        src = compatible_source(hf_dir, scratch_dir / "src")
        export_dir = scratch_dir / "export"
        log.info("optimum export: %s (task %s)", hf_dir, task)
        export_seconds = _export(src, export_dir, task, trust_remote_code)
        t0 = time.monotonic()
        model = _load_onnx(export_dir / "model.onnx")
        if task == "feature-extraction":
            info = _embedding_layout(model, src)
        else:
            info = _decoder_layout(model, src)
            _expose_hidden_states(model)
        quantised = 0
        if bits:
            # an encoder's vectors suffer from a 4-bit word table (MiniLM: cosine to fp32 down to 0.86)
            model, quantised = quantise(
                model,
                bits=bits,
                block_size=block_size,
                accuracy_level=accuracy_level,
                tables=task != "feature-extraction",
            )
        _save_onnx(model, out_dir / "model.onnx")
        del model
        quantise_seconds = time.monotonic() - t0
        _copy_tokenizer(src, out_dir)
        if task == "feature-extraction":
            _write_embedding_config(src, out_dir, info)
        else:
            _write_genai_config(src, out_dir, info)
    result: dict[str, object] = {
        "task": task,
        "optimum": _version("optimum"),
        "optimum-onnx": _version("optimum-onnx"),
        "export_seconds": round(export_seconds, 1),
        "quantise_seconds": round(quantise_seconds, 1) if bits else 0.0,
        "build_seconds": round(time.monotonic() - started, 1),
    }
    if bits:
        result.update(block_size=block_size, accuracy_level=accuracy_level, quantised_matmuls=quantised)
    if task == "feature-extraction":
        result["kind"] = "embedding"
    else:
        # LoadedModel reads this flag to allow /api/embeddings on the chat model (mean-pooled hidden states)
        result.update(genai_type=GENAI_MODEL_TYPE, extra_options={"include_hidden_states": "true"})
    return result


# ---- source folder -------------------------------------------------------------------------------


def read_config(hf_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((hf_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConversionFailed(f"{hf_dir} has no readable config.json") from exc


def detect_task(hf_dir: Path) -> str:
    """`text-generation-with-past` for causal LMs, `feature-extraction` for encoders (embedding models)."""
    config = read_config(hf_dir)
    archs = config.get("architectures") or []
    if any(a.endswith(GENERATIVE_SUFFIXES) for a in archs):
        return "text-generation-with-past"
    if (hf_dir / "modules.json").is_file() or archs:
        return "feature-extraction"
    raise UnsupportedArchitecture(f"{hf_dir}/config.json names no architecture; cannot tell how to export it")


def compatible_source(hf_dir: Path, staging: Path) -> Path:
    """`hf_dir`, or a shadow of it whose config.json transformers 4.x reads the same way.

    transformers 5 writes `rope_parameters` (theta, scaling) where 4.x reads `rope_theta` /
    `rope_scaling`; 4.x silently falls back to its default theta (10000) otherwise, which changes
    every attention score of e.g. SmolLM2 (theta 100000). The shadow links every other file.
    """
    config = read_config(hf_dir)
    patched = dict(config)
    rope = config.get("rope_parameters")
    if isinstance(rope, dict) and "rope_theta" not in config:
        if "rope_theta" in rope:
            patched["rope_theta"] = rope["rope_theta"]
        rope_type = rope.get("rope_type", "default")
        if rope_type != "default" and not config.get("rope_scaling"):
            patched["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    if patched == config:
        return hf_dir
    staging.mkdir(parents=True)
    for item in hf_dir.iterdir():
        if item.name != "config.json":
            os.symlink(item.resolve(), staging / item.name)
    (staging / "config.json").write_text(json.dumps(patched, indent=2), encoding="utf-8")
    log.info(
        "config.json adapted for transformers %s: %s",
        _version("transformers"),
        ", ".join(sorted(k for k in patched if patched.get(k) != config.get(k))),
    )
    return staging


# ---- export --------------------------------------------------------------------------------------


def _export(src: Path, export_dir: Path, task: str, trust_remote_code: bool) -> float:
    from optimum.exporters.onnx import main_export

    started = time.monotonic()
    try:
        main_export(
            str(src),
            str(export_dir),
            task=task,
            library_name="transformers",
            local_files_only=True,
            do_validation=False,
            trust_remote_code=trust_remote_code,
            device="cpu",
        )
    except (KeyError, ValueError, NotImplementedError) as exc:
        arch = (read_config(src).get("architectures") or ["?"])[0]
        raise UnsupportedArchitecture(f"optimum cannot export {arch} for {task}: {first_line(exc)}") from exc
    except Exception as exc:
        raise ConversionFailed(f"optimum's ONNX export failed: {first_line(exc)}") from exc
    if not (export_dir / "model.onnx").is_file():
        found = ", ".join(sorted(p.name for p in export_dir.glob("*.onnx"))) or "no ONNX file"
        raise UnsupportedArchitecture(
            f"optimum exported {found} for {task}; onnxruntime-genai needs one merged model.onnx with past key/values"
        )
    return time.monotonic() - started


def _load_onnx(path: Path):
    import onnx

    return onnx.load(str(path), load_external_data=True)


def _save_onnx(model, path: Path) -> None:
    """Weights in one `model.onnx.data` beside the graph (the layout the genai builder writes)."""
    import onnx

    for stale in (path, path.with_name(path.name + ".data")):
        stale.unlink(missing_ok=True)
    onnx.save_model(
        model,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=path.name + ".data",
        size_threshold=1024,
    )


def _dims(value_info) -> list[int | str]:
    return [
        d.dim_value if d.HasField("dim_value") else d.dim_param for d in value_info.type.tensor_type.shape.dim
    ]


_PAST_RE = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")


def _decoder_layout(model, src: Path) -> dict[str, Any]:
    """What genai_config.json must say about the exported graph, or a precise refusal."""
    inputs = {i.name: i for i in model.graph.input}
    outputs = {o.name: o for o in model.graph.output}
    arch = (read_config(src).get("architectures") or ["?"])[0]
    past = {m.group(1, 2): vi for name, vi in inputs.items() if (m := _PAST_RE.match(name))}
    layers = sorted({int(layer) for layer, _ in past})
    problems = []
    if "input_ids" not in inputs or "logits" not in outputs:
        problems.append("no input_ids input or logits output")
    if not layers or layers != list(range(len(layers))):
        problems.append("no past_key_values.N.key/value inputs")
    unknown = sorted(
        set(inputs)
        - {"input_ids", "attention_mask", "position_ids"}
        - {f"past_key_values.{n}.{k}" for n, k in past}
    )
    if unknown:
        problems.append(f"inputs genai cannot feed: {', '.join(unknown)}")
    for layer in layers:
        for kind in ("key", "value"):
            if (str(layer), kind) not in past or f"present.{layer}.{kind}" not in outputs:
                problems.append(
                    f"layer {layer} lacks past_key_values.{layer}.{kind} or present.{layer}.{kind}"
                )
    shapes = {tuple(_dims(vi)) for vi in past.values()}
    if problems or len(shapes) != 1:
        detail = "; ".join(problems) or f"past key and value shapes differ: {sorted(shapes)}"
        raise UnsupportedArchitecture(f"onnxruntime-genai cannot serve optimum's export of {arch}: {detail}")
    shape = shapes.pop()
    if len(shape) != 4 or not isinstance(shape[1], int) or not isinstance(shape[3], int):
        # e.g. Bloom's fused [batch*heads, head_size, seq] cache: genai only drives [batch, heads, seq, head_size]
        raise UnsupportedArchitecture(
            f"onnxruntime-genai cannot serve optimum's export of {arch}: its past key/values have shape "
            f"{list(shape)}, genai needs [batch, kv_heads, past_sequence, head_size]"
        )
    logits_dims = _dims(outputs["logits"])
    return {
        "inputs": [i.name for i in model.graph.input if not i.name.startswith("past_key_values.")],
        "num_hidden_layers": len(layers),
        "num_key_value_heads": shape[1],
        "head_size": shape[3],
        "vocab_size": logits_dims[-1] if logits_dims and isinstance(logits_dims[-1], int) else None,
        "arch": arch,
    }


def _embedding_layout(model, src: Path) -> dict[str, Any]:
    outputs = [o.name for o in model.graph.output]
    if "last_hidden_state" not in outputs:
        arch = (read_config(src).get("architectures") or ["?"])[0]
        raise UnsupportedArchitecture(
            f"optimum's feature-extraction export of {arch} has no last_hidden_state output (it has: {', '.join(outputs)})"
        )
    dims = _dims(next(o for o in model.graph.output if o.name == "last_hidden_state"))
    return {
        "inputs": [i.name for i in model.graph.input],
        "output": "last_hidden_state",
        "dimension": dims[-1] if isinstance(dims[-1], int) else None,
    }


def _expose_hidden_states(model) -> None:
    """Add a `hidden_states` output (the lm_head's input), as the genai builder's include_hidden_states does."""
    import onnx

    producer = next((n for n in model.graph.node if "logits" in n.output), None)
    if (
        producer is None
        or producer.op_type not in ("MatMul", "Gemm")
        or any(o.name == "hidden_states" for o in model.graph.output)
    ):
        log.info(
            "no hidden_states output added (logits come from %s)", producer.op_type if producer else "nothing"
        )
        return
    model.graph.node.append(
        onnx.helper.make_node("Identity", [producer.input[0]], ["hidden_states"], name="hidden_states_out")
    )
    model.graph.output.append(
        onnx.helper.make_tensor_value_info(
            "hidden_states", onnx.TensorProto.FLOAT, ["batch_size", "sequence_length", "hidden_size"]
        )
    )


# ---- quantisation --------------------------------------------------------------------------------


def quantise(
    model, *, bits: int, block_size: int, accuracy_level: int, tables: bool = True
) -> tuple[Any, int]:
    """Quantise every MatMul with a constant weight to MatMulNBits: the new model and how many were.

    Gemm nodes (GPT-2's Conv1D exports as Gemm) become MatMul + Add first, and MatMuls that read a
    transposed initializer (tied lm_head = embeddingsᵀ) get their own transposed copy, so both are
    quantised too. With `tables`, embedding tables (Gather) become GatherBlockQuantized as well.
    """
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    _gemm_to_matmul(model)
    _untie_transposed_weights(model)
    # SmolLM2-135M int4 is 102 MB with its embedding table quantised, 197 MB without
    ops = ("MatMul", "Gather") if tables else ("MatMul",)
    axes = (("MatMul", 0), ("Gather", 1))
    config = DefaultWeightOnlyQuantConfig(
        block_size=block_size,
        is_symmetric=True,
        accuracy_level=accuracy_level,
        bits=bits,
        op_types_to_quantize=ops,
        quant_axes=axes,
    )
    quantizer = MatMulNBitsQuantizer(
        model,
        bits=bits,
        block_size=block_size,
        is_symmetric=True,
        accuracy_level=accuracy_level,
        algo_config=config,
        op_types_to_quantize=ops,
        quant_axes=axes,
    )
    quantizer.process()
    result = quantizer.model.model
    count = sum(1 for n in result.graph.node if n.op_type == "MatMulNBits")
    if count == 0:
        raise ConversionFailed("the MatMulNBits quantiser found no MatMul with a constant weight to quantise")
    return result, count


def _gemm_to_matmul(model) -> int:
    import onnx
    from onnx import numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    new_nodes, changed = [], 0
    for node in graph.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if (
            node.op_type != "Gemm"
            or node.input[1] not in inits
            or attrs.get("transA", 0)
            or attrs.get("alpha", 1.0) != 1.0
            or attrs.get("beta", 1.0) != 1.0
        ):
            new_nodes.append(node)
            continue
        weight = numpy_helper.to_array(inits[node.input[1]])
        if attrs.get("transB", 0):
            weight = weight.T.copy()
        wname = f"{node.input[1]}_matmul_{changed}"
        graph.initializer.append(numpy_helper.from_array(weight, wname))
        has_bias = len(node.input) > 2 and node.input[2]
        mm_out = f"{node.output[0]}_matmul" if has_bias else node.output[0]
        new_nodes.append(
            onnx.helper.make_node("MatMul", [node.input[0], wname], [mm_out], name=f"{node.name}_MatMul")
        )
        if has_bias:
            new_nodes.append(
                onnx.helper.make_node(
                    "Add", [mm_out, node.input[2]], [node.output[0]], name=f"{node.name}_Add"
                )
            )
        changed += 1
    if changed:
        del graph.node[:]
        graph.node.extend(new_nodes)
        _drop_unused_initializers(model)
    return changed


def _untie_transposed_weights(model) -> int:
    import onnx
    from onnx import numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}
    changed = 0
    for node in graph.node:
        if node.op_type != "MatMul" or node.input[1] in inits:
            continue
        t = producers.get(node.input[1])
        if t is None or t.op_type != "Transpose" or t.input[0] not in inits:
            continue
        perm = next((list(onnx.helper.get_attribute_value(a)) for a in t.attribute if a.name == "perm"), None)
        weight = numpy_helper.to_array(inits[t.input[0]])
        if weight.ndim != 2 or perm not in (None, [1, 0]):
            continue
        name = f"{t.output[0]}_untied"
        if name not in inits:
            inits[name] = numpy_helper.from_array(weight.T.copy(), name)
            graph.initializer.append(inits[name])
        node.input[1] = name
        changed += 1
    if changed:
        used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
        dead = [n for n in graph.node if n.op_type == "Transpose" and not any(o in used for o in n.output)]
        for n in dead:
            graph.node.remove(n)
    return changed


def _drop_unused_initializers(model) -> None:
    graph = model.graph
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    keep = [i for i in graph.initializer if i.name in used]
    if len(keep) != len(graph.initializer):
        del graph.initializer[:]
        graph.initializer.extend(keep)


# ---- configuration files -------------------------------------------------------------------------


def check_tokenizer(src: Path) -> None:
    """Refuse a tokenizer.json onnxruntime-genai would decode into byte soup.

    transformers 4.x (the optimum environment's) converts a GGUF's byte-level BPE tokenizer with a
    SentencePiece decoder chain (ByteFallback, Fuse, Replace ▁) and a BOS template; genai then prints
    `ĠTheĠcapital...`. transformers 5 (the main environment) converts it correctly, and both
    environments share the dequantised-GGUF cache.
    """
    with contextlib.suppress(OSError, ValueError):
        tok = json.loads((src / "tokenizer.json").read_text(encoding="utf-8"))
        pre = (tok.get("pre_tokenizer") or {}).get("type")
        decoders = [d.get("type") for d in ((tok.get("decoder") or {}).get("decoders") or [])]
        if pre == "ByteLevel" and "ByteFallback" in decoders:
            raise ConversionFailed(
                f"{src}/tokenizer.json pairs byte-level BPE with a SentencePiece decoder (transformers "
                f"{_version('transformers')}'s GGUF conversion), which onnxruntime-genai decodes wrongly: delete "
                f"{src} and dequantise the GGUF in the main environment first (`ortllm convert --backend genai "
                "FILE.gguf` writes the same cache folder), then rerun this command"
            )


def _copy_tokenizer(src: Path, out_dir: Path) -> None:
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy(src / name, out_dir / name)
    if (out_dir / "tokenizer.json").is_file():
        return
    try:  # a slow tokenizer only (vocab/merges, sentencepiece): let transformers write tokenizer.json
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(str(src)).save_pretrained(str(out_dir))
    except Exception as exc:
        raise ConversionFailed(
            f"{src} has no tokenizer.json and transformers could not make one: {first_line(exc)}"
        ) from exc


def _model_config(src: Path):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(src), local_files_only=True)


def _token_ids(src: Path, config) -> dict[str, Any]:
    gen: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        gen = json.loads((src / "generation_config.json").read_text(encoding="utf-8"))

    def pick(key: str) -> Any:
        value = gen.get(key)
        return value if value is not None else getattr(config, key, None)

    eos = pick("eos_token_id")
    bos = pick("bos_token_id")
    pad = pick("pad_token_id")
    if pad is None:
        pad = eos[0] if isinstance(eos, list) else eos
    return {
        "eos_token_id": eos if eos is not None else 0,
        "bos_token_id": bos if bos is not None else 0,
        "pad_token_id": pad if pad is not None else 0,
    }


def _context_length(config) -> int:
    for key in ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return 2048


def _write_genai_config(src: Path, out_dir: Path, info: dict[str, Any]) -> None:
    config = _model_config(src)
    context = _context_length(config)
    hidden = int(getattr(config, "hidden_size", 0) or getattr(config, "n_embd", 0))
    heads = int(getattr(config, "num_attention_heads", 0) or getattr(config, "n_head", 0))
    inputs = {
        name: name for name in ("input_ids", "attention_mask", "position_ids") if name in info["inputs"]
    }
    inputs.update(past_key_names="past_key_values.%d.key", past_value_names="past_key_values.%d.value")
    genai = {
        "model": {
            **_token_ids(src, config),
            "context_length": context,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": "model.onnx",
                "head_size": info["head_size"],
                "hidden_size": hidden,
                "inputs": inputs,
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
                "num_attention_heads": heads,
                "num_hidden_layers": info["num_hidden_layers"],
                "num_key_value_heads": info["num_key_value_heads"],
            },
            "type": GENAI_MODEL_TYPE,
            "vocab_size": info["vocab_size"] or int(config.vocab_size),
        },
        "search": {
            "diversity_penalty": 0.0,
            "do_sample": False,
            "early_stopping": True,
            "length_penalty": 1.0,
            "max_length": context,
            "min_length": 0,
            "no_repeat_ngram_size": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            # optimum's graph concatenates past and new keys (present = past + new): no shared buffer
            "past_present_share_buffer": False,
            "repetition_penalty": 1.0,
            "temperature": 1.0,
            "top_k": 50,
            "top_p": 1.0,
        },
    }
    (out_dir / "genai_config.json").write_text(json.dumps(genai, indent=4), encoding="utf-8")


def _write_embedding_config(src: Path, out_dir: Path, info: dict[str, Any]) -> None:
    """Pooling, normalisation and length the way sentence-transformers reads them from its folder."""
    for name in EMBEDDING_FILES:
        if (src / name).is_file():
            shutil.copy(src / name, out_dir / name)
    config = read_config(src)
    modules: list[dict[str, Any]] = []
    with contextlib.suppress(OSError, ValueError):
        modules = json.loads((src / "modules.json").read_text(encoding="utf-8"))
    pooling_cfg: dict[str, Any] = {}
    for module in modules:
        if module.get("type", "").endswith("Pooling"):
            with contextlib.suppress(OSError, ValueError):
                pooling_cfg = json.loads(
                    (src / module.get("path", "") / "config.json").read_text(encoding="utf-8")
                )
    pooling = "mean"
    for mode in ("cls_token", "max_tokens", "mean_sqrt_len_tokens", "mean_tokens", "lasttoken"):
        if pooling_cfg.get(f"pooling_mode_{mode}"):
            pooling = {
                "cls_token": "cls",
                "max_tokens": "max",
                "mean_sqrt_len_tokens": "mean_sqrt_len",
                "mean_tokens": "mean",
                "lasttoken": "last",
            }[mode]
            break
    # without modules.json (a plain transformers encoder) vectors are normalised, as the catalog's embedding models are
    normalize = any(m.get("type", "").endswith("Normalize") for m in modules) if modules else True
    max_length = int(config.get("max_position_embeddings") or 512)
    with contextlib.suppress(OSError, ValueError, TypeError):
        st = json.loads((src / "sentence_bert_config.json").read_text(encoding="utf-8"))
        max_length = int(st.get("max_seq_length") or max_length)
    embedding = {
        "filename": "model.onnx",
        "inputs": info["inputs"],
        "output": info["output"],
        "dimension": info["dimension"] or int(config.get("hidden_size") or 0),
        "pooling": pooling,
        "normalize": normalize,
        "max_length": max_length,
        "pad_token_id": int(config.get("pad_token_id") or 0),
    }
    (out_dir / EMBEDDING_CONFIG).write_text(json.dumps(embedding, indent=2), encoding="utf-8")


# ---- plumbing ------------------------------------------------------------------------------------


@contextlib.contextmanager
def _captured(log_path: Path) -> Iterator[None]:
    """Send optimum's, torch's and transformers' logging and Python warnings to the build log.

    Their loggers' own handlers are swapped for the log file's while the build runs (no stdout or
    stderr redirection: the CLI's progress display keeps the terminal).
    """
    from optimum.utils import logging as optimum_logging
    from transformers.utils import logging as transformers_logging

    optimum_logging.get_logger()  # both libraries add their stderr handler on first use: do it now
    transformers_logging.get_logger()

    stream = open(log_path, "a", encoding="utf-8")
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    saved = []
    for name in ("", *LIBRARY_LOGGERS):
        logger = logging.getLogger(name)
        saved.append((logger, list(logger.handlers), logger.propagate, logger.level))
        logger.handlers = [handler]
        logger.propagate = False
        if name in ("", "ortllm", "py.warnings"):
            logger.setLevel(logging.INFO)
    logging.captureWarnings(True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            yield
    finally:
        logging.captureWarnings(False)
        for logger, handlers, propagate, level in saved:
            logger.handlers = handlers
            logger.propagate = propagate
            logger.setLevel(level)
        stream.close()


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return ""

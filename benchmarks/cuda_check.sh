#!/usr/bin/env bash
# The CUDA path end to end on a lent GPU machine, in one prepared run (results: benchmarks/NOTES.md, "CUDA").
# The machine has no network: WHEELS holds onnxruntime-gpu, onnxruntime-genai-cuda and ortllm's runtime
# dependencies for its Python; TOKENIZER holds SmolLM2's config and tokenizer files (random weights are made
# here in SmolLM2-135M's and Llama-3.2-1B's shapes: the path is what is checked, not the text). Every step is
# logged and bounded; a failing step does not stop the others. Output goes to $OUT.
set -u
OUT=${OUT:-/tmp/cuda-check}
WHEELS=${WHEELS:?folder of wheels}
TOKENIZER=${TOKENIZER:?folder with config.json and tokenizer.json}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 ORTLLM_HOME=/tmp/ortllm-home
PY=${PY:-python3}
SITE=/tmp/site
EP=${EP:-cuda}   # EP=cpu SKIP_INSTALL=1 runs the same steps on a CPU machine, to check the script itself
step() { echo "== $(date +%T) $*" | tee -a "$OUT/steps.log"; }
run() { local t=$1; shift; timeout "$t" "$@" >>"$OUT/steps.log" 2>&1; echo "   rc=$?" | tee -a "$OUT/steps.log"; }

WHEELS=$(cd "$WHEELS" && pwd) TOKENIZER=$(cd "$TOKENIZER" && pwd)
if [ -z "${SKIP_INSTALL:-}" ]; then
step "install wheels and ortllm into $SITE"
# one pip call: a second --target install neither adds to nor (with --upgrade) keeps the first one's bin/
run 300 $PY -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --no-cache-dir --target $SITE \
  "$WHEELS"/*.whl .
# the checkout's own ortllm/ folder must not shadow the installed package (cli/ is mapped into it)
export PYTHONPATH=$SITE PATH=$SITE/bin:$PATH PYTHONSAFEPATH=1
fi
cd /tmp
# onnxruntime-gpu finds CUDA, cuBLAS and cuDNN in the image's nvidia-* wheels
SP=$($PY -c "import site; print(site.getsitepackages()[0])")
LD_LIBRARY_PATH=$(find "$SP/nvidia" "$SP/torch/lib" -maxdepth 3 -type d -name lib 2>/dev/null | tr '\n' ':')${LD_LIBRARY_PATH:-}
export LD_LIBRARY_PATH

step "versions"
nvidia-smi -L >>"$OUT/steps.log" 2>&1
run 60 $PY -c "import onnxruntime as ort, onnxruntime_genai as og; print('ort', ort.__version__, ort.get_available_providers()); print('og', og.__version__, 'cuda', og.is_cuda_available())"
run 60 ortllm doctor
cp "$OUT/steps.log" "$OUT/doctor.txt"

step "random-weight models in SmolLM2-135M and Llama-3.2-1B shapes"
run 300 $PY - "$TOKENIZER" <<'EOF'
import shutil, sys
from pathlib import Path
import torch, transformers
src = Path(sys.argv[1])
torch.manual_seed(0)
base = transformers.AutoConfig.from_pretrained(src)
big = transformers.LlamaConfig(
    hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
    head_dim=64, vocab_size=base.vocab_size, max_position_embeddings=8192, tie_word_embeddings=True,
    bos_token_id=base.bos_token_id, eos_token_id=base.eos_token_id, rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
)
import os
for name, cfg in (("smol-rand", base), ("llama1b-rand", big))[: 1 if os.environ.get("SKIP_1B") else 2]:
    dst = Path("/tmp/src") / name
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float16)
    model.save_pretrained(dst)
    for f in src.iterdir():
        if f.name != "config.json" and f.suffix in (".json", ".jinja"):
            shutil.copy(f, dst / f.name)
    print(name, sum(p.numel() for p in model.parameters()) / 1e6, "M parameters")
EOF

step "ortllm convert --ep $EP (135M shape)"
run 240 ortllm convert /tmp/src/smol-rand --name smol-rand --ep $EP
run 30 ortllm list
run 30 ortllm show smol-rand

step "serve, a chat and a tool call"
ortllm serve --model smol-rand --port 8765 >"$OUT/serve.log" 2>&1 &
SERVER=$!
for _ in $(seq 120); do curl -fs http://127.0.0.1:8765/readiness >/dev/null 2>&1 && break; sleep 1; done
curl -s http://127.0.0.1:8765/v1/models >"$OUT/models.json"
curl -s http://127.0.0.1:8765/api/models >>"$OUT/models.json"
curl -s http://127.0.0.1:8765/v1/chat/completions -H 'content-type: application/json' -d '{"model":"smol-rand","messages":[{"role":"user","content":"Hi"}],"max_tokens":16,"temperature":0}' >"$OUT/chat.json"
TOOLS='[{"type":"function","function":{"name":"get_weather","description":"Weather in a city","parameters":{"type":"object","properties":{"city":{"type":"string"},"unit":{"type":"string","enum":["c","f"]}},"required":["city","unit"]}}}]'
for choice in '"required"' '{"type":"function","function":{"name":"get_weather"}}'; do
  curl -s http://127.0.0.1:8765/v1/chat/completions -H 'content-type: application/json' \
    -d "{\"model\":\"smol-rand\",\"messages\":[{\"role\":\"user\",\"content\":\"Weather in Paris?\"}],\"tools\":$TOOLS,\"tool_choice\":$choice,\"max_tokens\":64}" >>"$OUT/tools.json"
  echo >>"$OUT/tools.json"
done
curl -sN http://127.0.0.1:8765/v1/chat/completions -H 'content-type: application/json' \
  -d "{\"model\":\"smol-rand\",\"stream\":true,\"messages\":[{\"role\":\"user\",\"content\":\"Weather in Paris?\"}],\"tools\":$TOOLS,\"tool_choice\":\"required\",\"max_tokens\":64}" >"$OUT/tools-stream.txt"
curl -s http://127.0.0.1:8765/v1/chat/completions -H 'content-type: application/json' \
  -d '{"model":"smol-rand","messages":[{"role":"user","content":"JSON please"}],"response_format":{"type":"json_schema","json_schema":{"name":"x","schema":{"type":"object","properties":{"a":{"type":"integer"}},"required":["a"]}}},"max_tokens":32}' >"$OUT/schema.json"
kill -TERM $SERVER; wait $SERVER
cat "$OUT"/models.json "$OUT"/chat.json "$OUT"/tools.json "$OUT"/schema.json >>"$OUT/steps.log"

if [ -n "${GGUF:-}" ]; then
# a real model, so a tool call can complete (random weights never close a string)
step "a real GGUF on $EP: convert, serve, tool calls"
run 240 ortllm convert "$GGUF" --name real --ep $EP
ortllm serve --model real --port 8766 >"$OUT/serve-real.log" 2>&1 &
SERVER=$!
for _ in $(seq 120); do curl -fs http://127.0.0.1:8766/readiness >/dev/null 2>&1 && break; sleep 1; done
for choice in '"auto"' '"required"' '{"type":"function","function":{"name":"get_weather"}}'; do
  curl -s http://127.0.0.1:8766/v1/chat/completions -H 'content-type: application/json' \
    -d "{\"model\":\"real\",\"messages\":[{\"role\":\"user\",\"content\":\"What is the weather in Paris, in celsius?\"}],\"tools\":$TOOLS,\"tool_choice\":$choice,\"max_tokens\":96,\"temperature\":0}" >>"$OUT/tools-real.json"
  echo >>"$OUT/tools-real.json"
done
curl -s http://127.0.0.1:8766/v1/chat/completions -H 'content-type: application/json' \
  -d '{"model":"real","messages":[{"role":"user","content":"What is the capital of France? One word."}],"max_tokens":16,"temperature":0}' >>"$OUT/tools-real.json"
kill -TERM $SERVER; wait $SERVER
cat "$OUT/tools-real.json" >>"$OUT/steps.log"
run 150 ortllm bench engine real --pp 512 --tg 128 --batch 1,8 --reps 3 --json "$OUT/bench-real.json"
fi

step "ortllm bench engine (135M shape)"
run 150 ortllm bench engine smol-rand --pp 512 --tg 128 --batch 1,8 --reps 2 --json "$OUT/bench-smol.json"
if [ -z "${SKIP_1B:-}" ]; then
step "ortllm convert --ep $EP and bench engine (1B shape)"
run 200 ortllm convert /tmp/src/llama1b-rand --name llama1b-rand --ep $EP
run 150 ortllm bench engine llama1b-rand --pp 512 --tg 128 --batch 1,8 --reps 2 --json "$OUT/bench-1b.json"
fi
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv >>"$OUT/steps.log" 2>&1
step "done"

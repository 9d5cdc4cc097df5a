// A streamed chat with the official `ollama` npm package against ortllm's Ollama listener (OLLAMA_HOST):
// reassembles the message from its parts. Prints one JSON line; exits 1 on a broken stream.
import { Ollama } from "ollama";

const ollama = new Ollama({ host: process.env.OLLAMA_HOST });
const model = process.env.OLLAMA_MODEL;

function fail(message) {
  console.error(message);
  process.exit(1);
}

const version = await ollama.version();
const stream = await ollama.chat({
  model,
  messages: [{ role: "user", content: "What is the capital of France?" }],
  stream: true,
  options: { temperature: 0, num_predict: 12 },
});
let content = "";
let parts = 0;
let last = null;
for await (const part of stream) {
  if (last?.done) fail(`a part after the done one: ${JSON.stringify(part)}`);
  if (part.model !== model) fail(`part for another model: ${JSON.stringify(part)}`);
  if (part.message?.role !== "assistant") fail(`part without an assistant message: ${JSON.stringify(part)}`);
  content += part.message.content;
  parts += 1;
  last = part;
}
if (!last?.done) fail(`the stream ended without a done part after ${parts} parts`);
const { done_reason, eval_count, prompt_eval_count, total_duration, eval_duration } = last;
console.log(
  JSON.stringify({
    version: version.version,
    content,
    parts,
    done_reason,
    eval_count,
    prompt_eval_count,
    total_duration,
    eval_duration,
  }),
);

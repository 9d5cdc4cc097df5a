// The tool loop, streamed, with the official `openai` npm package: ask for the weather in Paris, get a
// get_weather call, send the tool's result, get the answer. Prints one JSON line; exits 1 on a broken stream.
import OpenAI from "openai";

const client = new OpenAI({ baseURL: process.env.ORTLLM_URL, apiKey: "any-key", maxRetries: 0 });
const model = process.env.ORTLLM_MODEL;
const tools = [
  {
    type: "function",
    function: {
      name: "get_weather",
      description: "Get the current weather in a city",
      parameters: {
        type: "object",
        properties: { city: { type: "string", description: "The city's name, e.g. London" } },
        required: ["city"],
      },
    },
  },
];

function fail(message) {
  console.error(message);
  process.exit(1);
}

// one streamed turn: the content and the tool calls reassembled from their deltas by index
async function turn(messages, extra = {}) {
  const stream = await client.chat.completions.create({
    model, messages, tools, temperature: 0, max_tokens: 64, stream: true, ...extra,
  });
  let content = "";
  let finish = null;
  const calls = [];
  for await (const chunk of stream) {
    const choice = chunk.choices[0];
    if (!choice) continue;
    if (choice.finish_reason) finish = choice.finish_reason;
    if (choice.delta.content) {
      if (choice.delta.content.includes("<tool_call>")) fail(`tool-call markup in content: ${choice.delta.content}`);
      content += choice.delta.content;
    }
    for (const part of choice.delta.tool_calls ?? []) {
      const call = (calls[part.index] ??= { id: "", name: "", arguments: "" });
      if (part.id) call.id = part.id;
      if (part.function?.name) call.name += part.function.name;
      if (part.function?.arguments) call.arguments += part.function.arguments;
    }
  }
  return { content, calls, finish };
}

const messages = [{ role: "user", content: "What is the weather in Paris?" }];
const first = await turn(messages);
if (first.calls.length !== 1 || !first.calls[0].id) fail(`expected one call with an id: ${JSON.stringify(first)}`);
const [call] = first.calls;
try {
  JSON.parse(call.arguments);
} catch (err) {
  fail(`arguments are not JSON: ${call.arguments} (${err})`);
}
messages.push(
  { role: "assistant", content: null, tool_calls: [{ id: call.id, type: "function", function: { name: call.name, arguments: call.arguments } }] },
  { role: "tool", tool_call_id: call.id, content: "18 degrees and sunny" },
);
// the answer turn: this small model calls again when it may (see tests/test_tool_clients.py FINAL)
const second = await turn(messages, { tool_choice: "none" });
if (second.calls.length) fail(`expected an answer, got calls: ${JSON.stringify(second.calls)}`);
console.log(JSON.stringify({ call, answer: second.content, finish_reasons: [first.finish, second.finish] }));

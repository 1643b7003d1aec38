// Resume a background streamed response with the official OpenAI JS SDK (npm `openai`), as
// shipped: create it with `background: true, stream: true`, read until at least --deltas
// `response.output_text.delta` events, break out of the stream (the SDK aborts the request:
// the connection drops), then pick the stream up again with
// `client.responses.retrieve(id, { stream: true, starting_after })` and read it to the end.
//
// Prints one JSON object to stdout:
//   {"id": "resp_...", "before": "text read before the drop", "after": "text read after it",
//    "sequence": [every event's sequence_number, in the order read, both streams],
//    "types": [every event's type, likewise], "first_stream": how many of them the first
//    stream gave before the drop, "last": "the last event's type"}
// Exits 0 once that is printed; 1 (with the error on stderr) if the SDK throws.
//
//   node tests/clients/openai_resume.mjs --base-url http://127.0.0.1:PORT/v1 --key tc-...
//        --model NAME [--input "Say it."] [--deltas 3] [--timeout 60000]
// or with OPENAI_BASE_URL, OPENAI_API_KEY and TIDECHAT_MODEL in the environment.
import { parseArgs } from "node:util";

import OpenAI from "openai";

const { values: opts } = parseArgs({
  options: {
    "base-url": { type: "string", default: process.env.OPENAI_BASE_URL },
    key: { type: "string", default: process.env.OPENAI_API_KEY },
    model: { type: "string", default: process.env.TIDECHAT_MODEL },
    input: { type: "string", default: "Say it." },
    deltas: { type: "string", default: "3" },
    timeout: { type: "string", default: "60000" },
  },
});
if (!opts["base-url"] || !opts.key || !opts.model) {
  console.error("usage: openai_resume.mjs --base-url URL/v1 --key KEY --model NAME");
  process.exit(64);
}

const client = new OpenAI({
  baseURL: opts["base-url"],
  apiKey: opts.key,
  maxRetries: 0,
  timeout: Number(opts.timeout),
});
const DELTA = "response.output_text.delta";
const sequence = [];
const types = [];

function seen(event) {
  sequence.push(event.sequence_number);
  types.push(event.type);
}

async function main() {
  const stream = await client.responses.create({
    model: opts.model,
    input: opts.input,
    background: true,
    stream: true,
  });
  let id = null;
  let before = "";
  let deltas = 0;
  let lastSeq = null;
  for await (const event of stream) {
    seen(event);
    lastSeq = event.sequence_number;
    if (event.response?.id) id ??= event.response.id;
    if (event.type === DELTA) {
      before += event.delta;
      deltas += 1;
      if (deltas >= Number(opts.deltas)) break; // the SDK aborts the request here
    }
  }
  if (id === null || lastSeq === null) throw new Error(`no response id seen: ${types}`);
  if (!stream.controller.signal.aborted) throw new Error("the first stream was not aborted");

  const firstStream = sequence.length;
  let after = "";
  const rest = await client.responses.retrieve(id, { stream: true, starting_after: lastSeq });
  for await (const event of rest) {
    seen(event);
    if (event.type === DELTA) after += event.delta;
  }
  return {
    id, before, after, sequence, types, first_stream: firstStream, last: types.at(-1) ?? null,
  };
}

try {
  process.stdout.write(`${JSON.stringify(await main())}\n`);
} catch (error) {
  console.error(`openai_resume: ${error?.stack || error}`);
  console.error(JSON.stringify({ sequence, types }));
  process.exit(1);
}

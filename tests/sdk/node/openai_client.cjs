// Drives an edge node with the official OpenAI Node SDK (`openai` on npm), as a new user would.
//
// Usage: NODE_PATH=.meridian/node-sdk/node_modules node openai_client.cjs BASE_URL API_KEY MODEL
// Prints one JSON line with what the SDK got back; exits non-zero on any unexpected SDK error.
'use strict';

const OpenAI = require('openai');

async function errorName(call) {
  try {
    await call();
    return null;
  } catch (e) {
    return e.constructor.name; // the SDK's typed error for the status
  }
}

async function main() {
  const [baseURL, apiKey, model] = process.argv.slice(2);
  const client = new OpenAI({ baseURL, apiKey, maxRetries: 0, timeout: 20_000 });

  const completion = await client.chat.completions.create({
    model,
    messages: [{ role: 'user', content: 'hello from the sdk' }],
  });

  const stream = await client.chat.completions.create({
    model,
    messages: [{ role: 'user', content: 'stream to the sdk' }],
    stream: true,
    stream_options: { include_usage: true },
  });
  const pieces = [];
  let usage = null;
  for await (const chunk of stream) {
    const delta = chunk.choices[0]?.delta?.content;
    if (delta) pieces.push(delta);
    if (chunk.usage) usage = chunk.usage.completion_tokens;
  }

  const models = [];
  for await (const m of client.models.list()) models.push(m.id);

  const unknownModel = await errorName(() =>
    client.chat.completions.create({ model: 'no-such-model', messages: [{ role: 'user', content: 'x' }] }),
  );
  const badKey = await errorName(() =>
    new OpenAI({ baseURL, apiKey: 'sk-not-a-key', maxRetries: 0 }).chat.completions.create({
      model,
      messages: [{ role: 'user', content: 'x' }],
    }),
  );

  console.log(
    JSON.stringify({
      text: completion.choices[0].message.content,
      usage: completion.usage.total_tokens,
      stream_text: pieces.join(''),
      stream_chunks: pieces.length,
      stream_usage: usage,
      models,
      unknown_model_error: unknownModel,
      bad_key_error: badKey,
    }),
  );
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});

// A shared gateway's keys, rate limit, usage and cost, as the official `openai` npm
// package sees them.
//
// Usage: node openai_keys.cjs NODE_MODULES_PARENT BASE_URL KEY BURST_KEY
// (prints one JSON object: what each check saw)
const [, , modules, baseURL, key, burstKey] = process.argv;
const OpenAI = require(require.resolve("openai", { paths: [modules] }));

const hello = [{ role: "user", content: "Say hello to the mesh." }];
const header = (headers, name) =>
  headers && typeof headers.get === "function" ? headers.get(name) : headers?.[name];

async function refusal(apiKey, options) {
  const c = new OpenAI({ baseURL, apiKey, maxRetries: 0 });
  try {
    await c.models.list(options);
    return null;
  } catch (e) {
    if (!(e instanceof OpenAI.APIError)) throw e;
    return {
      status: e.status,
      type: e.type,
      code: e.code,
      message: e.message,
      class: e.constructor.name,
    };
  }
}

async function main() {
  const seen = { costs: [] };
  seen.no_key = await refusal("unused", { headers: { Authorization: null } });
  seen.bad_key = await refusal("sk-mesh-not-a-key-of-this-gateway");

  const client = new OpenAI({ baseURL, apiKey: key, maxRetries: 0 });
  const model = (await client.models.list()).data[0].id;

  // Streamed: the final chunk carries usage and its cost.
  const chunks = [];
  const stream = await client.chat.completions.create({
    model, messages: hello, max_tokens: 8, temperature: 0, stream: true,
  });
  for await (const chunk of stream) chunks.push(chunk);
  seen.stream_final_usage = chunks[chunks.length - 1].usage ?? null;
  seen.stream_usage_before_final = chunks.slice(0, -1).some((c) => c.usage);
  seen.costs.push(seen.stream_final_usage.cost);

  // Whole: usage.cost, and X-Request-Id echoed.
  const { data: whole, response } = await client.chat.completions
    .create(
      { model, messages: hello, max_tokens: 8, temperature: 0 },
      { headers: { "X-Request-Id": "npm-request-9" } },
    )
    .withResponse();
  seen.echoed_request_id = response.headers.get("x-request-id");
  seen.whole_usage = whole.usage;
  seen.costs.push(whole.usage.cost);

  seen.usage = await client.get("/usage");

  const burst = new OpenAI({ baseURL, apiKey: burstKey, maxRetries: 0 });
  seen.burst = [];
  for (let i = 0; i < 6; i++) {
    try {
      const r = await burst.completions.create({
        model, prompt: "Hi", max_tokens: 1, temperature: 0,
      });
      seen.burst.push({ status: 200, cost: r.usage.cost });
      seen.costs.push(r.usage.cost);
    } catch (e) {
      if (!(e instanceof OpenAI.RateLimitError)) throw e;
      seen.burst.push({
        status: e.status, code: e.code, type: e.type,
        retry_after: header(e.headers, "retry-after"),
      });
    }
  }
  seen.burst_usage = await burst.get("/usage");
  console.log(JSON.stringify(seen));
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});

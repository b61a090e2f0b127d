// One scenario of the official TypeScript SDK against a base URL, for Ferry's acceptance tests.
//
//   ANTHROPIC_BASE_URL=http://127.0.0.1:8080/anthropic ANTHROPIC_API_KEY=sk-test \
//     node sdk_scenarios.mjs SCENARIO ['{"text": "...", "model": "..."}']
//
// Prints exactly one JSON object on stdout. When the SDK throws where the scenario expects an
// answer, the object is {"failed": {...the error...}} and the exit code is 1, so a test can show
// what the gateway said. SDK_MAX_RETRIES (default 0) keeps retries from hiding a failure.

import Anthropic from '@anthropic-ai/sdk';
import { VERSION } from '@anthropic-ai/sdk/version';

const DEFAULTS = {
  model: 'claude-ferry-test',
  text: 'hello from the TypeScript SDK',
  max_tokens: 64,
  betas: ['context-management-2025-06-27', 'token-counting-2024-11-01'],
  limit: 1,
};

function client() {
  const baseURL = process.env.ANTHROPIC_BASE_URL;
  const apiKey = process.env.ANTHROPIC_API_KEY;
  if (!baseURL || !apiKey) throw new Error('set ANTHROPIC_BASE_URL and ANTHROPIC_API_KEY');
  return new Anthropic({
    baseURL,
    apiKey,
    maxRetries: Number(process.env.SDK_MAX_RETRIES ?? 0),
    timeout: Number(process.env.SDK_TIMEOUT_MS ?? 60000),
  });
}

function textOf(message) {
  return message.content.filter((b) => b.type === 'text').map((b) => b.text).join('');
}

function summary(message) {
  return {
    id: message.id,
    type: message.type,
    role: message.role,
    model: message.model,
    stop_reason: message.stop_reason,
    block_types: message.content.map((b) => b.type),
    text: textOf(message),
    usage: message.usage,
    request_id: message._request_id ?? null,
  };
}

function describeError(err) {
  const out = { class: err?.constructor?.name ?? typeof err, message: String(err?.message ?? err) };
  if (err instanceof Anthropic.APIError) {
    out.status = err.status ?? null;
    out.error_type = err.error?.error?.type ?? err.type ?? null;
    out.error_message = err.error?.error?.message ?? err.apiMessage ?? null;
    out.request_id = err.requestID ?? err.headers?.get?.('request-id') ?? null;
    out.body = err.error ?? null;
  }
  if (err?.cause) out.cause = String(err.cause?.message ?? err.cause);
  return out;
}

function userMessages(opts) {
  return [{ role: 'user', content: opts.text }];
}

const SCENARIOS = {
  async create(sdk, opts) {
    const message = await sdk.messages.create({
      model: opts.model, max_tokens: opts.max_tokens, messages: userMessages(opts),
    });
    return summary(message);
  },

  async stream(sdk, opts) {
    const events = [];
    const stream = sdk.messages.stream({
      model: opts.model, max_tokens: opts.max_tokens, messages: userMessages(opts),
    });
    stream.on('streamEvent', (event) => events.push(event.type));
    const message = await stream.finalMessage();
    return { ...summary(message), event_types: [...new Set(events)], events: events.length,
             request_id: stream.request_id ?? null };
  },

  async count_tokens(sdk, opts) {
    const count = await sdk.messages.countTokens({ model: opts.model, messages: userMessages(opts) });
    return { input_tokens: count.input_tokens, keys: Object.keys(count).filter((k) => !k.startsWith('_')) };
  },

  async models_list(sdk, opts) {
    const page = await sdk.models.list({ limit: opts.limit });
    const first = page.data.map((m) => ({ id: m.id, type: m.type, display_name: m.display_name,
                                          created_at: m.created_at }));
    const all = [];
    for await (const model of sdk.models.list({ limit: opts.limit })) {
      all.push(model.id);
      if (all.length > 1000) break; // a gateway that never ends its pages
    }
    return { first_page: first, has_more: page.has_more, first_id: page.first_id ?? null,
             last_id: page.last_id ?? null, all_ids: all };
  },

  async models_get(sdk, opts) {
    let id = opts.id;
    if (!id) {
      const page = await sdk.models.list({ limit: 1 });
      if (!page.data.length) throw new Error('models.list returned no model to retrieve');
      id = page.data[0].id;
    }
    const model = await sdk.models.retrieve(id);
    return { asked: id, id: model.id, type: model.type, display_name: model.display_name,
             created_at: model.created_at };
  },

  async beta_create(sdk, opts) {
    const message = await sdk.beta.messages.create({
      model: opts.model, max_tokens: opts.max_tokens, messages: userMessages(opts),
      betas: opts.betas,
    });
    return { ...summary(message), betas: opts.betas };
  },

  // A request the gateway must refuse (no messages): the SDK's error, as a client sees it.
  async error(sdk, opts) {
    try {
      await sdk.messages.create({ model: opts.model, max_tokens: opts.max_tokens,
                                  messages: opts.messages ?? [] });
    } catch (err) {
      return { raised: describeError(err) };
    }
    return { raised: null };
  },
};

async function main() {
  const [name, json] = process.argv.slice(2);
  const scenario = SCENARIOS[name];
  if (!scenario) {
    process.stdout.write(JSON.stringify({ usage: `scenarios: ${Object.keys(SCENARIOS).join(', ')}` }) + '\n');
    process.exit(2);
  }
  const opts = { ...DEFAULTS, ...(json ? JSON.parse(json) : {}) };
  try {
    const result = await scenario(client(), opts);
    process.stdout.write(JSON.stringify({ scenario: name, sdk_version: VERSION,
                                          ...result }) + '\n');
  } catch (err) {
    process.stdout.write(JSON.stringify({ scenario: name, failed: describeError(err) }) + '\n');
    process.exit(1);
  }
}

await main();

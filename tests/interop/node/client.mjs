// The TypeScript SDK client for the interop tests. Prints one JSON object per line to
// stdout: each step's outcome, so pytest can assert on what the client saw. The SDK is
// used as an application would use it; a recording `fetch` notes every HTTP exchange
// (method, URL, status), and an OAuth provider that never opens a browser notes whether
// the SDK would have sent the user to an authorization server.
//
// usage: node client.mjs --url URL [--transport streamable|sse] [--steps a,b,c] [--oauth]
//   --token: send this bearer token itself (to talk to the server without the proxy)
//   steps: tools (list), echo, count (progress), large, notify (GET-stream notification),
//          terminate (DELETE the session), pause (print {"step":"pause"} and wait for a
//          line on stdin), call (echo that may fail: its error is reported, not fatal)
import readline from "node:readline";
import { parseArgs } from "node:util";

import { Client } from "@modelcontextprotocol/sdk/client/index.js";
import { SSEClientTransport } from "@modelcontextprotocol/sdk/client/sse.js";
import { StreamableHTTPClientTransport } from "@modelcontextprotocol/sdk/client/streamableHttp.js";
import { ToolListChangedNotificationSchema } from "@modelcontextprotocol/sdk/types.js";

const { values: args } = parseArgs({
  options: {
    url: { type: "string" },
    transport: { type: "string", default: "streamable" },
    steps: { type: "string", default: "tools,echo" },
    oauth: { type: "boolean", default: false },
    token: { type: "string" },
  },
});
const WAIT_MS = 10000;
const exchanges = [];
const authorizationRedirects = [];

function emit(object) {
  process.stdout.write(`${JSON.stringify(object)}\n`);
}

async function recordingFetch(input, init) {
  const method = init?.method ?? (input instanceof Request ? input.method : "GET");
  const url = String(input instanceof Request ? input.url : input);
  const response = await fetch(input, init);
  exchanges.push({ method, url, status: response.status, www_authenticate: response.headers.get("www-authenticate") });
  return response;
}

// An OAuth-capable client, like the ones people run: it would register, then send the
// user's browser to the authorization endpoint. Here it only notes where it would go.
const oauthProvider = {
  get redirectUrl() {
    return "http://127.0.0.1:1/callback";
  },
  get clientMetadata() {
    return { client_name: "interop", redirect_uris: ["http://127.0.0.1:1/callback"], token_endpoint_auth_method: "none" };
  },
  _client: undefined,
  clientInformation() {
    return this._client;
  },
  saveClientInformation(info) {
    this._client = info;
  },
  tokens() {
    return undefined;
  },
  saveTokens() {},
  redirectToAuthorization(url) {
    authorizationRedirects.push(String(url));
  },
  saveCodeVerifier() {},
  codeVerifier() {
    return "unused";
  },
};

function describe(error) {
  return { name: error?.name, message: String(error?.message ?? error), code: error?.code };
}

const lines = readline.createInterface({ input: process.stdin })[Symbol.asyncIterator]();

async function main() {
  const options = { fetch: recordingFetch, ...(args.oauth ? { authProvider: oauthProvider } : {}) };
  if (args.token !== undefined) options.requestInit = { headers: { Authorization: `Bearer ${args.token}` } };
  const url = new URL(args.url);
  const transport =
    args.transport === "sse" ? new SSEClientTransport(url, options) : new StreamableHTTPClientTransport(url, options);
  const client = new Client({ name: "interop-ts-client", version: "1.0.0" });
  const listChanged = new Promise((resolve) => client.setNotificationHandler(ToolListChangedNotificationSchema, () => resolve(true)));
  const timeout = { timeout: WAIT_MS };
  client.onerror = (error) => emit({ step: "client-error", error: describe(error) });

  try {
    await client.connect(transport, timeout);
  } catch (error) {
    emit({ step: "connect", ok: false, error: describe(error), exchanges, authorizationRedirects });
    return 1;
  }
  emit({ step: "connect", ok: true, server: client.getServerVersion(), session: transport.sessionId ?? null });

  for (const step of args.steps.split(",")) {
    if (step === "tools") {
      const { tools } = await client.listTools(undefined, timeout);
      emit({ step, tools: tools.map((t) => t.name).sort() });
    } else if (step === "echo") {
      const result = await client.callTool({ name: "echo", arguments: { text: "héllo" } }, undefined, timeout);
      emit({ step, text: result.content[0].text });
    } else if (step === "count") {
      const progress = [];
      const result = await client.callTool({ name: "count", arguments: { steps: 4 } }, undefined, {
        ...timeout,
        onprogress: (p) => {
          progress.push([p.progress, p.total, p.message]);
          if (progress.length === 1) client.callTool({ name: "release", arguments: {} }, undefined, timeout).catch(() => {});
        },
      });
      emit({ step, text: result.content[0].text, progress });
    } else if (step === "large") {
      const result = await client.callTool({ name: "large", arguments: {} }, undefined, timeout);
      const text = result.content[0].text;
      emit({ step, length: text.length, intact: text === "0123456789abcdef".repeat(text.length / 16) });
    } else if (step === "notify") {
      const result = await client.callTool({ name: "notify", arguments: {} }, undefined, timeout);
      const seen = await Promise.race([listChanged, new Promise((r) => setTimeout(() => r(false), WAIT_MS))]);
      emit({ step, text: result.content[0].text, list_changed: seen });
    } else if (step === "terminate") {
      const session = transport.sessionId;
      await transport.terminateSession();
      emit({ step, session, after: transport.sessionId ?? null });
    } else if (step === "pause") {
      exchanges.length = 0;
      emit({ step });
      await lines.next();
    } else if (step === "call") {
      const before = authorizationRedirects.length;
      try {
        const result = await client.callTool({ name: "echo", arguments: { text: "again" } }, undefined, timeout);
        emit({ step, ok: true, text: result.content[0].text });
      } catch (error) {
        emit({ step, ok: false, error: describe(error), exchanges: [...exchanges], authorizationRedirects: authorizationRedirects.slice(before) });
      }
      exchanges.length = 0;
    } else {
      throw new Error(`unknown step ${step}`);
    }
  }
  await client.close();
  emit({ step: "done" });
  return 0;
}

main().then(
  (code) => process.exit(code),
  (error) => {
    emit({ step: "failed", error: describe(error), stack: error?.stack });
    process.exit(1);
  },
);

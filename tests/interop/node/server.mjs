// A TypeScript SDK MCP server for the interop tests: Streamable HTTP at /mcp and the
// legacy HTTP+SSE transport at /sse (+ /messages), behind a bearer check that answers
// 401 with an RFC 6750 challenge carrying `error` and `resource_metadata` (RFC 9728),
// plus the metadata and authorization-server endpoints a client would wander off to.
//
// It binds 127.0.0.1 on a free port and prints one line to stdout, its origin. Every
// request except /_control/* is recorded, and so is every Streamable HTTP session issued;
// the tests read and change the state through /_control (never through the proxy). Every response allows any origin (CORS `*`), so
// that only the proxy can be what stops a foreign page. SIGTERM stops it.
//
// usage: node server.mjs --token TOKEN [--large-bytes N]
import { randomUUID } from "node:crypto";
import http from "node:http";
import { parseArgs } from "node:util";

import { McpServer } from "@modelcontextprotocol/sdk/server/mcp.js";
import { SSEServerTransport } from "@modelcontextprotocol/sdk/server/sse.js";
import { StreamableHTTPServerTransport } from "@modelcontextprotocol/sdk/server/streamableHttp.js";
import { z } from "zod";

const { values: args } = parseArgs({
  options: {
    token: { type: "string" },
    "large-bytes": { type: "string", default: String(2 * 1024 * 1024) },
  },
});

const REVOKED = "The access token was revoked";
const WAIT_MS = 5000;
// `issued`: every Mcp-Session-Id the Streamable HTTP transport handed out, in order.
const state = { accepted: new Set([args.token]), seen: [], issued: [] };
const largeBytes = Number(args["large-bytes"]);
let origin = "";

// Sessions of either transport, by id: {transport, server, getStreamOpen: Promise, markGet}.
const sessions = new Map();

function deferred() {
  let resolve;
  const promise = new Promise((r) => (resolve = r));
  return { promise, resolve };
}

function withTimeout(promise, ms) {
  return Promise.race([promise.then(() => true), new Promise((r) => setTimeout(() => r(false), ms))]);
}

function buildServer(session) {
  const server = new McpServer(
    { name: "interop-ts-upstream", version: "1.0.0" },
    { capabilities: { tools: { listChanged: true }, logging: {} } },
  );
  server.registerTool(
    "echo",
    { description: "Echoes its text back.", inputSchema: { text: z.string() } },
    async ({ text }) => ({ content: [{ type: "text", text: `echo: ${text}` }] }),
  );
  // Counts to `steps`, reporting progress after each step. After step 1 it waits until
  // the client, having seen that notification, calls `release`: had anything between
  // server and client held the stream back, the client would never see it in time.
  server.registerTool(
    "count",
    { description: "Counts with progress notifications.", inputSchema: { steps: z.number().int() } },
    async ({ steps }, extra) => {
      const token = extra._meta?.progressToken;
      session.released = deferred();
      let buffered = false;
      for (let step = 1; step <= steps; step++) {
        if (token !== undefined) {
          await extra.sendNotification({
            method: "notifications/progress",
            params: { progressToken: token, progress: step, total: steps, message: `step ${step}` },
          });
        }
        if (step === 1 && !(await withTimeout(session.released.promise, WAIT_MS))) buffered = true;
      }
      return { content: [{ type: "text", text: buffered ? "progress was buffered" : `counted to ${steps}` }] };
    },
  );
  server.registerTool(
    "release",
    { description: "Lets a running count go on." },
    async () => {
      session.released?.resolve();
      return { content: [{ type: "text", text: "released" }] };
    },
  );
  server.registerTool(
    "large",
    { description: "Returns a large text.", inputSchema: { bytes: z.number().int().optional() } },
    async ({ bytes }) => ({ content: [{ type: "text", text: "0123456789abcdef".repeat((bytes ?? largeBytes) / 16) }] }),
  );
  // Sends `notifications/tools/list_changed` unrelated to any request: on Streamable
  // HTTP it can only travel on the client's GET stream, so the tool waits for that.
  server.registerTool(
    "notify",
    { description: "Sends a server notification on the standalone stream." },
    async () => {
      const open = await withTimeout(session.getStreamOpen.promise, WAIT_MS);
      setTimeout(() => server.sendToolListChanged(), 50);
      return { content: [{ type: "text", text: open ? "notifying" : "no GET stream" }] };
    },
  );
  return server;
}

function newSession() {
  const session = { getStreamOpen: deferred(), released: undefined };
  session.server = buildServer(session);
  return session;
}

function record(req, res, path) {
  const entry = {
    method: req.method,
    path,
    query: new URL(req.url, "http://x").search,
    headers: req.headers,
    status: null,
  };
  state.seen.push(entry);
  res.on("finish", () => (entry.status = res.statusCode));
  res.on("close", () => (entry.status ??= res.statusCode));
}

function cors(res) {
  res.setHeader("Access-Control-Allow-Origin", "*");
  res.setHeader("Access-Control-Expose-Headers", "Mcp-Session-Id, WWW-Authenticate");
}

function json(res, status, body, headers = {}) {
  const data = Buffer.from(JSON.stringify(body));
  res.writeHead(status, { "Content-Type": "application/json", "Content-Length": data.length, ...headers });
  res.end(data);
}

function authorized(req) {
  const [scheme, token] = (req.headers.authorization ?? "").split(" ", 2);
  return scheme?.toLowerCase() === "bearer" && state.accepted.has(token?.trim());
}

function challenge(res) {
  const metadata = `${origin}/.well-known/oauth-protected-resource/mcp`;
  json(res, 401, { error: "invalid_token", error_description: REVOKED }, {
    "WWW-Authenticate": `Bearer error="invalid_token", error_description="${REVOKED}", resource_metadata="${metadata}"`,
  });
}

async function readBody(req) {
  const chunks = [];
  for await (const chunk of req) chunks.push(chunk);
  return Buffer.concat(chunks).toString("utf8");
}

async function control(req, res, path) {
  if (path === "/_control/seen") return json(res, 200, state.seen);
  // Sessions still open (either transport) and every Streamable HTTP one ever issued.
  if (path === "/_control/sessions") return json(res, 200, { open: [...sessions.keys()], issued: state.issued });
  if (path === "/_control/accept" && req.method === "POST") {
    const { tokens } = JSON.parse(await readBody(req));
    state.accepted = new Set(tokens);
    return json(res, 200, { accepted: tokens.length });
  }
  if (path === "/_control/clear" && req.method === "POST") {
    state.seen = [];
    return json(res, 200, {});
  }
  return json(res, 404, { error: "no such control" });
}

// What a target's authorization side looks like: discovery documents, registration,
// authorization and token endpoints. None of them must be reached while the proxy owns
// the credential; they exist so that a client which does wander off is seen doing it.
function oauth(req, res, path) {
  if (path.startsWith("/.well-known/oauth-protected-resource")) {
    return Promise.resolve(json(res, 200, {
      resource: `${origin}/mcp`,
      authorization_servers: [origin],
      bearer_methods_supported: ["header"],
    }));
  }
  if (path.startsWith("/.well-known/oauth-authorization-server") || path.startsWith("/.well-known/openid-configuration")) {
    return Promise.resolve(json(res, 200, {
      issuer: origin,
      authorization_endpoint: `${origin}/authorize`,
      token_endpoint: `${origin}/token`,
      registration_endpoint: `${origin}/register`,
      response_types_supported: ["code"],
      grant_types_supported: ["authorization_code", "refresh_token"],
      code_challenge_methods_supported: ["S256"],
      token_endpoint_auth_methods_supported: ["none"],
    }));
  }
  if (path === "/register" && req.method === "POST") {
    return readBody(req).then((body) =>
      json(res, 201, { ...JSON.parse(body || "{}"), client_id: `client-${randomUUID()}`, client_id_issued_at: 0 }),
    );
  }
  if (path === "/authorize" || path === "/token") {
    return Promise.resolve(json(res, 400, { error: "access_denied", error_description: "nobody signs in here" }));
  }
  return undefined;
}

async function streamable(req, res) {
  const id = req.headers["mcp-session-id"];
  if (id !== undefined) {
    const session = sessions.get(id);
    if (session === undefined) return json(res, 404, { jsonrpc: "2.0", error: { code: -32001, message: "Session not found" }, id: null });
    if (req.method === "GET") setImmediate(() => session.getStreamOpen.resolve());
    return session.transport.handleRequest(req, res);
  }
  if (req.method !== "POST") return json(res, 400, { error: "no session" });
  const session = newSession();
  session.transport = new StreamableHTTPServerTransport({
    sessionIdGenerator: () => randomUUID(),
    onsessioninitialized: (sid) => {
      sessions.set(sid, session);
      state.issued.push(sid);
    },
    onsessionclosed: (sid) => sessions.delete(sid),
  });
  await session.server.connect(session.transport);
  return session.transport.handleRequest(req, res);
}

async function legacySse(req, res, path) {
  if (path === "/sse" && req.method === "GET") {
    const session = newSession();
    session.transport = new SSEServerTransport("/messages", res);
    sessions.set(session.transport.sessionId, session);
    session.getStreamOpen.resolve();
    res.on("close", () => sessions.delete(session.transport.sessionId));
    return session.server.connect(session.transport);
  }
  if (path === "/messages" && req.method === "POST") {
    const sid = new URL(req.url, "http://x").searchParams.get("sessionId");
    const session = sessions.get(sid);
    if (session === undefined) return json(res, 404, { error: "no such session" });
    return session.transport.handlePostMessage(req, res);
  }
  return json(res, 405, { error: "method not allowed" });
}

const httpServer = http.createServer(async (req, res) => {
  const path = new URL(req.url, "http://x").pathname;
  try {
    if (path.startsWith("/_control/")) return await control(req, res, path);
    record(req, res, path);
    cors(res);
    if (req.method === "OPTIONS") {
      res.writeHead(204, {
        "Access-Control-Allow-Methods": "GET, POST, DELETE, OPTIONS",
        "Access-Control-Allow-Headers": "*",
        "Access-Control-Max-Age": "0",
      });
      return res.end();
    }
    const answered = oauth(req, res, path);
    if (answered !== undefined) return await answered;
    if (!authorized(req)) return challenge(res);
    if (path === "/mcp") return await streamable(req, res);
    return await legacySse(req, res, path);
  } catch (error) {
    process.stderr.write(`server error: ${error?.stack ?? error}\n`);
    if (!res.headersSent) json(res, 500, { error: String(error) });
    else res.destroy();
  }
});

httpServer.keepAliveTimeout = 5000;
httpServer.listen(0, "127.0.0.1", () => {
  origin = `http://127.0.0.1:${httpServer.address().port}`;
  process.stdout.write(`${origin}\n`);
});

function stop() {
  for (const session of sessions.values()) session.transport.close().catch(() => {});
  httpServer.close(() => process.exit(0));
  httpServer.closeAllConnections();
  setTimeout(() => process.exit(0), 2000).unref();
}
process.on("SIGTERM", stop);
process.on("SIGINT", stop);

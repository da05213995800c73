// The TypeScript SDK client as a browser-based MCP client runs it: bundled for the browser
// (esbuild, by the test), loaded by a page, talking Streamable HTTP with the browser's
// own fetch. `run` returns what the page reports.
import { Client } from "@modelcontextprotocol/sdk/client/index.js";
import { StreamableHTTPClientTransport } from "@modelcontextprotocol/sdk/client/streamableHttp.js";

export async function run(url) {
  const client = new Client({ name: "interop-browser-sdk", version: "1.0.0" });
  const transport = new StreamableHTTPClientTransport(new URL(url));
  await client.connect(transport);
  const { tools } = await client.listTools();
  const result = await client.callTool({ name: "echo", arguments: { text: "from the SDK in a browser" } });
  const session = transport.sessionId;
  await transport.terminateSession();
  await client.close();
  return { server: client.getServerVersion(), session, tools: tools.map((t) => t.name).sort(), text: result.content[0].text };
}

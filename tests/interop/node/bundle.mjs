// Bundles browser-client.mjs (the TypeScript SDK client) for the browser test's page.
// usage: node bundle.mjs OUTFILE
import { build } from "esbuild";

await build({
  entryPoints: [new URL("./browser-client.mjs", import.meta.url).pathname],
  bundle: true,
  format: "esm",
  platform: "browser",
  outfile: process.argv[2],
  logLevel: "warning",
});

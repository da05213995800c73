// A real authorization server for the sign-in tests: node-oidc-provider, configured the
// way an MCP deployment would be (open Dynamic Client Registration, PKCE S256 required,
// RFC 8707 resource indicators with opaque access tokens, refresh-token rotation, the
// device authorization grant, Client ID Metadata Documents, introspection, revocation).
// Its built-in development login and consent pages stand in for a person; the tests'
// `$BROWSER` script fills them in with plain HTTP requests.
//
// Listens on 127.0.0.1 only; the issuer has a path (`/oidc`) so that discovery has to
// use the path-insertion variants. Prints one line, `ready <issuer>`, once it accepts
// connections. Configured by environment variables (see `settings` below).
import * as http from 'node:http';

import Provider from 'oidc-provider';

const settings = {
  port: Number(process.env.AS_PORT || 0),
  // Lifetime of access tokens in seconds: the tests shorten it to see a refresh.
  accessTokenTtl: Number(process.env.AS_ACCESS_TTL || 3600),
  // The scopes a resource (an MCP target) may be granted.
  resourceScopes: process.env.AS_RESOURCE_SCOPES || 'mcp:read mcp:write',
  // The resource server's own client, used for token introspection.
  rsClientId: process.env.AS_RS_CLIENT_ID || 'mcp-target',
  rsClientSecret: process.env.AS_RS_CLIENT_SECRET || 'mcp-target-introspection-secret',
};

const MOUNT = '/oidc';

const server = http.createServer();
await new Promise((resolve) => { server.listen(settings.port, '127.0.0.1', resolve); });
const { port } = server.address();
const issuer = `http://127.0.0.1:${port}${MOUNT}`;

const provider = new Provider(issuer, {
  clients: [{
    client_id: settings.rsClientId,
    client_secret: settings.rsClientSecret,
    grant_types: [],
    response_types: [],
    redirect_uris: [],
    token_endpoint_auth_method: 'client_secret_basic',
  }, {
    // Registered beforehand (`login --client-id`): a confidential native client. Loopback
    // redirect URIs match on any port (RFC 8252 §7.3).
    client_id: 'preregistered',
    client_secret: process.env.AS_PREREGISTERED_SECRET || 'preregistered-secret',
    application_type: 'native',
    redirect_uris: ['http://127.0.0.1/callback'],
    grant_types: ['authorization_code', 'refresh_token'],
    response_types: ['code'],
    token_endpoint_auth_method: 'client_secret_basic',
  }],
  scopes: ['openid', 'offline_access', ...settings.resourceScopes.split(' ')],
  pkce: { required: () => true },
  features: {
    devInteractions: { enabled: true },
    registration: { enabled: true },
    deviceFlow: { enabled: true },
    introspection: { enabled: true },
    revocation: { enabled: true },
    clientIdMetadataDocument: { enabled: true, ack: 'draft-02', allowFetch: async () => true },
    resourceIndicators: {
      enabled: true,
      defaultResource: async (ctx, client, oneOf) => oneOf,
      // A refresh without `resource` keeps the resource the grant was given for.
      useGrantedResource: async () => true,
      getResourceServerInfo: async (ctx, resourceIndicator) => {
        const url = URL.parse(resourceIndicator);
        if (!url || url.hostname !== '127.0.0.1') {
          throw new Provider.errors.InvalidTarget();
        }
        return {
          scope: settings.resourceScopes,
          audience: resourceIndicator,
          accessTokenTTL: settings.accessTokenTtl,
          accessTokenFormat: 'opaque',
        };
      },
    },
  },
  // Every public client gets a refresh token (native apps keep their sign-in), rotated on
  // every use; the default asks for `offline_access` and consent to it.
  issueRefreshToken: async (ctx, client) => client.grantTypeAllowed('refresh_token'),
  rotateRefreshToken: () => true,
  // The tests serve Client ID Metadata Documents on loopback, which the provider's SSRF
  // protection (a special dispatcher handed to `fetch`) refuses; this server is a test
  // fixture on loopback only, so its outgoing fetches go out plainly.
  fetch: (url, options) => {
    const { dispatcher, ...plain } = options;
    return globalThis.fetch(url, plain);
  },
  ttl: {
    AccessToken: () => settings.accessTokenTtl,
    DeviceCode: () => 600,
    Grant: () => 86400,
    Interaction: () => 600,
    Session: () => 86400,
    RefreshToken: () => 86400,
  },
});
// The test server speaks plain http on loopback.
provider.proxy = false;
// One line per Dynamic Client Registration in the log (stderr), so tests can count them.
provider.on('registration_create.success', (ctx, client) => {
  process.stderr.write(`registered ${client.clientId}\n`);
});

const callback = provider.callback();
server.on('request', (req, res) => {
  if (req.url === MOUNT || req.url.startsWith(`${MOUNT}/`) || req.url.startsWith(`${MOUNT}?`)) {
    req.originalUrl = req.url;
    req.url = req.url.slice(MOUNT.length) || '/';
    callback(req, res);
    return;
  }
  res.statusCode = 404;
  res.setHeader('Content-Type', 'application/json');
  res.end('{"error":"not_found"}');
});

process.on('SIGTERM', () => { server.close(); process.exit(0); });
process.stdout.write(`ready ${issuer}\n`);

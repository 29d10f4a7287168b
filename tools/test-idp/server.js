// A real OpenID provider for Wardgate's tests: `oidc-provider` (a certified OP) with static
// accounts carrying `groups`/`amr`/`acr`, logins that complete without a form, and test-only
// endpoints that a real IdP would never have (device approval, key rotation).
//
//   node server.js --port 4444 [--id-token-ttl 300] [--access-token-ttl 300]
//                  [--code-ttl 60] [--device-code-ttl 300] [--refresh-token-ttl 3600]
//                  [--admin-redirect-uri URI]...
//
// Every option also reads from the environment (PORT, IDP_ID_TOKEN_TTL, ...). When listening it
// prints one line to stdout:  READY {"issuer": "...", "clients": {...}, "kid": "..."}
//
// Test-only endpoints (plain JSON, no authentication: this process must only ever listen on
// loopback, and it refuses any other host):
//   POST /test/device/approve {"user_code": "...", "account": "amara"}  -> approves a device flow
//   POST /test/device/deny    {"user_code": "..."}                      -> the user said no
//   POST /test/rotate-keys    {"keep_old": true}                        -> new active RS256 key
//   GET  /test/keys                                                     -> {"active": kid, "kids": [...]}
//   GET  /test/accounts                                                 -> the static accounts
//   POST /test/accounts/disable {"account": "amara"}  -> the account is disabled: its logins
//        fail (login_required) and its refresh tokens are refused (invalid_grant), as at a
//        real IdP where an administrator disabled the user
//   POST /test/accounts/enable  {"account": "amara"}  -> enabled again
//   POST /test/down / POST /test/up                   -> an outage: every OpenID endpoint
//        answers 503 until /test/up (the test endpoints keep working)
//
// Interactions: /interaction/:uid logs in the account named by `login_hint` and grants
// whatever the client asked for. An unknown or missing hint ends the flow the way a real
// IdP would: `error=login_required` at the client's redirect URI.

import { generateKeyPairSync, randomBytes } from 'node:crypto';
import http from 'node:http';
import { parseArgs } from 'node:util';

import Provider from 'oidc-provider';

const { values: args } = parseArgs({
  options: {
    port: { type: 'string' },
    host: { type: 'string' },
    'id-token-ttl': { type: 'string' },
    'access-token-ttl': { type: 'string' },
    'code-ttl': { type: 'string' },
    'device-code-ttl': { type: 'string' },
    'refresh-token-ttl': { type: 'string' },
    'session-ttl': { type: 'string' },
    'admin-redirect-uri': { type: 'string', multiple: true },
  },
  allowPositionals: false,
});

function opt(name, envName, fallback) {
  return args[name] ?? process.env[envName] ?? fallback;
}

function seconds(name, envName, fallback) {
  const raw = opt(name, envName, String(fallback));
  const n = Number.parseInt(raw, 10);
  if (!Number.isInteger(n) || n <= 0) {
    console.error(`--${name} / ${envName} must be a positive number of seconds, got '${raw}'`);
    process.exit(2);
  }
  return n;
}

const HOST = opt('host', 'IDP_HOST', '127.0.0.1');
if (!['127.0.0.1', '::1', 'localhost'].includes(HOST)) {
  console.error(`refusing to listen on ${HOST}: this IdP has unauthenticated test endpoints, loopback only`);
  process.exit(2);
}
const PORT = Number.parseInt(opt('port', 'PORT', '0'), 10);
if (!Number.isInteger(PORT) || PORT <= 0 || PORT > 65535) {
  console.error('give the port to listen on: --port N or PORT=N');
  process.exit(2);
}
const ISSUER = `http://${HOST.includes(':') ? `[${HOST}]` : HOST}:${PORT}`;

const TTL = {
  idToken: seconds('id-token-ttl', 'IDP_ID_TOKEN_TTL', 300),
  accessToken: seconds('access-token-ttl', 'IDP_ACCESS_TOKEN_TTL', 300),
  code: seconds('code-ttl', 'IDP_CODE_TTL', 60),
  deviceCode: seconds('device-code-ttl', 'IDP_DEVICE_CODE_TTL', 300),
  refreshToken: seconds('refresh-token-ttl', 'IDP_REFRESH_TOKEN_TTL', 3600),
  session: seconds('session-ttl', 'IDP_SESSION_TTL', 3600),
};

const ADMIN_REDIRECT_URIS = args['admin-redirect-uri']
  ?? (process.env.IDP_ADMIN_REDIRECT_URIS ? process.env.IDP_ADMIN_REDIRECT_URIS.split(',') : [
    'http://127.0.0.1/admin/oidc/callback',
  ]);

// The static accounts. `amr` values are RFC 8176's; `acr` names the assurance level the
// controller's MFA rule can also key on.
const ACR_PWD = 'urn:wardgate:acr:pwd';
const ACR_MFA = 'urn:wardgate:acr:mfa';
const ACCOUNTS = {
  amara: { name: 'Amara Okafor', groups: ['clinicians'], amr: ['pwd', 'mfa', 'otp'], acr: ACR_MFA },
  ben: { name: 'Ben Hughes', groups: ['clinicians', 'emergency'], amr: ['pwd', 'mfa'], acr: ACR_MFA },
  kim: { name: 'Kim Lee', groups: ['biomed', 'approvers'], amr: ['pwd', 'mfa', 'hwk'], acr: ACR_MFA },
  'acme-eng': { name: 'Acme Engineer', groups: ['vendor-acme'], amr: ['pwd'], acr: ACR_PWD },
  pat: { name: 'Pat Admin', groups: ['wardgate-admins', 'security'], amr: ['pwd', 'mfa'], acr: ACR_MFA },
  nomfa: { name: 'No MFA', groups: ['clinicians'], amr: ['pwd'], acr: ACR_PWD },
};

// Accounts an administrator disabled (test endpoint), and whether the IdP is "down".
const DISABLED = new Set();
let DOWN = false;

function emailOf(id) {
  return `${id}@hospital.test`;
}

const CLI_CLIENT_ID = 'wardgate-cli';
const ADMIN_CLIENT_ID = 'wardgate-admin';
const ADMIN_CLIENT_SECRET = process.env.IDP_ADMIN_CLIENT_SECRET || randomBytes(24).toString('base64url');

const clients = [
  {
    // The `wardgate` client: public, PKCE (required for public clients by default), native so
    // loopback redirect URIs match on any port (RFC 8252 §7.3), device flow for headless hosts.
    client_id: CLI_CLIENT_ID,
    application_type: 'native',
    token_endpoint_auth_method: 'none',
    redirect_uris: ['http://127.0.0.1/callback', 'http://[::1]/callback'],
    grant_types: ['authorization_code', 'refresh_token', 'urn:ietf:params:oauth:grant-type:device_code'],
    response_types: ['code'],
  },
  {
    // The admin console: a confidential web client.
    client_id: ADMIN_CLIENT_ID,
    client_secret: ADMIN_CLIENT_SECRET,
    application_type: 'web',
    token_endpoint_auth_method: 'client_secret_basic',
    redirect_uris: ADMIN_REDIRECT_URIS,
    grant_types: ['authorization_code', 'refresh_token'],
    response_types: ['code'],
  },
];

// Signing keys: made at start, never written anywhere. The first key signs.
function newSigningKey() {
  const { privateKey } = generateKeyPairSync('rsa', { modulusLength: 2048 });
  const jwk = privateKey.export({ format: 'jwk' });
  return { ...jwk, kid: `rs-${randomBytes(6).toString('hex')}`, alg: 'RS256', use: 'sig' };
}
let signingKeys = [newSigningKey()];

// Cookies must verify across provider instances (a key rotation builds a new one).
const COOKIE_KEYS = [randomBytes(32).toString('base64url')];

function makeProvider(keys) {
  const p = new Provider(ISSUER, {
    clients,
    jwks: { keys },
    cookies: { keys: COOKIE_KEYS },
    acrValues: [ACR_PWD, ACR_MFA],
    claims: {
      // acr, amr and auth_time only reach the ID token when a scope names them (or the
      // request's claims parameter does): the MFA rule needs them on every login.
      openid: ['sub', 'acr', 'amr', 'auth_time'],
      email: ['email', 'email_verified'],
      profile: ['name', 'preferred_username'],
      groups: ['groups'],
      sid: null,
      iss: null,
    },
    // Put the scope-requested claims in the ID token itself: the controller verifies the ID
    // token and does not call userinfo. (The default, true, keeps them for userinfo only.)
    conformIdTokenClaims: false,
    features: {
      devInteractions: { enabled: false },
      deviceFlow: { enabled: true },
      revocation: { enabled: true },
      introspection: { enabled: false },
      rpInitiatedLogout: { enabled: true },
    },
    pkce: { required: (_ctx, client) => client.clientAuthMethod === 'none' },
    ttl: {
      AccessToken: TTL.accessToken,
      AuthorizationCode: TTL.code,
      DeviceCode: TTL.deviceCode,
      IdToken: TTL.idToken,
      RefreshToken: TTL.refreshToken,
      Interaction: 600,
      Session: TTL.session,
      Grant: TTL.refreshToken,
    },
    // Refresh tokens for the device flow and for code flows that ask for offline_access.
    issueRefreshToken: async (_ctx, client, code) => client.grantTypeAllowed('refresh_token')
      && (code.scopes.has('offline_access') || code.kind === 'DeviceCode'),
    interactions: { url: (_ctx, interaction) => `/interaction/${interaction.uid}` },
    async findAccount(_ctx, sub) {
      const account = ACCOUNTS[sub];
      // A disabled account is not found: oidc-provider then refuses its refresh tokens and
      // codes with invalid_grant ("referenced account not found").
      if (!account || DISABLED.has(sub)) return undefined;
      return {
        accountId: sub,
        async claims() {
          return {
            sub,
            email: emailOf(sub),
            email_verified: true,
            name: account.name,
            preferred_username: sub,
            groups: [...account.groups],
          };
        },
      };
    },
    renderError(ctx, out) {
      ctx.type = 'json';
      ctx.body = out;
    },
  });
  p.on('server_error', (_ctx, err) => console.error('server_error', err));
  return p;
}

let provider = makeProvider(signingKeys);
let providerCallback = provider.callback();

function sendJson(res, status, body) {
  const text = JSON.stringify(body);
  res.statusCode = status;
  res.setHeader('Content-Type', 'application/json');
  res.setHeader('Content-Length', Buffer.byteLength(text));
  res.end(text);
}

async function readJson(req) {
  const chunks = [];
  let size = 0;
  for await (const chunk of req) {
    size += chunk.length;
    if (size > 64 * 1024) throw new Error('body over 64 KiB');
    chunks.push(chunk);
  }
  if (size === 0) return {};
  return JSON.parse(Buffer.concat(chunks).toString('utf8'));
}

// Logs in the account named by `login_hint` and consents to what was asked.
async function interaction(req, res) {
  const details = await provider.interactionDetails(req, res);
  const { prompt, params, session } = details;

  if (prompt.name === 'login') {
    const hint = params.login_hint;
    const account = hint ? ACCOUNTS[hint] : undefined;
    if (account && DISABLED.has(hint)) {
      await provider.interactionFinished(req, res, {
        error: 'login_required',
        error_description: `the account '${hint}' is disabled`,
      }, { mergeWithLastSubmission: false });
      return;
    }
    if (!account) {
      await provider.interactionFinished(req, res, {
        error: 'login_required',
        error_description: hint
          ? `the test IdP has no account '${hint}' (have: ${Object.keys(ACCOUNTS).join(', ')})`
          : 'the test IdP logs in the account named by login_hint; none was given',
      }, { mergeWithLastSubmission: false });
      return;
    }
    await provider.interactionFinished(req, res, {
      login: { accountId: hint, amr: account.amr, acr: account.acr, remember: false },
    }, { mergeWithLastSubmission: false });
    return;
  }

  if (prompt.name === 'consent') {
    const grant = details.grantId
      ? await provider.Grant.find(details.grantId)
      : new provider.Grant({ accountId: session.accountId, clientId: params.client_id });
    const d = prompt.details;
    if (d.missingOIDCScope) grant.addOIDCScope(d.missingOIDCScope.join(' '));
    if (d.missingOIDCClaims) grant.addOIDCClaims(d.missingOIDCClaims);
    if (d.missingResourceScopes) {
      for (const [indicator, scopes] of Object.entries(d.missingResourceScopes)) {
        grant.addResourceScope(indicator, scopes.join(' '));
      }
    }
    const grantId = await grant.save();
    await provider.interactionFinished(req, res, { consent: { grantId } }, { mergeWithLastSubmission: true });
    return;
  }

  sendJson(res, 400, { error: `unexpected prompt '${prompt.name}'` });
}

// Approves a pending device authorization as `account`, exactly as the provider's own
// verification page would after a login and consent (same fields on the DeviceCode).
async function approveDevice(body) {
  const userCode = String(body.user_code ?? '').replace(/[^A-Za-z]/g, '').toUpperCase();
  const account = ACCOUNTS[body.account];
  if (!account) return [400, { error: `no account '${body.account}'` }];
  if (DISABLED.has(body.account)) return [403, { error: `the account '${body.account}' is disabled` }];
  const code = await provider.DeviceCode.findByUserCode(userCode, { ignoreExpiration: true });
  if (!code) return [404, { error: `no device authorization with user_code '${body.user_code}'` }];
  if (code.isExpired) return [410, { error: 'the device code has expired' }];
  if (code.accountId || code.error) return [409, { error: 'the device code was already used' }];

  const scope = (code.params.scope ?? 'openid').split(' ').filter(Boolean);
  const grant = new provider.Grant({ accountId: body.account, clientId: code.clientId });
  grant.addOIDCScope(scope.join(' '));
  const grantId = await grant.save();
  Object.assign(code, {
    accountId: body.account,
    acr: account.acr,
    amr: account.amr,
    authTime: Math.floor(Date.now() / 1000),
    grantId,
    scope: scope.join(' '),
  });
  await code.save();
  return [200, { approved: true, account: body.account }];
}

async function denyDevice(body) {
  const userCode = String(body.user_code ?? '').replace(/[^A-Za-z]/g, '').toUpperCase();
  const code = await provider.DeviceCode.findByUserCode(userCode, { ignoreExpiration: true });
  if (!code) return [404, { error: `no device authorization with user_code '${body.user_code}'` }];
  Object.assign(code, { error: 'access_denied', errorDescription: 'End-User denied the request' });
  await code.save();
  return [200, { denied: true }];
}

function setDisabled(body, disabled) {
  const name = String(body.account ?? '');
  if (!ACCOUNTS[name]) return [400, { error: `no account '${name}'` }];
  if (disabled) DISABLED.add(name); else DISABLED.delete(name);
  return [200, { account: name, disabled }];
}

function rotateKeys(body) {
  const fresh = newSigningKey();
  signingKeys = body.keep_old === false ? [fresh] : [fresh, ...signingKeys];
  provider = makeProvider(signingKeys);
  providerCallback = provider.callback();
  return [200, { active: fresh.kid, kids: signingKeys.map((k) => k.kid) }];
}

const server = http.createServer(async (req, res) => {
  try {
    const url = new URL(req.url, ISSUER);
    if (url.pathname.startsWith('/interaction/') && req.method === 'GET') {
      await interaction(req, res);
      return;
    }
    if (url.pathname.startsWith('/test/')) {
      const route = `${req.method} ${url.pathname}`;
      let out;
      switch (route) {
        case 'POST /test/device/approve': out = await approveDevice(await readJson(req)); break;
        case 'POST /test/device/deny': out = await denyDevice(await readJson(req)); break;
        case 'POST /test/rotate-keys': out = rotateKeys(await readJson(req)); break;
        case 'GET /test/keys': out = [200, { active: signingKeys[0].kid, kids: signingKeys.map((k) => k.kid) }]; break;
        case 'GET /test/accounts': out = [200, ACCOUNTS]; break;
        case 'POST /test/accounts/disable': out = setDisabled(await readJson(req), true); break;
        case 'POST /test/accounts/enable': out = setDisabled(await readJson(req), false); break;
        case 'POST /test/down': DOWN = true; out = [200, { down: true }]; break;
        case 'POST /test/up': DOWN = false; out = [200, { down: false }]; break;
        default: out = [404, { error: `no test endpoint ${route}` }];
      }
      sendJson(res, out[0], out[1]);
      return;
    }
    if (DOWN) {
      sendJson(res, 503, { error: 'temporarily_unavailable', error_description: 'the test IdP is down (POST /test/up)' });
      return;
    }
    providerCallback(req, res);
  } catch (err) {
    console.error('request failed', err);
    if (!res.headersSent) sendJson(res, 500, { error: String(err?.message ?? err) });
    else res.end();
  }
});

server.listen(PORT, HOST, () => {
  const ready = {
    issuer: ISSUER,
    kid: signingKeys[0].kid,
    clients: {
      cli: CLI_CLIENT_ID,
      admin: { client_id: ADMIN_CLIENT_ID, client_secret: ADMIN_CLIENT_SECRET, redirect_uris: ADMIN_REDIRECT_URIS },
    },
    ttl: TTL,
  };
  process.stdout.write(`READY ${JSON.stringify(ready)}\n`);
});

for (const sig of ['SIGTERM', 'SIGINT']) {
  process.on(sig, () => { server.close(() => process.exit(0)); server.closeAllConnections(); });
}

// Drives the broker's Key Vault REST API with the unmodified Azure SDK for JavaScript.
//
// Run by tests/rest_sdk_js.rs:  node keyvault.js '<steps as JSON>'  (NODE_PATH = the installed
// node_modules). Inputs come from the environment, as for an application: VAULT_URL,
// NODE_EXTRA_CA_CERTS (the broker's dev CA, Node's documented way to trust a CA), SDK_CREDENTIAL
// ("appservice" | "imds" | "secret"), MI_CLIENT_ID, IDENTITY_ENDPOINT + IDENTITY_HEADER or
// AZURE_POD_IDENTITY_AUTHORITY_HOST (read by the SDK itself), AZURE_AUTHORITY_HOST,
// AZURE_TENANT_ID, AZURE_CLIENT_ID, AZURE_CLIENT_SECRET.
//
// Prints one JSON list with, per step, {"ok": RESULT} or {"error": {"type", "status", "code",
// "inner", "message"}}, and the HTTP statuses the SDK received for it ("responses").
"use strict";

const { ClientSecretCredential, ManagedIdentityCredential } = require("@azure/identity");
const { CryptographyClient, KeyClient } = require("@azure/keyvault-keys");

function credential() {
  const kind = process.env.SDK_CREDENTIAL;
  if (kind === "appservice" || kind === "imds") {
    // Which protocol the credential speaks is decided by the environment alone.
    return new ManagedIdentityCredential({ clientId: process.env.MI_CLIENT_ID });
  }
  if (kind === "secret") {
    return new ClientSecretCredential(
      process.env.AZURE_TENANT_ID,
      process.env.AZURE_CLIENT_ID,
      process.env.AZURE_CLIENT_SECRET,
      { authorityHost: process.env.AZURE_AUTHORITY_HOST, disableInstanceDiscovery: true },
    );
  }
  throw new Error(`unknown SDK_CREDENTIAL ${kind}`);
}

let responses = [];
// A documented pipeline option: a policy run on every attempt, recording what came back.
const recorder = {
  name: "recordResponses",
  async sendRequest(request, next) {
    const response = await next(request);
    responses.push([response.status, response.headers.get("retry-after") ?? null]);
    return response;
  },
};
const options = { additionalPolicies: [{ policy: recorder, position: "perRetry" }] };

const cred = credential();
const keys = new KeyClient(process.env.VAULT_URL, cred, options);
const crypto = (kid) => new CryptographyClient(kid, cred, options);
const b64 = (bytes) => Buffer.from(bytes).toString("base64");
const unb64 = (text) => new Uint8Array(Buffer.from(text, "base64"));

const ops = {
  async create_rsa(s) {
    const k = await keys.createRsaKey(s.name, { keySize: s.size ?? 2048 });
    return { id: k.id, name: k.name, version: k.properties.version, kty: k.keyType };
  },
  async get(s) {
    const k = await keys.getKey(s.name);
    return { id: k.id, name: k.name, version: k.properties.version, kty: k.keyType };
  },
  async wrap(s) {
    const r = await crypto(s.kid).wrapKey(s.alg, unb64(s.value));
    return { kid: r.keyID, value: b64(r.result) };
  },
  async unwrap(s) {
    const r = await crypto(s.kid).unwrapKey(s.alg, unb64(s.value));
    return { kid: r.keyID, value: b64(r.result) };
  },
};

async function run(step) {
  responses = [];
  const op = ops[step.op];
  if (!op) throw new Error(`unknown op ${step.op}`);
  let out;
  try {
    out = { ok: await op(step) };
  } catch (e) {
    const body = e.details && e.details.error ? e.details.error : undefined;
    out = {
      error: {
        type: e.name,
        status: e.statusCode ?? null,
        code: e.code ?? null,
        inner: body && body.innererror ? body.innererror.code : null,
        message: e.message,
      },
    };
  }
  out.responses = responses;
  return out;
}

(async () => {
  const results = [];
  for (const step of JSON.parse(process.argv[2])) results.push(await run(step));
  console.log(JSON.stringify(results));
})().catch((e) => {
  console.error(e);
  process.exit(1);
});

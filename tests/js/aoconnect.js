// Reads a result and runs a dry-run through @permaweb/aoconnect (npm, pinned in package.json),
// the client AO apps use, against the worker's compute-unit API (used by
// tests/all/interop_aoconnect.rs).
// Usage: node aoconnect.js <MU_URL> <CU_URL> <GATEWAY_URL> <process> <message>
// Prints one JSON line: {"result": <result(message)>, "dryrun": <dryrun(Action=Get)>,
// "requests": [{"method", "url"}]} where requests lists every HTTP request aoconnect made.
//
// Offline by construction: aoconnect 0.0.98 defaults to https://mu.ao-testnet.xyz,
// https://cu.ao-testnet.xyz and https://arweave.net (GraphQL), and its module-level default
// client reads MU_URL / CU_URL / GATEWAY_URL / GRAPHQL_URL from the environment at import, so
// those are set to the given loopback URLs before it is imported. Every request goes through
// the `fetch` given to connect() (and the global one, replaced too), which refuses anything
// but loopback; sockets to other hosts are refused as well, so nothing can leave the machine.
"use strict";

const net = require("net");

const LOOPBACK = new Set(["127.0.0.1", "::1", "[::1]", "localhost"]);

function refuse(what) {
  throw new Error(`aoconnect.js: refusing to reach ${what}: only loopback is allowed`);
}

// Any TCP connection (undici, http, axios) to a non-loopback host fails before DNS or connect.
const connect = net.Socket.prototype.connect;
net.Socket.prototype.connect = function (...args) {
  const first = Array.isArray(args[0]) ? args[0][0] : args[0];
  let host;
  if (first && typeof first === "object") {
    if (first.path) return connect.apply(this, args); // a Unix socket
    host = first.host ?? "localhost";
  } else {
    host = typeof args[1] === "string" ? args[1] : "localhost";
  }
  if (!LOOPBACK.has(host)) refuse(`host ${host}`);
  return connect.apply(this, args);
};

const requests = [];
const realFetch = globalThis.fetch;
async function guardedFetch(input, init) {
  const url = new URL(typeof input === "string" || input instanceof URL ? input : input.url);
  const method = (init && init.method) || "GET";
  requests.push({ method, url: url.toString() });
  if (!LOOPBACK.has(url.hostname)) refuse(url.toString());
  return realFetch(input, init);
}
globalThis.fetch = guardedFetch;

async function main() {
  const [MU_URL, CU_URL, GATEWAY_URL, processId, messageId] = process.argv.slice(2);
  if (!messageId) {
    console.error("usage: node aoconnect.js <MU_URL> <CU_URL> <GATEWAY_URL> <process> <message>");
    process.exit(64);
  }
  for (const url of [MU_URL, CU_URL, GATEWAY_URL]) {
    if (!LOOPBACK.has(new URL(url).hostname)) refuse(url);
  }
  Object.assign(process.env, { MU_URL, CU_URL, GATEWAY_URL, GRAPHQL_URL: `${GATEWAY_URL}/graphql` });
  const { connect } = await import("@permaweb/aoconnect");
  const ao = connect({ MODE: "legacy", MU_URL, CU_URL, GATEWAY_URL, fetch: guardedFetch, noLog: true });
  const result = await ao.result({ message: messageId, process: processId });
  const dryrun = await ao.dryrun({ process: processId, tags: [{ name: "Action", value: "Get" }], data: " " });
  process.stdout.write(JSON.stringify({ result, dryrun, requests }) + "\n");
}

main().catch((e) => {
  console.error(e && e.stack ? e.stack : String(e));
  process.exit(1);
});

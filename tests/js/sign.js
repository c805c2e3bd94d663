// Signs ANS-104 data items with arbundles (npm, pinned in package.json) and a fresh random
// ed25519 key (signature type 2, via SolanaSigner), or, given an Arweave JWK wallet file, with
// arbundles' ArweaveSigner (signature type 1, RSA-PSS), for the worker's parser to check.
// Usage: node sign.js <outdir> <count> [<arweave-jwk.json>]
// Writes <outdir>/item-N.bin (N = 0..count-1) and prints one JSON manifest line per item:
// {"file","id","owner_b64url","target","anchor_hex","tags":[{name,value}],"data_hex"}
// where target is base64url or null and anchor_hex is null when there is no anchor.
"use strict";

const crypto = require("crypto");
const fs = require("fs");
const path = require("path");
const bs58 = require("bs58");
const { ArweaveSigner, DataItem, SolanaSigner, createData } = require("arbundles");

const AO_TAGS = [
  { name: "Data-Protocol", value: "ao" },
  { name: "Variant", value: "ao.TN.1" },
  { name: "Type", value: "Message" },
];
// Multi-byte UTF-8 incl. a surrogate pair; short (<= 64 bytes) and long (> 64 bytes) values
// take different code paths in arbundles' Avro writer.
const UNICODE_SHORT = "héllo wörld ✓ 🚀 日本語";
const UNICODE_LONG = "Ωμέγα → ∞ · emoji 🦀🚀🎉 · 中文字符测试 · العربية · ".repeat(3);

// A fresh ed25519 key as SolanaSigner wants it: base58(secret seed 32 bytes || public 32 bytes).
function freshSigner() {
  const { publicKey, privateKey } = crypto.generateKeyPairSync("ed25519");
  const seed = Buffer.from(privateKey.export({ format: "jwk" }).d, "base64url");
  const pub = Buffer.from(publicKey.export({ format: "jwk" }).x, "base64url");
  if (seed.length !== 32 || pub.length !== 32) throw new Error("unexpected ed25519 key size");
  return new SolanaSigner(bs58.encode(Buffer.concat([seed, pub])));
}

// Item shapes, used in turn: every combination the worker must parse.
function shape(n) {
  const target = crypto.randomBytes(32).toString("base64url");
  switch (n % 6) {
    case 0: // nothing at all: no target, anchor, tags, data
      return { data: Buffer.alloc(0), opts: {} };
    case 1: // everything, AO tags plus a unicode value, text data
      return {
        data: Buffer.from(`hello from arbundles, item ${n}`),
        opts: {
          target,
          anchor: Buffer.from(crypto.randomBytes(16).toString("hex"), "ascii"),
          tags: [...AO_TAGS, { name: "Action", value: "Eval" }, { name: "Unicode", value: UNICODE_SHORT }],
        },
      };
    case 2: // binary anchor, no tags, binary data with every byte value
      return {
        data: Buffer.from(Array.from({ length: 512 }, (_, i) => i % 256)),
        opts: { anchor: crypto.randomBytes(32) },
      };
    case 3: // target only plus tags, empty data
      return {
        data: Buffer.alloc(0),
        opts: { target, tags: [{ name: "Ünïcödé-Name", value: UNICODE_LONG }, ...AO_TAGS] },
      };
    case 4: // tags only, short data
      return { data: Buffer.from("1 + 1"), opts: { tags: AO_TAGS } };
    default: // target, anchor, repeated tag names, 64 KiB random data
      return {
        data: crypto.randomBytes(64 * 1024),
        opts: {
          target,
          anchor: crypto.randomBytes(32),
          tags: [...AO_TAGS, { name: "Dup", value: "first" }, { name: "Dup", value: "second" }, { name: "Content-Type", value: "application/octet-stream" }],
        },
      };
  }
}

async function main() {
  const [outdir, countText, jwkFile] = process.argv.slice(2);
  const count = Number.parseInt(countText, 10);
  if (!outdir || !Number.isInteger(count) || count < 1) {
    process.stderr.write("usage: node sign.js <outdir> <count> [<arweave-jwk.json>]\n");
    process.exit(2);
  }
  fs.mkdirSync(outdir, { recursive: true });
  const signer = jwkFile ? new ArweaveSigner(JSON.parse(fs.readFileSync(jwkFile, "utf8"))) : freshSigner();
  for (let n = 0; n < count; n++) {
    const { data, opts } = shape(n);
    const item = createData(data, signer, opts);
    await item.sign(signer);
    const raw = item.getRaw();
    if (!(await DataItem.verify(raw))) throw new Error(`item ${n}: arbundles does not verify its own item`);
    const file = path.join(outdir, `item-${n}.bin`);
    fs.writeFileSync(file, raw);
    const manifest = {
      file,
      id: item.id,
      owner_b64url: Buffer.from(signer.publicKey).toString("base64url"),
      target: opts.target === undefined ? null : opts.target,
      anchor_hex: opts.anchor === undefined ? null : Buffer.from(opts.anchor).toString("hex"),
      tags: opts.tags === undefined ? [] : opts.tags.map(({ name, value }) => ({ name, value })),
      data_hex: data.toString("hex"),
    };
    process.stdout.write(JSON.stringify(manifest) + "\n");
  }
}

main().catch((e) => {
  process.stderr.write(`sign.js: ${(e && e.stack) || e}\n`);
  process.exit(1);
});

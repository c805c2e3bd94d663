// Verifies raw ANS-104 data items with arbundles (npm, pinned in package.json).
// Usage: node verify.js <file>...
// Prints one JSON line per file: {"file":..., "valid":bool, "id":...}; when arbundles throws
// (e.g. unknown signature type) the line has "valid":false and an "error" field instead.
// Exits non-zero only on usage or I/O errors, never because an item is invalid.
"use strict";

const fs = require("fs");
const { DataItem } = require("arbundles");

async function main() {
  const files = process.argv.slice(2);
  if (files.length === 0) {
    process.stderr.write("usage: node verify.js <file>...\n");
    process.exit(2);
  }
  for (const file of files) {
    const buffer = fs.readFileSync(file);
    const line = { file, valid: false, id: null };
    try {
      line.valid = (await DataItem.verify(buffer)) === true;
      line.id = new DataItem(buffer).id;
    } catch (e) {
      line.valid = false;
      line.error = String((e && e.message) || e);
    }
    process.stdout.write(JSON.stringify(line) + "\n");
  }
}

main().catch((e) => {
  process.stderr.write(`verify.js: ${(e && e.stack) || e}\n`);
  process.exit(1);
});

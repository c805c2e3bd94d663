#!/usr/bin/env node
// Regenerates every golden in tests/data/aos/ by running harness.js once per (sequence, fixture, format)
// run listed below, and writes tests/data/aos/index.json (which golden came from what, with the fixture's
// sha256 and the loader/Node versions). Usage (from the repository root or anywhere):
//   node scripts/aos-goldens/generate.js [--fixtures DIR] [--only NAME_SUBSTRING]
// Fixtures default to ../shared/reference/aos relative to the repository root (or AO_AOS_FIXTURES).
'use strict'

const fs = require('node:fs')
const os = require('node:os')
const path = require('node:path')
const crypto = require('node:crypto')
const { spawnSync } = require('node:child_process')

const HERE = __dirname
const ROOT = path.resolve(HERE, '..', '..')
const DATA = path.join(ROOT, 'tests', 'data', 'aos')
const SEQ = path.join(DATA, 'sequences')

const VARIANTS = {
  e4: { fixture: 'emscripten4.wasm', format: 'wasm32-unknown-emscripten4' },
  'e4-metering': { fixture: 'emscripten4.wasm', format: 'wasm32-unknown-emscripten-metering' },
  w64: { fixture: 'wasm64-emscripten.wasm', format: 'wasm64-unknown-emscripten-draft_2024_02_15' },
  'w64-metering': { fixture: 'wasm64-emscripten.wasm', format: 'wasm64-unknown-emscripten-draft_2024_10_16-metering' },
  e2: { fixture: 'aos.wasm', format: 'wasm32-unknown-emscripten2' },
  'e2-sqlite': { fixture: 'emscripten2_sqlite.wasm', format: 'wasm32-unknown-emscripten2' },
  'e1-actor': { fixture: 'emscripten.wasm', format: 'wasm32-unknown-emscripten' },
  'e2-actor': { fixture: 'emscripten2.wasm', format: 'wasm32-unknown-emscripten2' }
}

const AOS = ['e4', 'e4-metering', 'w64', 'w64-metering', 'e2']

// name: the golden file is tests/data/aos/<name>.jsonl. memoryReproducible: false where the loader itself gives
// different memory bytes on two identical runs (compare outputs only). sandbox: run with a fresh empty temporary directory
// as cwd and record which files appeared there (os.execute cases: the E3/E4/W64 Node glue runs shell commands).
const RUNS = [
  ...AOS.map((v) => ({ name: `acceptance.${v}`, sequence: 'acceptance.json', variant: v })),
  ...AOS.map((v) => ({ name: `acceptance-restore3.${v}`, sequence: 'acceptance.json', variant: v, restoreAfter: 3 })),
  ...['e4', 'e4-metering', 'w64', 'w64-metering'].map((v) => ({ name: `loader-tests.${v}`, sequence: 'loader-tests.json', variant: v })),
  ...['e4', 'w64', 'e2'].map((v) => ({ name: `nan.${v}`, sequence: 'nan.json', variant: v })),
  ...['e4', 'w64'].map((v) => ({ name: `os-execute-touch.${v}`, sequence: 'os-execute-touch.json', variant: v, sandbox: true })),
  { name: 'system.e2', sequence: 'system-e2.json', variant: 'e2', sandbox: true },
  { name: 'resize-heap.e2', sequence: 'resize-heap-e2.json', variant: 'e2' },
  // The JS FS serves real /dev/urandom bytes to sqlite: its memory differs between two identical runs (spec §9.2).
  { name: 'sqlite.e2-sqlite', sequence: 'sqlite-e2.json', variant: 'e2-sqlite', memoryReproducible: false },
  { name: 'test-actor.e1-actor', sequence: 'test-actor.json', variant: 'e1-actor' },
  { name: 'test-actor.e2-actor', sequence: 'test-actor.json', variant: 'e2-actor' },
  { name: 'assignment.e1-actor', sequence: 'assignment-e1.json', variant: 'e1-actor' }
]

function parseArgs (args) {
  const opts = { fixtures: process.env.AO_AOS_FIXTURES || path.resolve(ROOT, '..', 'shared', 'reference', 'aos'), only: null }
  for (let i = 0; i < args.length; i += 2) {
    if (args[i] === '--fixtures') opts.fixtures = path.resolve(args[i + 1])
    else if (args[i] === '--only') opts.only = args[i + 1]
    else {
      process.stderr.write(`generate: unknown argument ${args[i]}\nusage: node generate.js [--fixtures DIR] [--only NAME_SUBSTRING]\n`)
      process.exit(2)
    }
  }
  return opts
}

function sha256File (file) {
  return crypto.createHash('sha256').update(fs.readFileSync(file)).digest('hex')
}

function listFiles (dir) {
  return fs.readdirSync(dir).sort()
}

function main () {
  const opts = parseArgs(process.argv.slice(2))
  if (!fs.existsSync(opts.fixtures)) {
    process.stderr.write(`generate: fixtures not found at ${opts.fixtures} (give --fixtures DIR or AO_AOS_FIXTURES)\n`)
    process.exit(2)
  }
  const loaderVersion = JSON.parse(fs.readFileSync(path.join(HERE, 'node_modules', '@permaweb', 'ao-loader', 'package.json'), 'utf8')).version
  const indexFile = path.join(DATA, 'index.json')
  const index = fs.existsSync(indexFile) ? JSON.parse(fs.readFileSync(indexFile, 'utf8')) : { goldens: {} }
  index.generator = {
    loader: `@permaweb/ao-loader ${loaderVersion}`,
    node: process.version,
    arch: process.arch,
    tz: 'UTC',
    command: 'node scripts/aos-goldens/generate.js'
  }

  for (const run of RUNS) {
    if (opts.only && !run.name.includes(opts.only)) continue
    const variant = VARIANTS[run.variant]
    const wasm = path.join(opts.fixtures, variant.fixture)
    const out = path.join(DATA, `${run.name}.jsonl`)
    const args = ['--experimental-wasm-memory64', path.join(HERE, 'harness.js'),
      '--wasm', wasm, '--format', variant.format, '--sequence', path.join(SEQ, run.sequence), '--out', out]
    if (run.restoreAfter !== undefined) args.push('--restore-after', String(run.restoreAfter))
    const cwd = run.sandbox ? fs.mkdtempSync(path.join(os.tmpdir(), 'aos-golden-')) : HERE
    const started = process.hrtime.bigint()
    const res = spawnSync(process.execPath, args, { cwd, env: { ...process.env, TZ: 'UTC' }, stdio: ['ignore', 'inherit', 'inherit'] })
    const seconds = Number(process.hrtime.bigint() - started) / 1e9
    if (res.status !== 0) {
      process.stderr.write(`generate: ${run.name} failed (exit ${res.status}, signal ${res.signal})\n`)
      process.exit(1)
    }
    const entry = {
      fixture: variant.fixture,
      fixture_sha256: sha256File(wasm),
      format: variant.format,
      sequence: `sequences/${run.sequence}`,
      restore_after: run.restoreAfter !== undefined ? run.restoreAfter : null,
      lines: fs.readFileSync(out, 'utf8').split('\n').filter((l) => l !== '').length,
      memory_reproducible: run.memoryReproducible !== false
    }
    if (run.sandbox) {
      entry.files_created_in_cwd = listFiles(cwd)
      fs.rmSync(cwd, { recursive: true, force: true })
    }
    index.goldens[`${run.name}.jsonl`] = entry
    process.stderr.write(`generate: ${run.name}: ${entry.lines} lines in ${seconds.toFixed(1)} s` +
      (run.sandbox ? `; files created in cwd: ${JSON.stringify(entry.files_created_in_cwd)}` : '') + '\n')
  }
  // What the loader compiles for the -metering formats: meterWASM of the fixture (the loader's bundled copy of
  // @permaweb/wasm-metering 0.2.2 gives the same bytes as the dependency installed next to it; checked by
  // hashing the bytes handed to WebAssembly.instantiate). Only the digest is kept: the bytes are BSL-derived.
  const metering = require('@permaweb/wasm-metering')
  index.metered_binaries = {}
  for (const [fixture, meterType] of [['emscripten4.wasm', 'i32'], ['wasm64-emscripten.wasm', 'i64']]) {
    const bytes = metering.meterWASM(fs.readFileSync(path.join(opts.fixtures, fixture)), { meterType })
    index.metered_binaries[fixture] = { meter_type: meterType, len: bytes.length, sha256: crypto.createHash('sha256').update(bytes).digest('hex') }
  }
  const sorted = {}
  for (const k of Object.keys(index.goldens).sort()) sorted[k] = index.goldens[k]
  index.goldens = sorted
  fs.writeFileSync(indexFile, JSON.stringify(index, null, 2) + '\n')
}

main()

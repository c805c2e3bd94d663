#!/usr/bin/env node
// Throughput of the real AO loader (@permaweb/ao-loader, pinned in package.json) on the spec's benchmark
// sequence (shared/docs/aos.md §8, §10.4): a fresh loader, boot + `count = 0`, then N messages alternating
// `count = count + 1; return count` and `Send({Target='X', Data='hi <i>', Action='Ping'})`.
//
// Modes: "cu"     = what the JS CU does: the previous Memory (a copy, HEAPU8.slice()) is passed to every call
//                   and copied back in (HEAPU8.set), no UNSAFE_MEMORY;
//        "unsafe" = the loader option UNSAFE_MEMORY: true; Memory is the live HEAPU8.buffer (an ArrayBuffer,
//                   no copy out) and passing it back, as the loader's own tests do, copies nothing in.
//
// Usage: TZ=UTC node --experimental-wasm-memory64 bench.js --wasm FILE --format FORMAT --mode cu|unsafe
//        [--messages N] [--reps R]
// Prints one JSON line per repetition and a summary line (median msg/s). Times are taken with
// `new Date().getTime()`: the E2/E3/E4/W64 glues replace Date.now (and E2 performance.now, process.hrtime).
'use strict'

const cliArgs = process.argv.slice(2)
// Same argv fix as harness.js (spec §4.2): the E1/E2 glues copy process.argv into wasm memory.
process.argv.length = 2
process.argv[1] = './this.program'

const fs = require('node:fs')
const os = require('node:os')

const AoLoader = require('@permaweb/ao-loader')

const USAGE = 'usage: TZ=UTC node --experimental-wasm-memory64 bench.js --wasm FILE --format FORMAT --mode cu|unsafe [--messages N] [--reps R]'

function fail (message) {
  process.stderr.write(`bench: ${message}\n${USAGE}\n`)
  process.exit(2)
}

function parseOptions (args) {
  const opts = { messages: 200, reps: 3 }
  for (let i = 0; i < args.length; i += 2) {
    const v = args[i + 1]
    if (v === undefined) fail(`${args[i]} needs a value`)
    if (args[i] === '--wasm') opts.wasm = v
    else if (args[i] === '--format') opts.format = v
    else if (args[i] === '--mode') opts.mode = v
    else if (args[i] === '--messages') opts.messages = Number(v)
    else if (args[i] === '--reps') opts.reps = Number(v)
    else fail(`unknown argument ${args[i]}`)
  }
  if (!opts.wasm || !opts.format) fail('--wasm and --format are required')
  if (opts.mode !== 'cu' && opts.mode !== 'unsafe') fail('--mode must be cu or unsafe')
  if (!Number.isInteger(opts.messages) || opts.messages < 2 || opts.messages % 2 !== 0) fail('--messages must be an even integer >= 2')
  if (!Number.isInteger(opts.reps) || opts.reps < 1) fail('--reps must be a positive integer')
  return opts
}

const { DEFAULT_ENV: ENV, standardMessage: message } = require('./shapes.js')

function now () {
  return new Date().getTime()
}

function outputText (output) {
  if (output && typeof output === 'object' && output.data !== undefined) {
    return typeof output.data === 'object' && output.data !== null ? String(output.data.output) : String(output.data)
  }
  return String(output)
}

function median (xs) {
  const s = [...xs].sort((a, b) => a - b)
  const m = s.length >> 1
  return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2
}

async function rep (binary, opts) {
  const load = os.loadavg()
  let t = now()
  await WebAssembly.compile(binary) // plain V8 compile of the unmetered bytes (the loader patches this only for -metering formats with a format argument)
  const compileMs = now() - t

  t = now()
  const options = { format: opts.format }
  if (opts.mode === 'unsafe') options.UNSAFE_MEMORY = true
  const handle = await AoLoader(binary, options)
  const loaderMs = now() - t

  t = now()
  let result = await handle(null, message(1, 'count = 0'), ENV)
  const firstMs = now() - t
  if (result.Error) throw new Error(`boot message failed: ${result.Error}`)

  let memory = result.Memory
  t = now()
  for (let i = 0; i < opts.messages; i++) {
    const data = i % 2 === 0 ? 'count = count + 1; return count' : `Send({Target='X', Data='hi ${i}', Action='Ping'})`
    result = await handle(memory, message(i + 2, data), ENV)
    if (result.Error) throw new Error(`message ${i + 2} failed: ${result.Error}`)
    memory = result.Memory
  }
  const runMs = now() - t
  const check = await handle(memory, message(opts.messages + 2, 'return count'), ENV)
  const count = outputText(check.Output)
  if (count !== String(opts.messages / 2)) throw new Error(`sequence check failed: count = ${count}, expected ${opts.messages / 2}`)
  return {
    compile_ms: compileMs,
    loader_init_ms: loaderMs,
    first_message_ms: firstMs,
    messages: opts.messages,
    run_ms: runMs,
    msg_per_s: Number((opts.messages * 1000 / runMs).toFixed(1)),
    memory_len: memory.byteLength,
    loadavg_before: load.map((x) => Number(x.toFixed(2))),
    loadavg_after: os.loadavg().map((x) => Number(x.toFixed(2)))
  }
}

async function main () {
  const opts = parseOptions(cliArgs)
  if (process.env.TZ !== 'UTC') fail('run with TZ=UTC')
  const binary = fs.readFileSync(opts.wasm)
  const reps = []
  for (let r = 0; r < opts.reps; r++) {
    const res = await rep(binary, opts)
    reps.push(res)
    fs.writeSync(1, JSON.stringify({ wasm: opts.wasm.split('/').pop(), format: opts.format, mode: opts.mode, rep: r + 1, ...res }) + '\n')
  }
  const summary = {
    summary: true,
    wasm: opts.wasm.split('/').pop(),
    format: opts.format,
    mode: opts.mode,
    messages: opts.messages,
    reps: opts.reps,
    median_msg_per_s: median(reps.map((r) => r.msg_per_s)),
    all_msg_per_s: reps.map((r) => r.msg_per_s),
    median_first_message_ms: median(reps.map((r) => r.first_message_ms)),
    median_loader_init_ms: median(reps.map((r) => r.loader_init_ms)),
    median_compile_ms: median(reps.map((r) => r.compile_ms)),
    loadavg_1m: reps.map((r) => r.loadavg_before[0])
  }
  fs.writeSync(1, JSON.stringify(summary) + '\n')
}

main().then(
  () => process.exit(0),
  (e) => {
    process.stderr.write(`bench: ${e && e.stack ? e.stack : e}\n`)
    process.exit(1)
  }
)

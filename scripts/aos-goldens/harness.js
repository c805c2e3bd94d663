#!/usr/bin/env node
// Golden harness: runs a message sequence through the real AO loader (@permaweb/ao-loader, pinned in
// package.json) with CU semantics and prints one JSON line per message. Written from the project's spec
// (docs: shared/docs/aos.md §4.2, §4.7, §6, §10.2); see README.md here for the sequence and output formats.
//
// Run it as:  TZ=UTC node --experimental-wasm-memory64 harness.js --wasm FILE --format FORMAT --sequence FILE
//             [--compute-limit N] [--restore-after K] [--out FILE]
// (or the same through AOS_WASM, AOS_FORMAT, AOS_SEQUENCE, AOS_COMPUTE_LIMIT, AOS_RESTORE_AFTER, AOS_OUT).
'use strict'

// ---- 1. Arguments, read before anything else: process.argv is rewritten below. ----
const cliArgs = process.argv.slice(2)

// The E1/E2 glues copy process.argv[1] (as thisProgram) and process.argv.slice(2) (as extra main()
// arguments) into wasm memory, so the harness's own path and flags would leak into memory and gas
// (spec §4.2). Force the glue's non-Node default BEFORE the loader is loaded.
process.argv.length = 2
process.argv[1] = './this.program'

const fs = require('node:fs')
const path = require('node:path')
const crypto = require('node:crypto')

const AoLoader = require('@permaweb/ao-loader')

const USAGE = 'usage: TZ=UTC node --experimental-wasm-memory64 harness.js --wasm FILE --format FORMAT ' +
  '--sequence FILE [--compute-limit N] [--restore-after K] [--out FILE]'

function fail (message) {
  process.stderr.write(`harness: ${message}\n${USAGE}\n`)
  process.exit(2)
}

function parseOptions (args) {
  const opts = {
    wasm: process.env.AOS_WASM,
    format: process.env.AOS_FORMAT,
    sequence: process.env.AOS_SEQUENCE,
    computeLimit: process.env.AOS_COMPUTE_LIMIT,
    restoreAfter: process.env.AOS_RESTORE_AFTER,
    out: process.env.AOS_OUT
  }
  const names = {
    '--wasm': 'wasm',
    '--format': 'format',
    '--sequence': 'sequence',
    '--compute-limit': 'computeLimit',
    '--restore-after': 'restoreAfter',
    '--out': 'out'
  }
  for (let i = 0; i < args.length; i++) {
    const key = names[args[i]]
    if (!key) fail(`unknown argument ${JSON.stringify(args[i])}`)
    if (i + 1 >= args.length) fail(`${args[i]} needs a value`)
    opts[key] = args[++i]
  }
  if (!opts.wasm) fail('no module given (--wasm or AOS_WASM)')
  if (!opts.format) fail('no Module-Format given (--format or AOS_FORMAT)')
  if (!opts.sequence) fail('no message sequence given (--sequence or AOS_SEQUENCE)')
  opts.computeLimit = optionalInteger(opts.computeLimit, '--compute-limit')
  opts.restoreAfter = optionalInteger(opts.restoreAfter, '--restore-after')
  return opts
}

function optionalInteger (value, name) {
  if (value === undefined || value === '') return undefined
  const n = Number(value)
  if (!Number.isSafeInteger(n) || n < 0) fail(`${name} must be a non-negative integer, got ${JSON.stringify(value)}`)
  return n
}

// ---- 2. Sequence files ----
const { DEFAULT_ENV, standardMessage } = require('./shapes.js')

const STEP_KEYS = new Set(['data', 'msg', 'env', 'from', 'fresh', 'compute_limit', 'note'])

// Reads a sequence: a JSON array of steps, a JSON object {"env"?, "compute_limit"?, "steps": [...]}
// (other top-level keys such as "description" are ignored), or JSONL with one step per line.
// A step is a Data string or an object (see README.md).
function readSequence (file) {
  const text = fs.readFileSync(file, 'utf8')
  let top
  if (file.endsWith('.jsonl')) {
    top = { steps: text.split('\n').filter((l) => l.trim() !== '').map((l, i) => parseJson(l, `${file}:${i + 1}`)) }
  } else {
    const parsed = parseJson(text, file)
    top = Array.isArray(parsed) ? { steps: parsed } : parsed
  }
  if (!top || !Array.isArray(top.steps) || top.steps.length === 0) fail(`${file}: no steps (expected an array or {"steps": [...]})`)
  return top.steps.map((raw, i) => normaliseStep(raw, i + 1, top, file))
}

function parseJson (text, where) {
  try {
    return JSON.parse(text)
  } catch (e) {
    fail(`${where}: not JSON (${e.message})`)
  }
}

function normaliseStep (raw, n, top, file) {
  const where = `${file}: step ${n}`
  const step = typeof raw === 'string' ? { data: raw } : raw
  if (!step || typeof step !== 'object' || Array.isArray(step)) fail(`${where}: a step is a Data string or an object`)
  for (const k of Object.keys(step)) if (!STEP_KEYS.has(k)) fail(`${where}: unknown key ${JSON.stringify(k)}`)
  if ((step.data === undefined) === (step.msg === undefined)) fail(`${where}: give exactly one of "data" and "msg"`)
  let from = step.from === undefined ? 'prev' : step.from
  if (!(from === 'prev' || from === null || (Number.isInteger(from) && from >= 1 && from < n))) {
    fail(`${where}: "from" must be "prev", null or the number of an earlier step`)
  }
  if (n === 1 && from === 'prev') from = null
  return {
    n,
    msg: step.msg !== undefined ? step.msg : standardMessage(n, step.data),
    env: step.env !== undefined ? step.env : (top.env !== undefined ? top.env : DEFAULT_ENV),
    from,
    fresh: step.fresh === true,
    computeLimit: step.compute_limit !== undefined ? step.compute_limit : top.compute_limit,
    note: step.note
  }
}

// ---- 3. Running ----
function sha256 (bytes) {
  return crypto.createHash('sha256').update(bytes).digest('hex')
}

function errorText (e) {
  if (e instanceof Error) return e.message
  if (typeof e === 'string') return e
  try {
    return JSON.stringify(e)
  } catch (_) {
    return String(e)
  }
}

// What the CU reads as the message's textual output (CU worker/evaluate.js mergeOutput).
function outputText (output) {
  if (typeof output === 'string') return output
  if (typeof output === 'number') return String(output)
  if (output && typeof output === 'object' && output.data && typeof output.data.output === 'string') return output.data.output
  return ''
}

function orNull (v) {
  return v === undefined ? null : v
}

async function main () {
  const opts = parseOptions(cliArgs)
  if (process.env.TZ !== 'UTC') fail('run with TZ=UTC (the glue reads the host timezone, spec §5.3)')
  const binary = fs.readFileSync(opts.wasm)
  const steps = readSequence(opts.sequence)
  const out = opts.out ? fs.openSync(opts.out, 'w') : 1

  // Keep only the memories that a later step names explicitly (they are 110 MB each for aos 2.0).
  const named = new Set(steps.filter((s) => Number.isInteger(s.from)).map((s) => s.from))
  const history = new Map()

  let handle = null
  let kept = null // the memory the CU holds after the last step (previous memory on errors)
  let needFresh = true

  for (const step of steps) {
    const fresh = needFresh || step.fresh || (opts.restoreAfter !== undefined && step.n === opts.restoreAfter + 1)
    if (fresh) {
      const limit = opts.computeLimit !== undefined ? opts.computeLimit : step.computeLimit
      const options = { format: opts.format }
      if (limit !== undefined) options.computeLimit = limit
      handle = await AoLoader(binary, options)
    }
    const input = step.from === 'prev' ? kept : step.from === null ? null : history.get(step.from)
    const msgJson = JSON.stringify(step.msg)
    const envJson = JSON.stringify(step.env)

    let result = null
    let thrown = null
    try {
      result = await handle(input, step.msg, step.env)
    } catch (e) {
      thrown = e
    }

    let ok
    let error
    let errorMemory = null
    if (thrown !== null) {
      ok = false
      error = errorText(thrown)
    } else if (result.Error !== undefined && result.Error !== null && result.Error !== '') {
      ok = false
      error = errorText(result.Error)
      errorMemory = result.Memory
    } else if (outputText(result.Output).endsWith('not enough memory for buffer allocation')) {
      ok = false
      error = 'not enough memory for buffer allocation'
      errorMemory = result.Memory
    } else {
      ok = true
      error = null
      kept = result.Memory
    }
    if (!ok && step.from !== 'prev') kept = input // CU: the previous memory is what this message started from
    needFresh = !ok // CU: drop the instance after any error
    if (named.has(step.n)) history.set(step.n, kept)

    const line = {
      n: step.n,
      fresh,
      from: step.from === 'prev' ? step.n - 1 : step.from,
      msg: msgJson,
      env: envJson,
      ok,
      thrown: thrown !== null,
      error,
      output: result ? orNull(result.Output) : null,
      messages: result ? orNull(result.Messages) : null,
      spawns: result ? orNull(result.Spawns) : null,
      assignments: result ? orNull(result.Assignments) : null,
      patches: result ? orNull(result.Patches) : null,
      gas_used: result ? orNull(result.GasUsed) : null,
      memory_len: kept ? kept.byteLength : null,
      memory_sha256: kept ? sha256(kept) : null,
      error_memory_len: errorMemory ? errorMemory.byteLength : null,
      error_memory_sha256: errorMemory ? sha256(errorMemory) : null
    }
    if (step.note !== undefined) line.note = step.note
    fs.writeSync(out, JSON.stringify(line) + '\n')
  }
  if (out !== 1) fs.closeSync(out)
}

// The loader mutes console.log and leaves it muted after a throw: report through stderr directly.
main().then(
  () => process.exit(0),
  (e) => {
    process.stderr.write(`harness: ${e && e.stack ? e.stack : e}\n`)
    process.exit(1)
  }
)

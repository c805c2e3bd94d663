#!/usr/bin/env node
// Summarises bench-all.sh output (JSON lines) as the Markdown table of FIGURES.md.
// Usage: node bench-summary.js raw.jsonl
'use strict'

const fs = require('node:fs')

const file = process.argv[2]
if (!file) {
  process.stderr.write('usage: node bench-summary.js raw.jsonl\n')
  process.exit(2)
}

function median (xs) {
  if (xs.length === 0) return null
  const s = [...xs].sort((a, b) => a - b)
  const m = s.length >> 1
  return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2
}

const groups = new Map()
for (const line of fs.readFileSync(file, 'utf8').split('\n')) {
  if (line.trim() === '') continue
  const d = JSON.parse(line)
  if (d.uptime !== undefined || d.summary) continue
  const key = `${d.wasm} | ${d.format} | ${d.mode}`
  if (!groups.has(key)) groups.set(key, [])
  groups.get(key).push(d)
}

const fmt = (x) => (x === null ? '–' : String(x))
const list = (xs) => xs.join(', ')
process.stdout.write('| fixture | format | mode | msgs | cold msg/s (median; runs) | warm msg/s (median; runs) | first msg ms cold / warm | loader init ms cold | V8 compile ms cold | load avg (1 min) |\n')
process.stdout.write('|---|---|---|---|---|---|---|---|---|---|\n')
for (const [key, reps] of groups) {
  const cold = reps.filter((r) => r.rep === 1)
  const warm = reps.filter((r) => r.rep >= 2)
  const loads = reps.map((r) => r.loadavg_before[0])
  process.stdout.write(`| ${key} | ${reps[0].messages} ` +
    `| **${fmt(median(cold.map((r) => r.msg_per_s)))}** (${list(cold.map((r) => r.msg_per_s))}) ` +
    `| **${fmt(median(warm.map((r) => r.msg_per_s)))}** (${list(warm.map((r) => r.msg_per_s))}) ` +
    `| ${fmt(median(cold.map((r) => r.first_message_ms)))} / ${fmt(median(warm.map((r) => r.first_message_ms)))} ` +
    `| ${fmt(median(cold.map((r) => r.loader_init_ms)))} ` +
    `| ${fmt(median(cold.map((r) => r.compile_ms)))} ` +
    `| ${Math.min(...loads).toFixed(1)}–${Math.max(...loads).toFixed(1)} |\n`)
}

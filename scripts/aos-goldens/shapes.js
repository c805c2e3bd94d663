// The loader tests' message and env shapes (aos spec §6.1, §6.2), shared by harness.js and
// bench.js. Key order is part of the contract: aos's memory depends on the JSON bytes.
'use strict'

// The default env: process AOS owned by FOOBAR, named Thomas.
const DEFAULT_ENV = { Process: { Id: 'AOS', Owner: 'FOOBAR', Tags: [{ name: 'Name', value: 'Thomas' }] } }

// The standard Action=Eval message number `n` with `data` as its code.
function standardMessage (n, data) {
  return {
    Id: `MSG${n}`,
    Target: 'AOS',
    Owner: 'FOOBAR',
    From: 'FOOBAR',
    Module: 'FOO',
    'Block-Height': '1000',
    Timestamp: '1700000000000',
    Tags: [{ name: 'Action', value: 'Eval' }],
    Data: data
  }
}

module.exports = { DEFAULT_ENV, standardMessage }

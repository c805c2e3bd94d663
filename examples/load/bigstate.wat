;; A load-test actor (Module-Format wasm32-unknown-ao-gpu-worker, JSON-1 ABI) whose state is its
;; whole 64 MiB linear memory: the first message fills pages 1..1023 with xorshift noise (so the
;; journal's lz4 image is as large as the memory), every later message (and every dry-run)
;; answers an empty result and changes nothing.
(module
  (memory (export "memory") 1024)
  (global $heap (mut i32) (i32.const 4096))
  (data (i32.const 1024) "{\"ok\":true,\"response\":{\"Output\":\"big\",\"Messages\":[],\"Spawns\":[],\"Assignments\":[]}}\00")
  (func (export "malloc") (param $size i32) (result i32)
    (local $ptr i32)
    (local.set $ptr (global.get $heap))
    ;; Messages are small: the bump heap stays below the filled pages (from 64 KiB).
    (if (i32.gt_u (i32.add (local.get $ptr) (local.get $size)) (i32.const 65536))
      (then (return (i32.const 0))))
    (global.set $heap (i32.add (local.get $ptr) (local.get $size)))
    (local.get $ptr))
  (func (export "handle") (param $msg i32) (param $env i32) (result i32)
    (local $at i32)
    (local $x i32)
    (global.set $heap (i32.const 4096))
    (if (i32.eqz (i32.load (i32.const 8)))
      (then
        (local.set $x (i32.const 0x2545F491))
        (local.set $at (i32.const 65536))
        (loop $fill
          (local.set $x (i32.xor (local.get $x) (i32.shl (local.get $x) (i32.const 13))))
          (local.set $x (i32.xor (local.get $x) (i32.shr_u (local.get $x) (i32.const 17))))
          (local.set $x (i32.xor (local.get $x) (i32.shl (local.get $x) (i32.const 5))))
          (i32.store (local.get $at) (local.get $x))
          (local.set $at (i32.add (local.get $at) (i32.const 4)))
          (br_if $fill (i32.lt_u (local.get $at) (i32.const 67108864))))
        (i32.store (i32.const 8) (i32.const 1))))
    (i32.const 1024)))

;; The devnet's registry actor (Module-Format wasm32-unknown-ao-gpu-worker, JSON-1 ABI).
;;
;; The registry's state is its schedule: capacity advertisements and workload assignments are
;; messages in its log, which workers and clients read from the scheduler in nonce order.
;; Evaluated, it acknowledges each message with an empty result and keeps no state of its own.
(module
  (memory (export "memory") 1)
  ;; Bump allocator for the host's msg/env strings; it restarts at every handle() call.
  (global $heap (mut i32) (i32.const 4096))
  (data (i32.const 1024) "{\"ok\":true,\"response\":{\"Output\":\"\",\"Messages\":[],\"Spawns\":[],\"Assignments\":[]}}\00")
  (func (export "malloc") (param $size i32) (result i32)
    (local $ptr i32)
    (local $end i32)
    (local.set $ptr (global.get $heap))
    (local.set $end (i32.add (local.get $ptr) (local.get $size)))
    ;; Grow linear memory when the allocation passes its end; fail with 0 if it cannot.
    (if (i32.gt_u (local.get $end) (i32.mul (memory.size) (i32.const 65536)))
      (then
        (if (i32.eq
              (memory.grow (i32.add (i32.div_u (i32.sub (local.get $end) (i32.mul (memory.size) (i32.const 65536))) (i32.const 65536)) (i32.const 1)))
              (i32.const -1))
          (then (return (i32.const 0))))))
    (global.set $heap (local.get $end))
    (local.get $ptr))
  (func (export "handle") (param $msg i32) (param $env i32) (result i32)
    (global.set $heap (i32.const 4096))
    (i32.const 1024)))

//! Batched submission: results bitwise equal to unbatched ones, one submission per batch.

use super::*;
use ao_gpu_worker::gpu::TensorOps;

/// A small transformer-ish step touching every op family; returns the storage of its outputs.
/// `mid_read` reads an intermediate in the middle (which flushes an open batch).
fn script(b: &mut Backend, mid_read: bool) -> Result<Vec<RawTensor>> {
    let x = b.upload_raw(&rand_raw(1700, DType::F32, &[4, 64], 1.0))?;
    let w = b.upload_raw(&rand_raw(1701, DType::Q8_0, &[48, 64], 0.5))?;
    let wf = b.upload_raw(&rand_raw(1702, DType::F16, &[48, 48], 0.5))?;
    let norm_w = b.upload_raw(&rand_raw(1703, DType::F32, &[48], 1.0))?;
    let table = b.upload_raw(&rand_raw(1704, DType::Q4_1, &[48, 32], 1.0))?;
    let h = b.matmul(x, w, false, true)?;
    let h = b.gelu(h)?;
    let h = b.rmsnorm(h, norm_w, 1e-5)?;
    let h = b.matmul(h, wf, false, true)?;
    let mut mid = Vec::new();
    if mid_read {
        mid.push(b.read_raw(h)?);
    }
    let heads = b.reshape(h, &[4, 3, 16])?;
    let r = b.rope(heads, 2, 10000.0, RopeMode::Neox)?;
    let cache = b.upload_raw(&RawTensor::new(DType::F32, vec![0, 3, 16], vec![])?)?;
    b.append(cache, r)?;
    let att = b.attention(r, cache, cache, 0, 0.25)?;
    let flat = b.reshape(att, &[4, 48])?;
    let p = b.softmax_last(flat)?;
    let ids = b.argmax_last(p)?;
    let emb = b.gather_rows(table, ids)?;
    let emb16 = b.cast(emb, DType::F16)?;
    let t = b.permute(emb16, &[1, 0])?;
    let s = b.slice(t, 0, 3, 17)?;
    let c = b.concat(s, s, 1)?;
    let back = b.cast(c, DType::F32)?;
    let sum = b.sum_last(back)?;
    b.free(x)?;
    b.free(w)?;
    let mut out = mid;
    for id in [h, r, att, p, ids, emb, c, sum] {
        out.push(b.read_raw(id)?);
    }
    Ok(out)
}

#[test]
fn batched_results_equal_unbatched() {
    for det in [Determinism::Reproducible, Determinism::Fast] {
        for mut b in backends(det) {
            let what = format!("batch on {} ({det:?})", b.describe());
            let plain = script(&mut b, false).unwrap();
            // Everything up to the reads is one batch (the reads flush it); then a batch with a
            // read in the middle.
            b.begin_batch();
            let batched = script(&mut b, false).unwrap();
            b.end_batch().unwrap();
            b.begin_batch();
            let with_read = script(&mut b, true).unwrap();
            b.end_batch().unwrap();
            assert_eq!(plain.len(), batched.len());
            for (i, (p, q)) in plain.iter().zip(&batched).enumerate() {
                assert_raw_eq(&format!("{what}: output {i}"), q, p);
            }
            for (i, (p, q)) in plain.iter().zip(&with_read[1..]).enumerate() {
                assert_raw_eq(&format!("{what} with a read inside: output {i}"), q, p);
            }
        }
    }
}

#[test]
fn batch_submits_once_and_keeps_freed_buffers_until_submitted() {
    for det in [Determinism::Reproducible, Determinism::Fast] {
        for mut b in backends(det) {
            let what = format!("batch on {} ({det:?})", b.describe());
            let a = rand_tensor(1800, &[8, 16], 1.0);
            let c = rand_tensor(1801, &[8, 16], 1.0);
            let submissions = |b: &Backend| match b {
                Backend::Wgpu(w) => Some(w.submissions()),
                _ => None,
            };
            let before = submissions(&b);
            b.begin_batch();
            let x = b.upload(&a).unwrap();
            let y = b.scale(x, 2.0).unwrap();
            // The freed buffer must not take the next upload before the scale above has run.
            b.free(x).unwrap();
            let z = b.upload(&c).unwrap();
            let w = b.add(y, z).unwrap();
            // An error inside a batch is reported by its op and spoils nothing.
            assert!(matches!(b.matmul(y, z, false, false), Err(GpuError::ShapeMismatch { .. })), "{what}");
            let mut last = w;
            for _ in 0..100 {
                last = b.scale(last, 1.0).unwrap();
            }
            b.end_batch().unwrap();
            if let (Some(before), Some(after)) = (before, submissions(&b)) {
                assert_eq!(after - before, 1, "{what}: one submission for 103 ops");
            }
            let y = b.read(y).unwrap();
            let want: Vec<f64> = a.data.iter().map(|&v| (v * 2.0) as f64).collect();
            assert_close(&what, &y.data, &want, BITWISE);
            let got = b.read(last).unwrap();
            let want: Vec<f64> = a.data.iter().zip(&c.data).map(|(&p, &q)| (p * 2.0 + q) as f64).collect();
            assert_close(&what, &got.data, &want, BITWISE);
            // A batch that is never ended is flushed by a read; end_batch without begin is fine.
            b.begin_batch();
            let s = b.scale(last, 3.0).unwrap();
            assert_eq!(b.read(s).unwrap().shape, vec![8, 16]);
            b.end_batch().unwrap();
            b.end_batch().unwrap();
        }
    }
}

//! Temporary probe (wgpu perf helper): times WGSL matmul entry points read from files at run time.
//! `cargo run --release --example wgsl_mm_probe -- M N K [dtype=f32 ta=0 tb=0 batch=1 reps=5 check=1] -- FILE:ENTRY:GRID ...`
//! GRID: `tile:TM:TN` -> (ceil(n/TN), ceil(m/TM), batch); `rows:R` -> 2-D grid of ceil(batch*n/R).

use std::time::Instant;

use ao_gpu_worker::gpu::{DType, quant};

fn lcg(seed: u64, n: usize) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
            ((s >> 33) & 0xff_ffff) as f32 / (1 << 23) as f32 - 1.0
        })
        .collect()
}

struct Spec {
    label: String,
    pipeline: wgpu::ComputePipeline,
    groups: [u32; 3],
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let sep = args.iter().position(|a| a == "--").expect("-- before kernels");
    let (head, kernels) = (&args[..sep], &args[sep + 1..]);
    let m: usize = head[0].parse().unwrap();
    let n: usize = head[1].parse().unwrap();
    let k: usize = head[2].parse().unwrap();
    let (mut dtype, mut ta, mut tb, mut batch, mut reps, mut check) = (DType::F32, false, false, 1usize, 5usize, true);
    let mut constants: Vec<(String, f64)> = Vec::new();
    for kv in &head[3..] {
        let (key, v) = kv.split_once('=').unwrap();
        match key {
            "dtype" => dtype = DType::parse(v).unwrap(),
            "ta" => ta = v == "1",
            "tb" => tb = v == "1",
            "batch" => batch = v.parse().unwrap(),
            "reps" => reps = v.parse().unwrap(),
            "check" => check = v == "1",
            c => constants.push((c.to_owned(), v.parse().unwrap())),
        }
    }
    let a = lcg(1, batch * m * k);
    let wv = lcg(2, batch * k * n);
    let wshape = if tb { [batch * n, k] } else { [batch * k, n] };
    let wbytes = if dtype == DType::F32 {
        wv.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>()
    } else {
        quant::quantize(dtype, &wv).unwrap()
    };
    let wdeq = quant::dequantize(dtype, &wbytes, wv.len()).unwrap();
    let _ = wshape;

    let instance = wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle().with_env());
    let adapter = pollster::block_on(instance.request_adapter(&wgpu::RequestAdapterOptions::default())).unwrap();
    let limits = adapter.limits();
    let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
        required_limits: limits.clone(),
        required_features: adapter.features() & wgpu::Features::SUBGROUP,
        ..Default::default()
    }))
    .unwrap();
    eprintln!("adapter: {:?}", adapter.get_info().name);
    let storage = |bytes: &[u8]| {
        let b = device.create_buffer(&wgpu::BufferDescriptor {
            label: None,
            size: (bytes.len().next_multiple_of(4).max(4)) as u64,
            usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        });
        let mut v = bytes.to_vec();
        v.resize(bytes.len().next_multiple_of(4), 0);
        queue.write_buffer(&b, 0, &v);
        b
    };
    let abuf = storage(&a.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>());
    let wbuf = storage(&wbytes);
    let out_len = batch * m * n;
    let cbuf = storage(&vec![0u8; out_len * 4]);
    let (sa, sb) = if batch > 1 { (m * k, k * n) } else { (0, 0) };
    let sb_words = if batch > 1 { sb } else { 0 };
    let params: Vec<u32> = vec![batch, m, n, k, sa, sb_words, ta as usize, tb as usize, dtype.code() as usize]
        .into_iter()
        .map(|v| v as u32)
        .chain(std::iter::repeat(0))
        .take(16)
        .collect();
    let pbuf = device.create_buffer(&wgpu::BufferDescriptor {
        label: None,
        size: 64,
        usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    queue.write_buffer(&pbuf, 0, &params.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>());
    let staging = device.create_buffer(&wgpu::BufferDescriptor {
        label: None,
        size: (out_len * 4).max(4) as u64,
        usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });

    // The ordered reference (acc = acc + a * w, k in order) and the f64 bound.
    let (mut refv, mut bound) = (vec![0f32; out_len], vec![0f64; out_len]);
    if check {
        for bi in 0..batch {
            for i in 0..m {
                for j in 0..n {
                    let (mut acc, mut ab) = (0f32, 0f64);
                    for q in 0..k {
                        let av = if ta { a[bi * m * k + q * m + i] } else { a[bi * m * k + i * k + q] };
                        let wvv = if tb { wdeq[bi * k * n + j * k + q] } else { wdeq[bi * k * n + q * n + j] };
                        acc = acc + av * wvv;
                        ab += (av as f64 * wvv as f64).abs();
                    }
                    refv[bi * m * n + i * n + j] = acc;
                    bound[bi * m * n + i * n + j] = ab;
                }
            }
        }
    }

    let consts: Vec<(&str, f64)> = constants.iter().map(|(s, v)| (s.as_str(), *v)).collect();
    let mut specs = Vec::new();
    for spec in kernels {
        let parts: Vec<&str> = spec.split(':').collect();
        let src = std::fs::read_to_string(parts[0]).unwrap();
        let module = device.create_shader_module(wgpu::ShaderModuleDescriptor { label: None, source: wgpu::ShaderSource::Wgsl(src.into()) });
        let t0 = Instant::now();
        let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: None,
            layout: None,
            module: &module,
            entry_point: Some(parts[1]),
            compilation_options: wgpu::PipelineCompilationOptions { constants: &consts, zero_initialize_workgroup_memory: std::env::var("ZI").is_ok() },
            cache: None,
        });
        let groups = match parts[2] {
            "tile" => {
                let (tm, tn): (usize, usize) = (parts[3].parse().unwrap(), parts[4].parse().unwrap());
                [n.div_ceil(tn) as u32, m.div_ceil(tm) as u32, batch as u32]
            }
            "rows" => {
                let r: usize = parts[3].parse().unwrap();
                let g = (batch * n).div_ceil(r).max(1);
                let x = g.min(65535);
                [x as u32, g.div_ceil(x) as u32, 1]
            }
            g => panic!("grid {g}"),
        };
        eprintln!("{spec}: pipeline {:?}", t0.elapsed());
        specs.push(Spec { label: format!("{}:{}", parts[0].rsplit('/').next().unwrap(), parts[1]), pipeline, groups });
    }
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); specs.len()];
    for rep in 0..=reps {
        for (si, s) in specs.iter().enumerate() {
            let layout = s.pipeline.get_bind_group_layout(0);
            let bg = device.create_bind_group(&wgpu::BindGroupDescriptor {
                label: None,
                layout: &layout,
                entries: &[
                    wgpu::BindGroupEntry { binding: 0, resource: pbuf.as_entire_binding() },
                    wgpu::BindGroupEntry { binding: 1, resource: abuf.as_entire_binding() },
                    wgpu::BindGroupEntry { binding: 2, resource: wbuf.as_entire_binding() },
                    wgpu::BindGroupEntry { binding: 3, resource: cbuf.as_entire_binding() },
                ],
            });
            let t0 = Instant::now();
            let mut enc = device.create_command_encoder(&Default::default());
            {
                let mut pass = enc.begin_compute_pass(&Default::default());
                pass.set_pipeline(&s.pipeline);
                pass.set_bind_group(0, &bg, &[]);
                pass.dispatch_workgroups(s.groups[0], s.groups[1], s.groups[2]);
            }
            if rep == 0 {
                enc.copy_buffer_to_buffer(&cbuf, 0, &staging, 0, (out_len * 4) as u64);
            }
            queue.submit([enc.finish()]);
            device.poll(wgpu::PollType::wait_indefinitely()).unwrap();
            let dt = t0.elapsed().as_secs_f64();
            if rep == 0 {
                let slice = staging.slice(..);
                slice.map_async(wgpu::MapMode::Read, |_| {});
                device.poll(wgpu::PollType::wait_indefinitely()).unwrap();
                let got: Vec<f32> =
                    slice.get_mapped_range().unwrap().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
                staging.unmap();
                if check {
                    let mut mism = 0usize;
                    let mut worst = 0f64;
                    for i in 0..out_len {
                        if got[i].to_bits() != refv[i].to_bits() {
                            mism += 1;
                        }
                        let tol = (k.max(1) as f64) * 2.0 * f32::EPSILON as f64 * bound[i] + 1e-30;
                        worst = worst.max((got[i] as f64 - refv[i] as f64).abs() / tol);
                    }
                    eprintln!("{}: bitwise mismatches {mism}/{out_len}, worst err/bound {worst:.3}, first {:?}", s.label, &got[..2.min(out_len)]);
                }
                // Clear for the next kernel's check.
                queue.write_buffer(&cbuf, 0, &vec![0u8; out_len * 4]);
            } else {
                times[si].push(dt);
            }
        }
    }
    let flops = 2.0 * (batch * m * n * k) as f64;
    for (s, t) in specs.iter().zip(&mut times) {
        t.sort_by(f64::total_cmp);
        let med = t[t.len() / 2];
        println!(
            "{:40} {m}x{k}x{n} b{batch} {dtype} ta{} tb{}: median {:8.3} ms  {:7.2} GFLOP/s  {:7.2} GB/s(w)  (min {:.3})",
            s.label,
            ta as u8,
            tb as u8,
            med * 1e3,
            flops / med / 1e9,
            wbytes.len() as f64 / med / 1e9,
            t[0] * 1e3
        );
    }
}

//! Every kernel file is registered and valid: each `shaders/*.wgsl` parses and validates with naga
//! (no GPU needed), every file in `shaders/` and `kernels/` (except README.md) is listed in the
//! registry (`.cuh` headers in `HEADERS`), every registered file exists with the embedded contents,
//! every WGSL header a file names is registered and every registered one is used, and every
//! registered entry point is defined in its file.

use std::collections::HashSet;
use std::path::Path;

use ao_gpu_worker::gpu::kernels::{FILES, HEADERS, Lang, WGSL_PRELUDE, compiled_source, header};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn every_kernel_file_is_registered_and_exists() {
    let registered: HashSet<&str> = FILES.iter().map(|f| f.path).collect();
    assert_eq!(registered.len(), FILES.len(), "a file is registered twice");
    let headers: HashSet<&str> = HEADERS.iter().map(|h| h.path).collect();
    assert_eq!(headers.len(), HEADERS.len(), "a header is registered twice");
    for dir in ["shaders", "kernels"] {
        for entry in std::fs::read_dir(root().join(dir)).unwrap() {
            let name = entry.unwrap().file_name().into_string().unwrap();
            if name == "README.md" {
                continue;
            }
            let path = format!("{dir}/{name}");
            if name.ends_with(".cuh") {
                assert!(headers.contains(path.as_str()), "{path} is not in src/gpu/kernels.rs HEADERS");
            }
            if headers.contains(path.as_str()) {
                continue;
            }
            assert!(registered.contains(path.as_str()), "{path} is not in src/gpu/kernels.rs FILES");
        }
    }
    for f in FILES {
        let on_disk = std::fs::read_to_string(root().join(f.path)).unwrap_or_else(|e| panic!("{}: {e}", f.path));
        assert_eq!(on_disk, f.source, "{} differs from the embedded source", f.path);
        let expected_lang = if f.path.ends_with(".wgsl") { Lang::Wgsl } else { Lang::Cuda };
        assert_eq!(f.lang, expected_lang, "{}", f.path);
        assert!(!f.entries.is_empty(), "{} has no entry points", f.path);
    }
    for h in HEADERS {
        let on_disk = std::fs::read_to_string(root().join(h.path)).unwrap_or_else(|e| panic!("{}: {e}", h.path));
        assert_eq!(on_disk, h.source, "{} differs from the embedded source", h.path);
        let cuda = h.path.starts_with("kernels/") && h.path.ends_with(".cuh") && h.lang == Lang::Cuda;
        let wgsl = h.path.starts_with("shaders/") && h.path.ends_with(".wgsl") && h.lang == Lang::Wgsl;
        assert!(cuda || wgsl, "{}", h.path);
    }
    let mut names = HashSet::new();
    for f in FILES {
        for e in f.entries {
            assert!(names.insert((f.lang, e.name)), "entry point {} registered twice", e.name);
        }
    }
}

#[test]
fn every_wgsl_header_is_registered_and_used() {
    assert!(header(WGSL_PRELUDE).is_some_and(|h| h.lang == Lang::Wgsl), "{WGSL_PRELUDE} is not a registered WGSL header");
    let mut named = HashSet::new();
    for f in FILES {
        if f.lang == Lang::Cuda {
            assert!(f.headers.is_empty(), "{}: CUDA files #include their headers", f.path);
        }
        for &path in f.headers {
            assert!(header(path).is_some_and(|h| h.lang == Lang::Wgsl), "{}: header {path} is not a registered WGSL header", f.path);
            assert_ne!(path, WGSL_PRELUDE, "{}: {path} goes in front of every WGSL file already", f.path);
            assert!(named.insert((f.path, path)), "{}: header {path} named twice", f.path);
        }
    }
    for h in HEADERS.iter().filter(|h| h.lang == Lang::Wgsl && h.path != WGSL_PRELUDE) {
        assert!(named.iter().any(|&(_, path)| path == h.path), "{} is registered but no file names it", h.path);
    }
}

#[test]
fn every_wgsl_file_validates_with_naga() {
    for f in FILES.iter().filter(|f| f.lang == Lang::Wgsl) {
        // What the backend compiles: the shared header(s), then the file.
        let source = compiled_source(f);
        let module = naga::front::wgsl::parse_str(&source).unwrap_or_else(|e| panic!("{}: {}", f.path, e.emit_to_string(&source)));
        naga::valid::Validator::new(naga::valid::ValidationFlags::all(), naga::valid::Capabilities::empty())
            .validate(&module)
            .unwrap_or_else(|e| panic!("{}: {}", f.path, e.emit_to_string(&source)));
        for e in f.entries {
            assert!(module.entry_points.iter().any(|ep| ep.name == e.name), "{}: no entry point {}", f.path, e.name);
        }
        for ep in &module.entry_points {
            assert!(f.entries.iter().any(|e| e.name == ep.name), "{}: entry point {} is not registered", f.path, ep.name);
        }
    }
}

#[test]
fn every_cuda_entry_point_is_defined() {
    for f in FILES.iter().filter(|f| f.lang == Lang::Cuda) {
        for e in f.entries {
            let defined = f.source.contains(&format!("void {}(", e.name))
                || f.source.contains(&format!("BINARY({},", e.name))
                || f.source.contains(&format!("UNARY({},", e.name));
            assert!(defined, "{}: entry point {} is not defined", f.path, e.name);
        }
    }
}

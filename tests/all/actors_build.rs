//! The C example actors (examples/actors/{counter,ledger,mlp,smollm2,chat}.c, built by scripts/build-actors): the
//! committed `.wasm` files follow the actor ABI of docs/abi.md (exports with their types, only
//! the listed WASI and `ao_gpu` imports), checked by parsing the modules here with no toolchain; and, where
//! `clang-16` is installed, a fresh build gives exactly the committed bytes.
//!
//! Without `clang-16` the rebuild check prints a "skipped" line and passes, unless
//! `REQUIRE_ACTOR_BUILD=1`, where it fails.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The actors scripts/build-actors builds, by file stem.
const ACTORS: &[&str] = &["counter", "ledger", "mlp", "smollm2", "chat"];

const I32: u8 = 0x7f;
const KIND_FUNC: u8 = 0;
const KIND_TABLE: u8 = 1;
const KIND_MEMORY: u8 = 2;
const KIND_GLOBAL: u8 = 3;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn committed(actor: &str) -> PathBuf {
    root().join("examples").join("actors").join(format!("{actor}.wasm"))
}

/// The imports docs/abi.md allows, as (module, function): for `wasi_snapshot_preview1` and
/// `ao_gpu`, the names in backticks in the first column of the table after the line that starts
/// with the module name in backticks.
fn allowed_imports() -> Vec<(String, String)> {
    let path = root().join("docs").join("abi.md");
    let doc = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut allowed = Vec::new();
    for module in ["wasi_snapshot_preview1", "ao_gpu", "wasi_ephemeral_nn"] {
        allowed.extend(table_names(&doc, module).into_iter().map(|name| (module.to_owned(), name)));
    }
    let has = |m: &str, n: &str| allowed.iter().any(|(am, an)| am == m && an == n);
    assert!(
        has("wasi_snapshot_preview1", "fd_write") && has("wasi_snapshot_preview1", "proc_exit") && has("ao_gpu", "matmul"),
        "could not read the import tables from {} (found {allowed:?})",
        path.display()
    );
    allowed
}

/// The names in backticks in the first column of the table after the line that starts with `` `module` ``.
fn table_names(doc: &str, module: &str) -> Vec<String> {
    let head = format!("`{module}`");
    let mut lines = doc.lines().skip_while(|l| !l.starts_with(&head)).skip(1);
    let table = lines.by_ref().skip_while(|l| !l.starts_with('|')).take_while(|l| l.starts_with('|'));
    let mut names = Vec::new();
    for row in table {
        let first_column = row.split('|').nth(1).unwrap_or("");
        names.extend(first_column.split('`').skip(1).step_by(2).map(str::to_owned));
    }
    names
}

/// What the ABI checks need from a module.
#[derive(Debug, Default)]
struct Module {
    /// Function types: (params, results) as value-type bytes.
    types: Vec<(Vec<u8>, Vec<u8>)>,
    imports: Vec<Import>,
    /// Type index of each function the module defines (after the imported ones).
    functions: Vec<u32>,
    /// Limits flags of each memory the module defines (bit 2: 64-bit).
    memories: Vec<u8>,
    exports: Vec<Export>,
}

#[derive(Debug)]
struct Import {
    module: String,
    name: String,
    kind: u8,
    /// The type index of an imported function.
    type_index: Option<u32>,
}

#[derive(Debug)]
struct Export {
    name: String,
    kind: u8,
    index: u32,
}

/// A cursor over a byte slice; every read is bounds-checked and names what was cut short.
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Reader { bytes, pos: 0 }
    }

    fn at_end(&self) -> bool {
        self.pos >= self.bytes.len()
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.bytes.len());
        let end = end.ok_or_else(|| format!("{n} bytes wanted at offset {} of {}", self.pos, self.bytes.len()))?;
        let out = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(out)
    }

    fn byte(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }

    /// An unsigned LEB128 of at most 32 bits.
    fn u32(&mut self) -> Result<u32, String> {
        let mut value: u64 = 0;
        for shift in (0..35).step_by(7) {
            let b = self.byte()?;
            value |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return u32::try_from(value).map_err(|_| format!("LEB128 {value} does not fit in 32 bits"));
            }
        }
        Err(format!("LEB128 longer than 5 bytes before offset {}", self.pos))
    }

    fn len(&mut self) -> Result<usize, String> {
        Ok(self.u32()? as usize)
    }

    fn name(&mut self) -> Result<String, String> {
        let n = self.len()?;
        String::from_utf8(self.take(n)?.to_vec()).map_err(|e| format!("name is not UTF-8: {e}"))
    }

    /// Limits; returns the flags byte.
    fn limits(&mut self) -> Result<u8, String> {
        let flags = self.byte()?;
        self.u32()?;
        if flags & 1 != 0 {
            self.u32()?;
        }
        Ok(flags)
    }
}

fn parse(bytes: &[u8]) -> Result<Module, String> {
    let mut r = Reader::new(bytes);
    if r.take(8)? != b"\0asm\x01\0\0\0" {
        return Err("no wasm magic and version 1 at the start".into());
    }
    let mut m = Module::default();
    while !r.at_end() {
        let id = r.byte()?;
        let size = r.len()?;
        let mut s = Reader::new(r.take(size)?);
        match id {
            1 => {
                for _ in 0..s.u32()? {
                    if s.byte()? != 0x60 {
                        return Err("type section entry is not a function type".into());
                    }
                    let n = s.len()?;
                    let params = s.take(n)?.to_vec();
                    let n = s.len()?;
                    let results = s.take(n)?.to_vec();
                    m.types.push((params, results));
                }
            }
            2 => {
                for _ in 0..s.u32()? {
                    let module = s.name()?;
                    let name = s.name()?;
                    let kind = s.byte()?;
                    let mut type_index = None;
                    match kind {
                        KIND_FUNC => type_index = Some(s.u32()?),
                        KIND_TABLE => {
                            s.byte()?;
                            s.limits()?;
                        }
                        KIND_MEMORY => {
                            s.limits()?;
                        }
                        KIND_GLOBAL => {
                            s.take(2)?;
                        }
                        other => return Err(format!("import {module}.{name} has unknown kind {other}")),
                    }
                    m.imports.push(Import { module, name, kind, type_index });
                }
            }
            3 => {
                for _ in 0..s.u32()? {
                    m.functions.push(s.u32()?);
                }
            }
            5 => {
                for _ in 0..s.u32()? {
                    m.memories.push(s.limits()?);
                }
            }
            7 => {
                for _ in 0..s.u32()? {
                    let name = s.name()?;
                    let kind = s.byte()?;
                    let index = s.u32()?;
                    m.exports.push(Export { name, kind, index });
                }
            }
            _ => continue,
        }
        if !s.at_end() {
            return Err(format!("section {id} has {} bytes left over", s.bytes.len() - s.pos));
        }
    }
    Ok(m)
}

impl Module {
    fn export(&self, name: &str) -> Option<&Export> {
        self.exports.iter().find(|e| e.name == name)
    }

    /// The (params, results) of function `index` (imported functions come first).
    fn function_type(&self, index: u32) -> Option<&(Vec<u8>, Vec<u8>)> {
        let imported: Vec<u32> = self.imports.iter().filter_map(|i| i.type_index).collect();
        let index = index as usize;
        let type_index = if index < imported.len() { imported[index] } else { *self.functions.get(index - imported.len())? };
        self.types.get(type_index as usize)
    }

    /// Checks a function export's signature; returns a problem, if any.
    fn check_function(&self, name: &str, params: &[u8], results: &[u8]) -> Option<String> {
        let Some(export) = self.export(name) else { return Some(format!("does not export {name}")) };
        if export.kind != KIND_FUNC {
            return Some(format!("exports {name} as kind {}, not a function", export.kind));
        }
        match self.function_type(export.index) {
            Some((p, r)) if p == params && r == results => None,
            Some((p, r)) => Some(format!("exports {name} as {p:02x?} -> {r:02x?}, want {params:02x?} -> {results:02x?}")),
            None => Some(format!("export {name} names function {} that does not exist", export.index)),
        }
    }
}

/// Everything about `module` that breaks docs/abi.md.
fn abi_problems(module: &Module, allowed: &[(String, String)]) -> Vec<String> {
    let mut problems = Vec::new();
    match module.export("memory") {
        None => problems.push("does not export memory".to_owned()),
        Some(e) if e.kind != KIND_MEMORY => problems.push(format!("exports memory as kind {}, not a memory", e.kind)),
        Some(e) => match module.memories.get(e.index as usize) {
            None => problems.push(format!("exports memory {} that it does not define", e.index)),
            Some(flags) if flags & 0x04 != 0 => problems.push("exports a 64-bit memory; the ABI wants 32-bit".to_owned()),
            Some(_) => {}
        },
    }
    problems.extend(module.check_function("malloc", &[I32], &[I32]));
    problems.extend(module.check_function("handle", &[I32, I32], &[I32]));
    // The reactor model's constructor runner; the ABI makes it optional, scripts/build-actors always has it.
    problems.extend(module.check_function("_initialize", &[], &[]));
    for import in &module.imports {
        if import.kind != KIND_FUNC || !allowed.iter().any(|(m, n)| *m == import.module && *n == import.name) {
            problems.push(format!("imports {}.{} (kind {}), which docs/abi.md does not allow", import.module, import.name, import.kind));
        }
    }
    problems
}

#[test]
fn committed_actors_follow_the_abi() {
    let allowed = allowed_imports();
    for actor in ACTORS {
        let path = committed(actor);
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e} (run scripts/build-actors)", path.display()));
        assert!(bytes.starts_with(b"\0asm"), "{} does not start with the wasm magic", path.display());
        let module = parse(&bytes).unwrap_or_else(|e| panic!("{} is not a well-formed module: {e}", path.display()));
        let problems = abi_problems(&module, &allowed);
        assert!(problems.is_empty(), "{} breaks docs/abi.md:\n  {}", path.display(), problems.join("\n  "));
    }
}

/// The checker itself catches what it should (inline modules, no toolchain).
#[test]
fn abi_check_rejects_bad_modules() {
    let allowed = allowed_imports();
    let check =
        |wat_text: &str| abi_problems(&parse(&wat::parse_str(wat_text).expect("test WAT parses")).expect("module parses"), &allowed);
    let good = r#"(module
        (import "wasi_snapshot_preview1" "fd_write" (func (param i32 i32 i32 i32) (result i32)))
        (import "ao_gpu" "matmul" (func (param i32 i32 i32 i32 i32) (result i32)))
        (memory (export "memory") 1)
        (func (export "_initialize"))
        (func (export "malloc") (param i32) (result i32) (i32.const 0))
        (func (export "handle") (param i32 i32) (result i32) (i32.const 0)))"#;
    assert_eq!(check(good), Vec::<String>::new());

    let bad = r#"(module
        (import "wasi_snapshot_preview1" "path_open" (func (param i32) (result i32)))
        (import "env" "emscripten_date_now" (func (result f64)))
        (import "ao_gpu" "conv2d" (func (param i32) (result i32)))
        (memory (export "memory") i64 1)
        (func (export "_initialize"))
        (func (export "malloc") (param i64) (result i64) (i64.const 0)))"#;
    let problems = check(bad).join("\n");
    for expected in
        ["path_open", "env.emscripten_date_now", "ao_gpu.conv2d", "64-bit memory", "exports malloc as", "does not export handle"]
    {
        assert!(problems.contains(expected), "no problem mentions {expected:?}; got:\n{problems}");
    }
    assert!(parse(b"\0asm\x01\0\0\0\x07\x05\x01").is_err(), "a truncated section must not parse");
}

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
}

#[test]
fn committed_actors_match_their_sources() {
    if !on_path("clang-16") {
        let hint = "apt-get install -y clang-16 lld-16 wasi-libc libclang-rt-16-dev-wasm32 wabt";
        if std::env::var("REQUIRE_ACTOR_BUILD").is_ok_and(|v| v == "1") {
            panic!("committed_actors_match_their_sources: clang-16 is not on PATH; {hint}");
        }
        eprintln!(
            "\n*** committed_actors_match_their_sources skipped: clang-16 is not on PATH, so examples/actors/*.wasm \
             cannot be rebuilt and compared; {hint} (set REQUIRE_ACTOR_BUILD=1 to make this fail) ***\n"
        );
        return;
    }
    let out = tempfile::tempdir().expect("temporary directory");
    let mut build = Command::new(root().join("scripts").join("build-actors"));
    build.arg("--out-dir").arg(out.path());
    // The ABI check above does wasm-objdump's job without wabt.
    if !on_path("wasm-objdump") {
        build.env("AO_ACTORS_SKIP_OBJDUMP", "1");
    }
    let run = build.output().expect("cannot run scripts/build-actors");
    assert!(
        run.status.success(),
        "scripts/build-actors failed ({}):\n{}{}",
        run.status,
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr)
    );
    for actor in ACTORS {
        let fresh = std::fs::read(out.path().join(format!("{actor}.wasm"))).expect("scripts/build-actors wrote no module");
        let path = committed(actor);
        let old = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(fresh == old, "examples/actors/{actor}.wasm is stale: run scripts/build-actors");
    }
}

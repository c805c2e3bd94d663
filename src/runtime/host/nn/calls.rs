//! The `wasi_ephemeral_nn` functions. Each checks its pointers first (a bad range traps before
//! any effect), then delegates to `crate::llm` and maps the outcome to an errno.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{Call, Context, ENCODING_GGML, Errno, Fail, GAS_PER_OP, Graph, MAX_LOAD_BYTES, options};
use crate::gpu::Plan;
use crate::gpu::pool::lock;
use crate::llm::engine::{EngineError, Meter};
use crate::llm::generate::{LoadedModel, Next, Options, Session};
use crate::runtime::host::gpu::{BYTES_PER_GAS, FLOPS_PER_GAS};

/// Bytes of a witx `tensor` record: dims (ptr, len), type (u8, padded), data (ptr, len).
const TENSOR_RECORD: u64 = 20;

/// Charges each engine op to the call's fuel and stops at the deadline.
struct CallMeter<'a> {
    charged: &'a mut u64,
    fuel: u64,
    started: Instant,
    excluded: Duration,
    deadline: Option<Duration>,
    stop: Option<Fail>,
}

impl Meter for CallMeter<'_> {
    fn admit(&mut self, plan: &Plan) -> Result<(), String> {
        if self.deadline.is_some_and(|d| self.started.elapsed().saturating_sub(self.excluded) > d) {
            self.stop = Some(Fail::Deadline);
            return Err("the evaluation's deadline passed".into());
        }
        let gas = GAS_PER_OP.saturating_add(plan.bytes.div_ceil(BYTES_PER_GAS)).saturating_add(plan.flops.div_ceil(FLOPS_PER_GAS));
        let total = self.charged.saturating_add(gas);
        if total > self.fuel {
            self.stop = Some(Fail::OutOfFuel);
            return Err("out of gas".into());
        }
        *self.charged = total;
        Ok(())
    }
}

/// Runs `f` on the engine with the call's meter, mapping an engine error to a `Fail`.
fn with_engine<R>(
    call: &mut Call<'_>,
    f: impl FnOnce(&mut crate::gpu::Backend, &mut dyn Meter, &mut super::NnCtx) -> Result<R, EngineError>,
) -> Result<R, Fail> {
    let backend = call.ctx.backend.clone();
    let mut meter = CallMeter {
        charged: &mut call.charged,
        fuel: call.fuel,
        started: call.ctx.started,
        excluded: call.ctx.excluded,
        deadline: call.ctx.deadline,
        stop: None,
    };
    let result = f(&mut lock(&backend), &mut meter, call.ctx);
    match result {
        Ok(r) => Ok(r),
        Err(e) => Err(match meter.stop.take() {
            Some(stop) => stop,
            None => engine_fail(call.name, &e),
        }),
    }
}

fn engine_fail(name: &str, e: &EngineError) -> Fail {
    match e {
        EngineError::ContextFull { .. } => Fail::Errno(Errno::ContextFull),
        EngineError::BadToken(_) => Fail::Errno(Errno::InvalidArgument),
        other => {
            tracing::debug!(call = name, error = %other, "wasi-nn call failed");
            Fail::Errno(Errno::RuntimeError)
        }
    }
}

fn new_graph(call: &mut Call<'_>, model: Arc<LoadedModel>, options: Options, owned: bool, graph_out: i32) -> Result<(), Fail> {
    call.range(graph_out, 4, "graph_ptr")?;
    let h = call.ctx.handle()?;
    call.ctx.graphs.insert(h, Graph { model, options, owned });
    call.put_u32(graph_out, h, "graph_ptr")
}

pub(super) fn load(call: &mut Call<'_>, builders: i32, count: i32, encoding: i32, _target: i32, graph_out: i32) -> Result<(), Fail> {
    let count = u32::try_from(count).map_err(|_| Errno::InvalidArgument)?;
    let list = call.range(builders, u64::from(count) * 8, "builder array")?;
    call.range(graph_out, 4, "graph_ptr")?;
    if encoding != ENCODING_GGML {
        return Err(Errno::InvalidEncoding.into());
    }
    if count == 0 {
        return Err(Errno::InvalidArgument.into());
    }
    let at = list.start as u64;
    let (ptr, len) = (call.u32_at(at) as i32, call.u32_at(at + 4));
    if u64::from(len) > MAX_LOAD_BYTES {
        return Err(Errno::TooLarge.into());
    }
    let mut options = Options::default();
    if count > 1 {
        let (cptr, clen) = (call.u32_at(at + 8) as i32, call.u32_at(at + 12) as i32);
        let config = call.bytes(cptr, clen, "config builder")?.to_vec();
        options::apply(&mut options, &config).map_err(|why| {
            tracing::debug!(%why, "wasi-nn load: bad options");
            Errno::InvalidArgument
        })?;
    }
    call.range(ptr, u64::from(len), "model builder")?;
    call.charge(u64::from(len).div_ceil(BYTES_PER_GAS))?;
    let backend = call.ctx.backend.clone();
    let bytes = call.bytes(ptr, len as i32, "model builder")?;
    let model = LoadedModel::load(&mut lock(&backend), bytes).map_err(|e| {
        tracing::debug!(error = %e, "wasi-nn load: not a model this worker runs");
        Errno::InvalidArgument
    })?;
    new_graph(call, Arc::new(model), options, true, graph_out)
}

fn by_name(call: &mut Call<'_>, name: i32, name_len: i32, config: Option<(i32, i32)>, graph_out: i32) -> Result<(), Fail> {
    let name = std::str::from_utf8(call.bytes(name, name_len, "name")?).map_err(|_| Errno::InvalidArgument)?.to_owned();
    let config = match config {
        Some((ptr, len)) => Some(call.bytes(ptr, len, "config")?.to_vec()),
        None => None,
    };
    call.range(graph_out, 4, "graph_ptr")?;
    let mut options = Options::default();
    if let Some(config) = config {
        options::apply(&mut options, &config).map_err(|why| {
            tracing::debug!(%why, model = %name, "wasi-nn load_by_name_with_config: bad options");
            Errno::InvalidArgument
        })?;
    }
    let loading = Instant::now();
    let model = call.ctx.env.by_name(&name, call.ctx.process.as_deref(), call.ctx.device, &call.ctx.backend);
    call.ctx.excluded += loading.elapsed();
    let model = model.map_err(|e| {
        tracing::info!(error = %e, "wasi-nn load_by_name refused");
        match e {
            super::models::ModelError::NotFound(_) | super::models::ModelError::NotAllowed { .. } => Errno::ModelNotFound,
            _ => Errno::RuntimeError,
        }
    })?;
    new_graph(call, model, options, false, graph_out)
}

pub(super) fn load_by_name(call: &mut Call<'_>, name: i32, name_len: i32, graph_out: i32) -> Result<(), Fail> {
    by_name(call, name, name_len, None, graph_out)
}

pub(super) fn load_by_name_with_config(
    call: &mut Call<'_>,
    name: i32,
    len: i32,
    config: i32,
    config_len: i32,
    out: i32,
) -> Result<(), Fail> {
    by_name(call, name, len, Some((config, config_len)), out)
}

pub(super) fn init_execution_context(call: &mut Call<'_>, graph: i32, ctx_out: i32) -> Result<(), Fail> {
    call.range(ctx_out, 4, "context_ptr")?;
    let g = call.ctx.graphs.get(&(graph as u32)).ok_or(Errno::NotFound)?;
    let c = Context {
        model: g.model.clone(),
        options: g.options.clone(),
        prompt: None,
        session: None,
        output: String::new(),
        output_tokens: 0,
        input_tokens: 0,
        single: String::new(),
        done: false,
    };
    let h = call.ctx.handle()?;
    call.ctx.contexts.insert(h, c);
    call.put_u32(ctx_out, h, "context_ptr")
}

fn context<'a>(call: &'a mut Call<'_>, ctx: i32) -> Result<&'a mut Context, Fail> {
    call.ctx.contexts.get_mut(&(ctx as u32)).ok_or(Fail::Errno(Errno::NotFound))
}

/// Ends the context's session (frees its KV cache).
fn end_session(call: &mut Call<'_>, ctx: i32) {
    let backend = call.ctx.backend.clone();
    if let Some(c) = call.ctx.contexts.get_mut(&(ctx as u32))
        && let Some(s) = c.session.take()
    {
        s.free(&mut lock(&backend));
    }
}

pub(super) fn set_input(call: &mut Call<'_>, ctx: i32, index: i32, tensor: i32) -> Result<(), Fail> {
    let rec = call.range(tensor, TENSOR_RECORD, "tensor")?.start as u64;
    let (data_ptr, data_len) = (call.u32_at(rec + 12) as i32, call.u32_at(rec + 16) as i32);
    let data = call.bytes(data_ptr, data_len, "tensor data")?.to_vec();
    call.charge((data.len() as u64).div_ceil(BYTES_PER_GAS))?;
    context(call, ctx)?;
    match index {
        0 => {
            let text = std::str::from_utf8(&data).map_err(|_| Errno::InvalidArgument)?;
            let c = context(call, ctx)?;
            let mut tokens = Vec::new();
            if c.model.tokenizer.adds_bos()
                && let Some(bos) = c.model.tokenizer.bos()
            {
                tokens.push(bos);
            }
            tokens.extend(c.model.tokenizer.encode(text, true));
            if tokens.is_empty() {
                return Err(Errno::InvalidArgument.into());
            }
            let ctx_size = c.options.ctx_size.min(c.model.llama.hyper.context_length as usize);
            if tokens.len() >= ctx_size {
                return Err(Errno::PromptTooLong.into());
            }
            c.input_tokens = tokens.len();
            c.prompt = Some(tokens);
            end_session(call, ctx);
            let c = context(call, ctx)?;
            c.output.clear();
            c.single.clear();
            c.output_tokens = 0;
            c.done = false;
            Ok(())
        }
        1 => {
            let c = context(call, ctx)?;
            options::apply(&mut c.options, &data).map_err(|why| {
                tracing::debug!(%why, "wasi-nn set_input: bad metadata");
                Fail::Errno(Errno::InvalidArgument)
            })
        }
        _ => Err(Errno::InvalidArgument.into()),
    }
}

/// Starts a session on the context's prompt (the KV cache of an earlier one is freed).
fn start(call: &mut Call<'_>, ctx: i32) -> Result<(), Fail> {
    end_session(call, ctx);
    let c = context(call, ctx)?;
    let prompt = c.prompt.clone().ok_or(Errno::InvalidArgument)?;
    let (model, options) = (c.model.clone(), c.options.clone());
    let session = with_engine(call, |be, meter, _| {
        let mut s = Session::new(&model, be, &options)?;
        match s.feed(&model, be, &prompt, meter) {
            Ok(()) => Ok(s),
            Err(e) => {
                s.free(be);
                Err(e)
            }
        }
    })?;
    let c = context(call, ctx)?;
    c.session = Some(session);
    c.output.clear();
    c.single.clear();
    c.output_tokens = 0;
    c.done = false;
    Ok(())
}

/// One token of the context's session: `Ok(true)` when one was made.
fn one_token(call: &mut Call<'_>, ctx: i32) -> Result<bool, Fail> {
    let c = context(call, ctx)?;
    if c.done || c.output_tokens >= c.options.n_predict {
        return Ok(false);
    }
    let mut session = c.session.take().ok_or(Errno::InvalidArgument)?;
    if !session.ready() {
        context(call, ctx)?.session = Some(session);
        return Err(Errno::ContextFull.into());
    }
    let model = c.model.clone();
    let result = with_engine(call, |be, meter, _| session.next(&model, be, meter));
    let c = context(call, ctx)?;
    c.session = Some(session);
    match result? {
        Next::End => {
            c.done = true;
            let rest = c.session.as_mut().map(Session::finish_text).unwrap_or_default();
            c.output.push_str(&rest);
            Ok(false)
        }
        Next::Token(_, text) => {
            c.output.push_str(&text);
            c.single = text;
            c.output_tokens += 1;
            Ok(true)
        }
    }
}

pub(super) fn compute(call: &mut Call<'_>, ctx: i32) -> Result<(), Fail> {
    start(call, ctx)?;
    let result = loop {
        match one_token(call, ctx) {
            Ok(true) => continue,
            Ok(false) => break Ok(()),
            Err(e) => break Err(e),
        }
    };
    let c = context(call, ctx)?;
    if !c.done {
        let rest = c.session.as_mut().map(Session::finish_text).unwrap_or_default();
        c.output.push_str(&rest);
    }
    result
}

pub(super) fn compute_single(call: &mut Call<'_>, ctx: i32) -> Result<(), Fail> {
    if context(call, ctx)?.session.is_none() {
        start(call, ctx)?;
    }
    match one_token(call, ctx)? {
        true => Ok(()),
        false => Err(Errno::EndOfSequence.into()),
    }
}

fn metadata(c: &Context) -> Vec<u8> {
    serde_json::json!({ "input_tokens": c.input_tokens, "output_tokens": c.output_tokens, "model": c.model.name, "sha256": c.model.sha256 })
        .to_string()
        .into_bytes()
}

/// Copies `data` to the guest's buffer (at most `max` bytes) and stores the count.
fn put_output(call: &mut Call<'_>, data: &[u8], out: i32, max: i32, written: i32) -> Result<(), Fail> {
    let cap = call.range(out, max as u32 as u64, "output buffer")?;
    call.range(written, 4, "bytes_written_ptr")?;
    let n = data.len().min(cap.len());
    call.mem[cap.start..cap.start + n].copy_from_slice(&data[..n]);
    call.put_u32(written, n as u32, "bytes_written_ptr")
}

pub(super) fn get_output(call: &mut Call<'_>, ctx: i32, index: i32, out: i32, max: i32, written: i32) -> Result<(), Fail> {
    let c = context(call, ctx)?;
    let data = match index {
        0 => c.output.clone().into_bytes(),
        1 => metadata(c),
        _ => return Err(Errno::InvalidArgument.into()),
    };
    put_output(call, &data, out, max, written)
}

pub(super) fn get_output_single(call: &mut Call<'_>, ctx: i32, index: i32, out: i32, max: i32, written: i32) -> Result<(), Fail> {
    let c = context(call, ctx)?;
    let data = match index {
        0 => c.single.clone().into_bytes(),
        1 => metadata(c),
        _ => return Err(Errno::InvalidArgument.into()),
    };
    put_output(call, &data, out, max, written)
}

pub(super) fn fini_single(call: &mut Call<'_>, ctx: i32) -> Result<(), Fail> {
    context(call, ctx)?;
    end_session(call, ctx);
    let c = context(call, ctx)?;
    c.single.clear();
    c.done = false;
    Ok(())
}

pub(super) fn unload(call: &mut Call<'_>, graph: i32) -> Result<(), Fail> {
    let g = call.ctx.graphs.remove(&(graph as u32)).ok_or(Errno::NotFound)?;
    if g.owned {
        match Arc::try_unwrap(g.model) {
            Ok(model) => model.llama.free(&mut lock(&call.ctx.backend)),
            // A context still uses it: freed when the evaluation ends.
            Err(model) => call.ctx.orphans.push(model),
        }
    }
    Ok(())
}

pub(super) fn finalize_execution_context(call: &mut Call<'_>, ctx: i32) -> Result<(), Fail> {
    context(call, ctx)?;
    end_session(call, ctx);
    call.ctx.contexts.remove(&(ctx as u32));
    Ok(())
}

//! AO tag conventions (docs/ao-protocol.md §2): protocol tags, types and the values the
//! units check.

use super::{DataItem, Tag};

pub const DATA_PROTOCOL: &str = "ao";
/// Legacynet variant, served by the legacy scheduler and compute units.
pub const VARIANT: &str = "ao.TN.1";
/// The worker's own module format: wasm32 modules with the JSON-1 `handle(msg, env)` ABI and
/// the worker's host modules.
pub const MODULE_FORMAT: &str = "wasm32-unknown-ao-gpu-worker";

/// The AO `Type` of an item.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ItemType {
    Message,
    Process,
    Module,
    Assignment,
}

impl ItemType {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Message => "Message",
            Self::Process => "Process",
            Self::Module => "Module",
            Self::Assignment => "Assignment",
        }
    }
}

/// The tags every AO item starts with: `Data-Protocol`, `Variant`, `Type`, in that order
/// (protocol tags follow `Data-Protocol`, as aoconnect writes them).
pub fn base_tags(item_type: ItemType) -> Vec<Tag> {
    vec![Tag::new("Data-Protocol", DATA_PROTOCOL), Tag::new("Variant", VARIANT), Tag::new("Type", item_type.as_str())]
}

/// The tags of a Module item in the worker's format (§2.3): protocol tags, format, JSON-1
/// encodings, content type, the module's limits and a name.
pub fn module_tags(name: &str, memory_limit: &str, compute_limit: &str) -> Vec<Tag> {
    format_module_tags(MODULE_FORMAT, name, memory_limit, compute_limit)
}

/// The tags of a Module item of `format` (an aos format such as `wasm32-unknown-emscripten4`, or
/// the worker's own), with JSON-1 encodings, the limits and a name.
pub fn format_module_tags(format: &str, name: &str, memory_limit: &str, compute_limit: &str) -> Vec<Tag> {
    let mut tags = base_tags(ItemType::Module);
    tags.extend([
        Tag::new("Module-Format", format),
        Tag::new("Input-Encoding", "JSON-1"),
        Tag::new("Output-Encoding", "JSON-1"),
        Tag::new("Content-Type", "application/wasm"),
        Tag::new("Memory-Limit", memory_limit),
        Tag::new("Compute-Limit", compute_limit),
        Tag::new("Name", name),
    ]);
    tags
}

/// True when the item carries `Data-Protocol=ao` (the legacy MU checks "contains ao").
pub fn is_ao(item: &DataItem) -> bool {
    item.tags.iter().any(|t| t.name == "Data-Protocol" && t.value == DATA_PROTOCOL)
}

/// The item's AO type: the first `Type` tag wins, as in the MU. The legacy SU also
/// accepts a lowercase `type` name.
pub fn item_type(item: &DataItem) -> Option<&str> {
    item.tags.iter().find(|t| t.name == "Type" || t.name == "type").map(|t| t.value.as_str())
}

/// 32-byte anchor from text of at most 32 bytes, left-padded with ASCII zeros, the way aos
/// writes numeric anchors (`00000000000000000000000000000003`).
pub fn numeric_anchor(n: u64) -> [u8; 32] {
    let text = format!("{n:0>32}");
    let mut out = [0u8; 32];
    out.copy_from_slice(&text.as_bytes()[text.len() - 32..]);
    out
}

//! The message and environment JSON exactly as AO's compute unit hands them to an aos module:
//! the same keys, in the same order, with the same value types, written without whitespace.
//!
//! Key order matters for aos: the module parses the JSON into Lua tables, and the order in which
//! keys are inserted moves Lua heap objects, so a different order gives the same outputs but a
//! different memory image (and, through printed addresses such as `function: 0x4167c20`,
//! sometimes a different output). The CU builds the message in `mapNode` (servers/cu
//! `effects/ao-su.js`), then validates it with zod's `messageSchema.message`
//! (`domain/model.js`), whose parse rebuilds the object in the *schema's* key order and drops
//! unknown keys (such as the assignment's `Message`); `evaluate.js` then removes `From` and
//! `Owner` tags. The loader serializes the result with `JSON.stringify`, which drops `undefined`
//! values. So the order is:
//!
//! `Id, Signature, Data, Owner, Target, Anchor, From, Forwarded-By, Tags, Epoch, Nonce,
//! Timestamp, Block-Height, Hash-Chain, Cron, Read-Only`
//!
//! with `Epoch`, `Nonce`, `Timestamp` and `Block-Height` as numbers (the CU `parseInt`s the
//! assignment's tags), `Forwarded-By` only when the message carries `From-Process`, and the
//! environment `{"Process":{"Id","Owner","Tags"},"Module":{"Id","Owner","Tags"}}`.
//!
//! Strings are escaped as `JSON.stringify` escapes them (serde_json's escaping is the same:
//! `\"`, `\\`, `\b \f \n \r \t`, other control characters as lowercase `\u00xx`, nothing else).

use super::Tag;

/// One message as the CU passes it to `handle`. `None` fields are left out, as
/// `JSON.stringify` leaves out `undefined`.
#[derive(Debug, Clone, Copy)]
pub struct CuMessage<'a> {
    pub id: &'a str,
    pub signature: Option<&'a str>,
    pub data: Option<&'a str>,
    /// The signer's address.
    pub owner: &'a str,
    pub target: &'a str,
    pub anchor: Option<&'a str>,
    /// `From-Process` when a process pushed the message, else the owner.
    pub from: &'a str,
    /// The signer, when a process pushed the message (the messenger signed it).
    pub forwarded_by: Option<&'a str>,
    /// The message's tags, `From` and `Owner` tags removed by [`CuMessage::tags_for_cu`].
    pub tags: &'a [Tag],
    pub epoch: Option<u64>,
    pub nonce: Option<u64>,
    pub timestamp: u64,
    pub block_height: u64,
    pub hash_chain: Option<&'a str>,
    pub cron: bool,
    pub read_only: bool,
}

impl CuMessage<'_> {
    /// The tags the CU passes on: all but those named `From` or `Owner` (`evaluate.js`'s
    /// `removeInvalidTags`), in their order.
    pub fn tags_for_cu(tags: &[Tag]) -> Vec<Tag> {
        tags.iter().filter(|t| t.name != "From" && t.name != "Owner").cloned().collect()
    }

    /// The JSON text, in the CU's key order.
    pub fn to_json(&self) -> String {
        let mut o = Object::new();
        o.str("Id", self.id);
        o.opt_str("Signature", self.signature);
        o.opt_str("Data", self.data);
        o.str("Owner", self.owner);
        o.str("Target", self.target);
        o.opt_str("Anchor", self.anchor);
        o.str("From", self.from);
        o.opt_str("Forwarded-By", self.forwarded_by);
        o.raw("Tags", &tags_json(self.tags));
        o.opt_num("Epoch", self.epoch);
        o.opt_num("Nonce", self.nonce);
        o.num("Timestamp", self.timestamp);
        o.num("Block-Height", self.block_height);
        o.opt_str("Hash-Chain", self.hash_chain);
        o.raw("Cron", if self.cron { "true" } else { "false" });
        o.raw("Read-Only", if self.read_only { "true" } else { "false" });
        o.finish()
    }
}

/// One side of the environment: the process's or the module's id, owner address and tags.
#[derive(Debug, Clone, Copy)]
pub struct CuEnvItem<'a> {
    pub id: &'a str,
    pub owner: &'a str,
    pub tags: &'a [Tag],
}

/// The environment (`AoGlobal`): `{"Process":{…},"Module":{…}}`, each `{"Id","Owner","Tags"}`.
pub fn env_json(process: CuEnvItem<'_>, module: CuEnvItem<'_>) -> String {
    let item = |i: CuEnvItem<'_>| {
        let mut o = Object::new();
        o.str("Id", i.id);
        o.str("Owner", i.owner);
        o.raw("Tags", &tags_json(i.tags));
        o.finish()
    };
    let mut o = Object::new();
    o.raw("Process", &item(process));
    o.raw("Module", &item(module));
    o.finish()
}

/// `[{"name":…,"value":…},…]`.
pub fn tags_json(tags: &[Tag]) -> String {
    let mut out = String::from("[");
    for (i, t) in tags.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let mut o = Object::new();
        o.str("name", &t.name);
        o.str("value", &t.value);
        out.push_str(&o.finish());
    }
    out.push(']');
    out
}

/// A JSON object written key by key, in the order the keys are given.
struct Object {
    out: String,
    empty: bool,
}

impl Object {
    fn new() -> Self {
        Self { out: String::from("{"), empty: true }
    }

    fn key(&mut self, key: &str) {
        if !self.empty {
            self.out.push(',');
        }
        self.empty = false;
        self.out.push_str(&quote(key));
        self.out.push(':');
    }

    fn raw(&mut self, key: &str, json: &str) {
        self.key(key);
        self.out.push_str(json);
    }

    fn str(&mut self, key: &str, value: &str) {
        self.raw(key, &quote(value));
    }

    fn opt_str(&mut self, key: &str, value: Option<&str>) {
        if let Some(v) = value {
            self.str(key, v);
        }
    }

    fn num(&mut self, key: &str, value: u64) {
        self.raw(key, &value.to_string());
    }

    fn opt_num(&mut self, key: &str, value: Option<u64>) {
        if let Some(v) = value {
            self.num(key, v);
        }
    }

    fn finish(mut self) -> String {
        self.out.push('}');
        self.out
    }
}

fn quote(s: &str) -> String {
    // Serializing a &str cannot fail.
    serde_json::to_string(s).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message<'a>(tags: &'a [Tag]) -> CuMessage<'a> {
        CuMessage {
            id: "MSG",
            signature: Some("SIG"),
            data: Some("1+1"),
            owner: "OWNER",
            target: "PROC",
            anchor: None,
            from: "OWNER",
            forwarded_by: None,
            tags,
            epoch: Some(0),
            nonce: Some(3),
            timestamp: 1_700_000_000_000,
            block_height: 1000,
            hash_chain: Some("HC"),
            cron: false,
            read_only: false,
        }
    }

    #[test]
    fn messages_keep_the_compute_units_key_order_and_types() {
        let tags = [Tag::new("Action", "Eval")];
        assert_eq!(
            message(&tags).to_json(),
            r#"{"Id":"MSG","Signature":"SIG","Data":"1+1","Owner":"OWNER","Target":"PROC","From":"OWNER","Tags":[{"name":"Action","value":"Eval"}],"Epoch":0,"Nonce":3,"Timestamp":1700000000000,"Block-Height":1000,"Hash-Chain":"HC","Cron":false,"Read-Only":false}"#
        );
        let pushed = CuMessage { from: "P2", forwarded_by: Some("MU"), anchor: Some("00000000000000000000000000000001"), ..message(&tags) };
        let text = pushed.to_json();
        assert!(text.contains(r#""Anchor":"00000000000000000000000000000001","From":"P2","Forwarded-By":"MU","Tags""#), "{text}");
    }

    #[test]
    fn strings_are_escaped_like_json_stringify() {
        let tags = [Tag::new("q\"", "a\u{1}b\n\u{7f}/é")];
        let data = "tab\there \\ \u{1f} \u{2028}";
        let text = CuMessage { data: Some(data), ..message(&tags) }.to_json();
        assert!(text.contains("\"Data\":\"tab\\there \\\\ \\u001f \u{2028}\""), "{text}");
        assert!(text.contains("{\"name\":\"q\\\"\",\"value\":\"a\\u0001b\\n\u{7f}/é\"}"), "{text}");
        let back: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(back["Data"], data);
    }

    #[test]
    fn from_and_owner_tags_are_removed_as_the_cu_does() {
        let tags = [Tag::new("From", "x"), Tag::new("Action", "A"), Tag::new("Owner", "y"), Tag::new("From-Process", "p")];
        let kept = CuMessage::tags_for_cu(&tags);
        assert_eq!(kept, vec![Tag::new("Action", "A"), Tag::new("From-Process", "p")]);
    }

    #[test]
    fn the_environment_puts_process_before_module() {
        let pt = [Tag::new("Name", "Thomas")];
        let env = env_json(CuEnvItem { id: "AOS", owner: "FOOBAR", tags: &pt }, CuEnvItem { id: "MOD", owner: "M", tags: &[] });
        assert_eq!(
            env,
            r#"{"Process":{"Id":"AOS","Owner":"FOOBAR","Tags":[{"name":"Name","value":"Thomas"}]},"Module":{"Id":"MOD","Owner":"M","Tags":[]}}"#
        );
    }
}

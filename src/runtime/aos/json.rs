//! The `msg` and `env` JSON strings in the exact key order the AO compute unit produces (spec §6.1,
//! §6.2): aos's memory depends on the bytes, not only the values, so these are built in order as
//! strings (serde_json's default map would sort the keys).

/// A `{name, value}` tag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JsonTag {
    pub name: String,
    pub value: String,
}

impl JsonTag {
    pub fn new(name: impl Into<String>, value: impl Into<String>) -> Self {
        Self { name: name.into(), value: value.into() }
    }
}

fn string(s: &str) -> String {
    serde_json::Value::String(s.to_owned()).to_string()
}

fn tags(tags: &[JsonTag]) -> String {
    let items: Vec<String> = tags.iter().map(|t| format!("{{\"name\":{},\"value\":{}}}", string(&t.name), string(&t.value))).collect();
    format!("[{}]", items.join(","))
}

/// A message as the CU passes it (`mapNode` + `evaluate`): keys in the CU's order, absent ones
/// dropped like `JSON.stringify` drops `undefined`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CuMessage {
    pub id: Option<String>,
    pub signature: Option<String>,
    pub data: Option<String>,
    pub owner: Option<String>,
    pub anchor: Option<String>,
    pub from: Option<String>,
    pub forwarded_by: Option<String>,
    pub tags: Vec<JsonTag>,
    pub message: Option<String>,
    pub target: Option<String>,
    pub epoch: Option<u64>,
    pub nonce: Option<u64>,
    pub timestamp: Option<u64>,
    pub block_height: Option<u64>,
    pub hash_chain: Option<String>,
    pub cron: Option<bool>,
}

impl CuMessage {
    pub fn to_json(&self) -> String {
        let mut fields: Vec<String> = Vec::new();
        let mut s = |k: &str, v: &Option<String>| {
            if let Some(v) = v {
                fields.push(format!("{}:{}", string(k), string(v)));
            }
        };
        s("Id", &self.id);
        s("Signature", &self.signature);
        s("Data", &self.data);
        s("Owner", &self.owner);
        s("Anchor", &self.anchor);
        s("From", &self.from);
        s("Forwarded-By", &self.forwarded_by);
        fields.push(format!("\"Tags\":{}", tags(&self.tags)));
        let mut s = |k: &str, v: &Option<String>| {
            if let Some(v) = v {
                fields.push(format!("{}:{}", string(k), string(v)));
            }
        };
        s("Message", &self.message);
        s("Target", &self.target);
        for (k, v) in [("Epoch", self.epoch), ("Nonce", self.nonce), ("Timestamp", self.timestamp), ("Block-Height", self.block_height)] {
            if let Some(v) = v {
                fields.push(format!("\"{k}\":{v}"));
            }
        }
        if let Some(h) = &self.hash_chain {
            fields.push(format!("\"Hash-Chain\":{}", string(h)));
        }
        if let Some(c) = self.cron {
            fields.push(format!("\"Cron\":{c}"));
        }
        format!("{{{}}}", fields.join(","))
    }
}

/// The loader tests' message shape (spec §6.1), which the acceptance goldens use:
/// `{"Id","Target","Owner","From","Module","Block-Height","Timestamp","Tags","Data"}` with
/// `Block-Height` and `Timestamp` as strings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TestMessage {
    pub id: String,
    pub target: String,
    pub owner: String,
    pub from: String,
    pub module: String,
    pub block_height: String,
    pub timestamp: String,
    pub tags: Vec<JsonTag>,
    pub data: String,
}

impl TestMessage {
    /// An `Action=Eval` of `data` with the acceptance sequence's fixed fields.
    pub fn eval(id: impl Into<String>, data: impl Into<String>) -> Self {
        Self {
            id: id.into(),
            target: "AOS".into(),
            owner: "FOOBAR".into(),
            from: "FOOBAR".into(),
            module: "FOO".into(),
            block_height: "1000".into(),
            timestamp: "1700000000000".into(),
            tags: vec![JsonTag::new("Action", "Eval")],
            data: data.into(),
        }
    }

    pub fn to_json(&self) -> String {
        format!(
            "{{\"Id\":{},\"Target\":{},\"Owner\":{},\"From\":{},\"Module\":{},\"Block-Height\":{},\"Timestamp\":{},\"Tags\":{},\"Data\":{}}}",
            string(&self.id),
            string(&self.target),
            string(&self.owner),
            string(&self.from),
            string(&self.module),
            string(&self.block_height),
            string(&self.timestamp),
            tags(&self.tags),
            string(&self.data)
        )
    }
}

/// `{"Process":{"Id","Owner","Tags"}}` plus `"Module":{"Id","Owner","Tags"}` when given (CU
/// `mapAoMessage` order).
pub fn env_json(process_id: &str, process_owner: &str, process_tags: &[JsonTag], module: Option<(&str, &str, &[JsonTag])>) -> String {
    let process = format!("{{\"Id\":{},\"Owner\":{},\"Tags\":{}}}", string(process_id), string(process_owner), tags(process_tags));
    match module {
        Some((id, owner, module_tags)) => {
            format!(
                "{{\"Process\":{process},\"Module\":{{\"Id\":{},\"Owner\":{},\"Tags\":{}}}}}",
                string(id),
                string(owner),
                tags(module_tags)
            )
        }
        None => format!("{{\"Process\":{process}}}"),
    }
}

/// The acceptance tests' env: process `AOS` owned by `FOOBAR`, named `Thomas`.
pub fn test_env_json() -> String {
    env_json("AOS", "FOOBAR", &[JsonTag::new("Name", "Thomas")], None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_message_has_the_loader_test_key_order() {
        assert_eq!(
            TestMessage::eval("MSG1", "1+1").to_json(),
            r#"{"Id":"MSG1","Target":"AOS","Owner":"FOOBAR","From":"FOOBAR","Module":"FOO","Block-Height":"1000","Timestamp":"1700000000000","Tags":[{"name":"Action","value":"Eval"}],"Data":"1+1"}"#
        );
        assert_eq!(test_env_json(), r#"{"Process":{"Id":"AOS","Owner":"FOOBAR","Tags":[{"name":"Name","value":"Thomas"}]}}"#);
    }

    #[test]
    fn cu_message_keeps_order_and_drops_absent_keys() {
        let m = CuMessage {
            id: Some("i".into()),
            data: Some("say \"hi\"\n".into()),
            owner: Some("o".into()),
            from: Some("f".into()),
            tags: vec![JsonTag::new("Action", "Eval")],
            target: Some("t".into()),
            timestamp: Some(5),
            block_height: Some(7),
            cron: Some(false),
            ..CuMessage::default()
        };
        assert_eq!(
            m.to_json(),
            r#"{"Id":"i","Data":"say \"hi\"\n","Owner":"o","From":"f","Tags":[{"name":"Action","value":"Eval"}],"Target":"t","Timestamp":5,"Block-Height":7,"Cron":false}"#
        );
        let with_module = env_json("P", "O", &[], Some(("M", "MO", &[JsonTag::new("a", "b")])));
        assert_eq!(
            with_module,
            r#"{"Process":{"Id":"P","Owner":"O","Tags":[]},"Module":{"Id":"M","Owner":"MO","Tags":[{"name":"a","value":"b"}]}}"#
        );
    }
}

//! The `msg` and `env` JSON strings of the loader's own tests (spec §6.1, §6.2), which the goldens
//! use: aos's memory depends on the bytes, not only the values, so these are built in order as
//! strings (serde_json's default map would sort the keys). The compute unit's shape, which served
//! processes get, is `protocol::cu_json`.

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
    fn env_json_puts_the_module_after_the_process() {
        let with_module = env_json("P", "O", &[], Some(("M", "MO", &[JsonTag::new("a", "b")])));
        assert_eq!(
            with_module,
            r#"{"Process":{"Id":"P","Owner":"O","Tags":[]},"Module":{"Id":"M","Owner":"MO","Tags":[{"name":"a","value":"b"}]}}"#
        );
    }
}

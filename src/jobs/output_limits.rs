//! The limits on what one evaluation hands back (`[limits]` max_result_bytes, max_outbox_items,
//! max_outbox_item_bytes): a result over one is not kept; the evaluation fails with an `Error`
//! that names the limit and its key, and its state is rolled back, like a trap's.

use serde_json::Value;

use crate::config::ActorLimits;

/// Why `response` (the actor's successful response) may not be kept, if it may not.
pub fn check(response: &Value, limits: &ActorLimits) -> Result<(), String> {
    let list = |k: &str| response.get(k).and_then(Value::as_array).map_or(&[][..], Vec::as_slice);
    let (messages, spawns) = (list("Messages"), list("Spawns"));
    let items = messages.len() + spawns.len();
    if items > limits.max_outbox_items {
        return Err(format!(
            "the result has {items} outbox entries (Messages and Spawns), more than the {} allowed (limits.max_outbox_items); state rolled back",
            limits.max_outbox_items
        ));
    }
    for (kind, entries) in [("Messages", messages), ("Spawns", spawns)] {
        for (i, entry) in entries.iter().enumerate() {
            let len = entry.to_string().len() as u64;
            if len > limits.max_outbox_item_bytes {
                return Err(format!(
                    "{kind}[{i}] is {len} bytes, more than the {} allowed (limits.max_outbox_item_bytes); state rolled back",
                    limits.max_outbox_item_bytes
                ));
            }
        }
    }
    let len = response.to_string().len() as u64;
    if len > limits.max_result_bytes {
        return Err(format!(
            "the result is {len} bytes, more than the {} allowed (limits.max_result_bytes); state rolled back",
            limits.max_result_bytes
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn results_over_a_limit_are_refused_naming_the_key() {
        let limits = ActorLimits { max_result_bytes: 200, max_outbox_items: 2, max_outbox_item_bytes: 60, ..ActorLimits::default() };
        assert!(check(&json!({"Output": "ok", "Messages": [{"Target": "T"}]}), &limits).is_ok());
        let e = check(&json!({"Messages": [{}, {}], "Spawns": [{}]}), &limits).unwrap_err();
        assert!(e.contains("3 outbox entries") && e.contains("limits.max_outbox_items"), "{e}");
        let e = check(&json!({"Spawns": [{"Data": "x".repeat(100)}]}), &limits).unwrap_err();
        assert!(e.contains("Spawns[0]") && e.contains("limits.max_outbox_item_bytes"), "{e}");
        let e = check(&json!({"Output": "y".repeat(300)}), &limits).unwrap_err();
        assert!(e.contains("limits.max_result_bytes") && e.contains("rolled back"), "{e}");
    }
}

//! Re-addressing JSON-RPC messages for the pooled process: another id or progress token in
//! place of the agent's, every other byte kept as it was.

use std::collections::BTreeMap;

use bytes::Bytes;
use serde_json::value::RawValue;

use super::lines::one_line;

/// Re-addresses a stateless request: our id in place of the agent's, and our id as its
/// progress token (so progress of concurrent agents never mixes); returns the agent's token.
pub(super) fn remap_request(
    payload: &[u8],
    id: u64,
) -> Result<(Bytes, Option<Box<RawValue>>), serde_json::Error> {
    let raw: &RawValue = serde_json::from_slice(payload)?;
    let ours = serde_json::value::to_raw_value(&id)?;
    let (message, _) = replace_at(raw, &["id"], &ours)?;
    let (message, token) = replace_at(&message, &["params", "_meta", "progressToken"], &ours)?;
    Ok((one_line(Bytes::from(message.get().to_owned())), token))
}

/// Replaces the value at `path` (object keys) with `value`, keeping every other value byte for
/// byte; returns the new text and the old value. A path that does not exist changes nothing.
pub(super) fn replace_at(
    raw: &RawValue,
    path: &[&str],
    value: &RawValue,
) -> Result<(Box<RawValue>, Option<Box<RawValue>>), serde_json::Error> {
    let Some((first, rest)) = path.split_first() else {
        return Ok((value.to_owned(), Some(raw.to_owned())));
    };
    if !raw.get().trim_start().starts_with('{') {
        return Ok((raw.to_owned(), None));
    }
    let mut object: BTreeMap<String, Box<RawValue>> = serde_json::from_str(raw.get())?;
    let Some(child) = object.get(*first) else {
        return Ok((raw.to_owned(), None));
    };
    let (child, old) = replace_at(child, rest, value)?;
    if old.is_none() {
        return Ok((raw.to_owned(), None));
    }
    object.insert((*first).to_owned(), child);
    Ok((serde_json::value::to_raw_value(&object)?, old))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stateless_requests_are_readdressed_and_answers_restored() {
        let request = br#"{"jsonrpc":"2.0","id":"agent-7","method":"tools/call","params":{"name":"x","big":12345678901234567890123,"_meta":{"progressToken":"p1","io.modelcontextprotocol/protocolVersion":"2026-07-28"}}}"#;
        let (line, token) = remap_request(request, 42).expect("remaps");
        let value: serde_json::Value = serde_json::from_slice(&line).expect("json");
        assert_eq!(value["id"], 42);
        assert_eq!(value["params"]["_meta"]["progressToken"], 42);
        assert_eq!(
            value["params"]["_meta"]["io.modelcontextprotocol/protocolVersion"],
            "2026-07-28"
        );
        assert!(
            std::str::from_utf8(&line)
                .expect("utf-8")
                .contains("12345678901234567890123"),
            "values are kept byte for byte"
        );
        assert_eq!(token.expect("token").get(), "\"p1\"");

        let (line, token) =
            remap_request(br#"{"jsonrpc":"2.0","id":1,"method":"ping"}"#, 3).expect("remaps");
        assert!(token.is_none());
        let value: serde_json::Value = serde_json::from_slice(&line).expect("json");
        assert_eq!(
            value,
            serde_json::json!({"jsonrpc":"2.0","id":3,"method":"ping"})
        );

        let answer: &RawValue =
            serde_json::from_str(r#"{"jsonrpc":"2.0","id":42,"result":{"content":[]}}"#)
                .expect("json");
        let original = RawValue::from_string("\"agent-7\"".into()).expect("raw");
        let (restored, old) = replace_at(answer, &["id"], &original).expect("restores");
        assert_eq!(old.expect("old id").get(), "42");
        let value: serde_json::Value = serde_json::from_str(restored.get()).expect("json");
        assert_eq!(value["id"], "agent-7");
    }
}

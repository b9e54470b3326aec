//! The fields 2026-07-28 requires on a result that a session-era upstream does not write
//! (`resultType`, and the cache hints of the cacheable ones), inserted into its answer without
//! re-serialising it.

use bytes::Bytes;
use serde::Deserialize;
use serde_json::value::RawValue;

/// The cache lifetime given to a cacheable result whose upstream gave none: nothing may be
/// reused, the conservative reading of a server that never said.
pub const DEFAULT_TTL_MS: u64 = 0;

/// The cache scope given to a cacheable result whose upstream gave none. `private`: through a
/// governed relay a list depends on the caller (policy filters it per role), so no intermediary
/// may share it.
pub const DEFAULT_CACHE_SCOPE: &str = "private";

/// Methods whose complete results carry cache hints (`ttlMs`, `cacheScope`) in 2026-07-28.
pub const CACHEABLE_METHODS: &[&str] = &[
    "server/discover",
    "tools/list",
    "prompts/list",
    "resources/list",
    "resources/templates/list",
    "resources/read",
];

/// Completes a session-era answer for a 2026-07-28 agent: a result object gets
/// `resultType: "complete"` when it has no `resultType`, and a result of a cacheable `method`
/// (see [`CACHEABLE_METHODS`]) gets [`DEFAULT_TTL_MS`] and [`DEFAULT_CACHE_SCOPE`] where it
/// has none. The fields are inserted at the start of the result object: every other byte stays
/// as the upstream sent it. Anything else (errors, notifications, requests, text that is not
/// JSON) comes back unchanged.
pub fn complete(message: Bytes, method: Option<&str>) -> Bytes {
    #[derive(Deserialize)]
    struct Envelope<'a> {
        #[serde(borrow)]
        result: Option<&'a RawValue>,
    }
    #[derive(Deserialize)]
    struct Present<'a> {
        #[serde(rename = "resultType", borrow)]
        result_type: Option<&'a RawValue>,
        #[serde(rename = "ttlMs", borrow)]
        ttl_ms: Option<&'a RawValue>,
        #[serde(rename = "cacheScope", borrow)]
        cache_scope: Option<&'a RawValue>,
    }
    let Ok(Envelope {
        result: Some(result),
    }) = serde_json::from_slice::<Envelope<'_>>(&message)
    else {
        return message;
    };
    let Ok(present) = serde_json::from_str::<Present<'_>>(result.get()) else {
        return message;
    };
    if present.result_type.is_some() {
        // Already 2026-07-28 (`complete`, or `input_required`, which carries no cache hints).
        return message;
    }
    let mut fields = String::from(r#""resultType":"complete""#);
    if method.is_some_and(|m| CACHEABLE_METHODS.contains(&m)) {
        if present.ttl_ms.is_none() {
            fields.push_str(&format!(r#","ttlMs":{DEFAULT_TTL_MS}"#));
        }
        if present.cache_scope.is_none() {
            fields.push_str(&format!(r#","cacheScope":"{DEFAULT_CACHE_SCOPE}""#));
        }
    }
    // The result borrows from `message`: its offset there is where the object opens.
    let open = result.get().as_ptr() as usize - message.as_ptr() as usize;
    let body = &result.get()[1..];
    if !body.trim_start().starts_with('}') {
        fields.push(',');
    }
    let mut completed = Vec::with_capacity(message.len() + fields.len());
    completed.extend_from_slice(&message[..=open]);
    completed.extend_from_slice(fields.as_bytes());
    completed.extend_from_slice(&message[open + 1..]);
    Bytes::from(completed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mcp::bridge::testing::value;
    use serde_json::json;

    #[test]
    fn results_get_result_type_and_cacheable_ones_cache_hints() {
        let call = br#"{"jsonrpc":"2.0","id":7,"result":{"content":[{"type":"text","text":"hi"}],"n":12345678901234567890123}}"#;
        let done = complete(Bytes::from_static(call), Some("tools/call"));
        let text = std::str::from_utf8(&done).expect("utf-8");
        assert!(
            text.starts_with(
                r#"{"jsonrpc":"2.0","id":7,"result":{"resultType":"complete","content""#
            ),
            "{text}"
        );
        assert!(
            text.contains("12345678901234567890123"),
            "other bytes are kept"
        );

        let list = br#"{"jsonrpc":"2.0","id":1,"result":{"tools":[]}}"#;
        let done = value(&complete(Bytes::from_static(list), Some("tools/list")));
        assert_eq!(
            done["result"],
            json!({"resultType":"complete","ttlMs":0,"cacheScope":"private","tools":[]})
        );

        let hinted = br#"{"jsonrpc":"2.0","id":1,"result":{"contents":[],"ttlMs":5000,"cacheScope":"public"}}"#;
        let done = value(&complete(
            Bytes::from_static(hinted),
            Some("resources/read"),
        ));
        assert_eq!(done["result"]["ttlMs"], 5000, "the upstream's hints stay");
        assert_eq!(done["result"]["cacheScope"], "public");
        assert_eq!(done["result"]["resultType"], "complete");

        let empty = br#"{"jsonrpc":"2.0","id":"x","result": { } }"#;
        let done = value(&complete(Bytes::from_static(empty), Some("ping")));
        assert_eq!(done["result"], json!({"resultType":"complete"}));
    }

    #[test]
    fn what_is_not_a_plain_result_is_left_alone() {
        for message in [
            &br#"{"jsonrpc":"2.0","id":1,"result":{"resultType":"input_required","inputRequests":{}}}"#[..],
            br#"{"jsonrpc":"2.0","id":1,"error":{"code":-32601,"message":"no"}}"#,
            br#"{"jsonrpc":"2.0","method":"notifications/progress","params":{"progress":1}}"#,
            br#"{"jsonrpc":"2.0","id":1,"result":[1,2]}"#,
            br#"{"jsonrpc":"2.0","id":1,"result":"text"}"#,
            b"not json",
            b"",
        ] {
            let done = complete(Bytes::copy_from_slice(message), Some("tools/list"));
            assert_eq!(&done[..], message);
        }
    }
}

//! How much of a call's arguments and results the trail keeps, per tenant and source, and the
//! redaction applied to what it keeps.

use std::collections::HashMap;
use std::sync::Arc;

use serde_json::Value;

/// What replaces the value of a redacted key.
pub const REDACTED: &str = "[REDACTED]";

/// What to keep of one source's arguments and results.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Capture {
    /// Only metadata and the arguments' digest (the default).
    #[default]
    Metadata,
    /// The arguments and results too, with the values of these keys (compared ignoring ASCII
    /// case, at any depth) replaced by [`REDACTED`].
    Full {
        /// The keys to redact.
        redact: Arc<[String]>,
    },
}

impl Capture {
    /// What to store for a JSON text (`params`, `result` or `error`): nothing for
    /// [`Capture::Metadata`], the redacted text for [`Capture::Full`].
    pub fn keep(&self, json: &[u8]) -> Option<String> {
        match self {
            Capture::Metadata => None,
            Capture::Full { redact } => Some(redact_json(json, redact)),
        }
    }
}

/// `json` with the value of every object key in `keys` (ignoring ASCII case) replaced by
/// [`REDACTED`], at any depth. Text that is not JSON is not kept at all (it could hide
/// anything): it becomes a note of its length.
pub fn redact_json(json: &[u8], keys: &[String]) -> String {
    let mut value: Value = match serde_json::from_slice(json) {
        Ok(value) => value,
        Err(_) => return format!("[not JSON: {} bytes]", json.len()),
    };
    if !keys.is_empty() {
        redact_value(&mut value, keys);
    }
    value.to_string()
}

/// Recursion is bounded by serde_json's nesting limit (128) on the parsed value.
fn redact_value(value: &mut Value, keys: &[String]) {
    match value {
        Value::Object(map) => {
            for (key, item) in map.iter_mut() {
                if keys.iter().any(|k| k.eq_ignore_ascii_case(key)) {
                    *item = Value::String(REDACTED.to_owned());
                } else {
                    redact_value(item, keys);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|item| redact_value(item, keys)),
        _ => {}
    }
}

/// Per tenant and source, the configured [`Capture`]; everything else is metadata only.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CaptureRules {
    /// Tenant, then source.
    rules: HashMap<String, HashMap<String, Capture>>,
}

impl CaptureRules {
    /// The rules given as (tenant, source, capture); sources not listed keep metadata only.
    pub fn new(rules: impl IntoIterator<Item = (String, String, Capture)>) -> Self {
        let mut by_tenant: HashMap<String, HashMap<String, Capture>> = HashMap::new();
        for (tenant, source, capture) in rules {
            by_tenant.entry(tenant).or_default().insert(source, capture);
        }
        Self { rules: by_tenant }
    }

    /// The capture for one tenant's source.
    pub fn get(&self, tenant: &str, source: &str) -> Capture {
        self.rules
            .get(tenant)
            .and_then(|sources| sources.get(source))
            .cloned()
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn redacts_keys_at_any_depth_ignoring_case() {
        let text =
            br#"{"name":"q","arguments":{"Password":"hunter2","rows":[{"ssn":"123"},{"ok":1}]}}"#;
        let out = redact_json(text, &keys(&["password", "ssn"]));
        let value: Value = serde_json::from_str(&out).expect("redaction yields JSON");
        assert_eq!(value["arguments"]["Password"], REDACTED);
        assert_eq!(value["arguments"]["rows"][0]["ssn"], REDACTED);
        assert_eq!(value["arguments"]["rows"][1]["ok"], 1);
        assert_eq!(value["name"], "q");
        assert!(!out.contains("hunter2") && !out.contains("123"));
    }

    #[test]
    fn a_redacted_object_value_is_replaced_whole() {
        let out = redact_json(br#"{"secret":{"a":1}}"#, &keys(&["secret"]));
        assert_eq!(out, r#"{"secret":"[REDACTED]"}"#);
    }

    #[test]
    fn text_that_is_not_json_is_not_kept() {
        let out = redact_json(b"password=hunter2", &keys(&["password"]));
        assert_eq!(out, "[not JSON: 16 bytes]");
    }

    #[test]
    fn rules_default_to_metadata() {
        let rules = CaptureRules::new([(
            "acme".to_owned(),
            "db".to_owned(),
            Capture::Full {
                redact: keys(&["password"]).into(),
            },
        )]);
        assert_eq!(rules.get("acme", "web"), Capture::Metadata);
        assert_eq!(rules.get("globex", "db"), Capture::Metadata);
        let full = rules.get("acme", "db");
        assert_eq!(
            full.keep(br#"{"password":"x"}"#).as_deref(),
            Some(r#"{"password":"[REDACTED]"}"#)
        );
        assert_eq!(Capture::Metadata.keep(b"{}"), None);
    }
}

//! `Mcp-Param-*` headers (2026-07-28): a tool may mark arguments with `x-mcp-header` in its
//! input schema, and a client then repeats each such argument's value in a header
//! `Mcp-Param-<token>`, so that an intermediary can route on it without reading the body. A
//! 2026-07-28 server checks that they agree with the body and refuses a call whose header is
//! missing. A session-era agent sends none, so a session carried to a 2026-07-28 upstream
//! adds them, from the tools the upstream lists.
//!
//! The rules are the specification's, as the SDKs apply them: an annotation counts only on a
//! property reached from the schema's root through `properties` alone, naming an RFC 9110
//! token, on an `integer`, `string` or `boolean` property, unique (case-insensitively) in the
//! schema; a schema with any annotation that breaks them marks nothing (a conforming client
//! drops such a tool). A value is rendered as its text (`true`/`false` for booleans), in the
//! `=?base64?…?=` form when it is not plain printable ASCII.

use std::collections::HashMap;

use serde_json::Value;

use crate::mcp::era::{PARAM_HEADER_PREFIX, encode_header_value};

/// The schema keyword that marks an argument as repeated in a header.
pub const X_MCP_HEADER: &str = "x-mcp-header";

/// Annotations of one tool: each marked argument's path (the `properties` keys from the root)
/// and its header token.
pub type ParamAnnotations = Vec<(Vec<String>, String)>;

/// Schema keywords holding one subschema, a list of them, or a map of them: an annotation
/// under any of these is off the pure `properties` chain.
const SUBSCHEMA_KEYWORDS: &[&str] = &[
    "additionalProperties",
    "items",
    "contains",
    "propertyNames",
    "not",
    "if",
    "then",
    "else",
    "unevaluatedItems",
    "unevaluatedProperties",
    "allOf",
    "anyOf",
    "oneOf",
    "prefixItems",
    "$defs",
    "definitions",
    "patternProperties",
    "dependentSchemas",
];

/// Bound on schema positions walked in one tool's schema: far beyond any real tool, and a
/// hostile listing costs no more than this.
const MAX_POSITIONS: usize = 10_000;

/// The annotations of one tool's `inputSchema`; `None` when any is invalid (the tool then
/// gets no headers).
pub fn annotations(input_schema: &Value) -> Option<ParamAnnotations> {
    let mut found: ParamAnnotations = Vec::new();
    let mut stack: Vec<(Option<Vec<String>>, &Value)> = vec![(Some(Vec::new()), input_schema)];
    let mut positions = 0;
    while let Some((path, node)) = stack.pop() {
        positions += 1;
        if positions > MAX_POSITIONS {
            return None;
        }
        let Value::Object(schema) = node else {
            continue;
        };
        if let Some(token) = schema.get(X_MCP_HEADER) {
            let path = path.clone().filter(|p| !p.is_empty())?;
            let token = token.as_str().filter(|t| is_token(t))?;
            let typed = schema.get("type").and_then(Value::as_str);
            if !matches!(typed, Some("integer" | "string" | "boolean")) {
                return None;
            }
            if found
                .iter()
                .any(|(_, seen)| seen.eq_ignore_ascii_case(token))
            {
                return None;
            }
            found.push((path, token.to_owned()));
        }
        for (keyword, value) in schema {
            if keyword == "properties" {
                if let Value::Object(properties) = value {
                    for (name, sub) in properties {
                        let sub_path = path.as_ref().map(|p| {
                            let mut p = p.clone();
                            p.push(name.clone());
                            p
                        });
                        stack.push((sub_path, sub));
                    }
                }
            } else if SUBSCHEMA_KEYWORDS.contains(&keyword.as_str()) {
                match value {
                    Value::Array(subs) => stack.extend(subs.iter().map(|s| (None, s))),
                    Value::Object(map) if keyword_holds_a_map(keyword) => {
                        stack.extend(map.values().map(|s| (None, s)));
                    }
                    sub => stack.push((None, sub)),
                }
            }
        }
    }
    Some(found)
}

fn keyword_holds_a_map(keyword: &str) -> bool {
    matches!(
        keyword,
        "$defs" | "definitions" | "patternProperties" | "dependentSchemas"
    )
}

/// An RFC 9110 token: one or more of the `tchar`s.
fn is_token(text: &str) -> bool {
    !text.is_empty()
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// The annotated tools of a `tools/list` answer, by name, and its `nextCursor`.
pub fn listed_annotations(answer: &[u8]) -> (HashMap<String, ParamAnnotations>, Option<String>) {
    let Ok(value) = serde_json::from_slice::<Value>(answer) else {
        return (HashMap::new(), None);
    };
    let result = &value["result"];
    let tools = result["tools"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|tool| {
            let name = tool["name"].as_str()?;
            let found = annotations(&tool["inputSchema"])?;
            (!found.is_empty()).then(|| (name.to_owned(), found))
        })
        .collect();
    let cursor = result["nextCursor"].as_str().map(str::to_owned);
    (tools, cursor)
}

/// The `Mcp-Param-*` headers (name, value) a call with `arguments` carries for a tool with
/// `annotations`: one per marked argument present, not null, and a scalar.
pub fn param_headers(annotations: &ParamAnnotations, arguments: &Value) -> Vec<(String, String)> {
    annotations
        .iter()
        .filter_map(|(path, token)| {
            let value = path
                .iter()
                .try_fold(arguments, |node, key| node.as_object()?.get(key))?;
            let rendered = match value {
                Value::String(text) => text.clone(),
                Value::Bool(flag) => flag.to_string(),
                Value::Number(number) => number.to_string(),
                _ => return None,
            };
            Some((
                format!("{PARAM_HEADER_PREFIX}{token}"),
                encode_header_value(&rendered),
            ))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn marked_arguments_become_headers() {
        let schema = json!({"type": "object", "properties": {
            "region": {"type": "string", "x-mcp-header": "Region"},
            "dry": {"type": "boolean", "x-mcp-header": "Dry-Run"},
            "limits": {"type": "object", "properties": {"n": {"type": "integer", "x-mcp-header": "N"}}},
            "text": {"type": "string"},
        }});
        let found = annotations(&schema).expect("valid annotations");
        assert_eq!(found.len(), 3);
        let mut headers = param_headers(
            &found,
            &json!({"region": "eu-west", "dry": true, "limits": {"n": 3}, "text": "x"}),
        );
        headers.sort();
        assert_eq!(
            headers,
            [
                ("mcp-param-Dry-Run".to_owned(), "true".to_owned()),
                ("mcp-param-N".to_owned(), "3".to_owned()),
                ("mcp-param-Region".to_owned(), "eu-west".to_owned()),
            ]
        );
        let headers = param_headers(&found, &json!({"region": "Zürich", "dry": null}));
        assert_eq!(
            headers,
            [(
                "mcp-param-Region".to_owned(),
                "=?base64?WsO8cmljaA==?=".to_owned()
            )],
            "non-ASCII in the base64 form; null and absent arguments get none"
        );
    }

    #[test]
    fn a_schema_with_an_invalid_annotation_marks_nothing() {
        for schema in [
            json!({"x-mcp-header": "Root"}),
            json!({"properties": {"a": {"type": "array", "x-mcp-header": "A"}}}),
            json!({"properties": {"a": {"type": "string", "x-mcp-header": "has space"}}}),
            json!({"properties": {"a": {"type": "string", "x-mcp-header": 7}}}),
            json!({"properties": {"a": {"type": "string", "x-mcp-header": "X"}, "b": {"type": "string", "x-mcp-header": "x"}}}),
            json!({"anyOf": [{"properties": {"a": {"type": "string", "x-mcp-header": "A"}}}]}),
        ] {
            assert_eq!(annotations(&schema), None, "{schema}");
        }
        assert_eq!(annotations(&json!({"type": "object"})), Some(Vec::new()));
    }

    #[test]
    fn a_listing_gives_each_annotated_tool_and_the_next_page() {
        let answer = json!({"jsonrpc": "2.0", "id": 1, "result": {"tools": [
            {"name": "routed", "inputSchema": {"properties": {"region": {"type": "string", "x-mcp-header": "Region"}}}},
            {"name": "plain", "inputSchema": {"properties": {"a": {"type": "string"}}}},
            {"name": "broken", "inputSchema": {"properties": {"a": {"type": "object", "x-mcp-header": "A"}}}},
        ], "nextCursor": "p2"}});
        let (tools, cursor) = listed_annotations(answer.to_string().as_bytes());
        assert_eq!(tools.keys().collect::<Vec<_>>(), ["routed"]);
        assert_eq!(cursor.as_deref(), Some("p2"));
        assert_eq!(listed_annotations(b"not json").0.len(), 0);
    }
}

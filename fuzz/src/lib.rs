//! Fuzz targets for mcp-tunnel's parsers of untrusted input.
//!
//! Each target is a plain `fn(&[u8])` that panics only when it finds a bug: a panic inside a
//! parser, or a broken invariant the target asserts (a round trip that changes the data, two
//! readings of one message that disagree). The same functions run under AFL++
//! (`src/bin/afl.rs`) and as a plain replay of the committed corpora (`src/bin/replay.rs`,
//! `tests/replay.rs`), which is what CI runs.
//!
//! Inputs made of several parts (a JWKS and a token, a CEL expression and a message) are split
//! at their first line breaks, so seeds stay readable text.

pub mod targets;

/// One fuzz target: its name (also its corpus folder, `corpus/<name>`) and its function.
pub struct Target {
    /// The name used on the command line and for the corpus folder.
    pub name: &'static str,
    /// What it exercises.
    pub about: &'static str,
    /// The function: panics on a bug.
    pub run: fn(&[u8]),
}

/// Every target, in the order the README lists them.
pub const TARGETS: &[Target] = &[
    Target {
        name: "frame",
        about: "frame decoder fed in pieces, open headers and frame round trips (src/wire)",
        run: targets::frame,
    },
    Target {
        name: "handshake",
        about: "control stream messages: greeting, hello, reply, notices, identity assertions",
        run: targets::handshake,
    },
    Target {
        name: "mcp_classify",
        about: "JSON-RPC classification (single, batch) and the response scanner fed whole and in pieces",
        run: targets::mcp_classify,
    },
    Target {
        name: "mcp_differential",
        about: "the relay's classification against a plain serde_json reading of the same message",
        run: targets::mcp_differential,
    },
    Target {
        name: "sse_upstream",
        about: "upstream SSE streams in pieces: events, their data classified, endpoint URLs",
        run: targets::sse_upstream,
    },
    Target {
        name: "sse_agent",
        about: "agent-facing SSE: Last-Event-ID parsing and the relay's events read back by an SSE parser",
        run: targets::sse_agent,
    },
    Target {
        name: "relay_config",
        about: "relay and connect TOML configuration: parse, validate, build governance",
        run: targets::relay_config,
    },
    Target {
        name: "jwt",
        about: "JWKS documents and bearer JWTs through the relay's verifier",
        run: targets::jwt,
    },
    Target {
        name: "bridge",
        about: "the protocol-era bridge's readings and rewrites of agent and upstream messages (src/mcp/bridge.rs)",
        run: targets::bridge,
    },
    Target {
        name: "tasks",
        about: "task ids bound to callers in upstream messages and unbound in agent requests (src/mcp/tasks.rs)",
        run: targets::tasks,
    },
    Target {
        name: "cel",
        about: "CEL conditions compiled and evaluated over hostile call arguments, rule globs",
        run: targets::cel,
    },
];

/// The target called `name`.
pub fn target(name: &str) -> Option<&'static Target> {
    TARGETS.iter().find(|t| t.name == name)
}

/// Splits `data` at its first `\n`: (before, after); all of it and nothing when there is none.
pub fn split_line(data: &[u8]) -> (&[u8], &[u8]) {
    match data.iter().position(|&b| b == b'\n') {
        Some(at) => (&data[..at], &data[at + 1..]),
        None => (data, &[]),
    }
}

/// Cuts `data` into pieces of 1 to 17 bytes, their sizes derived from the data itself, so one
/// input always gives the same pieces and the fuzzer explores piece boundaries by mutating.
pub fn pieces(data: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    let mut rest = data;
    let mut i = 0usize;
    while !rest.is_empty() {
        let seed = data[i % data.len()] as usize ^ i;
        let take = (seed % 17 + 1).min(rest.len());
        let (piece, tail) = rest.split_at(take);
        out.push(piece);
        rest = tail;
        i += 1;
    }
    out
}

pub mod corpus {
    //! Reading corpora and replaying them through a target without a fuzzing engine.

    use std::path::{Path, PathBuf};

    use mcp_tunnel::mcp::jsonrpc::{MessageKind, classify};

    /// The committed corpus folder of `target`.
    pub fn dir(target: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("corpus")
            .join(target)
    }

    /// The files at `paths` (files as given, folders' files sorted), skipping dot files.
    pub fn files(paths: &[PathBuf]) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for path in paths {
            if path.is_dir() {
                let mut found: Vec<PathBuf> = std::fs::read_dir(path)
                    .into_iter()
                    .flatten()
                    .flatten()
                    .map(|e| e.path())
                    .filter(|p| {
                        p.is_file()
                            && !p
                                .file_name()
                                .is_some_and(|n| n.to_string_lossy().starts_with('.'))
                    })
                    .collect();
                found.sort();
                out.extend(found);
            } else {
                out.push(path.clone());
            }
        }
        out
    }

    /// How a replay went.
    pub struct Report {
        /// Inputs run.
        pub inputs: usize,
        /// Inputs whose run panicked.
        pub failures: Vec<PathBuf>,
    }

    /// Runs `target` over each of `files`, catching panics so every input runs.
    pub fn replay(target: &crate::Target, files: &[PathBuf]) -> Report {
        let mut failures = Vec::new();
        for file in files {
            let Ok(data) = std::fs::read(file) else {
                failures.push(file.clone());
                continue;
            };
            let run = target.run;
            if std::panic::catch_unwind(|| run(&data)).is_err() {
                eprintln!("{}: {} panicked", target.name, file.display());
                failures.push(file.clone());
            }
        }
        Report {
            inputs: files.len(),
            failures,
        }
    }

    /// The relay's classification of `data` as one JSON line: `{"file", "ok", "messages":
    /// [{"kind", "id", "method", "target"}], "batch"}`, or `"ok": false` with the error.
    pub fn classification_line(file: &Path, data: &[u8]) -> String {
        let line = match classify(data) {
            Ok(classified) => {
                let messages: Vec<serde_json::Value> = classified
                    .messages()
                    .iter()
                    .map(|m| {
                        serde_json::json!({
                            "kind": match m.kind {
                                MessageKind::Request => "request",
                                MessageKind::Notification => "notification",
                                MessageKind::Response => "response",
                            },
                            "id": m.id.as_ref().map(|id| id.get()),
                            "method": m.method,
                            "target": m.target,
                            "error_code": m.error_code,
                        })
                    })
                    .collect();
                serde_json::json!({
                    "file": file.display().to_string(),
                    "ok": true,
                    "batch": matches!(classified, mcp_tunnel::mcp::Classified::Batch(_)),
                    "messages": messages,
                })
            }
            Err(e) => serde_json::json!({
                "file": file.display().to_string(),
                "ok": false,
                "error": e.to_string(),
            }),
        };
        line.to_string()
    }
}

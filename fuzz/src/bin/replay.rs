//! Replays inputs through the targets without a fuzzing engine.
//!
//! - `replay`: every target over its committed corpus (`corpus/<target>/`);
//! - `replay <target> [FILE|DIR]...`: one target over the given inputs (default: its corpus),
//!   e.g. a crash AFL++ found in `out/<target>/default/crashes/`;
//! - `replay --classify [FILE|DIR]...`: prints the relay's classification of each input as one
//!   JSON line, for `differential.py` (the Python SDK's reading of the same inputs).
//!
//! Exits non-zero when a target panics (after running every input).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use mcp_tunnel_fuzz::corpus;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--classify") {
        let paths = paths_or(&args[1..], "mcp_differential");
        for file in corpus::files(&paths) {
            let data = std::fs::read(&file).unwrap_or_default();
            println!("{}", corpus::classification_line(&file, &data));
        }
        return ExitCode::SUCCESS;
    }
    let targets: Vec<&mcp_tunnel_fuzz::Target> = match args.first() {
        None => mcp_tunnel_fuzz::TARGETS.iter().collect(),
        Some(name) => match mcp_tunnel_fuzz::target(name) {
            Some(t) => vec![t],
            None => {
                eprintln!("unknown target {name}");
                return ExitCode::from(2);
            }
        },
    };
    let mut failed = 0usize;
    for target in targets {
        let paths = if args.len() > 1 {
            args[1..].iter().map(PathBuf::from).collect()
        } else {
            vec![corpus::dir(target.name)]
        };
        let report = corpus::replay(target, &corpus::files(&paths));
        println!(
            "{:<18} {:>6} inputs {:>4} failed",
            target.name,
            report.inputs,
            report.failures.len()
        );
        for file in &report.failures {
            println!("  FAILED {}", file.display());
        }
        failed += report.failures.len();
    }
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn paths_or(args: &[String], target: &str) -> Vec<PathBuf> {
    if args.is_empty() {
        vec![corpus::dir(target)]
    } else {
        args.iter().map(|a| Path::new(a).to_path_buf()).collect()
    }
}

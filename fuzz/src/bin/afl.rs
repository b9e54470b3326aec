//! The AFL++ driver: `afl <target>` runs one target in AFL++'s persistent mode. Built with
//! `cargo afl build --features afl --bin afl` (see README.md).

fn main() {
    let name = std::env::args().nth(1).unwrap_or_default();
    let Some(target) = mcp_tunnel_fuzz::target(&name) else {
        eprintln!("usage: afl <target>; targets:");
        for t in mcp_tunnel_fuzz::TARGETS {
            eprintln!("  {:<18} {}", t.name, t.about);
        }
        std::process::exit(2);
    };
    let run = target.run;
    afl::fuzz!(|data: &[u8]| {
        run(data);
    });
}

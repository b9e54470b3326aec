//! The relay's and `connect`'s configuration files as the binaries read them: the schema
//! ([`crate::config`]) and what the relay builds from it ([`super::governance`]).

use std::path::{Path, PathBuf};

use super::governance::{build, load_config, trust_warnings};
use crate::config::*;

fn write(text: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("relay.toml");
    std::fs::write(&path, text).expect("write config");
    (dir, path)
}

const GOOD: &str = r#"
[tunnel]
listen = "127.0.0.1:4433"
cert = "relay.pem"
key = "relay.key"
[agents]
listen = "127.0.0.1:8443"
[admin]
listen = "127.0.0.1:9090"
[audit]
path = "audit.db"
[[tenants]]
name = "acme"
tunnel_tokens = ["sha256:0000000000000000000000000000000000000000000000000000000000000001"]
[[tenants.keys]]
subject = "alice@acme.example"
roles = ["analyst"]
key = "sha256:0000000000000000000000000000000000000000000000000000000000000002"
[[tenants.roles]]
name = "analyst"
allow = ["everything/echo", "everything/get-*"]
deny = []
"#;

#[test]
fn parses_the_documented_example() {
    let (_dir, path) = write(GOOD);
    let config = load_config(&path).expect("documented config parses");
    assert_eq!(config.tenants[0].keys[0].roles, vec!["analyst"]);
    assert!(config.tunnel.cert.ends_with("relay.pem"));
}

#[test]
fn audit_section_defaults_and_sources() {
    let (dir, path) = write(&GOOD.replace(
        "[audit]\npath = \"audit.db\"\n",
        "[audit]\npath = \"audit.db\"\ndurability = \"fsync\"\n\
         [[audit.sources]]\ntenant = \"acme\"\nsource = \"db\"\nlevel = \"full\"\n\
         redact = [\"password\", \"ssn\"]\n\
         [[audit.sources]]\ntenant = \"acme\"\nsource = \"web\"\n",
    ));
    let config = load_config(&path).expect("audit config parses");
    let audit = config.audit.expect("[audit] present");
    assert_eq!(audit.durability, Durability::Fsync);
    assert_eq!(audit.key_path(), dir.path().join("audit.key"));
    assert_eq!(audit.checkpoint_rows, DEFAULT_CHECKPOINT_ROWS);
    assert_eq!(audit.checkpoint_secs, DEFAULT_CHECKPOINT_SECS);
    assert_eq!(audit.sources[0].level, AuditLevel::Full);
    assert_eq!(audit.sources[0].redact, vec!["password", "ssn"]);
    assert_eq!(audit.sources[1].level, AuditLevel::Metadata);

    let (dir, path) = write(&GOOD.replace(
        "path = \"audit.db\"\n",
        "path = \"audit.db\"\nkey = \"keys/trail.key\"\n",
    ));
    let audit = load_config(&path).expect("parses").audit.expect("present");
    assert_eq!(audit.key_path(), dir.path().join("keys/trail.key"));
    assert_eq!(audit.durability, Durability::Commit);
}

#[test]
fn audit_mistakes_are_named() {
    for (text, needle) in [
        ("path = \"audit.db\"\nlevel = \"full\"\n", "level"),
        (
            "path = \"audit.db\"\ndurability = \"sometimes\"\n",
            "sometimes",
        ),
        (
            "path = \"audit.db\"\ncheckpoint_rows = 0\n",
            "checkpoint_rows",
        ),
        (
            "path = \"audit.db\"\n[[audit.sources]]\ntenant = \"acme\"\nsource = \"db\"\nredacted = []\n",
            "redacted",
        ),
        (
            "path = \"audit.db\"\n[[audit.sources]]\ntenant = \"acme\"\nsource = \"db\"\n\
             [[audit.sources]]\ntenant = \"acme\"\nsource = \"db\"\n",
            "listed twice",
        ),
    ] {
        let (_dir, path) = write(&GOOD.replace("path = \"audit.db\"\n", text));
        let err = load_config(&path).expect_err(text).to_string();
        assert!(err.contains(needle), "{text}: {err}");
    }
}

#[test]
fn unknown_key_is_named_with_its_line() {
    let (_dir, path) = write(&GOOD.replace("[admin]\n", "[admin]\nlisten_typo = 1\n"));
    let err = load_config(&path).expect_err("unknown key").to_string();
    assert!(err.contains("listen_typo") && err.contains("line"), "{err}");
}

#[test]
fn refuses_clear_text_secrets_and_undefined_roles() {
    let (_dir, path) = write(&GOOD.replace(
        "sha256:0000000000000000000000000000000000000000000000000000000000000002",
        "plain-key",
    ));
    assert!(
        load_config(&path)
            .expect_err("clear text")
            .to_string()
            .contains("alice")
    );
    let (_dir, path) = write(&GOOD.replace("roles = [\"analyst\"]", "roles = [\"admin\"]"));
    assert!(
        load_config(&path)
            .expect_err("undefined role")
            .to_string()
            .contains("admin")
    );
}

#[test]
fn conditions_compile_at_load_and_errors_name_tenant_role_and_problem() {
    let with = |when: &str, kind: &str| {
        let (dir, path) = write(&format!(
            "{GOOD}[[tenants.roles.conditions]]\nmatch = \"everything/echo\"\n{kind}when = '{when}'\n"
        ));
        let result = load_config(&path).map_err(|e| e.to_string());
        drop(dir);
        result
    };
    let config = with(r#"args.message != "secret" || "hr" in roles"#, "").expect("valid");
    assert_eq!(
        config.tenants[0].roles[0].conditions[0].kind,
        MatchKind::Tool
    );
    let config = with(
        "args.startsWith(\"file:///public/\")",
        "kind = \"resource\"\n",
    )
    .expect("a resource condition");
    assert_eq!(
        config.tenants[0].roles[0].conditions[0].kind,
        MatchKind::Resource
    );
    let err = with("args.message ==", "").expect_err("syntax");
    assert!(
        err.contains("tenant acme: role analyst: condition on everything/echo: invalid CEL"),
        "{err}"
    );
    let err = with("user == 1", "").expect_err("unknown variable");
    assert!(
        err.contains("role analyst") && err.contains("\"user\""),
        "{err}"
    );
    let err = with("true", "kind = \"tools\"\n").expect_err("unknown kind");
    assert!(err.contains("tools") && err.contains("line"), "{err}");
}

const PROVIDER: &str = r#"
[[identity_providers]]
issuer = "https://idp.example"
jwks_file = "jwks.json"
algorithms = ["ES256", "EdDSA"]
tenant = "acme"
roles_claim = "roles"
required_scopes = ["mcp:tools"]
"#;

fn with_provider(agents_extra: &str, provider: &str) -> (tempfile::TempDir, PathBuf) {
    let text = GOOD.replace(
        "listen = \"127.0.0.1:8443\"\n",
        &format!("listen = \"127.0.0.1:8443\"\n{agents_extra}"),
    ) + provider;
    let (dir, path) = write(&text);
    std::fs::write(dir.path().join("jwks.json"), r#"{"keys":[]}"#).expect("write JWKS");
    (dir, path)
}

#[test]
fn identity_providers_parse_and_are_checked() {
    let public_url = "public_url = \"https://relay.example/\"\n";
    let (_dir, path) = with_provider(public_url, PROVIDER);
    let config = load_config(&path).expect("a provider parses");
    assert!(
        config.identity_providers[0]
            .jwks_file
            .as_ref()
            .is_some_and(|f| f.is_absolute())
    );
    let (keyring, _) = build(&config).expect("governance");
    assert_eq!(keyring.jwt().public_url(), Some("https://relay.example"));
    assert_eq!(keyring.jwt().issuers(), ["https://idp.example"]);
    assert_eq!(keyring.jwt().scopes(), ["mcp:tools"]);
    let (_dir, path) = with_provider(
        public_url,
        &PROVIDER.replace(
            "jwks_file = \"jwks.json\"",
            "jwks_url = \"https://idp.example/jwks\"",
        ),
    );
    load_config(&path).expect("a JWKS URL is not fetched to check a file");
}

#[test]
fn identity_provider_mistakes_are_named() {
    let public_url = "public_url = \"https://relay.example/\"\n";
    let jwks_file = "jwks_file = \"jwks.json\"";
    // Each refused provider (agent listener lines, provider): what its error names.
    let refused: [(&str, String, &[&str]); 10] = [
        (
            public_url,
            PROVIDER.replace("\"acme\"", "\"globex\""),
            &["globex", "idp.example"],
        ),
        (
            public_url,
            PROVIDER.replace("issuer =", "isuser ="),
            &["isuser", "line"],
        ),
        (
            public_url,
            PROVIDER.replace("\"EdDSA\"", "\"HS256\""),
            &["HS256"],
        ),
        ("", PROVIDER.to_owned(), &["public_url"]),
        (
            public_url,
            PROVIDER.replace(
                "tenant = \"acme\"",
                "tenant = \"acme\"\ntenant_claim = \"t\"",
            ),
            &["exactly one of tenant"],
        ),
        (
            public_url,
            PROVIDER.replace("jwks.json", "missing.json"),
            &["missing.json"],
        ),
        (
            public_url,
            PROVIDER.replace(
                jwks_file,
                "jwks_file = \"jwks.json\"\njwks_url = \"https://idp.example/jwks\"",
            ),
            &["exactly one of jwks_file or jwks_url"],
        ),
        (
            public_url,
            PROVIDER.replace(jwks_file, ""),
            &["exactly one of jwks_file or jwks_url"],
        ),
        (
            public_url,
            PROVIDER.replace(jwks_file, "jwks_url = \"ftp://idp/jwks\""),
            &["ftp://idp/jwks"],
        ),
        (
            "public_url = \"relay.example\"\n",
            PROVIDER.to_owned(),
            &["public_url"],
        ),
    ];
    for (agents, provider, named) in refused {
        let (_dir, path) = with_provider(agents, &provider);
        let err = load_config(&path).expect_err("refused").to_string();
        assert!(named.iter().all(|n| err.contains(n)), "{named:?}: {err}");
    }
}

#[test]
fn identity_assertions_are_checked() {
    let with = |tenant_extra: &str, section: &str| {
        let text = GOOD.replace(
            "name = \"acme\"\n",
            &format!("name = \"acme\"\n{tenant_extra}"),
        );
        let (dir, path) = write(&format!("{text}{section}"));
        let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).expect("Ed25519 key");
        std::fs::write(dir.path().join("id.key"), pair.serialize_pem()).expect("write key");
        let result = load_config(&path).map(|config| {
            let (keyring, _) = build(&config).expect("governance");
            keyring
                .assertions()
                .is_some_and(|signer| signer.is_enabled("acme", "db"))
        });
        (dir, result.map_err(|e| e.to_string()))
    };
    let section = "[identity_assertion]\nkey = \"id.key\"\n";
    let enabled = "assert_identity = [\"db\"]\n";
    assert_eq!(with(enabled, section).1, Ok(true));
    assert_eq!(with("", section).1, Ok(false), "off by default");
    assert_eq!(with("", "").1, Ok(false));
    let err = with(enabled, "").1.expect_err("no section");
    assert!(err.contains("[identity_assertion] is missing"), "{err}");
    let err = with(enabled, "[identity_assertion]\nkey = \"missing.key\"\n")
        .1
        .expect_err("no key file");
    assert!(err.contains("missing.key"), "{err}");
    let err = with(enabled, &format!("{section}header = \"Authorization\"\n"))
        .1
        .expect_err("header");
    assert!(err.contains("Authorization"), "{err}");
    let err = with("assert_identity = [\"a/b\"]\n", section)
        .1
        .expect_err("bad source name");
    assert!(err.contains("assert_identity"), "{err}");
}

#[test]
fn shipped_examples_parse() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let relay = load_config(&dir.join("relay.toml")).expect("examples/relay.toml");
    assert_eq!(relay.tenants[0].name, "acme");
    let client = ClientFile::load(&dir.join("connect.toml")).expect("examples/connect.toml");
    assert_eq!(client.sources().expect("sources")[0].name, "everything");
}

#[test]
fn source_flags() {
    assert_eq!(
        SourceConfig::parse_flag("db=http://127.0.0.1:1/mcp").expect("http"),
        SourceConfig {
            name: "db".into(),
            target: SourceTarget::Http("http://127.0.0.1:1/mcp".into()),
            follow_cross_origin_redirects: false,
        }
    );
    assert_eq!(
        SourceConfig::parse_flag("fs=stdio:npx -y server")
            .expect("stdio")
            .target,
        SourceTarget::Stdio(vec!["npx".into(), "-y".into(), "server".into()])
    );
    assert!(SourceConfig::parse_flag("bad name=http://x").is_err());
    assert!(SourceConfig::parse_flag("x=ftp://x").is_err());
}

// --- [fleet] and the audit checkpoint file (issue 13, item 5) ---

#[test]
fn fleet_id_and_checkpoint_file_parse_and_name_the_relay_in_the_trail() {
    let text = GOOD.replace(
        "[audit]\npath = \"audit.db\"\n",
        "[audit]\npath = \"audit.db\"\ncheckpoint_file = \"cp.jsonl\"\n[fleet]\nid = \"relay-a\"\n",
    );
    let (dir, path) = write(&text);
    let config = load_config(&path).expect("parses");
    let audit = config.audit.as_ref().expect("[audit]");
    assert_eq!(audit.checkpoint_file, Some(dir.path().join("cp.jsonl")));
    assert_eq!(
        config.fleet.as_ref().and_then(|f| f.id.as_deref()),
        Some("relay-a")
    );
    assert_eq!(
        crate::govern::audit::relay_instance(Some("relay-a"), 4433),
        "relay-a"
    );
    assert!(crate::govern::audit::relay_instance(None, 4433).ends_with(":4433"));
    let (_dir, path) = write(&text.replace("id = \"relay-a\"", "id = \" \""));
    let err = load_config(&path).expect_err("an empty id").to_string();
    assert!(err.contains("fleet.id"), "{err}");
}

// --- [fleet] drain_delay_secs (issue 15) ---

#[test]
fn drain_delay_defaults_to_five_with_a_fleet_and_zero_without_and_is_bounded() {
    let (_dir, path) = write(GOOD);
    let single = load_config(&path).expect("parses");
    assert!(single.fleet.is_none());
    assert_eq!(single.drain_delay_secs(), 0, "a single relay stops at once");

    let (_dir, path) = write(&format!("{GOOD}[fleet]\nid = \"relay-a\"\n"));
    let fleet = load_config(&path).expect("parses");
    assert_eq!(fleet.drain_delay_secs(), DEFAULT_DRAIN_DELAY_SECS);
    assert_eq!(DEFAULT_DRAIN_DELAY_SECS, 5);
    assert_eq!(
        FleetSection::default().drain_delay_secs,
        5,
        "as serde's default"
    );

    let (_dir, path) = write(&format!("{GOOD}[fleet]\ndrain_delay_secs = 0\n"));
    assert_eq!(load_config(&path).expect("parses").drain_delay_secs(), 0);
    let (_dir, path) = write(&format!("{GOOD}[fleet]\ndrain_delay_secs = 30\n"));
    let config = load_config(&path).expect("parses");
    assert_eq!(config.drain_delay_secs(), 30);
    assert_eq!(
        config.fleet.as_ref().and_then(|f| f.id.as_deref()),
        None,
        "the id stays derived"
    );

    let (_dir, path) = write(&format!("{GOOD}[fleet]\ndrain_delay_secs = 301\n"));
    let err = load_config(&path).expect_err("too long").to_string();
    assert!(err.contains("fleet.drain_delay_secs"), "{err}");
    let (_dir, path) = write(&format!("{GOOD}[fleet]\ndrain_delay_secs = -1\n"));
    let err = load_config(&path).expect_err("negative").to_string();
    assert!(err.contains("drain_delay_secs"), "{err}");
}

// ---- Tunnel trust ----

#[test]
fn bound_tunnel_tokens_load_and_mistakes_are_named() {
    let token = "sha256:00000000000000000000000000000000000000000000000000000000000000aa";
    let with = |tunnels: &str| {
        let text = GOOD.replace("name = \"acme\"\n", &format!("name = \"acme\"\n{tunnels}"));
        let (_dir, path) = write(&text);
        load_config(&path).map_err(|e| e.to_string())
    };
    // TOML: the array-of-tables lines go after the tenant's plain keys.
    let stanza =
        |sources: &str| format!("[[tenants.tunnels]]\ntoken = \"{token}\"\nsources = {sources}\n");
    let good = GOOD.to_owned() + &stanza("[\"db\", \"files\"]");
    let (_dir, path) = write(&good);
    let config = load_config(&path).expect("a bound token loads");
    assert_eq!(config.tenants[0].tunnels[0].sources, ["db", "files"]);
    assert_eq!(
        trust_warnings(&config).len(),
        1,
        "the unbound token of GOOD is warned about"
    );
    assert!(trust_warnings(&config)[0].contains("not bound"));
    for (sources, expected) in [("[]", "names no sources"), ("[\"a/b\"]", "source name")] {
        let (_dir, path) = write(&(GOOD.to_owned() + &stanza(sources)));
        let err = load_config(&path).expect_err("refused").to_string();
        assert!(err.contains(expected) && err.contains("tunnels"), "{err}");
    }
    let twice = GOOD.to_owned() + &stanza("[\"db\"]") + &stanza("[\"files\"]");
    let (_dir, path) = write(&twice);
    let err = load_config(&path).expect_err("refused").to_string();
    assert!(err.contains("listed twice"), "{err}");
    assert!(with("").is_ok());
}

#[test]
fn provider_tenants_are_checked_and_warned_about() {
    let public_url = "public_url = \"https://relay.example/\"\n";
    let claim = PROVIDER.replace("tenant = \"acme\"", "tenant_claim = \"t\"");
    let (_dir, path) = with_provider(public_url, &claim);
    let config = load_config(&path).expect("tenant_claim alone still loads");
    assert!(
        trust_warnings(&config)
            .iter()
            .any(|w| w.contains("idp.example") && w.contains("any tenant")),
        "{:?}",
        trust_warnings(&config)
    );
    let listed = claim.replace(
        "tenant_claim = \"t\"",
        "tenant_claim = \"t\"\ntenants = [\"acme\"]",
    );
    let (_dir, path) = with_provider(public_url, &listed);
    let config = load_config(&path).expect("listed tenants load");
    assert!(
        !trust_warnings(&config)
            .iter()
            .any(|w| w.contains("idp.example"))
    );
    for (provider, expected) in [
        (
            claim.replace(
                "tenant_claim = \"t\"",
                "tenant_claim = \"t\"\ntenants = [\"globex\"]",
            ),
            "tenant globex is not defined",
        ),
        (
            claim.replace("tenant_claim = \"t\"", "tenant_claim = \"t\"\ntenants = []"),
            "no tenant",
        ),
        (
            PROVIDER.replace(
                "tenant = \"acme\"",
                "tenant = \"acme\"\ntenants = [\"acme\"]",
            ),
            "only with tenant_claim",
        ),
        (
            PROVIDER.replace(
                "jwks_file = \"jwks.json\"",
                "jwks_url = \"http://idp.example/jwks\"",
            ),
            "https",
        ),
    ] {
        let (_dir, path) = with_provider(public_url, &provider);
        let err = load_config(&path).expect_err("refused").to_string();
        assert!(err.contains(expected), "{err}");
    }
    for loopback in [
        "http://127.0.0.1:1/jwks",
        "http://localhost:1/jwks",
        "http://[::1]:1/jwks",
    ] {
        let provider = PROVIDER.replace(
            "jwks_file = \"jwks.json\"",
            &format!("jwks_url = \"{loopback}\""),
        );
        let (_dir, path) = with_provider(public_url, &provider);
        load_config(&path).unwrap_or_else(|e| panic!("{loopback}: {e}"));
    }
}

#[test]
fn cross_origin_redirects_are_a_per_source_switch_for_url_sources() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("connect.toml");
    let base = "relay = \"localhost:4433\"\n[[sources]]\nname = \"db\"\n";
    std::fs::write(&path, format!("{base}url = \"http://127.0.0.1:1/mcp\"\n")).expect("write");
    let sources = ClientFile::load(&path)
        .expect("loads")
        .sources()
        .expect("sources");
    assert!(!sources[0].follow_cross_origin_redirects, "off by default");
    std::fs::write(
        &path,
        format!("{base}url = \"http://127.0.0.1:1/mcp\"\nfollow_cross_origin_redirects = true\n"),
    )
    .expect("write");
    let sources = ClientFile::load(&path)
        .expect("loads")
        .sources()
        .expect("sources");
    assert!(sources[0].follow_cross_origin_redirects);
    std::fs::write(
        &path,
        format!("{base}command = [\"server\"]\nfollow_cross_origin_redirects = true\n"),
    )
    .expect("write");
    let err = ClientFile::load(&path).expect_err("refused").to_string();
    assert!(err.contains("url sources only"), "{err}");
}

// --- Session limits (issue 13: items 8, 10 and 19) ---

#[test]
fn the_examples_name_every_session_limit_with_its_default() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let relay = load_config(&dir.join("relay.toml")).expect("examples/relay.toml");
    let defaults = LimitsSection::default();
    assert_eq!(
        relay.limits.max_sessions_per_key,
        defaults.max_sessions_per_key
    );
    assert_eq!(
        relay.limits.max_sessions_per_tenant,
        defaults.max_sessions_per_tenant
    );
    assert_eq!(
        relay.limits.max_sessions_per_source,
        defaults.max_sessions_per_source
    );
    assert_eq!(
        relay.limits.open_stream_timeout_secs,
        defaults.open_stream_timeout_secs
    );
    assert_eq!(
        relay.limits.session_event_bytes,
        defaults.session_event_bytes
    );
    let client = ClientFile::load(&dir.join("connect.toml")).expect("examples/connect.toml");
    assert_eq!(client.stdio_max_processes, DEFAULT_STDIO_MAX_PROCESSES);
    assert_eq!(client.session_idle_secs, DEFAULT_CONNECT_SESSION_IDLE_SECS);
    // Absent keys take the defaults; the section may name only some.
    let limits: LimitsSection =
        toml::from_str("max_sessions_per_key = 2").expect("a partial [limits]");
    assert_eq!(limits.max_sessions_per_key, 2);
    assert_eq!(limits.session_event_bytes, DEFAULT_SESSION_EVENT_BYTES);
}

// --- [fleet] secret_file and accepted_secret_files (issue 15) ---

#[test]
fn fleet_secrets_load_relative_to_the_file_and_a_rotation_opens_the_old_ids() {
    let text = format!(
        "{GOOD}\n[fleet]\nsecret_file = \"new.key\"\naccepted_secret_files = [\"old.key\"]\n"
    );
    let (dir, path) = write(&text);
    std::fs::write(dir.path().join("new.key"), [b'n'; 32]).expect("write");
    std::fs::write(dir.path().join("old.key"), [b'o'; 40]).expect("write");
    let config = load_config(&path).expect("parses");
    let fleet = config.fleet.as_ref().expect("[fleet]");
    assert_eq!(fleet.secret_file, Some(dir.path().join("new.key")));
    assert_eq!(
        fleet.accepted_secret_files,
        vec![dir.path().join("old.key")]
    );
    let keys = super::fleet_keys(&config).expect("the secrets load");
    let old = super::fleet::FleetKeys::from_secrets(&[b'o'; 40], &[]);
    let id = old.seal(super::fleet::Purpose::Session, b"claims");
    assert_eq!(
        keys.open(super::fleet::Purpose::Session, &id).as_deref(),
        Some(&b"claims"[..]),
        "an id the old secret sealed still opens during the rotation"
    );
    let fresh = keys.seal(super::fleet::Purpose::Session, b"x");
    assert!(
        old.open(super::fleet::Purpose::Session, &fresh).is_none(),
        "sealed with the new one"
    );

    std::fs::write(dir.path().join("new.key"), b"short\n").expect("write");
    let err = super::fleet_keys(&config)
        .expect_err("a 5-byte secret is refused")
        .to_string();
    assert!(err.contains("at least 32"), "{err}");
    let (_dir, path) = write(&format!(
        "{GOOD}\n[fleet]\naccepted_secret_files = [\"old.key\"]\n"
    ));
    let err = load_config(&path)
        .expect_err("accepted without a secret")
        .to_string();
    assert!(err.contains("fleet.accepted_secret_files"), "{err}");
}

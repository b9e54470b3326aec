//! CI's short fuzzing check: every committed corpus input through its target, no engine.

#[test]
fn every_corpus_input_passes_its_target() {
    let mut failures = Vec::new();
    let mut total = 0;
    for target in mcp_tunnel_fuzz::TARGETS {
        let files = mcp_tunnel_fuzz::corpus::files(&[mcp_tunnel_fuzz::corpus::dir(target.name)]);
        assert!(!files.is_empty(), "corpus/{} is empty", target.name);
        let report = mcp_tunnel_fuzz::corpus::replay(target, &files);
        total += report.inputs;
        failures.extend(report.failures);
    }
    assert!(
        failures.is_empty(),
        "{} of {total} inputs failed: {failures:#?}",
        failures.len()
    );
}

/// The jwt target reaches the identity mapping: claims it signs verify.
#[test]
fn jwt_target_signs_claims_that_verify() {
    let claims = serde_json::json!({
        "iss": mcp_tunnel_fuzz::targets::FUZZ_ISSUER, "aud": "mcp-tunnel", "exp": 4102444800u64,
        "sub": "alice", "tenant": "acme", "roles": "dev", "scope": "mcp",
    });
    let claims = claims.as_object().expect("an object").clone();
    let identity = mcp_tunnel_fuzz::targets::signed_identity(
        &claims,
        mcp_tunnel::govern::jwt::TenantSource::Claim("tenant".into()),
    )
    .expect("signed")
    .expect("verified");
    assert_eq!(&*identity.subject, "alice");
}

use detect::{check_fixtures, default_pack};

#[test]
fn every_default_rule_passes_its_fixtures() {
    let rules = default_pack().unwrap_or_else(|e| panic!("{e}"));
    assert!(rules.len() >= 12, "{} rules", rules.len());
    let mut failures = Vec::new();
    for rule in &rules {
        assert!(rule.fixtures.iter().any(|f| f.expect_match), "{}", rule.id);
        assert!(rule.fixtures.iter().any(|f| !f.expect_match), "{}", rule.id);
        failures.extend(check_fixtures(rule).into_iter().map(|f| f.to_string()));
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

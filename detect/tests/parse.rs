use detect::{default_pack, load_pack, parse_rules, PackError};

/// The first diagnostic as `line:column: message (hint: ...)`.
fn first_error(text: &str) -> String {
    match parse_rules(text) {
        Ok(_) => panic!("parsed:\n{text}"),
        Err(d) => d.first().map(|d| d.to_string()).unwrap_or_default(),
    }
}

const GOOD: &str = r#"rules:
  - id: r1
    title: t
    severity: low
    mitre: [T1059]
    match:
      kind: exec
      where:
        exe_name: bash
    fixtures:
      match: [{kind: exec, exe: /bin/bash}]
      no_match: [{kind: exec, exe: /bin/sh}]
"#;

#[test]
fn the_good_rule_parses() {
    let rules = parse_rules(GOOD).unwrap_or_else(|d| panic!("{}", d.render(GOOD, "t.yaml")));
    assert_eq!(rules.len(), 1);
    assert_eq!(rules[0].position.line, 2);
}

#[test]
fn misspelt_key_is_located_with_a_suggestion() {
    let text = GOOD.replace("    severity: low", "    severty: low");
    let errors = parse_rules(&text).err().unwrap_or_else(|| panic!("parsed"));
    // The rule (2:5) now lacks `severity`; the misspelt key (4:5) says why.
    assert_eq!(errors.0.len(), 2, "{errors}");
    assert_eq!(errors.0[0].to_string(), "2:5: a rule needs `severity`");
    let first = &errors.0[1];
    assert_eq!((first.position.line, first.position.column), (4, 5));
    assert_eq!(first.message, "unknown key `severty` in a rule");
    assert_eq!(first.hint.as_deref(), Some("did you mean `severity`?"));
    // Rendered as the compiler does.
    let rendered = errors.render(&text, "rules.yaml");
    assert!(
        rendered.contains("rules.yaml:4:5: error: unknown key `severty` in a rule\n  |\n4 |     severty: low\n  |     ^\n"),
        "{rendered}"
    );
}

#[test]
fn bad_values_are_located() {
    let cases: &[(&str, &str, &str)] = &[
        (
            "severity: low",
            "severity: hig",
            "4:15: severity `hig` is not one of low, medium, high, critical (hint: did you mean `high`?)",
        ),
        (
            "mitre: [T1059]",
            "mitre: [T1059, 1059.004]",
            "5:20: `1059.004` is not an ATT&CK technique id (hint: write T and four digits, with an optional sub-technique: T1059 or T1059.004)",
        ),
        (
            "exe_name: bash",
            "exe_nam: bash",
            "9:9: unknown key `exe_nam` in a condition (fields and any, all, not) (hint: did you mean `exe_name`?)",
        ),
        (
            "exe_name: bash",
            "mode: {glob: '*'}",
            "9:22: `glob` does not apply to `mode`, a number field (hint: `glob` applies to text fields)",
        ),
        (
            "exe_name: bash",
            "mode: {mask_any: 04000}",
            "9:26: a number `04000` has a leading 0: YAML reads it as decimal 4000 (hint: write 0o4000 for octal)",
        ),
        (
            "exe_name: bash",
            "argv: {regex: ['ok', 'a(b']}",
            "9:30: `a(b` is not a regular expression: error: unclosed group (hint: the syntax is the `regex` crate's (RE2-like, no look-around))",
        ),
        (
            "exe_name: bash",
            "remote_ip: {cidr: 10.0.0.0/33}",
            "9:27: `10.0.0.0/33` is not an address prefix (hint: e.g. 10.0.0.0/8 or fd00::/8)",
        ),
        (
            "exe_name: bash",
            "exe_name: {startswith: ba}",
            "9:20: unknown key `startswith` in a predicate (hint: a predicate takes: eq, in, glob, regex, prefix, suffix, contains, gt, lt, mask_any, mask_all, cidr, not)",
        ),
        (
            "kind: exec",
            "kind: exe",
            "7:13: kind `exe` is not one of exec, fork, exit, cred_change, connect, connect_failed, accept, close, listen, file_write, file_read, file_unlink, file_rename, file_chmod, dns, decision, heartbeat (hint: did you mean `exec`?)",
        ),
        (
            "no_match: [{kind: exec, exe: /bin/sh}]",
            "no_match: [{kind: exec, exe: /bin/sh, mdoe: 1}]",
            "12:45: unknown key `mdoe` in a fixture event (hint: did you mean `mode`?)",
        ),
    ];
    for (from, to, want) in cases {
        assert!(GOOD.contains(from), "{from}");
        let text = GOOD.replace(from, to);
        assert_eq!(&first_error(&text), want, "for {to}");
    }
}

#[test]
fn a_rule_has_exactly_one_logic_and_fixtures() {
    let both = GOOD.replace(
        "    fixtures:",
        "    absence: {kind: heartbeat, by: host, for: 1m}\n    fixtures:",
    );
    assert_eq!(
        first_error(&both),
        "10:5: a rule has exactly one of match, sequence, threshold, absence; this one also has `absence` (hint: split it into two rules)"
    );
    let none = GOOD.replace("    fixtures:", "    fixture:");
    assert!(
        first_error(&none).starts_with("2:5: a rule needs `fixtures`"),
        "{}",
        first_error(&none)
    );
}

#[test]
fn invalid_yaml_is_located() {
    let text = "rules:\n  - id: [unclosed\n";
    assert!(
        first_error(text).starts_with("3:1: not valid YAML"),
        "{}",
        first_error(text)
    );
}

const SEQ: &str = r#"rules:
  - id: s
    title: t
    severity: high
    mitre: [T1105]
    sequence:
      by: host
      within: 5m
      steps:
        - {kind: file_write, join: path}
        - {kind: exec, join: exe}
    fixtures:
      match:
        - [{kind: file_write, path: /tmp/a}, {kind: exec, exe: /tmp/a}]
      no_match:
        - [{kind: exec, exe: /tmp/a}]
"#;

#[test]
fn sequence_errors_are_located() {
    assert!(parse_rules(SEQ).is_ok());
    let cases: &[(&str, &str, &str)] = &[
        ("within: 5m", "within: 5 minutes", "8:15: within is not a time span (hint: write a number and a unit: 500ms, 30s, 5m, 1h or 2d)"),
        ("by: host", "by: hosts", "7:11: by `hosts` is not one of process, process_tree, host, user (hint: did you mean `host`?)"),
        ("{kind: exec, join: exe}", "{kind: exec}", "11:11: some steps have `join` and this one has not (hint: give every step a `join` field (they may differ, e.g. path then exe) or none)"),
        ("join: path}", "join: pth}", "10:36: unknown field `pth` (hint: did you mean `path`?)"),
        (
            "- [{kind: file_write, path: /tmp/a}, {kind: exec, exe: /tmp/a}]",
            "- {kind: file_write, path: /tmp/a}",
            "14:11: one event cannot fire a sequence, threshold or absence rule (hint: write the case as a list of events: `- [ {kind: ...}, {kind: ...} ]`)",
        ),
    ];
    for (from, to, want) in cases {
        assert!(SEQ.contains(from), "{from}");
        let text = SEQ.replace(from, to);
        assert_eq!(&first_error(&text), want, "for {to}");
    }
}

#[test]
fn every_error_is_reported_in_text_order() {
    let text = GOOD
        .replace("severity: low", "severity: lo")
        .replace("exe_name: bash", "exe_nme: bash");
    let errors = parse_rules(&text).err().unwrap_or_else(|| panic!("parsed"));
    let lines: Vec<usize> = errors.0.iter().map(|d| d.position.line).collect();
    assert_eq!(lines, [4, 9]);
}

#[test]
fn pack_ids_are_unique_across_files() {
    let err = load_pack([("a.yaml", GOOD), ("b.yaml", GOOD)]).err();
    assert!(
        matches!(&err, Some(PackError::DuplicateId { file, id, first, .. }) if file == "b.yaml" && id == "r1" && first == "a.yaml"),
        "{err:?}"
    );
    assert!(default_pack().is_ok());
}

use detect::{parse_rules, Config, Engine, Event, Kind, Rule, Snapshot};

const S: u64 = 1_000_000_000;
const T0: u64 = 1_700_000_000 * S;

fn rules(text: &str) -> Vec<Rule> {
    parse_rules(text).unwrap_or_else(|d| panic!("{}", d.render(text, "test.yaml")))
}

const SEQUENCE: &str = r#"
rules:
  - id: dl-exec
    title: download then exec
    severity: high
    mitre: [T1105]
    sequence:
      by: host
      within: 5m
      steps:
        - kind: file_write
          join: path
          where: {exe_name: curl}
        - kind: file_chmod
          join: path
          where: {mode: {mask_any: 0o111}}
        - kind: exec
          join: exe
    fixtures:
      match:
        - - {kind: file_write, exe: /usr/bin/curl, path: /tmp/a}
          - {kind: file_chmod, path: /tmp/a, mode: 0o755}
          - {kind: exec, exe: /tmp/a}
      no_match:
        - - {kind: exec, exe: /tmp/a}
"#;

fn write(id: u64, t: u64, host: &str, path: &str) -> Event {
    let mut e = Event::new(Kind::FileWrite, "org1", host, T0 + t);
    e.id = id;
    e.exe = "/usr/bin/curl".into();
    e.path = path.into();
    e
}

fn chmod(id: u64, t: u64, host: &str, path: &str) -> Event {
    let mut e = Event::new(Kind::FileChmod, "org1", host, T0 + t);
    e.id = id;
    e.exe = "/usr/bin/chmod".into();
    e.path = path.into();
    e.mode = Some(0o755);
    e
}

fn exec(id: u64, t: u64, host: &str, exe: &str) -> Event {
    let mut e = Event::new(Kind::Exec, "org1", host, T0 + t);
    e.id = id;
    e.exe = exe.into();
    e
}

fn feed(engine: &mut Engine, events: &[Event]) -> Vec<detect::Alert> {
    events.iter().flat_map(|e| engine.process(e)).collect()
}

#[test]
fn sequence_in_order_fires_once_with_its_events() {
    let mut engine = Engine::new(rules(SEQUENCE));
    let alerts = feed(
        &mut engine,
        &[
            write(1, 0, "pc1", "/tmp/a"),
            chmod(2, S, "pc1", "/tmp/a"),
            exec(3, 2 * S, "pc1", "/tmp/a"),
            exec(4, 3 * S, "pc1", "/tmp/a"),
        ],
    );
    assert_eq!(alerts.len(), 1, "{alerts:#?}");
    let a = &alerts[0];
    assert_eq!(a.rule_id, "dl-exec");
    assert_eq!(a.host, "pc1");
    assert_eq!(a.org, "org1");
    assert_eq!(a.first_ns, T0);
    assert_eq!(a.last_ns, T0 + 2 * S);
    assert_eq!(a.events.iter().map(|r| r.id).collect::<Vec<_>>(), [1, 2, 3]);
    assert_eq!(a.mitre, ["T1105"]);
}

#[test]
fn sequence_out_of_order_arrival_is_judged_by_event_time() {
    // Arrival order: exec, chmod, write; event order: write, chmod, exec.
    let mut engine = Engine::new(rules(SEQUENCE));
    let alerts = feed(
        &mut engine,
        &[
            exec(3, 20 * S, "pc1", "/tmp/a"),
            chmod(2, 10 * S, "pc1", "/tmp/a"),
            write(1, 0, "pc1", "/tmp/a"),
        ],
    );
    assert_eq!(alerts.len(), 1);
    assert_eq!(alerts[0].first_ns, T0);
    // Event times in the wrong order never fire, whatever the arrival order.
    let mut engine = Engine::new(rules(SEQUENCE));
    let alerts = feed(
        &mut engine,
        &[
            write(1, 20 * S, "pc1", "/tmp/a"),
            chmod(2, 10 * S, "pc1", "/tmp/a"),
            exec(3, 30 * S, "pc1", "/tmp/a"),
        ],
    );
    assert!(alerts.is_empty(), "{alerts:#?}");
}

#[test]
fn late_events_count_within_the_lateness_and_not_beyond() {
    let config = Config {
        lateness_ns: 30 * S,
        ..Config::default()
    };
    // Another host's events move the clock on by 20 s; the write, 20 s
    // late, still completes the sequence.
    let mut engine = Engine::with_config(rules(SEQUENCE), config.clone());
    let mut events = vec![
        chmod(2, S, "pc1", "/tmp/a"),
        exec(3, 2 * S, "pc1", "/tmp/a"),
        exec(9, 22 * S, "pc2", "/usr/bin/ls"),
    ];
    events.push(write(1, 0, "pc1", "/tmp/a"));
    assert_eq!(feed(&mut engine, &events).len(), 1);
    assert_eq!(engine.stats().too_late, 0);

    // 100 s late: beyond the lateness, the write does not count.
    let mut engine = Engine::with_config(rules(SEQUENCE), config);
    let mut events = vec![
        chmod(2, S, "pc1", "/tmp/a"),
        exec(3, 2 * S, "pc1", "/tmp/a"),
        exec(9, 102 * S, "pc2", "/usr/bin/ls"),
    ];
    events.push(write(1, 0, "pc1", "/tmp/a"));
    assert!(feed(&mut engine, &events).is_empty());
    assert_eq!(engine.stats().too_late, 1);
}

#[test]
fn sequences_do_not_cross_hosts_or_organisations() {
    let mut engine = Engine::new(rules(SEQUENCE));
    let mut other_org = chmod(2, S, "pc1", "/tmp/a");
    other_org.org = "org2".into();
    let alerts = feed(
        &mut engine,
        &[
            write(1, 0, "pc1", "/tmp/a"),
            other_org,
            chmod(3, S, "pc2", "/tmp/a"),
            exec(4, 2 * S, "pc1", "/tmp/a"),
        ],
    );
    assert!(alerts.is_empty(), "{alerts:#?}");
}

#[test]
fn redelivered_events_are_not_counted_twice() {
    let mut engine = Engine::new(rules(SEQUENCE));
    let w = write(1, 0, "pc1", "/tmp/a");
    feed(&mut engine, &[w.clone(), w]);
    assert_eq!(engine.stats().duplicates, 1);
}

#[test]
fn expired_sequences_are_dropped_by_advance_to() {
    let mut engine = Engine::new(rules(SEQUENCE));
    feed(&mut engine, &[write(1, 0, "pc1", "/tmp/a")]);
    assert_eq!(engine.open_state(), 1);
    // 5 min window + 60 s lateness.
    assert!(engine.advance_to(T0 + 359 * S).is_empty());
    assert_eq!(engine.open_state(), 1);
    engine.advance_to(T0 + 361 * S);
    assert_eq!(engine.open_state(), 0);
    assert_eq!(engine.stats().expired, 1);
}

#[test]
fn snapshot_and_restore_mid_sequence() {
    let mut engine = Engine::new(rules(SEQUENCE));
    feed(
        &mut engine,
        &[write(1, 0, "pc1", "/tmp/a"), chmod(2, S, "pc1", "/tmp/a")],
    );
    let text = serde_json::to_string(&engine.snapshot()).unwrap_or_else(|e| panic!("{e}"));
    drop(engine);

    let mut restarted = Engine::new(rules(SEQUENCE));
    let snapshot: Snapshot = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}"));
    let report = restarted
        .restore(snapshot)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(report.rules, 1);
    assert!(report.dropped.is_empty());
    assert_eq!(restarted.stats().events, 2);
    let alerts = feed(&mut restarted, &[exec(3, 2 * S, "pc1", "/tmp/a")]);
    assert_eq!(alerts.len(), 1);
    assert_eq!(
        alerts[0].events.iter().map(|r| r.id).collect::<Vec<_>>(),
        [1, 2, 3]
    );
}

#[test]
fn restore_drops_state_of_rules_that_changed_shape() {
    let mut engine = Engine::new(rules(SEQUENCE));
    feed(&mut engine, &[write(1, 0, "pc1", "/tmp/a")]);
    let snapshot = engine.snapshot();
    let changed = SEQUENCE.replace("by: host", "by: user");
    let mut restarted = Engine::new(rules(&changed));
    let report = restarted
        .restore(snapshot)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(report.rules, 0);
    assert_eq!(report.dropped, ["dl-exec"]);
    assert_eq!(restarted.open_state(), 0);
}

#[test]
fn open_state_is_bounded_and_evicts_the_oldest() {
    let config = Config {
        max_open: 2,
        ..Config::default()
    };
    let mut engine = Engine::with_config(rules(SEQUENCE), config);
    feed(
        &mut engine,
        &[
            write(1, 0, "pc1", "/tmp/a"),
            write(2, S, "pc2", "/tmp/a"),
            write(3, 2 * S, "pc3", "/tmp/a"),
        ],
    );
    assert_eq!(engine.open_state(), 2);
    assert_eq!(engine.stats().evicted_open, 1);
    // pc1's sequence was evicted; pc3's still completes.
    let alerts = feed(
        &mut engine,
        &[
            chmod(4, 3 * S, "pc1", "/tmp/a"),
            exec(5, 4 * S, "pc1", "/tmp/a"),
            chmod(6, 3 * S, "pc3", "/tmp/a"),
            exec(7, 4 * S, "pc3", "/tmp/a"),
        ],
    );
    assert_eq!(alerts.len(), 1);
    assert_eq!(alerts[0].host, "pc3");
    assert!(engine.open_state() <= 2);
}

#[test]
fn per_rule_max_open_overrides_the_default_and_events_per_step_are_capped() {
    let text = SEQUENCE.replace("    sequence:", "    max_open: 1\n    sequence:");
    let config = Config {
        max_events: 3,
        ..Config::default()
    };
    let mut engine = Engine::with_config(rules(&text), config);
    feed(
        &mut engine,
        &[write(1, 0, "pc1", "/tmp/a"), write(2, 0, "pc2", "/tmp/a")],
    );
    assert_eq!(engine.open_state(), 1);
    for i in 0..10 {
        engine.process(&write(10 + i, i * S, "pc2", "/tmp/a"));
    }
    assert_eq!(engine.stats().evicted_events, 8);
}

const THRESHOLD: &str = r#"
rules:
  - id: scan
    title: scan
    severity: medium
    mitre: [T1046]
    threshold:
      kind: [connect_failed, decision]
      where:
        any:
          - kind: connect_failed
          - verdict: denied
      by: host
      count: 3
      distinct: [remote_ip, remote_port]
      within: 60s
    fixtures:
      match:
        - - {kind: connect_failed, remote_ip: 10.0.0.1, remote_port: 1}
          - {kind: connect_failed, remote_ip: 10.0.0.2, remote_port: 1}
          - {kind: connect_failed, remote_ip: 10.0.0.3, remote_port: 1}
      no_match:
        - - {kind: connect_failed, remote_ip: 10.0.0.1, remote_port: 1}
"#;

fn denied(id: u64, t: u64, ip: &str, port: u16) -> Event {
    let mut e = Event::new(Kind::Decision, "org1", "pc1", T0 + t);
    e.id = id;
    e.verdict = "denied".into();
    e.remote_ip = ip.parse().ok();
    e.remote_port = Some(port);
    e
}

#[test]
fn threshold_counts_distinct_values() {
    let mut engine = Engine::new(rules(THRESHOLD));
    let alerts = feed(
        &mut engine,
        &[
            denied(1, 0, "10.0.0.1", 22),
            denied(2, S, "10.0.0.1", 22),
            denied(3, 2 * S, "10.0.0.1", 22),
            denied(4, 3 * S, "10.0.0.1", 23),
        ],
    );
    assert!(alerts.is_empty());
    let alerts = feed(&mut engine, &[denied(5, 4 * S, "10.0.0.2", 22)]);
    assert_eq!(alerts.len(), 1);
    assert_eq!(alerts[0].entity, "org1/pc1");
    assert_eq!(alerts[0].events.len(), 5);
    // The window was consumed: the next alert needs three new ones.
    assert!(feed(&mut engine, &[denied(6, 5 * S, "10.0.0.3", 22)]).is_empty());
    assert_eq!(
        feed(
            &mut engine,
            &[
                denied(7, 6 * S, "10.0.0.4", 22),
                denied(8, 7 * S, "10.0.0.5", 22)
            ]
        )
        .len(),
        1
    );
}

#[test]
fn threshold_window_slides_and_expires() {
    let mut engine = Engine::new(rules(THRESHOLD));
    // Three distinct, but the first is 61 s before the third.
    let alerts = feed(
        &mut engine,
        &[
            denied(1, 0, "10.0.0.1", 22),
            denied(2, 30 * S, "10.0.0.2", 22),
            denied(3, 61 * S, "10.0.0.3", 22),
        ],
    );
    assert!(alerts.is_empty());
    // A late event at 45 s makes 0 s, 30 s, 45 s one window of 60 s.
    let alerts = feed(&mut engine, &[denied(4, 45 * S, "10.0.0.4", 22)]);
    assert_eq!(alerts.len(), 1);
    assert_eq!(alerts[0].first_ns, T0);
    assert_eq!(alerts[0].last_ns, T0 + 45 * S);
    assert_eq!(
        alerts[0].events.iter().map(|r| r.id).collect::<Vec<_>>(),
        [1, 2, 4]
    );
    // What is left expires once no late event could complete it.
    assert_eq!(engine.open_state(), 1);
    engine.advance_to(T0 + 200 * S);
    assert_eq!(engine.open_state(), 0);
}

const ABSENCE: &str = r#"
rules:
  - id: silent
    title: silent
    severity: high
    mitre: [T1562.001]
    absence:
      kind: heartbeat
      by: host
      for: 2m
    fixtures:
      match:
        - - {kind: heartbeat}
          - advance: 3m
      no_match:
        - - {kind: heartbeat}
"#;

fn heartbeat(t: u64, host: &str) -> Event {
    Event::new(Kind::Heartbeat, "org1", host, T0 + t)
}

#[test]
fn absence_fires_once_per_silence() {
    let mut engine = Engine::new(rules(ABSENCE));
    feed(&mut engine, &[heartbeat(0, "pc1"), heartbeat(0, "pc2")]);
    assert!(engine.advance_to(T0 + 60 * S).is_empty());
    feed(&mut engine, &[heartbeat(90 * S, "pc2")]);
    let alerts = engine.advance_to(T0 + 121 * S);
    assert_eq!(alerts.len(), 1);
    assert_eq!(alerts[0].host, "pc1");
    assert_eq!(alerts[0].last_ns, T0);
    // Not again while it stays silent.
    assert!(engine
        .advance_to(T0 + 200 * S)
        .iter()
        .all(|a| a.host != "pc1"));
    // Back, then silent again: a new alert.
    feed(&mut engine, &[heartbeat(300 * S, "pc1")]);
    let alerts = engine.advance_to(T0 + 500 * S);
    assert!(alerts.iter().any(|a| a.host == "pc1"));
}

#[test]
fn absence_after_a_restore_waits_a_full_span() {
    let mut engine = Engine::new(rules(ABSENCE));
    feed(&mut engine, &[heartbeat(0, "pc1")]);
    let snapshot = engine.snapshot();
    let mut restarted = Engine::new(rules(ABSENCE));
    restarted
        .restore(snapshot)
        .unwrap_or_else(|e| panic!("{e}"));
    // The collector was down ten minutes; the agent could not report.
    assert!(restarted.advance_to(T0 + 600 * S).is_empty());
    feed(&mut restarted, &[heartbeat(610 * S, "pc1")]);
    assert!(restarted.advance_to(T0 + 700 * S).is_empty());
    assert_eq!(restarted.advance_to(T0 + 800 * S).len(), 1);
}

#[test]
fn a_clock_far_ahead_does_not_make_everyone_late() {
    let mut engine = Engine::new(rules(SEQUENCE));
    feed(&mut engine, &[write(1, 0, "pc1", "/tmp/a")]);
    feed(&mut engine, &[exec(9, 86_400 * S, "pc9", "/usr/bin/ls")]);
    assert_eq!(engine.stats().future_skew, 1);
    let alerts = feed(
        &mut engine,
        &[
            chmod(2, S, "pc1", "/tmp/a"),
            exec(3, 2 * S, "pc1", "/tmp/a"),
        ],
    );
    assert_eq!(alerts.len(), 1);
}

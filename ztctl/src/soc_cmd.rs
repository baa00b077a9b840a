//! The SOC analysts' commands: `incidents` (list, show, ack, resolve),
//! `events search`, `fleet list` and `kpi`, on the collector's query API
//! (`zt.query.v1.Query`, docs/cli.md).
//!
//! With `--json` they print the API's messages as the collector's
//! HTTP/JSON endpoints serve them (a list command prints the array of its
//! items, every page with `--all`); otherwise tables and text.

use anyhow::bail;
use clap::{Args, Subcommand};
use proto::query::{
    query_client::QueryClient, GetIncidentRequest, KpiRequest, ListFleetRequest,
    ListIncidentsRequest, SearchEventsRequest, UpdateIncidentRequest,
};
use serde::Serialize;
use tonic::transport::Channel;

use crate::{
    refused, soc_render,
    when::{parse_time, UtcTime},
};

pub const STATUSES: [&str; 3] = ["open", "acknowledged", "resolved"];
pub const SEVERITIES: [&str; 4] = ["low", "medium", "high", "critical"];
pub const KINDS: [&str; 5] = ["process", "network", "file", "dns", "decision"];

/// The top-level commands, flattened into `ztctl`'s.
#[derive(Debug, Subcommand)]
pub enum SocCommand {
    /// Incidents: list, show, ack, resolve (analyst, admin, soc).
    #[command(subcommand)]
    Incidents(IncidentsCommand),
    /// Events stored by the collector: search.
    #[command(subcommand)]
    Events(EventsCommand),
    /// The agents: state, versions, heartbeats, sensors, drops.
    #[command(subcommand)]
    Fleet(FleetCommand),
    /// The zero-incident KPI of the fiscal year (April to March).
    Kpi {
        /// The organisation [default: every organisation you may read]
        #[arg(long, default_value = "", hide_default_value = true)]
        org: String,
        /// Print JSON only (the API's messages).
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum IncidentsCommand {
    /// Incidents, newest first (by first seen).
    List {
        /// open, acknowledged or resolved [default: any]
        #[arg(long, value_parser = parse_status)]
        status: Option<String>,
        /// low, medium, high or critical [default: any]
        #[arg(long, value_parser = parse_severity)]
        severity: Option<String>,
        /// A detection rule's id.
        #[arg(long, value_name = "ID", default_value = "", hide_default_value = true)]
        rule: String,
        /// The host name.
        #[arg(long, default_value = "", hide_default_value = true)]
        host: String,
        /// The organisation [default: every organisation you may read]
        #[arg(long, default_value = "", hide_default_value = true)]
        org: String,
        #[command(flatten)]
        window: Window,
        #[command(flatten)]
        page: Page,
        /// Print JSON only (the API's messages).
        #[arg(long)]
        json: bool,
    },
    /// One incident: its header, process tree, events, network timeline
    /// and history.
    Show {
        /// The incident's id.
        id: String,
        /// Print JSON only (the API's messages).
        #[arg(long)]
        json: bool,
    },
    /// Acknowledges an open incident (someone is on it).
    #[command(alias = "acknowledge")]
    Ack {
        /// The incident's id.
        id: String,
        /// Why, for the incident's history.
        #[arg(long, default_value = "", hide_default_value = true)]
        note: String,
        /// Print JSON only (the API's messages).
        #[arg(long)]
        json: bool,
    },
    /// Resolves an incident, saying why.
    Resolve {
        /// The incident's id.
        id: String,
        /// Why it is resolved (required).
        #[arg(long, required = true)]
        note: String,
        /// Print JSON only (the API's messages).
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum EventsCommand {
    /// Events, newest first; without --since, the last 24 hours.
    Search {
        /// The host name.
        #[arg(long, default_value = "", hide_default_value = true)]
        host: String,
        /// process, network, file, dns or decision; repeat or separate
        /// with commas [default: all]
        #[arg(long = "kind", value_name = "KIND", value_parser = parse_kind, value_delimiter = ',')]
        kinds: Vec<String>,
        /// Case-insensitive substring of the command line or of the path.
        #[arg(long, default_value = "", hide_default_value = true)]
        text: String,
        /// The process id.
        #[arg(long)]
        pid: Option<u32>,
        /// The user name.
        #[arg(long, default_value = "", hide_default_value = true)]
        user: String,
        /// The organisation [default: every organisation you may read]
        #[arg(long, default_value = "", hide_default_value = true)]
        org: String,
        #[command(flatten)]
        window: Window,
        #[command(flatten)]
        page: Page,
        /// Print JSON only (the API's messages).
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum FleetCommand {
    /// Every agent of the organisations you may read.
    List {
        /// The organisation [default: every organisation you may read]
        #[arg(long, default_value = "", hide_default_value = true)]
        org: String,
        /// Print JSON only (the API's messages).
        #[arg(long)]
        json: bool,
    },
}

/// `--since` and `--until`.
#[derive(Debug, Args)]
pub struct Window {
    /// From: an RFC 3339 time (2026-04-01T09:00:00Z, 2026-04-01) or a
    /// duration back from now (90s, 30m, 2h, 7d).
    #[arg(long, value_name = "TIME", value_parser = parse_time)]
    since: Option<UtcTime>,
    /// Until: as --since [default: now].
    #[arg(long, value_name = "TIME", value_parser = parse_time)]
    until: Option<UtcTime>,
}

impl Window {
    /// RFC 3339 UTC strings for the request (empty: unbounded).
    fn rfc3339(&self) -> anyhow::Result<(String, String)> {
        if let (Some(since), Some(until)) = (self.since, self.until) {
            if since > until {
                bail!("--since {since} is after --until {until}");
            }
        }
        let text = |t: Option<UtcTime>| t.map(|t| t.to_string()).unwrap_or_default();
        Ok((text(self.since), text(self.until)))
    }
}

/// `--limit`, `--all`, `--page-token`.
#[derive(Debug, Args)]
pub struct Page {
    /// Page size, 1..=1000 [default: the collector's, 100].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=1000))]
    limit: Option<u32>,
    /// Every page, following the page tokens to the end.
    #[arg(long)]
    all: bool,
    /// Start at this page (the token a previous page gave).
    #[arg(
        long,
        value_name = "TOKEN",
        default_value = "",
        hide_default_value = true
    )]
    page_token: String,
}

fn one_of(what: &str, valid: &[&str], text: &str) -> Result<String, String> {
    let value = text.trim().to_ascii_lowercase();
    if valid.contains(&value.as_str()) {
        Ok(value)
    } else {
        Err(format!(
            "unknown {what} {text:?}: one of {}",
            valid.join(", ")
        ))
    }
}

/// `--status`: `open`, `acknowledged` or `resolved`.
pub fn parse_status(text: &str) -> Result<String, String> {
    one_of("status", &STATUSES, text)
}

/// `--severity`: `low`, `medium`, `high` or `critical`.
pub fn parse_severity(text: &str) -> Result<String, String> {
    one_of("severity", &SEVERITIES, text)
}

/// `--kind`: `process`, `network`, `file`, `dns` or `decision`.
pub fn parse_kind(text: &str) -> Result<String, String> {
    one_of("event kind", &KINDS, text)
}

fn print_json<T: Serialize + ?Sized>(value: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// Follows the page tokens: `fetch(token)` gives a page's items and the
/// next token. One page unless `all`.
async fn pages<T, F, Fut>(
    first_token: String,
    all: bool,
    mut fetch: F,
) -> anyhow::Result<(Vec<T>, String)>
where
    F: FnMut(String) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<(Vec<T>, String)>>,
{
    let mut items = Vec::new();
    let mut token = first_token;
    loop {
        let (page, next) = fetch(token.clone()).await?;
        items.extend(page);
        if !all || next.is_empty() {
            return Ok((items, next));
        }
        if next == token {
            bail!("the collector gave the same page token twice ({next}); stopping");
        }
        token = next;
    }
}

fn more_on_stderr(json: bool, next: &str) {
    if json && !next.is_empty() {
        eprintln!("ztctl: more on the next page: --page-token {next} (or --all)");
    }
}

/// Runs a SOC command; `collector` connects to the collector.
pub async fn run<F, Fut>(command: SocCommand, collector: F) -> anyhow::Result<()>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<QueryClient<Channel>>>,
{
    match command {
        SocCommand::Incidents(IncidentsCommand::List {
            status,
            severity,
            rule,
            host,
            org,
            window,
            page,
            json,
        }) => {
            let (since, until) = window.rfc3339()?;
            let request = ListIncidentsRequest {
                org_id: org,
                status: status.unwrap_or_default(),
                severity: severity.unwrap_or_default(),
                rule_id: rule,
                host,
                since,
                until,
                page_size: page.limit.unwrap_or(0),
                page_token: String::new(),
            };
            let client = collector().await?;
            let (incidents, next) = pages(page.page_token, page.all, |page_token| {
                let request = ListIncidentsRequest {
                    page_token,
                    ..request.clone()
                };
                let mut client = client.clone();
                async move {
                    let list = client
                        .list_incidents(request)
                        .await
                        .map_err(refused("cannot list incidents"))?
                        .into_inner();
                    Ok((list.incidents, list.next_page_token))
                }
            })
            .await?;
            if json {
                print_json(&incidents)?;
                more_on_stderr(json, &next);
            } else {
                print!("{}", soc_render::incident_list(&incidents, &next));
            }
        }
        SocCommand::Incidents(IncidentsCommand::Show { id, json }) => {
            let id = incident_id(id)?;
            let detail = collector()
                .await?
                .get_incident(GetIncidentRequest { id: id.clone() })
                .await
                .map_err(refused(&format!("cannot show incident {id}")))?
                .into_inner();
            if json {
                print_json(&detail)?;
            } else {
                print!("{}", soc_render::incident_detail(&detail));
            }
        }
        SocCommand::Incidents(IncidentsCommand::Ack { id, note, json }) => {
            update(collector, id, "acknowledge", note, json).await?;
        }
        SocCommand::Incidents(IncidentsCommand::Resolve { id, note, json }) => {
            if note.trim().is_empty() {
                bail!("resolving needs a --note saying why (what was found, what was done)");
            }
            update(collector, id, "resolve", note, json).await?;
        }
        SocCommand::Events(EventsCommand::Search {
            host,
            kinds,
            text,
            pid,
            user,
            org,
            window,
            page,
            json,
        }) => {
            let (since, until) = window.rfc3339()?;
            let request = SearchEventsRequest {
                org_id: org,
                host,
                kinds,
                since,
                until,
                text,
                pid: pid.unwrap_or(0),
                user,
                page_size: page.limit.unwrap_or(0),
                page_token: String::new(),
            };
            let client = collector().await?;
            let (events, next) = pages(page.page_token, page.all, |page_token| {
                let request = SearchEventsRequest {
                    page_token,
                    ..request.clone()
                };
                let mut client = client.clone();
                async move {
                    let list = client
                        .search_events(request)
                        .await
                        .map_err(refused("cannot search events"))?
                        .into_inner();
                    Ok((list.events, list.next_page_token))
                }
            })
            .await?;
            if json {
                print_json(&events)?;
                more_on_stderr(json, &next);
            } else {
                print!("{}", soc_render::event_list(&events, &next));
            }
        }
        SocCommand::Fleet(FleetCommand::List { org, json }) => {
            let agents = collector()
                .await?
                .list_fleet(ListFleetRequest { org_id: org })
                .await
                .map_err(refused("cannot list the fleet"))?
                .into_inner()
                .agents;
            if json {
                print_json(&agents)?;
            } else {
                print!("{}", soc_render::fleet(&agents));
            }
        }
        SocCommand::Kpi { org, json } => {
            let kpi = collector()
                .await?
                .get_kpi(KpiRequest { org_id: org })
                .await
                .map_err(refused("cannot read the KPI"))?
                .into_inner();
            if json {
                print_json(&kpi)?;
            } else {
                print!("{}", soc_render::kpi(&kpi));
            }
        }
    }
    Ok(())
}

fn incident_id(id: String) -> anyhow::Result<String> {
    let id = id.trim().to_owned();
    if id.is_empty() {
        bail!("an incident id is needed (see `ztctl incidents list`)");
    }
    Ok(id)
}

/// `ack` / `resolve`: UpdateIncident, then the updated incident.
async fn update<F, Fut>(
    collector: F,
    id: String,
    action: &str,
    note: String,
    json: bool,
) -> anyhow::Result<()>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<QueryClient<Channel>>>,
{
    let id = incident_id(id)?;
    let incident = collector()
        .await?
        .update_incident(UpdateIncidentRequest {
            id: id.clone(),
            action: action.to_owned(),
            note,
        })
        .await
        .map_err(refused(&format!("cannot {action} incident {id}")))?
        .into_inner();
    if json {
        print_json(&incident)?;
    } else {
        println!("{}", soc_render::updated(&incident));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use clap::Parser;
    use proto::query::{Agent, Event, Incident, IncidentChange, IncidentDetail, Kpi, ProcessNode};
    use serde_json::Value;

    use super::*;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(subcommand)]
        command: SocCommand,
    }

    fn parse(args: &[&str]) -> Result<SocCommand, String> {
        Cli::try_parse_from(std::iter::once("ztctl").chain(args.iter().copied()))
            .map(|cli| cli.command)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn statuses_severities_and_kinds_are_checked() {
        assert_eq!(parse_status("open").unwrap(), "open");
        assert_eq!(parse_status(" Acknowledged ").unwrap(), "acknowledged");
        assert_eq!(parse_status("resolved").unwrap(), "resolved");
        let err = parse_status("closed").unwrap_err();
        assert_eq!(
            err,
            "unknown status \"closed\": one of open, acknowledged, resolved"
        );
        assert_eq!(parse_severity("CRITICAL").unwrap(), "critical");
        for s in SEVERITIES {
            assert_eq!(parse_severity(s).unwrap(), s);
        }
        let err = parse_severity("urgent").unwrap_err();
        assert!(err.contains("low, medium, high, critical"), "{err}");
        for k in KINDS {
            assert_eq!(parse_kind(k).unwrap(), k);
        }
        let err = parse_kind("registry").unwrap_err();
        assert!(
            err.contains("\"registry\"") && err.contains("process, network, file, dns, decision"),
            "{err}"
        );
        assert!(parse_kind("").is_err());
    }

    #[test]
    fn the_command_line_refuses_bad_values_before_calling_anyone() {
        let err = parse(&["incidents", "list", "--status", "closed"]).unwrap_err();
        assert!(err.contains("open, acknowledged, resolved"), "{err}");
        let err = parse(&["incidents", "list", "--severity", "sev1"]).unwrap_err();
        assert!(err.contains("low, medium, high, critical"), "{err}");
        let err = parse(&["events", "search", "--kind", "process,registry"]).unwrap_err();
        assert!(err.contains("dns, decision"), "{err}");
        let err = parse(&["incidents", "list", "--since", "last tuesday"]).unwrap_err();
        assert!(err.contains("RFC 3339"), "{err}");
        assert!(parse(&["incidents", "list", "--limit", "0"]).is_err());
        assert!(parse(&["incidents", "list", "--limit", "1001"]).is_err());
        // resolve needs --note.
        let err = parse(&["incidents", "resolve", "inc-1"]).unwrap_err();
        assert!(err.contains("--note"), "{err}");
    }

    #[test]
    fn flags_become_the_request() {
        let Ok(SocCommand::Incidents(IncidentsCommand::List {
            status,
            severity,
            rule,
            window,
            page,
            json,
            ..
        })) = parse(&[
            "incidents",
            "list",
            "--status",
            "open",
            "--severity",
            "high",
            "--rule",
            "reverse-shell",
            "--since",
            "2026-04-01T09:00:00+09:00",
            "--until",
            "2026-04-02",
            "--limit",
            "50",
            "--all",
            "--json",
        ])
        else {
            panic!("does not parse");
        };
        assert_eq!(status.as_deref(), Some("open"));
        assert_eq!(severity.as_deref(), Some("high"));
        assert_eq!(rule, "reverse-shell");
        assert_eq!(
            window.rfc3339().unwrap(),
            (
                "2026-04-01T00:00:00Z".to_owned(),
                "2026-04-02T00:00:00Z".to_owned()
            )
        );
        assert_eq!(page.limit, Some(50));
        assert!(page.all && json);

        let Ok(SocCommand::Events(EventsCommand::Search {
            kinds, pid, window, ..
        })) = parse(&[
            "events", "search", "--kind", "process", "--kind", "file,dns", "--pid", "42",
            "--since", "2h",
        ])
        else {
            panic!("does not parse");
        };
        assert_eq!(kinds, ["process", "file", "dns"]);
        assert_eq!(pid, Some(42));
        let (since, until) = window.rfc3339().unwrap();
        assert!(since.ends_with('Z') && until.is_empty(), "{since}");

        let Ok(SocCommand::Events(EventsCommand::Search { window, .. })) = parse(&[
            "events",
            "search",
            "--since",
            "2026-04-02",
            "--until",
            "2026-04-01",
        ]) else {
            panic!("does not parse");
        };
        let err = window.rfc3339().unwrap_err().to_string();
        assert!(err.contains("is after --until"), "{err}");

        assert!(matches!(
            parse(&["incidents", "acknowledge", "inc-1"]),
            Ok(SocCommand::Incidents(IncidentsCommand::Ack { .. }))
        ));
        assert!(matches!(
            parse(&["kpi", "--org", "city-a", "--json"]),
            Ok(SocCommand::Kpi { json: true, .. })
        ));
    }

    #[tokio::test]
    async fn all_follows_the_page_tokens_to_the_end() {
        let mut asked = Vec::new();
        let (items, next) = pages(String::new(), true, |token| {
            asked.push(token.clone());
            async move {
                Ok(match token.as_str() {
                    "" => (vec![1, 2], "b".to_owned()),
                    "b" => (vec![3], "c".to_owned()),
                    _ => (vec![4], String::new()),
                })
            }
        })
        .await
        .unwrap();
        assert_eq!(items, [1, 2, 3, 4]);
        assert_eq!(next, "");
        assert_eq!(asked, ["", "b", "c"]);
        // One page without --all, with the token of the next.
        let (items, next) = pages("b".to_owned(), false, |_| async {
            Ok((vec![3], "c".to_owned()))
        })
        .await
        .unwrap();
        assert_eq!((items, next.as_str()), (vec![3], "c"));
        // A server that loops is not followed forever.
        let err = pages(String::new(), true, |_| async {
            Ok((vec![0], "same".to_owned()))
        })
        .await
        .unwrap_err();
        assert!(err.to_string().contains("same page token"), "{err}");
    }

    /// The JSON keys of a serialised message.
    fn keys(value: &Value) -> BTreeSet<String> {
        value
            .as_object()
            .expect("a JSON object")
            .keys()
            .cloned()
            .collect()
    }

    pub fn sample_incident() -> Incident {
        Incident {
            id: "inc-7f3a".into(),
            title: "Reverse shell".into(),
            rule_id: "reverse-shell".into(),
            severity: "high".into(),
            mitre: vec!["T1059.004".into()],
            host: "web-1".into(),
            status: "open".into(),
            first_seen: "2026-04-10T09:15:02.123456789Z".into(),
            last_seen: "2026-04-10T09:15:02.123456789Z".into(),
            count: 3,
            ..Default::default()
        }
    }

    const INCIDENT_KEYS: [&str; 22] = [
        "id",
        "title",
        "rule_id",
        "severity",
        "mitre",
        "host",
        "status",
        "first_seen",
        "last_seen",
        "count",
        "org_id",
        "device_id",
        "rule_severity",
        "escalation",
        "process_tree_root",
        "spread_hosts",
        "acknowledged_by",
        "acknowledged_at",
        "resolved_by",
        "resolved_at",
        "note",
        "description",
    ];

    #[test]
    fn the_incident_json_has_exactly_the_documented_keys_and_types() {
        let v = serde_json::to_value(sample_incident()).unwrap();
        assert_eq!(
            keys(&v),
            INCIDENT_KEYS.iter().map(|k| k.to_string()).collect()
        );
        assert_eq!(v["mitre"], serde_json::json!(["T1059.004"]));
        assert!(v["count"].is_u64() && v["count"] == 3);
        assert!(v["spread_hosts"].is_array());
        for k in INCIDENT_KEYS {
            if !["mitre", "count", "spread_hosts"].contains(&k) {
                assert!(v[k].is_string(), "{k}: {}", v[k]);
            }
        }
        assert_eq!(v["severity"], "high");
        assert_eq!(v["first_seen"], "2026-04-10T09:15:02.123456789Z");
        // --json of a list is the array of these, and it reads back.
        let list = serde_json::to_string(&vec![sample_incident()]).unwrap();
        let back: Vec<Incident> = serde_json::from_str(&list).unwrap();
        assert_eq!(back, [sample_incident()]);
    }

    /// Every message's fields are in its table of docs/cli.md, and the
    /// tables name no other field: the documentation is the wire.
    #[test]
    fn docs_cli_md_documents_every_json_field() {
        let docs = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/cli.md"))
            .expect("docs/cli.md");
        let messages: [(&str, Value); 7] = [
            ("Incident", serde_json::to_value(sample_incident()).unwrap()),
            (
                "IncidentDetail",
                serde_json::to_value(IncidentDetail::default()).unwrap(),
            ),
            (
                "ProcessNode",
                serde_json::to_value(ProcessNode::default()).unwrap(),
            ),
            (
                "IncidentChange",
                serde_json::to_value(IncidentChange::default()).unwrap(),
            ),
            ("Event", serde_json::to_value(Event::default()).unwrap()),
            ("Agent", serde_json::to_value(Agent::default()).unwrap()),
            ("Kpi", serde_json::to_value(Kpi::default()).unwrap()),
        ];
        for (name, value) in messages {
            let documented = documented_fields(&docs, name);
            assert_eq!(
                documented,
                keys(&value),
                "the table of {name} in docs/cli.md"
            );
        }
    }

    /// The first column (`` `name` ``) of the table after the heading
    /// `### <name>` (a heading's first word).
    fn documented_fields(docs: &str, message: &str) -> BTreeSet<String> {
        let mut lines = docs.lines().skip_while(|l| {
            !(l.starts_with("### ")
                && l[4..].trim_matches('`').split([' ', '`']).next() == Some(message))
        });
        assert!(lines.next().is_some(), "no `### {message}` in docs/cli.md");
        lines
            .skip_while(|l| !l.starts_with('|'))
            .take_while(|l| l.starts_with('|'))
            .skip(2)
            .filter_map(|row| {
                let cell = row.split('|').nth(1)?.trim();
                Some(cell.trim_matches('`').to_owned())
            })
            .collect()
    }
}

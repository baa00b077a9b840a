//! Incidents through the SOC's API, end to end: the real collector and
//! ClickHouse, telemetry over gRPC with the devices' certificates (two
//! municipalities, one device each), `ztctl` and the HTTP/JSON API with
//! the users' certificates.
//!
//! * a reverse shell on each device raises one incident per municipality;
//!   more alerts of the same process tree join it;
//! * an analyst sees only their municipality's incidents and events; the
//!   prefecture's SOC sees both; naming another organisation is refused,
//!   and another's incident is "not found";
//! * filters carrying SQL injection return an error or nothing, never more;
//! * no certificate, a device's certificate, or an analyst doing an
//!   admin's work: refused;
//! * acknowledge → resolve with notes, in the history and the audit log;
//!   a resolved incident stays resolved;
//! * the KPI counts this fiscal year's incidents against the target of 0;
//! * a download → chmod → exec sequence spanning a collector restart
//!   still raises its incident (the engine's state is saved and restored).

use std::time::Duration;

use anyhow::{Context as _, Result};
use proto::query::{query_client::QueryClient, ListIncidentsRequest};
use serde_json::Value;
use zt_e2e::{
    eventually,
    fleet_sim::start_fleet,
    stack::Stack,
    telemetry_sim::{now_ns, Device},
    ztctl::ZtctlUser,
};

const WAIT: Duration = Duration::from_secs(20);

fn incidents(user: &ZtctlUser, extra: &[&str]) -> Result<Vec<Value>> {
    let mut args = vec!["incidents", "list", "--json"];
    args.extend_from_slice(extra);
    Ok(user
        .json(&args)?
        .as_array()
        .context("incidents list --json is not an array")?
        .clone())
}

/// Waits until `user` sees exactly `count` incidents matching `extra`.
async fn wait_for_incidents(user: &ZtctlUser, extra: &[&str], count: usize) -> Result<Vec<Value>> {
    let mut last = Vec::new();
    let found = eventually(WAIT, || {
        let seen = incidents(user, extra);
        if let Ok(seen) = &seen {
            last.clone_from(seen);
        }
        async move { seen.ok().filter(|s| s.len() == count) }
    })
    .await;
    found.with_context(|| format!("expected {count} incidents for {extra:?}, last saw {last:?}"))
}

fn refused(user: &ZtctlUser, args: &[&str]) -> Result<String> {
    match user.ztctl(args)? {
        Ok(stdout) => anyhow::bail!("ztctl {args:?} succeeded: {stdout}"),
        Err(stderr) => Ok(stderr),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incidents_are_scoped_triaged_and_counted() -> Result<()> {
    let stack = Stack::new("incidents-api").await?;
    let mut collector = stack.start_collector().await?;
    let soc = ZtctlUser::create(&stack, "pref", "soc-1", "soc")?;
    let analyst_a = ZtctlUser::create(&stack, "city-a", "analyst-a", "analyst")?;
    let analyst_b = ZtctlUser::create(&stack, "city-b", "analyst-b", "analyst")?;
    let fleet_a = start_fleet(&stack, &soc, "city-a", "pc-a", 1).await?;
    let fleet_b = start_fleet(&stack, &soc, "city-b", "pc-b", 1).await?;
    let mut device_a = Device::new(&stack, &fleet_a[0]);
    let mut device_b = Device::new(&stack, &fleet_b[0]);

    // A reverse shell on each device: one incident per municipality.
    device_a.reverse_shell(4242).await?;
    device_b.reverse_shell(5151).await?;
    let seen_a = wait_for_incidents(&analyst_a, &[], 1).await?;
    let seen_b = wait_for_incidents(&analyst_b, &[], 1).await?;
    let incident_a = &seen_a[0];
    let id_a = incident_a["id"].as_str().context("no id")?.to_owned();
    let id_b = seen_b[0]["id"].as_str().context("no id")?.to_owned();
    assert_ne!(id_a, id_b);
    assert_eq!(incident_a["rule_id"], "reverse-shell-dev-tcp");
    assert_eq!(incident_a["severity"], "critical");
    assert_eq!(incident_a["status"], "open");
    assert_eq!(incident_a["org_id"], "city-a");
    assert_eq!(incident_a["device_id"], "pc-a-0000");
    assert_eq!(incident_a["count"], 1);
    assert_eq!(incident_a["process_tree_root"], "900:/usr/bin/python3.11");
    assert!(incident_a["mitre"]
        .as_array()
        .context("mitre is not a list")?
        .contains(&Value::from("T1059.004")));
    assert_eq!(seen_b[0]["org_id"], "city-b");
    let both = wait_for_incidents(&soc, &[], 2).await?;
    assert_eq!(
        both.iter().filter(|i| i["org_id"] == "city-b").count(),
        1,
        "{both:?}"
    );

    // More reverse shells under the same python process join the incident.
    device_a.reverse_shell(4243).await?;
    device_a.reverse_shell(4244).await?;
    let grouped = eventually(WAIT, || async {
        incidents(&analyst_a, &[])
            .ok()
            .filter(|s| s.len() == 1 && s[0]["count"] == 3)
    })
    .await
    .context("the later alerts did not join the incident")?;
    assert_eq!(grouped[0]["id"].as_str(), Some(id_a.as_str()));

    // Tenancy: nothing of city-b reaches city-a's analyst.
    let stderr = refused(
        &analyst_a,
        &["incidents", "list", "--org", "city-b", "--json"],
    )?;
    assert!(stderr.contains("may not read"), "{stderr}");
    let stderr = refused(&analyst_a, &["incidents", "show", &id_b, "--json"])?;
    assert!(stderr.contains("no incident"), "{stderr}");
    let stderr = refused(&analyst_a, &["incidents", "ack", &id_b, "--note", "mine?"])?;
    assert!(stderr.contains("no incident"), "{stderr}");
    let events_a = analyst_a.json(&["events", "search", "--json"])?;
    let events_a = events_a.as_array().context("events is not a list")?;
    assert_eq!(events_a.len(), 3, "{events_a:?}");
    assert!(
        events_a.iter().all(|e| e["org_id"] == "city-a"),
        "{events_a:?}"
    );
    let events_all = soc.json(&["events", "search", "--kind", "process", "--json"])?;
    assert_eq!(events_all.as_array().map(Vec::len), Some(4));

    // Injection in filters: an error or nothing, never more.
    for host in ["x' OR '1'='1", "x') OR 1=1 --", "' OR org_id != '"] {
        assert!(
            incidents(&analyst_a, &["--host", host])?.is_empty(),
            "{host}"
        );
        let found = analyst_a.json(&["events", "search", "--host", host, "--json"])?;
        assert_eq!(found.as_array().map(Vec::len), Some(0), "{host}");
    }
    let found = analyst_a.json(&["events", "search", "--text", "') OR 1=1 --", "--json"])?;
    assert_eq!(found.as_array().map(Vec::len), Some(0));
    let (status, body) = analyst_a.https(
        &stack,
        "GET",
        "/v1/incidents?status=open%27%20OR%201%3D1%20--",
        None,
        true,
    )?;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["code"], "invalid_argument");
    let (status, body) = analyst_a.https(
        &stack,
        "GET",
        "/v1/incidents?host=x%27%20OR%20%271%27%3D%271",
        None,
        true,
    )?;
    assert_eq!(
        (status, body["incidents"].as_array().map(Vec::len)),
        (200, Some(0))
    );
    let (status, body) =
        analyst_a.https(&stack, "GET", "/v1/incidents?org_id=city-b", None, true)?;
    assert_eq!(
        (status, body["code"].as_str()),
        (403, Some("permission_denied"))
    );
    let (status, _) =
        analyst_a.https(&stack, "GET", "/v1/events?kinds=process;drop", None, true)?;
    assert_eq!(status, 400);
    let (status, body) = analyst_a.https(&stack, "GET", "/v1/incidents?staus=open", None, true)?;
    assert_eq!(
        status, 400,
        "a misspelt filter must not widen the list: {body}"
    );

    // Pages: one at a time, newest first, and all of them with --all.
    let (status, page) = soc.https(&stack, "GET", "/v1/incidents?page_size=1", None, true)?;
    assert_eq!(status, 200, "{page}");
    assert_eq!(page["incidents"].as_array().map(Vec::len), Some(1));
    assert_eq!(page["incidents"][0]["id"].as_str(), Some(id_b.as_str()));
    let token = page["next_page_token"].as_str().context("no next page")?;
    let (_, next) = soc.https(
        &stack,
        "GET",
        &format!("/v1/incidents?page_size=1&page_token={token}"),
        None,
        true,
    )?;
    assert_eq!(next["incidents"][0]["id"].as_str(), Some(id_a.as_str()));
    assert_eq!(next["next_page_token"], "");
    let all = incidents(&soc, &["--limit", "1", "--all"])?;
    assert_eq!(all.len(), 2);
    let events = soc.json(&["events", "search", "--limit", "1", "--all", "--json"])?;
    assert_eq!(events.as_array().map(Vec::len), Some(4), "{events}");
    let (status, _) = soc.https(&stack, "GET", "/v1/incidents?page_token=1%27--", None, true)?;
    assert_eq!(status, 400);

    // The same service over HTTP/JSON.
    let (status, body) = analyst_a.https(&stack, "GET", "/v1/incidents", None, true)?;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["incidents"][0]["id"].as_str(), Some(id_a.as_str()));
    let (status, body) = soc.https(&stack, "GET", "/v1/incidents?org_id=city-b", None, true)?;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["incidents"][0]["id"].as_str(), Some(id_b.as_str()));

    // Who may call at all.
    let (status, body) = analyst_a.https(&stack, "GET", "/v1/incidents", None, false)?;
    assert_eq!(
        (status, body["code"].as_str()),
        (401, Some("unauthenticated"))
    );
    let device_channel =
        zt_grpc_tls::channel(&stack.collector_url(), fleet_a[0].client_tls()?).await?;
    let refused_device = QueryClient::new(device_channel)
        .list_incidents(ListIncidentsRequest::default())
        .await
        .expect_err("a device read incidents");
    assert_eq!(refused_device.code(), tonic::Code::PermissionDenied);
    let stderr = refused(
        &analyst_a,
        &["device", "revoke", "pc-a-0000", "--reason", "x"],
    )?;
    assert!(stderr.contains("may not change"), "{stderr}");

    // The incident page.
    let detail = analyst_a.json(&["incidents", "show", &id_a, "--json"])?;
    let events = detail["events"].as_array().context("no events")?;
    assert_eq!(events.len(), 3, "{detail}");
    assert!(events.iter().all(|e| e["argv"][2]
        .as_str()
        .is_some_and(|a| a.contains("/dev/tcp/"))));
    let tree = detail["process_tree"].as_array().context("no tree")?;
    assert_eq!(tree[0]["pid"], 900, "the root first: {tree:?}");
    assert_eq!(tree[0]["ppid"], 0);
    let shells: Vec<&Value> = tree.iter().filter(|n| n["ppid"] == 900).collect();
    assert_eq!(shells.len(), 3, "{tree:?}");
    assert!(shells
        .iter()
        .all(|n| n["in_incident"] == true && n["exe"] == "/usr/bin/bash"));

    // Triage: acknowledge, resolve, and a resolved incident stays so.
    let acked = analyst_a.json(&["incidents", "ack", &id_a, "--note", "looking", "--json"])?;
    assert_eq!(acked["status"], "acknowledged");
    assert!(
        acked["acknowledged_by"]
            .as_str()
            .is_some_and(|by| by.contains("analyst-a")),
        "{acked}"
    );
    let stderr = refused(&analyst_a, &["incidents", "resolve", &id_a, "--note", "  "])?;
    assert!(stderr.contains("note"), "{stderr}");
    // The server checks too (ztctl refused the blank note itself).
    let (status, body) = analyst_a.https(
        &stack,
        "POST",
        &format!("/v1/incidents/{id_a}/resolve"),
        Some(r#"{"note": " "}"#),
        true,
    )?;
    assert_eq!(
        (status, body["code"].as_str()),
        (400, Some("invalid_argument")),
        "{body}"
    );
    let (status, body) = analyst_a.https(
        &stack,
        "POST",
        &format!("/v1/incidents/{id_a}/resolve"),
        Some(r#"{"note": "red-team exercise, confirmed with the CISO"}"#),
        true,
    )?;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "resolved");
    let stderr = refused(
        &analyst_a,
        &["incidents", "resolve", &id_a, "--note", "again"],
    )?;
    assert!(stderr.contains("resolved"), "{stderr}");
    let (status, body) = analyst_a.https(
        &stack,
        "POST",
        &format!("/v1/incidents/{id_a}/acknowledge"),
        Some("{}"),
        true,
    )?;
    assert_eq!(
        (status, body["code"].as_str()),
        (409, Some("failed_precondition")),
        "{body}"
    );
    let detail = analyst_a.json(&["incidents", "show", &id_a, "--json"])?;
    let history: Vec<&str> = detail["history"]
        .as_array()
        .context("no history")?
        .iter()
        .filter_map(|h| h["status"].as_str())
        .collect();
    assert_eq!(history, ["open", "acknowledged", "resolved"]);
    assert_eq!(
        detail["incident"]["note"],
        "red-team exercise, confirmed with the CISO"
    );
    assert_eq!(
        incidents(&analyst_a, &["--status", "open"])?.len(),
        0,
        "resolved is not open"
    );
    let audited: Vec<(String, String)> = stack
        .db()
        .query(
            "SELECT action, result FROM audit_log WHERE target = ? AND action LIKE 'incident.%' \
             ORDER BY time_ns",
        )
        .bind(&id_a)
        .fetch_all()
        .await?;
    assert_eq!(
        audited,
        [
            ("incident.acknowledge".to_owned(), "ok".to_owned()),
            ("incident.resolve".to_owned(), "denied".to_owned()),
            ("incident.resolve".to_owned(), "ok".to_owned()),
            ("incident.resolve".to_owned(), "denied".to_owned()),
            ("incident.acknowledge".to_owned(), "denied".to_owned()),
        ]
    );

    // The KPI against the target of 0.
    let kpi_a = analyst_a.json(&["kpi", "--json"])?;
    assert_eq!(kpi_a["incidents"], 1, "{kpi_a}");
    assert_eq!(kpi_a["by_severity"]["critical"], 1);
    assert_eq!(kpi_a["open"], 0);
    assert_eq!(kpi_a["target"], 0);
    assert_eq!(kpi_a["on_target"], false);
    assert_eq!(kpi_a["days_since_last"], 0);
    let kpi_all = soc.json(&["kpi", "--json"])?;
    assert_eq!(
        (kpi_all["incidents"].clone(), kpi_all["open"].clone()),
        (2.into(), 1.into())
    );

    // The fleet, scoped the same way.
    let fleet = analyst_a.json(&["fleet", "list", "--json"])?;
    let fleet = fleet.as_array().context("fleet is not a list")?;
    assert_eq!(fleet.len(), 1, "{fleet:?}");
    assert_eq!(fleet[0]["device_id"], "pc-a-0000");
    assert_eq!(
        soc.json(&["fleet", "list", "--json"])?
            .as_array()
            .map(Vec::len),
        Some(2)
    );

    // A sequence across a restart: download and chmod before, exec after.
    let t = now_ns();
    let write = device_a.file(t, "open_write", "/usr/bin/curl", "/tmp/.x/upd", 0o644);
    let chmod = device_a.file(
        t + 1_000_000,
        "chmod",
        "/usr/bin/chmod",
        "/tmp/.x/upd",
        0o755,
    );
    device_a.send(vec![write, chmod]).await?;
    // Let the events reach the engine before the restart.
    tokio::time::sleep(Duration::from_millis(500)).await;
    collector
        .terminate(Duration::from_secs(15))
        .context("collector did not stop")?;
    let _collector = stack.start_collector().await?;
    let exec = device_a.exec(now_ns(), 4300, "/tmp/.x/upd", &["/tmp/.x/upd"]);
    device_a.send(vec![exec]).await?;
    let staged = wait_for_incidents(&analyst_a, &["--rule", "download-exec-tmp"], 1).await?;
    assert_eq!(staged[0]["severity"], "high");
    let detail = analyst_a.json(&[
        "incidents",
        "show",
        staged[0]["id"].as_str().context("no id")?,
        "--json",
    ])?;
    let actions: Vec<&str> = detail["events"]
        .as_array()
        .context("no events")?
        .iter()
        .filter_map(|e| e["action"].as_str())
        .collect();
    assert_eq!(actions, ["open_write", "chmod", "exec"], "{detail}");
    Ok(())
}

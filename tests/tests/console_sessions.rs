//! The web console's back end over real HTTPS (curl with a cookie jar, as
//! a browser would): accounts, sign-in, sessions, CSRF, lockout, the
//! console's files with their security headers, and the routes the console
//! adds (trend, audit, policy status, revoke) under the same roles and
//! organisation scoping as the rest of the API.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{ensure, Context as _, Result};
use serde_json::Value;
use zt_e2e::{fleet_sim::start_fleet, stack::Stack, telemetry_sim::Device, ztctl::ZtctlUser};

const PASSWORD: &str = "correct horse battery staple";

/// A browser-like HTTPS client: one cookie jar, the collector's CA.
struct Browser {
    base: String,
    ca: PathBuf,
    jar: PathBuf,
    csrf: String,
}

struct Reply {
    status: u16,
    headers: String,
    body: Value,
}

impl Browser {
    fn new(stack: &Stack, ca: &Path, name: &str) -> Browser {
        Browser {
            base: stack.collector_url(),
            ca: ca.to_owned(),
            jar: stack.dir.path().join(format!("{name}.cookies")),
            csrf: String::new(),
        }
    }

    fn call(&self, method: &str, path: &str, body: Option<&str>, csrf: bool) -> Result<Reply> {
        let headers = self.jar.with_extension("headers");
        let mut curl = Command::new("curl");
        curl.args(["-sS", "--http2", "--max-time", "10", "-X", method])
            .arg("--cacert")
            .arg(&self.ca)
            .arg("-b")
            .arg(&self.jar)
            .arg("-c")
            .arg(&self.jar)
            .arg("-D")
            .arg(&headers)
            .args(["-w", "\n%{http_code}"]);
        if let Some(body) = body {
            curl.args(["-H", "content-type: application/json", "--data", body]);
        }
        if csrf {
            curl.args(["-H", &format!("x-zt-csrf: {}", self.csrf)]);
        }
        let output = curl.arg(format!("{}{path}", self.base)).output()?;
        ensure!(output.status.success(), "curl {method} {path}: {output:?}");
        let text = String::from_utf8(output.stdout)?;
        let (body, status) = text.rsplit_once('\n').context("no status")?;
        Ok(Reply {
            status: status.trim().parse()?,
            headers: std::fs::read_to_string(&headers)?.to_lowercase(),
            body: if body.trim().is_empty() {
                Value::Null
            } else {
                serde_json::from_str(body).unwrap_or_else(|_| Value::String(body.to_owned()))
            },
        })
    }

    fn get(&self, path: &str) -> Result<Reply> {
        self.call("GET", path, None, false)
    }

    fn sign_in(&mut self, user: &str, password: &str) -> Result<Reply> {
        let body = serde_json::json!({ "user": user, "password": password }).to_string();
        let reply = self.call("POST", "/console/api/session", Some(&body), false)?;
        if reply.status == 200 {
            self.csrf = reply.body["csrf"].as_str().unwrap_or_default().to_owned();
        }
        Ok(reply)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_sign_in_sessions_and_roles() -> Result<()> {
    let stack = Stack::new("console-sessions").await?;
    let _collector = stack.start_collector().await?;
    let soc = ZtctlUser::create(&stack, "pref", "soc-1", "soc")?;
    // The collector's CA, as `credential create` hands it out.
    let ca = soc.credential_dir().join("ca.pem");
    let fleet_a = start_fleet(&stack, &soc, "city-a", "pc-a", 1).await?;
    let fleet_b = start_fleet(&stack, &soc, "city-b", "pc-b", 1).await?;
    Device::new(&stack, &fleet_a[0]).reverse_shell(4242).await?;
    Device::new(&stack, &fleet_b[0]).reverse_shell(5151).await?;

    // Accounts: weak passwords and names taken in another organisation are refused.
    let (ok, stderr) = stack.create_account("city-a", "analyst-a", "analyst", "short")?;
    assert!(!ok && stderr.contains("at least 12"), "{stderr}");
    assert!(
        stack
            .create_account("city-a", "analyst-a", "analyst", PASSWORD)?
            .0
    );
    assert!(
        stack
            .create_account("city-a", "admin-a", "admin", PASSWORD)?
            .0
    );
    let (ok, stderr) = stack.create_account("city-b", "analyst-a", "analyst", PASSWORD)?;
    assert!(!ok && stderr.contains("taken"), "{stderr}");
    let stored = std::fs::read_to_string(stack.collector_state().join("accounts.json"))?;
    assert!(stored.contains("$argon2id$") && !stored.contains(PASSWORD));

    // The console's files, with their security headers.
    let mut analyst = Browser::new(&stack, &ca, "analyst");
    let page = analyst.get("/console/")?;
    assert_eq!(page.status, 200);
    assert!(
        page.headers.contains("content-type: text/html"),
        "{}",
        page.headers
    );
    let script = analyst.get("/console/app.js")?;
    assert_eq!(script.status, 200);
    assert!(
        script.headers.contains("content-type: text/javascript"),
        "{}",
        script.headers
    );
    assert!(
        page.headers
            .contains("content-security-policy: default-src 'self'"),
        "{}",
        page.headers
    );
    assert!(page.headers.contains("x-frame-options: deny"));
    assert_eq!(analyst.get("/console/no-such-file.js")?.status, 404);

    // A browser presenting a user certificate is signed in as that user.
    let (status, me) = soc.https(&stack, "GET", "/console/api/me", None, true)?;
    assert_eq!(status, 200, "{me}");
    assert_eq!(
        (me["auth"].as_str(), me["role"].as_str()),
        (Some("certificate"), Some("soc"))
    );
    assert!(me["orgs"]
        .as_array()
        .is_some_and(|orgs| orgs.contains(&"city-a".into()) && orgs.contains(&"city-b".into())));

    // A page of another site can make the browser post a form with its
    // certificate; a change must be a JSON request, which it cannot send.
    let dir = soc.credential_dir();
    let form = Command::new("curl")
        .args([
            "-sS",
            "--http2",
            "--max-time",
            "10",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
        ])
        .arg("--cacert")
        .arg(dir.join("ca.pem"))
        .arg("--cert")
        .arg(dir.join("credential.pem"))
        .args(["--data", "note=forged"])
        .arg(format!(
            "{}/v1/incidents/0123456789abcdef/acknowledge",
            stack.collector_url()
        ))
        .output()?;
    assert_eq!(String::from_utf8_lossy(&form.stdout), "403", "{form:?}");

    // Not signed in: refused.
    let reply = analyst.get("/console/api/me")?;
    assert_eq!(
        (reply.status, reply.body["code"].as_str()),
        (401, Some("unauthenticated"))
    );
    assert_eq!(analyst.get("/v1/incidents")?.status, 401);

    // A wrong password, then the right one.
    let reply = analyst.sign_in("analyst-a", "wrong password!")?;
    assert_eq!(reply.status, 401, "{}", reply.body);
    let reply = analyst.sign_in("nobody", PASSWORD)?;
    assert_eq!(reply.status, 401);
    let reply = analyst.sign_in("analyst-a", PASSWORD)?;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert!(reply.headers.contains("httponly") && reply.headers.contains("samesite=strict"));
    assert!(reply.headers.contains("secure"));
    assert_eq!(reply.body["role"], "analyst");
    assert_eq!(reply.body["orgs"], serde_json::json!(["city-a"]));
    let me = analyst.get("/console/api/me")?;
    assert_eq!(
        (me.status, me.body["user"].as_str()),
        (200, Some("analyst-a"))
    );
    assert_eq!(me.body["auth"], "password");

    // The API with the session: scoped to the account's organisation.
    let list = zt_e2e::eventually(std::time::Duration::from_secs(20), || async {
        analyst.get("/v1/incidents").ok().filter(|r| {
            r.body["incidents"]
                .as_array()
                .is_some_and(|l| !l.is_empty())
        })
    })
    .await
    .context("no incident for city-a")?;
    let incidents = list.body["incidents"].as_array().context("no list")?;
    assert_eq!(incidents.len(), 1);
    assert_eq!(incidents[0]["org_id"], "city-a");
    let id = incidents[0]["id"].as_str().context("no id")?.to_owned();
    assert_eq!(analyst.get("/v1/incidents?org_id=city-b")?.status, 403);
    let trend = analyst.get("/v1/trend?days=7")?;
    assert_eq!(trend.status, 200, "{}", trend.body);
    let days = trend.body["days"].as_array().context("no days")?;
    assert_eq!(days.len(), 7);
    let today = &days[6];
    assert_eq!(today["critical"], 1, "{}", trend.body);
    assert_eq!(trend.body["utc_offset"], "+09:00");

    // Changes need the CSRF token.
    let path = format!("/v1/incidents/{id}/acknowledge");
    let reply = analyst.call("POST", &path, Some(r#"{"note": "mine"}"#), false)?;
    assert_eq!(
        (reply.status, reply.body["code"].as_str()),
        (403, Some("permission_denied"))
    );
    let reply = analyst.call("POST", &path, Some(r#"{"note": "mine"}"#), true)?;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert!(reply.body["acknowledged_by"]
        .as_str()
        .is_some_and(|by| by.ends_with("/org/city-a/user/analyst-a")));

    // An analyst doing an admin's work: refused; the admin may.
    let revoke = "/v1/devices/city-a/pc-a-0000/revoke";
    let reply = analyst.call("POST", revoke, Some(r#"{"reason": "lost"}"#), true)?;
    assert_eq!(
        (reply.status, reply.body["code"].as_str()),
        (403, Some("permission_denied"))
    );
    let status = analyst.get("/v1/policy/status")?;
    assert_eq!(status.status, 200, "{}", status.body);
    assert_eq!(status.body["org_id"], "city-a");

    // The policy's serials and their texts, for the console's diff.
    let examples = concat!(env!("CARGO_MANIFEST_DIR"), "/../policy/examples");
    soc.ok(&[
        "policy",
        "push",
        &format!("{examples}/baseline.yaml"),
        "--json",
    ])?;
    soc.ok(&[
        "policy",
        "push",
        &format!("{examples}/city-a.yaml"),
        "--json",
    ])?;
    let history = analyst.get("/v1/policy/history")?;
    assert_eq!(history.status, 200, "{}", history.body);
    let serials = history.body["serials"].as_array().context("no serials")?;
    assert_eq!(serials.len(), 2, "{}", history.body);
    assert!(serials[0]["serial"].as_u64() > serials[1]["serial"].as_u64());
    assert!(serials[0]["organisation"]
        .as_str()
        .is_some_and(|t| t.contains("city-a")));
    assert_eq!(serials[1]["organisation"], "");
    let older = serials[1]["serial"].as_u64().context("no serial")?;
    let layers = analyst.get(&format!("/v1/policy?serial={older}"))?;
    assert_eq!(
        (layers.status, layers.body["serial"].as_u64()),
        (200, Some(older))
    );
    assert_eq!(analyst.get("/v1/policy/history?org_id=city-b")?.status, 403);
    assert_eq!(analyst.get("/v1/policy?serial=999")?.status, 404);
    let mut admin = Browser::new(&stack, &ca, "admin");
    assert_eq!(admin.sign_in("admin-a", PASSWORD)?.status, 200);
    let reply = admin.call(
        "POST",
        "/v1/devices/city-b/pc-b-0000/revoke",
        Some("{}"),
        true,
    )?;
    assert_eq!(
        reply.status, 403,
        "another organisation's device: {}",
        reply.body
    );
    let reply = admin.call("POST", revoke, Some(r#"{"reason": "lost"}"#), true)?;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert!(reply.body["revocation_version"]
        .as_u64()
        .is_some_and(|v| v > 0));

    // The audit log shows it all, scoped.
    let audit = analyst.get("/v1/audit")?;
    assert_eq!(audit.status, 200, "{}", audit.body);
    let entries = audit.body["entries"].as_array().context("no entries")?;
    let actions: Vec<(&str, &str)> = entries
        .iter()
        .filter_map(|e| Some((e["action"].as_str()?, e["result"].as_str()?)))
        .collect();
    for wanted in [
        ("console.sign_in", "denied"),
        ("console.sign_in", "ok"),
        ("incident.acknowledge", "ok"),
        ("device.revoke", "denied"),
        ("device.revoke", "ok"),
    ] {
        assert!(actions.contains(&wanted), "{wanted:?} not in {actions:?}");
    }
    assert!(
        entries.iter().all(|e| e["org_id"] == "city-a"),
        "{entries:?}"
    );

    // Sign out: the cookie no longer works, even replayed.
    let jar = std::fs::read_to_string(&analyst.jar)?;
    let reply = analyst.call("DELETE", "/console/api/session", None, false)?;
    assert_eq!(reply.status, 403, "sign-out needs the CSRF token too");
    let reply = analyst.call("DELETE", "/console/api/session", None, true)?;
    assert_eq!(reply.status, 204);
    std::fs::write(&analyst.jar, jar)?;
    assert_eq!(analyst.get("/v1/incidents")?.status, 401);

    // Five wrong passwords lock the account, even against the right one.
    let mut guesser = Browser::new(&stack, &ca, "guesser");
    for _ in 0..5 {
        assert_eq!(guesser.sign_in("admin-a", "guess guess guess")?.status, 401);
    }
    let reply = guesser.sign_in("admin-a", PASSWORD)?;
    assert_eq!(
        (reply.status, reply.body["code"].as_str()),
        (429, Some("locked"))
    );
    Ok(())
}

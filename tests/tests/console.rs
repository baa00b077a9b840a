//! The SOC web console in a real browser (headless Chromium driven over
//! WebDriver), against the real collector and ClickHouse: two
//! municipalities, each with a reverse-shell incident sent as telemetry
//! over gRPC, and console accounts made with `zt-collector account create`.
//!
//! * a wrong password is refused and the sign-in page stays;
//! * city-a's analyst sees the KPI (1 incident this fiscal year against
//!   the target of 0), only city-a's incident, its page with the process
//!   tree (bash under python), resolves it with a note (and a resolve
//!   without a note is refused in the page), and sees the history, the
//!   audit log and the KPI's open count change;
//! * the analyst's revoke is refused by the collector (403) and the page
//!   says so; the fleet, event search and policy pages show their data;
//! * the overview in Japanese; sign-out;
//! * city-a's admin revokes the device;
//! * the prefecture's SOC sees both municipalities' incidents, and the
//!   organisation switcher narrows the list to one;
//! * no script error and no Content-Security-Policy violation throughout.
//!
//! Screenshots of every page are saved in
//! `target/console-screenshots/` (the README shows them).

use std::time::Duration;

use anyhow::{ensure, Context as _, Result};
use serde_json::json;
use zt_e2e::{
    browser::Browser, eventually, fleet_sim::start_fleet, stack::Stack, telemetry_sim::Device,
    ztctl::ZtctlUser,
};

const PASSWORD: &str = "correct horse battery staple";
const NOTE: &str = "red-team exercise, confirmed with the CISO";
/// The whole test, browser included, ends within this.
const LIMIT: Duration = Duration::from_secs(150);

/// A console account with the test's password.
fn create_account(stack: &Stack, org: &str, user: &str, role: &str) -> Result<()> {
    let (ok, stderr) = stack.create_account(org, user, role, PASSWORD)?;
    ensure!(ok, "account create {user}: {stderr}");
    Ok(())
}

/// Waits until the page `name` has rendered its data.
async fn page_ready(browser: &Browser, name: &str) -> Result<()> {
    browser
        .wait_js(
            &format!("the {name} page"),
            "return !!document.querySelector(`[data-testid=\"page-${arguments[0]}\"][data-ready=\"true\"]`);",
            vec![json!(name)],
        )
        .await?;
    Ok(())
}

async fn go(browser: &Browser, page: &str) -> Result<()> {
    browser.click(&format!("[data-testid=nav-{page}]")).await?;
    page_ready(browser, page).await
}

async fn sign_in(browser: &Browser, user: &str, password: &str) -> Result<()> {
    browser.wait_for("[data-testid=signin-form]").await?;
    browser.fill("[data-testid=signin-user]", user).await?;
    browser
        .fill("[data-testid=signin-password]", password)
        .await?;
    browser.click("[data-testid=signin-submit]").await
}

async fn sign_out(browser: &Browser) -> Result<()> {
    browser.click("[data-testid=signout]").await?;
    browser.wait_for("[data-testid=signin-form]").await?;
    Ok(())
}

/// The incident rows shown: (id, organisation).
async fn incident_rows(browser: &Browser) -> Result<Vec<(String, String)>> {
    let rows = browser
        .js(
            "return [...document.querySelectorAll('[data-testid=incident-row]')]
               .map(r => [r.dataset.id, r.dataset.org]);",
            vec![],
        )
        .await?;
    Ok(serde_json::from_value(rows)?)
}

/// Waits until the list shows exactly the organisations `orgs` (one row each).
async fn wait_for_incident_orgs(browser: &Browser, orgs: &[&str]) -> Result<Vec<(String, String)>> {
    let mut wanted: Vec<String> = orgs.iter().map(|o| (*o).to_owned()).collect();
    wanted.sort();
    browser
        .wait(&format!("incidents of {orgs:?}"), || async {
            let rows = incident_rows(browser).await?;
            let mut seen: Vec<String> = rows.iter().map(|(_, org)| org.clone()).collect();
            seen.sort();
            Ok((seen == wanted).then_some(rows))
        })
        .await
}

async fn text_of(browser: &Browser, testid: &str) -> Result<String> {
    let text = browser
        .wait_for(&format!("[data-testid={testid}]"))
        .await?
        .text()
        .await?;
    Ok(text.trim().to_owned())
}

/// Waits for the banner to show an error with this HTTP status and code.
async fn wait_for_refusal(browser: &Browser, status: u16, code: &str) -> Result<String> {
    browser
        .wait_js(
            &format!("a banner with {status} {code}"),
            "const b = document.getElementById('banner');
             return b && !b.hidden && b.dataset.kind === 'error' && b.dataset.status === arguments[0]
               && b.dataset.code === arguments[1] ? b.innerText : null;",
            vec![json!(status.to_string()), json!(code)],
        )
        .await
        .map(|v| v.as_str().unwrap_or_default().to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_in_a_real_browser() -> Result<()> {
    let stack = Stack::new("console").await?;
    let collector = stack.start_collector().await?;
    let outcome = tokio::time::timeout(LIMIT, scenario(&stack)).await;
    drop(collector);
    match outcome {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e.context(stack.logs())),
        Err(_) => anyhow::bail!(
            "the console test took longer than {LIMIT:?}\n{}",
            stack.logs()
        ),
    }
}

async fn scenario(stack: &Stack) -> Result<()> {
    // Two municipalities, a device and a reverse shell each.
    let cli = ZtctlUser::create(stack, "pref", "soc-cli", "soc")?;
    let fleet_a = start_fleet(stack, &cli, "city-a", "pc-a", 1).await?;
    let fleet_b = start_fleet(stack, &cli, "city-b", "pc-b", 1).await?;
    let mut device_a = Device::new(stack, &fleet_a[0]);
    let mut device_b = Device::new(stack, &fleet_b[0]);
    device_a.reverse_shell(4242).await?;
    device_b.reverse_shell(5151).await?;
    create_account(stack, "city-a", "analyst-a", "analyst")?;
    create_account(stack, "city-a", "admin-a", "admin")?;
    create_account(stack, "pref", "soc-1", "soc")?;
    // Two serials for city-a: the baseline, then its own layer (the policy
    // page shows them and the change between them).
    let examples = concat!(env!("CARGO_MANIFEST_DIR"), "/../policy/examples");
    cli.ok(&[
        "policy",
        "push",
        &format!("{examples}/baseline.yaml"),
        "--json",
    ])?;
    cli.ok(&[
        "policy",
        "push",
        &format!("{examples}/city-a.yaml"),
        "--json",
    ])?;
    eventually(Duration::from_secs(20), || async {
        cli.json(&["incidents", "list", "--json"])
            .ok()
            .filter(|list| list.as_array().map(Vec::len) == Some(2))
    })
    .await
    .context("the two incidents were not raised")?;

    let browser = Browser::start("Asia/Tokyo").await?;
    let result = in_browser(&browser, stack).await;
    let result = match result {
        Ok(()) => {
            let errors = browser.console_errors().await?;
            ensure!(errors.is_empty(), "the console logged errors: {errors:#?}");
            Ok(())
        }
        Err(e) => {
            // Keep what the page looked like.
            let _ = browser.screenshot("failure").await;
            Err(e.context(browser.driver_log()))
        }
    };
    let closed = browser.close().await;
    result.and(closed)
}

async fn in_browser(browser: &Browser, stack: &Stack) -> Result<()> {
    let console = format!("{}/console/", stack.collector_url());

    // A wrong password: refused, still on the sign-in page.
    browser.goto(&console).await?;
    sign_in(browser, "analyst-a", "not the password").await?;
    let error = text_of(browser, "signin-error").await?;
    assert!(error.contains("Wrong user name or password"), "{error}");
    browser.wait_for("[data-testid=signin-form]").await?;
    assert!(browser.texts("[data-testid=me-user]").await?.is_empty());
    browser.screenshot("signin-refused").await?;

    // City-a's analyst: the overview and its KPI.
    sign_in(browser, "analyst-a", PASSWORD).await?;
    page_ready(browser, "overview").await?;
    assert_eq!(text_of(browser, "me-user").await?, "analyst-a");
    assert_eq!(text_of(browser, "me-role").await?, "Analyst");
    assert_eq!(text_of(browser, "me-org").await?, "city-a");
    assert!(
        browser.texts("[data-testid=org-select]").await?.is_empty(),
        "an analyst has no organisation switcher"
    );
    assert_eq!(text_of(browser, "kpi-incidents").await?, "1");
    assert_eq!(text_of(browser, "kpi-open").await?, "1");
    assert_eq!(text_of(browser, "kpi-verdict").await?, "Target missed");
    let card = browser
        .js(
            "const c = document.querySelector('[data-testid=kpi-card]');
             const chart = document.querySelector('[data-testid=trend-chart]');
             return [c.dataset.onTarget, chart ? chart.dataset.total : null,
                     chart ? chart.querySelectorAll('.day').length : 0];",
            vec![],
        )
        .await?;
    assert_eq!(
        card,
        json!(["false", "1", 30]),
        "KPI card, trend total, days"
    );
    browser
        .wait_js(
            "the fleet summary",
            "const n = id => Number((document.querySelector(`[data-testid=fleet-${id}]`) || {}).textContent);
             return n('online') + n('offline') + n('revoked') === 1;",
            vec![],
        )
        .await?;
    browser.screenshot("overview").await?;

    // The incidents list: city-a's incident only.
    go(browser, "incidents").await?;
    let rows = wait_for_incident_orgs(browser, &["city-a"]).await?;
    let id = rows[0].0.clone();
    let list = text_of(browser, "incident-table").await?;
    assert!(
        list.contains("city-a") && !list.contains("city-b"),
        "{list}"
    );
    browser.screenshot("incidents").await?;

    // Its page: the process tree, bash under python.
    browser.click("[data-testid=incident-link]").await?;
    browser
        .wait_for("[data-testid=incident-detail][data-status=open]")
        .await?;
    assert_eq!(text_of(browser, "incident-id").await?, id);
    assert!(text_of(browser, "incident-mitre")
        .await?
        .contains("T1059.004"));
    let tree = browser
        .wait_js(
            "the process tree",
            "const bash = document.querySelector('[data-testid=tree-node][data-pid=\"4242\"]');
             if (!bash) return null;
             const parent = bash.closest('li').parentElement.closest('li');
             const up = parent && parent.querySelector(':scope > [data-testid=tree-node]');
             return [bash.dataset.exe, bash.dataset.inIncident, up && up.dataset.pid, up && up.dataset.exe];",
            vec![],
        )
        .await?;
    assert_eq!(
        tree,
        json!(["/usr/bin/bash", "true", "900", "/usr/bin/python3.11"])
    );
    let timeline = browser.texts("[data-testid=timeline-event]").await?;
    assert_eq!(timeline.len(), 1, "{timeline:?}");
    assert!(
        timeline[0].contains("/dev/tcp/203.0.113.9/4444"),
        "{timeline:?}"
    );
    browser.screenshot("incident").await?;

    // Resolve: a note is required, then it is resolved with one.
    browser.click("[data-testid=resolve-button]").await?;
    let error = text_of(browser, "note-error").await?;
    assert!(error.contains("note is required"), "{error}");
    browser.fill("[data-testid=note-input]", NOTE).await?;
    browser.click("[data-testid=resolve-button]").await?;
    browser
        .wait_for("[data-testid=incident-detail][data-status=resolved]")
        .await?;
    assert_eq!(text_of(browser, "incident-note").await?, NOTE);
    let history = browser
        .js(
            "return [...document.querySelectorAll('[data-testid=history-row]')].map(r => r.dataset.status);",
            vec![],
        )
        .await?;
    assert_eq!(history, json!(["open", "resolved"]));
    assert!(text_of(browser, "incident-resolved")
        .await?
        .contains("analyst-a"));
    browser.screenshot("incident-resolved").await?;

    // The audit log has it, by analyst-a.
    go(browser, "audit").await?;
    let resolved = browser
        .wait_js(
            "incident.resolve in the audit log",
            "const r = [...document.querySelectorAll('[data-testid=audit-row]')]
               .find(r => r.dataset.action === 'incident.resolve' && r.dataset.target === arguments[0]);
             return r ? [r.dataset.actor, r.dataset.result] : null;",
            vec![json!(id)],
        )
        .await?;
    assert!(
        resolved[0]
            .as_str()
            .is_some_and(|a| a.contains("analyst-a")),
        "{resolved}"
    );
    assert_eq!(resolved[1], "ok");
    browser.screenshot("audit").await?;

    // The KPI: still one incident this year, none open.
    go(browser, "overview").await?;
    assert_eq!(text_of(browser, "kpi-open").await?, "0");
    assert_eq!(text_of(browser, "kpi-incidents").await?, "1");

    // The fleet; an analyst's revoke is refused by the collector.
    go(browser, "fleet").await?;
    let agents = browser
        .js(
            "return [...document.querySelectorAll('[data-testid=agent-row]')].map(r => [r.dataset.org, r.dataset.device]);",
            vec![],
        )
        .await?;
    assert_eq!(agents, json!([["city-a", "pc-a-0000"]]));
    browser.screenshot("fleet").await?;
    browser.click("[data-testid=revoke-button]").await?;
    browser.click("[data-testid=revoke-confirm]").await?;
    let refusal = wait_for_refusal(browser, 403, "permission_denied").await?;
    assert!(refusal.contains("Refused"), "{refusal}");
    browser.screenshot("fleet-refused").await?;

    // Event search: the reverse shell's exec.
    go(browser, "events").await?;
    browser.click("[data-testid=events-kind-process]").await?;
    browser
        .fill("[data-testid=events-text]", "/dev/tcp")
        .await?;
    browser.click("[data-testid=events-search]").await?;
    let found = browser
        .wait_js(
            "the reverse shell's exec",
            "if (!location.hash.includes('text=')) return null;
             const page = document.querySelector('[data-testid=page-events][data-ready=true]');
             const rows = page ? [...page.querySelectorAll('[data-testid=event-row]')] : [];
             return rows.length ? rows.map(r => [r.dataset.org, r.dataset.kind, r.dataset.pid]) : null;",
            vec![],
        )
        .await?;
    assert_eq!(found, json!([["city-a", "process", "4242"]]));
    browser.screenshot("events").await?;

    // Policy: the two serials and what the second changed.
    go(browser, "policy").await?;
    browser.wait_for("[data-testid=rollout-card]").await?;
    let serials = browser
        .wait_js(
            "the serials issued",
            "const rows = [...document.querySelectorAll('[data-testid=policy-history] tbody tr')];
             return rows.length ? rows.map(r => r.dataset.serial) : null;",
            vec![],
        )
        .await?;
    assert_eq!(serials.as_array().map(Vec::len), Some(2), "{serials}");
    let change = browser
        .wait_for_text("[data-testid=diff-organisation] .diff-summary", "added")
        .await?;
    assert!(change.contains("0 removed"), "{change}");
    assert_eq!(
        browser
            .wait_for_text("[data-testid=diff-baseline] .diff-summary", "No change")
            .await?,
        "No change."
    );
    browser.screenshot("policy").await?;

    // The overview in Japanese, then back to English.
    browser.choose("[data-testid=lang-select]", "ja").await?;
    go(browser, "overview").await?;
    browser
        .wait_for_text("[data-testid=nav-overview]", "概要")
        .await?;
    assert_eq!(text_of(browser, "kpi-verdict").await?, "目標未達");
    browser.screenshot("overview-ja").await?;
    browser.choose("[data-testid=lang-select]", "en").await?;
    browser
        .wait_for_text("[data-testid=nav-overview]", "Overview")
        .await?;
    sign_out(browser).await?;

    // City-a's admin may revoke the device.
    sign_in(browser, "admin-a", PASSWORD).await?;
    page_ready(browser, "overview").await?;
    go(browser, "fleet").await?;
    browser.click("[data-testid=revoke-button]").await?;
    browser.click("[data-testid=revoke-confirm]").await?;
    browser
        .wait_for("[data-testid=agent-row][data-state=revoked]")
        .await?;
    let notice = browser.wait_for_text("#banner", "revoked").await?;
    assert!(notice.contains("pc-a-0000"), "{notice}");
    sign_out(browser).await?;

    // The prefecture's SOC: both municipalities, and one when chosen.
    sign_in(browser, "soc-1", PASSWORD).await?;
    page_ready(browser, "overview").await?;
    assert_eq!(text_of(browser, "me-role").await?, "Prefectural SOC");
    assert_eq!(text_of(browser, "kpi-incidents").await?, "2");
    browser
        .wait_for("[data-testid=policy-card] [data-testid=policy-org-row]")
        .await?;
    browser.screenshot("overview-soc").await?;
    go(browser, "incidents").await?;
    wait_for_incident_orgs(browser, &["city-a", "city-b"]).await?;
    browser.choose("[data-testid=org-select]", "city-b").await?;
    wait_for_incident_orgs(browser, &["city-b"]).await?;
    browser.screenshot("incidents-soc").await?;
    sign_out(browser).await?;
    Ok(())
}

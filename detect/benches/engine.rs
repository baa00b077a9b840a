//! Events per second through the whole default pack, with a realistic mix:
//! mostly ordinary exec, connect and file events that match nothing, some
//! DNS, allowed decisions and heartbeats, and a rare denied decision.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use detect::{default_pack, Ancestor, Engine, Event, Kind};

const S: u64 = 1_000_000_000;
const T0: u64 = 1_700_000_000 * S;

fn mix(n: usize) -> Vec<Event> {
    let programs = [
        ("/usr/bin/ls", vec!["ls", "-la", "/home/alice"]),
        ("/usr/bin/git", vec!["git", "status", "--short"]),
        (
            "/usr/bin/python3.12",
            vec!["python3", "/opt/app/report.py", "--daily"],
        ),
        ("/usr/bin/bash", vec!["bash", "-c", "make -j4 all"]),
        (
            "/usr/lib/firefox/firefox",
            vec!["firefox", "-contentproc", "-isForBrowser"],
        ),
        ("/usr/bin/grep", vec!["grep", "-r", "TODO", "src"]),
    ];
    let files = [
        (
            Kind::FileWrite,
            "/usr/bin/soffice",
            "/home/alice/Documents/budget.ods",
            0o1,
        ),
        (Kind::FileRead, "/usr/bin/bash", "/etc/passwd", 0),
        (
            Kind::FileWrite,
            "/usr/sbin/rsyslogd",
            "/var/log/syslog",
            0o2001,
        ),
        (
            Kind::FileWrite,
            "/usr/bin/vim",
            "/home/alice/.vimrc",
            0o1101,
        ),
        (
            Kind::FileChmod,
            "/usr/bin/chmod",
            "/home/alice/bin/tool",
            0o755,
        ),
        (Kind::FileUnlink, "/usr/bin/rm", "/tmp/tmp.8f3k2", 0),
    ];
    let ancestry = vec![
        Ancestor {
            pid: 2000,
            exe: "/usr/bin/bash".into(),
        },
        Ancestor {
            pid: 1500,
            exe: "/usr/libexec/gnome-terminal-server".into(),
        },
        Ancestor {
            pid: 1,
            exe: "/usr/lib/systemd/systemd".into(),
        },
    ];
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let host = format!("pc-{:04}", i % 500);
        let t = T0 + (i as u64) * 1_000_000; // 1000 events/s of event time
        let pid = 3000 + (i % 20_000) as u32;
        let roll = i % 100;
        let mut e = match roll {
            0..=39 => {
                let (exe, argv) = &programs[i % programs.len()];
                let mut e = Event::new(Kind::Exec, "pref", &host, t);
                e.exe = (*exe).into();
                e.argv = argv.iter().map(|s| (*s).to_owned()).collect();
                e.ancestry = ancestry.clone();
                e.ppid = 2000;
                e
            }
            40..=64 => {
                let mut e = Event::new(Kind::Connect, "pref", &host, t);
                e.exe = "/usr/lib/firefox/firefox".into();
                e.remote_ip = format!("93.184.{}.{}", i % 200, i % 250).parse().ok();
                e.remote_port = Some(443);
                e
            }
            65..=89 => {
                let (kind, exe, path, flags) = files[i % files.len()];
                let mut e = Event::new(kind, "pref", &host, t);
                e.exe = exe.into();
                e.path = path.into();
                if kind == Kind::FileChmod {
                    e.mode = Some(flags);
                } else {
                    e.flags = Some(flags);
                }
                e
            }
            90..=94 => {
                let mut e = Event::new(Kind::Dns, "pref", &host, t);
                e.exe = "/usr/lib/systemd/systemd-resolved".into();
                e.dns_name = "intranet.pref.example".into();
                e
            }
            95..=97 => {
                let mut e = Event::new(Kind::Decision, "pref", &host, t);
                e.verdict = "allowed".into();
                e.action = "allow".into();
                e.enforcement_point = "kernel".into();
                e.rule = "web".into();
                e.remote_ip = "10.20.0.5".parse().ok();
                e.remote_port = Some(443);
                e
            }
            98 => Event::new(Kind::Heartbeat, "pref", &host, t),
            _ => {
                let mut e = Event::new(Kind::Decision, "pref", &host, t);
                e.verdict = "denied".into();
                e.action = "deny".into();
                e.enforcement_point = "kernel".into();
                e.reason = "policy".into();
                e.remote_ip = "198.51.100.9".parse().ok();
                e.remote_port = Some(9001);
                e
            }
        };
        e.id = i as u64;
        e.pid = pid;
        e.user = "alice".into();
        e.uid = Some(1000);
        out.push(e);
    }
    out
}

fn bench(c: &mut Criterion) {
    let rules = default_pack().unwrap_or_else(|e| panic!("{e}"));
    let events = mix(100_000);
    let mut group = c.benchmark_group("engine");
    group.throughput(Throughput::Elements(events.len() as u64));
    group.sample_size(10);
    group.bench_function("default_pack_mix", |b| {
        b.iter_batched_ref(
            || Engine::new(rules.clone()),
            |engine| {
                let mut alerts = 0;
                for e in &events {
                    alerts += engine.process(black_box(e)).len();
                }
                black_box(alerts)
            },
            criterion::BatchSize::LargeInput,
        )
    });
    let single: Vec<_> = rules
        .iter()
        .filter(|r| matches!(r.logic, detect::rules::Logic::Match(_)))
        .cloned()
        .collect();
    group.bench_function("single_event_rules_mix", |b| {
        b.iter_batched_ref(
            || Engine::new(single.clone()),
            |engine| {
                let mut alerts = 0;
                for e in &events {
                    alerts += engine.process(black_box(e)).len();
                }
                black_box(alerts)
            },
            criterion::BatchSize::LargeInput,
        )
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);

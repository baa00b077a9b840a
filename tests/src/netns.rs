//! Several "hosts" on one machine for end-to-end tests: network namespaces
//! joined by a private LAN, removed when dropped (also on failure).
//!
//! # Topology
//!
//! ```text
//!  root namespace            switch namespace (ztlan-<lan>-<id>)      host namespaces
//!  ──────────────            ──────────────────────────────────      ───────────────
//!  ztl<id> 10.X.Y.1/24 ◄────► root ─┐                                 zt-<host>-<id>
//!  (bridge_addr())                  ├─ br0 ─ h2 ◄─────────────────► eth0 10.X.Y.2/24, lo
//!                                   │      └ h3 ◄─────────────────► eth0 10.X.Y.3/24, lo
//!                                   └ ...                            ...
//! ```
//!
//! The bridge lives in a namespace of its own rather than in the root
//! namespace. With `br_netfilter` loaded, bridged frames pass through
//! iptables whenever the *namespace's* `bridge-nf-call-iptables` is 1 **or**
//! the bridge's own `nf_call_iptables` option is 1 — the per-bridge option
//! can only switch filtering on, never off. A bridge in the root namespace
//! would therefore be subject to the host's firewall (e.g. a `FORWARD DROP`
//! policy) whenever the host sets the global sysctl, which this harness must
//! not change. In the switch namespace, which has no firewall rules, the
//! sysctls are that namespace's own and are set to 0 there; the host's stay
//! untouched. Host-to-host traffic never enters the root namespace; traffic
//! to `bridge_addr()` arrives on an ordinary veth (`ztl<id>`) in the root
//! namespace, so processes there (the collector, the test itself) are
//! reachable from every host without forwarding (`ip_forward` stays 0).
//!
//! Names carry a random suffix and the /24 is picked among those no
//! interface address or route on the machine uses, so tests may run
//! concurrently.

use std::{
    collections::HashSet,
    fs::File,
    net::{Ipv4Addr, Ipv6Addr},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::Command,
    sync::Arc,
};

use anyhow::{bail, Context as _, Result};

/// Where `ip netns add` puts the namespace handles.
const NETNS_DIR: &str = "/run/netns";
/// util-linux's `nsenter`, which joins namespaces and executes a program.
const NSENTER: &str = "/usr/bin/nsenter";

/// The per-namespace `br_netfilter` switches (present when `br_netfilter`
/// is loaded; per namespace since Linux 5.3).
const BRIDGE_NF_SYSCTLS: [&str; 3] = [
    "/proc/sys/net/bridge/bridge-nf-call-iptables",
    "/proc/sys/net/bridge/bridge-nf-call-ip6tables",
    "/proc/sys/net/bridge/bridge-nf-call-arptables",
];

/// How many random /24s to try before giving up.
const SUBNET_ATTEMPTS: usize = 32;

/// A small LAN for one test: any number of hosts, each a network namespace
/// with loopback up and `eth0` in the LAN's /24, and the root namespace
/// reachable from all of them at [`Lan::bridge_addr`].
///
/// Dropping it kills processes still running in its namespaces and removes
/// the namespaces and the root namespace's interface; it never panics.
#[derive(Debug)]
pub struct Lan {
    /// Random suffix shared by every name this LAN creates (8 hex digits).
    id: String,
    /// Namespace holding the bridge.
    switch_ns: String,
    /// The veth end in the root namespace, which carries `bridge_addr()`.
    root_link: String,
    /// Whether `root_link` was created (and so must be deleted).
    root_link_created: bool,
    /// The LAN's network address (10.X.Y.0); unspecified until picked.
    network: Ipv4Addr,
    /// Namespaces created so far, switch first; all are deleted on drop.
    namespaces: Vec<String>,
    /// Host names in use, to refuse duplicates.
    host_names: HashSet<String>,
    /// Last octet of the next host's address.
    next_host: u8,
}

/// One host of a [`Lan`]: a network namespace and its address. Cheap to
/// clone; it does not keep the namespace alive (the [`Lan`] owns it).
#[derive(Debug, Clone)]
pub struct Host {
    netns: Arc<str>,
    addr: Ipv4Addr,
    addr6: Ipv6Addr,
}

impl Lan {
    /// Creates an empty LAN on a random 10.X.Y.0/24 that no interface
    /// address or route on the machine overlaps; the root namespace gets
    /// 10.X.Y.1 ([`Lan::bridge_addr`]).
    pub fn create(name: &str) -> Result<Self> {
        check_name("LAN", name)?;
        let id = random_hex(8);
        let mut lan = Self {
            switch_ns: format!("ztlan-{name}-{id}"),
            root_link: format!("ztl{id}"),
            id,
            root_link_created: false,
            network: Ipv4Addr::UNSPECIFIED,
            namespaces: Vec::new(),
            host_names: HashSet::new(),
            next_host: 2,
        };
        // On error `lan` is dropped here, which removes what was made.
        lan.build()
            .with_context(|| format!("creating network LAN {name:?}"))?;
        Ok(lan)
    }

    fn build(&mut self) -> Result<()> {
        let sw = self.switch_ns.clone();
        ip(&["netns", "add", &sw])?;
        self.namespaces.push(sw.clone());
        ip(&["-n", &sw, "link", "set", "lo", "up"])?;
        ip(&["-n", &sw, "link", "add", "br0", "type", "bridge"])?;
        if Path::new(BRIDGE_NF_SYSCTLS[0]).exists() {
            // Per-bridge options (already 0 by default; set so a changed
            // default cannot turn them on) and the switch namespace's own
            // sysctls (the root namespace's are not touched).
            ip(&[
                "-n",
                &sw,
                "link",
                "set",
                "br0",
                "type",
                "bridge",
                "nf_call_iptables",
                "0",
                "nf_call_ip6tables",
                "0",
                "nf_call_arptables",
                "0",
            ])?;
            in_netns(&netns_path(&sw), || -> Result<()> {
                for path in BRIDGE_NF_SYSCTLS {
                    // Absent before Linux 5.3 in non-root namespaces: then
                    // there is nothing per-namespace to switch off.
                    if Path::new(path).exists() {
                        std::fs::write(path, "0")
                            .with_context(|| format!("writing 0 to {path} in {sw}"))?;
                    }
                }
                Ok(())
            })??;
        }
        ip(&["-n", &sw, "link", "set", "br0", "up"])?;

        let root_link = self.root_link.clone();
        ip(&[
            "link", "add", &root_link, "type", "veth", "peer", "name", "root", "netns", &sw,
        ])?;
        self.root_link_created = true;
        ip(&["-n", &sw, "link", "set", "root", "master", "br0", "up"])?;

        self.network = self.claim_subnet()?;
        ip(&["link", "set", &root_link, "up"])?;
        Ok(())
    }

    /// Picks a free 10.X.Y.0/24 and puts .1/24 on the root link. Re-checks
    /// after adding the address so two LANs created at the same moment (in
    /// this process or another) cannot both keep the same subnet.
    fn claim_subnet(&self) -> Result<Ipv4Addr> {
        for _ in 0..SUBNET_ATTEMPTS {
            let bytes = random_bytes();
            // 10.0.x.x is a common default elsewhere; stay off it.
            let network = Ipv4Addr::new(10, bytes[0].clamp(1, 254), bytes[1], 0);
            if used_networks(None)?
                .iter()
                .any(|&(addr, prefix)| overlaps(network, 24, addr, prefix))
            {
                continue;
            }
            let cidr = format!("{}/24", host_addr(network, 1));
            ip(&["addr", "add", &cidr, "dev", &self.root_link])?;
            let clash = used_networks(Some(&self.root_link))?
                .iter()
                .any(|&(addr, prefix)| overlaps(network, 24, addr, prefix));
            if !clash {
                return Ok(network);
            }
            ip(&["addr", "del", &cidr, "dev", &self.root_link])?;
        }
        bail!("no free 10.X.Y.0/24 found in {SUBNET_ATTEMPTS} random tries")
    }

    /// The root namespace's address on the LAN (10.X.Y.1): processes in the
    /// root namespace listening on it (or on 0.0.0.0) are reachable from
    /// every host.
    pub fn bridge_addr(&self) -> Ipv4Addr {
        host_addr(self.network, 1)
    }

    /// The LAN's network address (10.X.Y.0; the prefix is /24).
    pub fn network(&self) -> Ipv4Addr {
        self.network
    }

    /// Name of the interface in the root namespace that carries
    /// [`Lan::bridge_addr`] (`ztl<id>`, e.g. for packet captures).
    pub fn root_link(&self) -> &str {
        &self.root_link
    }

    /// Name of the namespace that holds the bridge (`br0`).
    pub fn switch_netns(&self) -> &str {
        &self.switch_ns
    }

    /// Adds a host: namespace `zt-<name>-<id>`, loopback up, and `eth0` on
    /// the bridge with the next address (.2, .3, ...) of the /24. No default
    /// route: every address of the LAN is on-link.
    pub fn add_host(&mut self, name: &str) -> Result<Host> {
        check_name("host", name)?;
        if self.host_names.contains(name) {
            bail!("LAN already has a host named {name:?}");
        }
        if self.next_host > 254 {
            bail!("LAN {} is full (253 hosts)", self.switch_ns);
        }
        let octet = self.next_host;
        let netns = format!("zt-{name}-{}", self.id);
        let addr = host_addr(self.network, octet);
        let addr6 = self.host_addr6(octet);
        self.add_host_inner(&netns, octet, addr, addr6)
            .with_context(|| format!("adding host {name:?} ({netns}, {addr}, {addr6})"))?;
        self.next_host += 1;
        self.host_names.insert(name.to_owned());
        Ok(Host {
            netns: netns.into(),
            addr,
            addr6,
        })
    }

    /// Host `octet`'s IPv6 address: `fd7a:<LAN id>::<octet>` in a unique
    /// local /64 of the LAN's own (its random id), so no two LANs share one.
    fn host_addr6(&self, octet: u8) -> Ipv6Addr {
        let id = u32::from_str_radix(&self.id, 16).unwrap_or(0);
        Ipv6Addr::new(
            0xfd7a,
            (id >> 16) as u16,
            id as u16,
            0,
            0,
            0,
            0,
            u16::from(octet),
        )
    }

    fn add_host_inner(
        &mut self,
        netns: &str,
        octet: u8,
        addr: Ipv4Addr,
        addr6: Ipv6Addr,
    ) -> Result<()> {
        let sw = self.switch_ns.clone();
        ip(&["netns", "add", netns])?;
        // Registered before anything else can fail, so Drop removes it.
        self.namespaces.push(netns.to_owned());
        ip(&["-n", netns, "link", "set", "lo", "up"])?;
        // The veth is made in the switch namespace with its peer created
        // directly in the host's as eth0: no interface of a host ever
        // appears in the root namespace.
        let port = format!("h{octet}");
        ip(&[
            "-n", &sw, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", netns,
        ])?;
        ip(&["-n", &sw, "link", "set", &port, "master", "br0", "up"])?;
        ip(&[
            "-n",
            netns,
            "addr",
            "add",
            &format!("{addr}/24"),
            "dev",
            "eth0",
        ])?;
        // IPv6 beside it, usable at once (no duplicate address detection:
        // the address is the LAN's own).
        ip(&[
            "-n",
            netns,
            "addr",
            "add",
            &format!("{addr6}/64"),
            "dev",
            "eth0",
            "nodad",
        ])?;
        ip(&["-n", netns, "link", "set", "eth0", "up"])?;
        Ok(())
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        // A namespace with processes left in it outlives `ip netns del`
        // (and keeps its interfaces); stop them first.
        for netns in &self.namespaces {
            if let Err(e) = kill_processes_in(netns) {
                eprintln!("warning: netns {netns}: {e:#}");
            }
        }
        // Deleted explicitly (synchronously): namespace teardown is
        // asynchronous, and a namespace still pinned elsewhere (a socket
        // made inside it, say) would keep the pair alive.
        if self.root_link_created {
            if let Err(e) = ip(&["link", "del", &self.root_link]) {
                eprintln!("warning: removing test LAN interface: {e:#}");
            }
        }
        // Hosts before the switch, newest first.
        for netns in self.namespaces.iter().rev() {
            if let Err(e) = ip(&["netns", "del", netns]) {
                eprintln!("warning: removing test network namespace: {e:#}");
            }
        }
    }
}

impl Host {
    /// The namespace's name (as `ip netns list` shows it).
    pub fn netns(&self) -> &str {
        &self.netns
    }

    /// The host's address on its LAN (on `eth0`, /24).
    pub fn addr(&self) -> Ipv4Addr {
        self.addr
    }

    /// The host's IPv6 address on its LAN (on `eth0`, a unique local /64).
    pub fn addr6(&self) -> Ipv6Addr {
        self.addr6
    }

    /// The argv prefix that runs a program inside the namespace:
    /// `["nsenter", "--net=/run/netns/<netns>"]`.
    ///
    /// `nsenter` joins the network namespace only. (`ip netns exec` would
    /// also remount `/sys` for the namespace, which hides the cgroup v2
    /// hierarchy mounted under `/sys/fs/cgroup` from the program: the agent
    /// could not attach its cgroup programs.)
    pub fn exec_prefix(&self) -> [String; 2] {
        [
            NSENTER.to_owned(),
            format!("--net={}", netns_path(&self.netns).display()),
        ]
    }

    /// A plain [`Command`] for `program` inside the namespace (see
    /// [`Self::exec_prefix`]); add the program's own arguments with
    /// `.arg()`/`.args()`. `nsenter` executes the program in place, so the
    /// child's pid is the program's, and a `pre_exec` hook (e.g. joining a
    /// cgroup) is inherited by it.
    pub fn command(&self, program: &str) -> Command {
        let [nsenter, net] = self.exec_prefix();
        let mut command = Command::new(nsenter);
        command.args([net.as_str(), program]);
        command
    }

    /// Runs `f` on a fresh OS thread that has joined the namespace
    /// (`setns(CLONE_NEWNET)` on `/run/netns/<netns>`) and returns its
    /// result; e.g. to bind a `std::net::TcpListener` inside it. Sockets made
    /// there stay in the namespace after the thread ends, so they can be
    /// handed back and used (or turned into tokio sockets) anywhere.
    ///
    /// Blocks the calling thread until `f` returns; from async code call it
    /// inside `spawn_blocking`. If `f` panics, the panic is resumed on the
    /// calling thread.
    pub fn run_in<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        in_netns(&netns_path(&self.netns), f)
            .with_context(|| format!("running in network namespace {}", self.netns))
    }
}

/// A network namespace with nothing but loopback (up), for a test's
/// processes that talk to each other on `127.0.0.1` apart from the
/// machine's own loopback (any port is free in it). Dropping it kills the
/// processes still inside and deletes it; it never panics.
#[derive(Debug)]
pub struct LoopbackNetns {
    name: String,
}

impl LoopbackNetns {
    /// Creates namespace `ztlo-<name>-<random>` with `lo` up.
    pub fn create(name: &str) -> Result<Self> {
        check_name("namespace", name)?;
        let full = format!("ztlo-{name}-{}", random_hex(8));
        ip(&["netns", "add", &full])
            .with_context(|| format!("creating network namespace {full}"))?;
        // From here on Drop removes it, also when bringing `lo` up fails.
        let netns = Self { name: full };
        ip(&["-n", &netns.name, "link", "set", "lo", "up"])?;
        Ok(netns)
    }

    /// The namespace's name (as `ip netns list` shows it).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/run/netns/<name>`.
    pub fn path(&self) -> PathBuf {
        netns_path(&self.name)
    }

    /// A [`Command`] for `program` that joins this namespace and then
    /// `cgroup` between fork and exec: the program itself is the only exec
    /// (no `nsenter` in between, whose command line would carry the
    /// program's), and the child's pid is the program's. Add arguments,
    /// stdio and environment as usual.
    pub fn command_in_cgroup(
        &self,
        cgroup: &crate::cgroup::TestCgroup,
        program: &str,
    ) -> Result<Command> {
        use std::os::unix::process::CommandExt as _;
        let handle = File::open(self.path())
            .with_context(|| format!("opening {}", self.path().display()))?;
        let mut command = Command::new(program);
        // SAFETY: only async-signal-safe calls (setns) between fork and
        // exec; `handle` stays open in the parent (owned by the closure)
        // until the command is dropped.
        unsafe {
            command.pre_exec(move || {
                if libc::setns(handle.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        // Then the cgroup, still before exec.
        cgroup.join_on_exec(&mut command)?;
        Ok(command)
    }
}

impl Drop for LoopbackNetns {
    fn drop(&mut self) {
        if let Err(e) = kill_processes_in(&self.name) {
            eprintln!("warning: netns {}: {e:#}", self.name);
        }
        if let Err(e) = ip(&["netns", "del", &self.name]) {
            eprintln!("warning: removing test network namespace: {e:#}");
        }
    }
}

/// Runs `f` on a fresh thread that has joined the network namespace at
/// `path`; resumes `f`'s panic, if any, on the caller.
fn in_netns<T: Send>(path: &Path, f: impl FnOnce() -> T + Send) -> Result<T> {
    let handle = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    std::thread::scope(|scope| {
        let thread = std::thread::Builder::new()
            .name("netns".into())
            .spawn_scoped(scope, move || -> Result<T> {
                // SAFETY: plain syscall on a valid, open descriptor; only
                // this thread (which ends after `f`) changes namespace.
                let rc = unsafe { libc::setns(handle.as_raw_fd(), libc::CLONE_NEWNET) };
                if rc != 0 {
                    return Err(std::io::Error::last_os_error())
                        .with_context(|| format!("setns(CLONE_NEWNET) on {}", path.display()));
                }
                drop(handle);
                Ok(f())
            })
            .context("spawning a thread to enter the namespace")?;
        match thread.join() {
            Ok(result) => result,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

fn netns_path(netns: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(netns)
}

/// Runs `ip args`; returns its stdout, or an error naming the command and
/// quoting its stderr.
fn ip(args: &[&str]) -> Result<String> {
    let output = Command::new("ip")
        .args(args)
        .output()
        .with_context(|| format!("running `ip {}` (is iproute2 installed?)", args.join(" ")))?;
    if !output.status.success() {
        bail!(
            "`ip {}` failed ({}): {}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    String::from_utf8(output.stdout)
        .with_context(|| format!("`ip {}` printed non-UTF-8 output", args.join(" ")))
}

/// SIGKILLs every process (other than this one) still in namespace
/// `netns`; says which ones on stderr.
fn kill_processes_in(netns: &str) -> Result<()> {
    use std::os::unix::fs::MetadataExt as _;
    let path = netns_path(netns);
    let Ok(meta) = std::fs::metadata(&path) else {
        return Ok(());
    };
    // The namespace as /proc/<pid>/ns/net names it. Scanned here rather
    // than with `ip netns pids`, and again until none is left: a process
    // that was entering the namespace during one pass is caught by the next.
    let wanted = format!("net:[{}]", meta.ino());
    let own = std::process::id();
    for _ in 0..5 {
        let pids: Vec<libc::pid_t> = std::fs::read_dir("/proc")?
            .filter_map(Result::ok)
            .filter_map(|e| e.file_name().to_str()?.parse::<libc::pid_t>().ok())
            .filter(|&pid| u32::try_from(pid).is_ok_and(|p| p != own))
            .filter(|pid| {
                std::fs::read_link(format!("/proc/{pid}/ns/net"))
                    .is_ok_and(|link| link.to_string_lossy() == wanted)
            })
            .collect();
        if pids.is_empty() {
            return Ok(());
        }
        eprintln!("note: killing processes left in network namespace {netns}: {pids:?}");
        for pid in pids {
            // SAFETY: plain syscall; `pid` is a positive id from /proc.
            if unsafe { libc::kill(pid, libc::SIGKILL) } != 0 {
                let e = std::io::Error::last_os_error();
                if e.raw_os_error() != Some(libc::ESRCH) {
                    eprintln!("warning: kill -9 {pid}: {e}");
                }
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    anyhow::bail!("processes keep appearing in network namespace {netns}")
}

/// IPv4 networks in use in the root namespace: every interface address
/// (except on `skip_dev`) and every non-default route of the main table.
fn used_networks(skip_dev: Option<&str>) -> Result<Vec<(Ipv4Addr, u8)>> {
    let mut used = Vec::new();
    // "4: eth0    inet 192.0.2.2/24 brd ... scope global eth0\ ..."
    for line in ip(&["-o", "-4", "addr", "show"])?.lines() {
        let mut fields = line.split_whitespace();
        let dev = fields.nth(1).unwrap_or_default();
        if skip_dev == Some(dev) {
            continue;
        }
        if let Some(cidr) = fields.skip_while(|&f| f != "inet").nth(1) {
            used.extend(parse_cidr(cidr));
        }
    }
    // "10.1.2.0/24 dev x ...", "192.0.2.1 dev y ...", "blackhole 10.9.0.0/16"
    for line in ip(&["-4", "route", "show"])?.lines() {
        if let Some(dev) = skip_dev {
            if line.split_whitespace().any(|f| f == dev) {
                continue;
            }
        }
        if let Some(net) = line.split_whitespace().take(2).find_map(parse_cidr) {
            used.push(net);
        }
    }
    Ok(used)
}

/// "a.b.c.d/p" or "a.b.c.d" (a /32).
fn parse_cidr(text: &str) -> Option<(Ipv4Addr, u8)> {
    let (addr, prefix) = match text.split_once('/') {
        Some((addr, prefix)) => (addr, prefix.parse().ok().filter(|&p| p <= 32)?),
        None => (text, 32),
    };
    Some((addr.parse().ok()?, prefix))
}

/// Whether `a/pa` and `b/pb` share an address.
fn overlaps(a: Ipv4Addr, pa: u8, b: Ipv4Addr, pb: u8) -> bool {
    let prefix = pa.min(pb);
    let mask = if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(prefix))
    };
    u32::from(a) & mask == u32::from(b) & mask
}

/// `network` with its last octet set to `octet`.
fn host_addr(network: Ipv4Addr, octet: u8) -> Ipv4Addr {
    let [a, b, c, _] = network.octets();
    Ipv4Addr::new(a, b, c, octet)
}

/// Names go into namespace names and must stay plain.
fn check_name(what: &str, name: &str) -> Result<()> {
    let plain = name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if name.is_empty() || name.len() > 32 || !plain {
        bail!("{what} name {name:?} must be 1-32 of [A-Za-z0-9_-]");
    }
    Ok(())
}

fn random_bytes() -> [u8; 16] {
    *uuid::Uuid::new_v4().as_bytes()
}

fn random_hex(len: usize) -> String {
    let mut hex = uuid::Uuid::new_v4().simple().to_string();
    hex.truncate(len);
    hex
}

#[cfg(test)]
mod tests {
    use std::{
        io::{Read as _, Write as _},
        net::{SocketAddr, TcpListener, TcpStream},
        os::unix::fs::MetadataExt as _,
        time::Duration,
    };

    use super::*;

    const TIMEOUT: Duration = Duration::from_secs(3);

    fn netns_list() -> String {
        ip(&["netns", "list"]).expect("ip netns list")
    }

    fn read_trimmed(path: &str) -> Option<String> {
        std::fs::read_to_string(path)
            .ok()
            .map(|s| s.trim().to_owned())
    }

    /// Connects to `to` with a timeout, sends a byte and reads one back
    /// from a listener that echoes; returns the connection's local address.
    fn connect_and_ping(to: SocketAddr) -> std::io::Result<SocketAddr> {
        let mut stream = TcpStream::connect_timeout(&to, TIMEOUT)?;
        stream.set_read_timeout(Some(TIMEOUT))?;
        stream.write_all(b"x")?;
        let mut byte = [0u8; 1];
        stream.read_exact(&mut byte)?;
        assert_eq!(&byte, b"x");
        stream.local_addr()
    }

    /// Accepts one connection on a thread (bounded by a timeout), echoes a
    /// byte and returns the peer's address.
    fn echo_once(listener: TcpListener) -> std::thread::JoinHandle<SocketAddr> {
        std::thread::spawn(move || {
            listener.set_nonblocking(true).expect("nonblocking");
            let deadline = std::time::Instant::now() + TIMEOUT;
            let (mut stream, peer) = loop {
                match listener.accept() {
                    Ok(accepted) => break accepted,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        assert!(std::time::Instant::now() < deadline, "no connection");
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    Err(e) => panic!("accept: {e}"),
                }
            };
            stream.set_nonblocking(false).expect("blocking");
            stream.set_read_timeout(Some(TIMEOUT)).expect("timeout");
            let mut byte = [0u8; 1];
            stream.read_exact(&mut byte).expect("read");
            stream.write_all(&byte).expect("write");
            peer
        })
    }

    #[test]
    fn netns_hosts_reach_each_other_and_the_root_namespace_only_via_the_lan() {
        let root_nf = read_trimmed(BRIDGE_NF_SYSCTLS[0]);
        let forward = read_trimmed("/proc/sys/net/ipv4/ip_forward");

        let mut lan = Lan::create("unit").expect("create LAN");
        let a = lan.add_host("a").expect("host a");
        let b = lan.add_host("b").expect("host b");
        let bridge = lan.bridge_addr();
        assert_eq!(bridge.octets()[0], 10);
        assert_eq!(bridge.octets()[3], 1);
        assert_eq!(a.addr(), host_addr(lan.network(), 2));
        assert_eq!(b.addr(), host_addr(lan.network(), 3));
        assert!(lan.root_link().len() <= 15);
        assert!(lan.add_host("a").is_err(), "duplicate host name accepted");
        assert!(lan.add_host("../x").is_err(), "bad host name accepted");

        // The switch namespace does not filter bridged frames; the host's
        // sysctls are untouched.
        if root_nf.is_some() {
            let switch_nf = in_netns(&netns_path(lan.switch_netns()), || {
                read_trimmed(BRIDGE_NF_SYSCTLS[0])
            })
            .expect("enter switch");
            assert!(
                matches!(switch_nf.as_deref(), None | Some("0")),
                "switch namespace bridge-nf-call-iptables: {switch_nf:?}"
            );
        }
        assert_eq!(read_trimmed(BRIDGE_NF_SYSCTLS[0]), root_nf);
        assert_eq!(read_trimmed("/proc/sys/net/ipv4/ip_forward"), forward);
        let list = netns_list();
        for ns in [a.netns(), b.netns(), lan.switch_netns()] {
            assert!(list.contains(ns), "{ns} not in `ip netns list`: {list}");
        }

        // A -> B over TCP, listener bound inside B.
        let listener = b
            .run_in(|| TcpListener::bind((b.addr(), 0)))
            .expect("enter b")
            .expect("bind in b");
        let to = listener.local_addr().expect("addr");
        let server = echo_once(listener);
        let local = a.run_in(move || connect_and_ping(to)).expect("enter a");
        let local = local.expect("a connects to b");
        assert_eq!(local.ip(), a.addr());
        assert_eq!(server.join().expect("server"), local);

        // A -> B with ping, if installed.
        if Command::new("ping").arg("-V").output().is_ok() {
            let out = a
                .command("ping")
                .args(["-c1", "-W2", &b.addr().to_string()])
                .output()
                .expect("ping");
            assert!(out.status.success(), "ping a -> b: {out:?}");
        }

        // A -> root namespace at bridge_addr().
        let listener = TcpListener::bind((bridge, 0)).expect("bind on bridge addr");
        let to = listener.local_addr().expect("addr");
        let server = echo_once(listener);
        let local = a.run_in(move || connect_and_ping(to)).expect("enter a");
        assert_eq!(local.expect("a connects to root").ip(), a.addr());
        assert_eq!(server.join().expect("server").ip(), a.addr());

        // Root's loopback is not A's loopback.
        let root_lo = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind lo");
        let to = root_lo.local_addr().expect("addr");
        let from_a = a
            .run_in(move || TcpStream::connect_timeout(&to, TIMEOUT))
            .expect("enter a");
        assert!(from_a.is_err(), "root's 127.0.0.1 reachable from a");
        TcpStream::connect_timeout(&to, TIMEOUT).expect("root reaches its own loopback");

        // command() runs the program itself inside the namespace.
        let out = a
            .command("readlink")
            .arg("/proc/self/ns/net")
            .output()
            .expect("readlink");
        let ino = std::fs::metadata(netns_path(a.netns()))
            .expect("stat netns")
            .ino();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            format!("net:[{ino}]")
        );

        // A process left running inside a host is stopped on drop. `spawn`
        // returns once `nsenter` runs; wait until it has joined the
        // namespace and become `sleep`, or the drop could find nothing yet.
        let mut sleeper = a.command("sleep").arg("600").spawn().expect("spawn sleep");
        let wanted = format!("net:[{ino}]");
        let deadline = std::time::Instant::now() + TIMEOUT;
        while !(std::fs::read_to_string(format!("/proc/{}/comm", sleeper.id()))
            .is_ok_and(|comm| comm.trim() == "sleep")
            && std::fs::read_link(format!("/proc/{}/ns/net", sleeper.id()))
                .is_ok_and(|link| link.to_string_lossy() == wanted))
        {
            assert!(
                std::time::Instant::now() < deadline,
                "sleep never ran inside {}",
                a.netns()
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }

        let names = [
            a.netns().to_owned(),
            b.netns().to_owned(),
            lan.switch_netns().to_owned(),
        ];
        let root_link = lan.root_link().to_owned();
        drop(lan);

        let deadline = std::time::Instant::now() + TIMEOUT;
        let status = loop {
            if let Some(status) = sleeper.try_wait().expect("wait sleep") {
                break Some(status);
            }
            if std::time::Instant::now() >= deadline {
                let _ = sleeper.kill();
                let _ = sleeper.wait();
                break None;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        };
        assert!(
            status.is_some_and(|status| !status.success()),
            "sleep was not killed: {status:?}"
        );
        let list = netns_list();
        for ns in &names {
            assert!(!list.contains(ns.as_str()), "{ns} left behind: {list}");
            assert!(!netns_path(ns).exists());
        }
        assert!(
            ip(&["link", "show", &root_link]).is_err(),
            "{root_link} left behind"
        );
        assert!(
            !ip(&["-o", "-4", "addr", "show"])
                .expect("addr")
                .contains(&bridge.to_string()),
            "{bridge} still assigned"
        );
        assert!(a.run_in(|| ()).is_err(), "host usable after drop");
    }

    #[test]
    fn netns_concurrent_lans_get_distinct_subnets() {
        let lans: Vec<Lan> = std::thread::scope(|s| {
            let threads: Vec<_> = (0..4)
                .map(|i| s.spawn(move || Lan::create(&format!("par{i}"))))
                .collect();
            threads
                .into_iter()
                .map(|t| t.join().expect("thread").expect("create LAN"))
                .collect()
        });
        let networks: HashSet<Ipv4Addr> = lans.iter().map(Lan::network).collect();
        assert_eq!(networks.len(), lans.len());
    }

    #[test]
    fn netns_run_in_resumes_panics() {
        let mut lan = Lan::create("panic").expect("create LAN");
        let host = lan.add_host("p").expect("host");
        let caught = std::panic::catch_unwind(|| host.run_in(|| panic!("boom")));
        let payload = caught.expect_err("panic not resumed");
        assert_eq!(payload.downcast_ref::<&str>(), Some(&"boom"));
        // Borrowing closures work too.
        let local = 41;
        assert_eq!(host.run_in(|| local + 1).expect("run_in"), 42);
    }

    #[test]
    fn netns_subnet_arithmetic() {
        let net = |s: &str| parse_cidr(s).expect("cidr");
        let (a, pa) = net("10.1.2.0/24");
        assert!(overlaps(a, pa, net("10.1.2.77").0, 32));
        assert!(overlaps(a, pa, net("10.0.0.0/8").0, 8));
        assert!(!overlaps(a, pa, net("10.1.3.0/24").0, 24));
        assert!(overlaps(a, pa, Ipv4Addr::UNSPECIFIED, 0));
        assert_eq!(parse_cidr("default"), None);
        assert_eq!(parse_cidr("10.1.2.0/33"), None);
    }
}

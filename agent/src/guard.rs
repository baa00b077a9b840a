//! The connection guard's kernel maps, owned in user space: the verdicts and
//! settings the connect hooks read, the protected ports the ingress hook
//! reads, and the original destinations of tunnelled sockets. A new policy
//! replaces the old one in place, settings last, so the programs never see
//! a half-written policy's default.

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::{Arc, Mutex, RwLock},
};

use agent_common::{
    GuardChain, GuardSettings, InodeKey, TunnelOrigin, TunnelPeerKey, Verdict, VerdictKey,
    BINARY_INODES_MAP, GUARD_CHAINS_MAP, GUARD_SETTINGS_MAP, PROCESS_BINARIES_MAP,
    PROTECTED_PORTS_MAP, TUNNEL_ORIGINS_MAP, USER_GROUPS_MAP, VERDICTS_MAP,
};
use aya::{
    maps::{
        lpm_trie::{Key, LpmTrie},
        Array, HashMap, MapData, MapError,
    },
    Ebpf,
};

use crate::guard_policy::CompiledPolicy;

#[derive(Debug, thiserror::Error)]
pub enum GuardError {
    #[error("the eBPF object has no map {0}")]
    Missing(&'static str),
    #[error("guard map {map}: {source}")]
    Map {
        map: &'static str,
        #[source]
        source: MapError,
    },
}

fn map_error(map: &'static str) -> impl Fn(MapError) -> GuardError {
    move |source| GuardError::Map { map, source }
}

/// The policy in force, shared with whoever names rules in decisions.
pub type SharedPolicy = Arc<RwLock<Arc<CompiledPolicy>>>;

/// The guard's maps and the policy written into them.
pub struct KernelGuard {
    verdicts: LpmTrie<MapData, VerdictKey, Verdict>,
    settings: Array<MapData, GuardSettings>,
    protected: HashMap<MapData, u16, u32>,
    chains: Array<MapData, GuardChain>,
    user_groups: HashMap<MapData, u32, u64>,
    binary_inodes: HashMap<MapData, InodeKey, u64>,
    process_binaries: HashMap<MapData, u32, u64>,
    /// Written into every policy's settings.
    tunnel_port: u16,
    agent_tgid: u32,
    policy: SharedPolicy,
}

impl KernelGuard {
    /// Takes the guard's maps out of `ebpf` and writes `policy` into them.
    /// `tunnel_port` is the agent's tunnel listener (0: none; tunnel
    /// verdicts then fail closed).
    pub fn take(
        ebpf: &mut Ebpf,
        policy: Arc<CompiledPolicy>,
        tunnel_port: u16,
    ) -> Result<Self, GuardError> {
        let take = |ebpf: &mut Ebpf, name| ebpf.take_map(name).ok_or(GuardError::Missing(name));
        let verdicts =
            LpmTrie::try_from(take(ebpf, VERDICTS_MAP)?).map_err(map_error(VERDICTS_MAP))?;
        let settings = Array::try_from(take(ebpf, GUARD_SETTINGS_MAP)?)
            .map_err(map_error(GUARD_SETTINGS_MAP))?;
        let protected = HashMap::try_from(take(ebpf, PROTECTED_PORTS_MAP)?)
            .map_err(map_error(PROTECTED_PORTS_MAP))?;
        let chains =
            Array::try_from(take(ebpf, GUARD_CHAINS_MAP)?).map_err(map_error(GUARD_CHAINS_MAP))?;
        let user_groups =
            HashMap::try_from(take(ebpf, USER_GROUPS_MAP)?).map_err(map_error(USER_GROUPS_MAP))?;
        let binary_inodes = HashMap::try_from(take(ebpf, BINARY_INODES_MAP)?)
            .map_err(map_error(BINARY_INODES_MAP))?;
        let process_binaries = HashMap::try_from(take(ebpf, PROCESS_BINARIES_MAP)?)
            .map_err(map_error(PROCESS_BINARIES_MAP))?;
        let mut guard = Self {
            verdicts,
            settings,
            protected,
            chains,
            user_groups,
            binary_inodes,
            process_binaries,
            tunnel_port,
            agent_tgid: std::process::id(),
            policy: Arc::new(RwLock::new(policy.clone())),
        };
        guard.write(None, &policy)?;
        Ok(guard)
    }

    /// The policy in force.
    pub fn policy(&self) -> SharedPolicy {
        self.policy.clone()
    }

    /// Replaces the policy in force with `policy`.
    pub fn apply(&mut self, policy: Arc<CompiledPolicy>) -> Result<(), GuardError> {
        let old = self
            .policy
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        self.write(Some(&old), &policy)?;
        *self.policy.write().unwrap_or_else(|e| e.into_inner()) = policy;
        Ok(())
    }

    fn write(
        &mut self,
        old: Option<&CompiledPolicy>,
        new: &CompiledPolicy,
    ) -> Result<(), GuardError> {
        // What verdicts point at goes in first: chains, then the groups
        // they test.
        for (index, chain) in new.chains.iter().enumerate() {
            self.chains
                .set(index as u32, *chain, 0)
                .map_err(map_error(GUARD_CHAINS_MAP))?;
        }
        for (uid, bits) in &new.uid_bits {
            self.user_groups
                .insert(uid, bits, 0)
                .map_err(map_error(USER_GROUPS_MAP))?;
        }
        for (inode, bits) in &new.binary_inodes {
            self.binary_inodes
                .insert(inode, bits, 0)
                .map_err(map_error(BINARY_INODES_MAP))?;
        }
        if let Some(old) = old {
            for uid in old
                .uid_bits
                .keys()
                .filter(|u| !new.uid_bits.contains_key(u))
            {
                self.user_groups
                    .remove(uid)
                    .map_err(map_error(USER_GROUPS_MAP))?;
            }
            for inode in old
                .binary_inodes
                .keys()
                .filter(|i| !new.binary_inodes.contains_key(i))
            {
                self.binary_inodes
                    .remove(inode)
                    .map_err(map_error(BINARY_INODES_MAP))?;
            }
        }
        if old.is_none_or(|old| old.binary_inodes != new.binary_inodes) {
            self.seed_process_binaries(&new.binary_inodes);
        }
        for (prefix, key, verdict) in &new.entries {
            self.verdicts
                .insert(&Key::new(*prefix, *key), *verdict, 0)
                .map_err(map_error(VERDICTS_MAP))?;
        }
        for &(port, rule) in &new.protected_ports {
            self.protected
                .insert(port, rule, 0)
                .map_err(map_error(PROTECTED_PORTS_MAP))?;
        }
        if let Some(old) = old {
            let kept: BTreeSet<(u32, VerdictKey)> =
                new.entries.iter().map(|(p, k, _)| (*p, *k)).collect();
            for (prefix, key, _) in &old.entries {
                if !kept.contains(&(*prefix, *key)) {
                    self.verdicts
                        .remove(&Key::new(*prefix, *key))
                        .map_err(map_error(VERDICTS_MAP))?;
                }
            }
            let ports: BTreeSet<u16> = new.protected_ports.iter().map(|(p, _)| *p).collect();
            for (port, _) in &old.protected_ports {
                if !ports.contains(port) {
                    self.protected
                        .remove(port)
                        .map_err(map_error(PROTECTED_PORTS_MAP))?;
                }
            }
        }
        // Last: the programs enforce nothing until the settings name a
        // default, and a new default applies only once its rules are in.
        let settings = GuardSettings {
            tunnel_port: self.tunnel_port.to_be(),
            agent_tgid: self.agent_tgid,
            ..new.settings
        };
        self.settings
            .set(0, settings, 0)
            .map_err(map_error(GUARD_SETTINGS_MAP))
    }
}

/// The original destinations of redirected sockets, by the address the
/// tunnel listener sees as their peer.
impl KernelGuard {
    /// The binary-group bits of processes already running, which the
    /// kernel only learns at exec and fork: from `/proc/<pid>/exe`.
    fn seed_process_binaries(&mut self, inodes: &std::collections::BTreeMap<InodeKey, u64>) {
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return;
        };
        for entry in entries.filter_map(Result::ok) {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            let bits = crate::guard_policy::inode_of(&entry.path().join("exe"))
                .and_then(|key| inodes.get(&key).copied());
            let _ = match bits {
                Some(bits) => self.process_binaries.insert(pid, bits, 0),
                None => self.process_binaries.remove(&pid),
            };
        }
    }
}

#[derive(Clone)]
pub struct TunnelOrigins {
    map: Arc<Mutex<HashMap<MapData, TunnelPeerKey, TunnelOrigin>>>,
}

impl TunnelOrigins {
    pub fn take(ebpf: &mut Ebpf) -> Result<Self, GuardError> {
        let map = ebpf
            .take_map(TUNNEL_ORIGINS_MAP)
            .ok_or(GuardError::Missing(TUNNEL_ORIGINS_MAP))?;
        Ok(Self {
            map: Arc::new(Mutex::new(
                HashMap::try_from(map).map_err(map_error(TUNNEL_ORIGINS_MAP))?,
            )),
        })
    }

    /// Takes the origin of the redirected socket whose local end is `peer`
    /// (each is taken once); `None` when the connection was not redirected.
    pub fn take_origin(&self, peer: SocketAddr) -> Option<TunnelOrigin> {
        let key = peer_key(peer);
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        let origin = map.get(&key, 0).ok()?;
        let _ = map.remove(&key);
        Some(origin)
    }
}

/// The map key of a socket's local address, as the kernel files it.
pub fn peer_key(peer: SocketAddr) -> TunnelPeerKey {
    let mut addr = [0u8; 16];
    let ip_version = match peer.ip() {
        IpAddr::V4(ip) => {
            addr[..4].copy_from_slice(&ip.octets());
            4
        }
        IpAddr::V6(ip) => match ip.to_ipv4_mapped() {
            // An IPv4 client accepted on a dual-stack socket.
            Some(v4) => {
                addr[..4].copy_from_slice(&v4.octets());
                4
            }
            None => {
                addr.copy_from_slice(&ip.octets());
                6
            }
        },
    };
    TunnelPeerKey {
        addr,
        port: peer.port(),
        ip_version,
    }
}

/// The original destination an origin records.
pub fn destination(origin: &TunnelOrigin) -> SocketAddr {
    let a = origin.addr;
    let ip = if origin.ip_version == 4 {
        IpAddr::V4(Ipv4Addr::new(a[0], a[1], a[2], a[3]))
    } else {
        IpAddr::V6(Ipv6Addr::from(a)).to_canonical()
    };
    SocketAddr::new(ip, origin.port)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_keys_match_the_kernels_layout() {
        let key = peer_key("127.0.0.1:40000".parse().unwrap());
        assert_eq!(key.ip_version, 4);
        assert_eq!(key.port, 40000);
        assert_eq!(&key.addr[..4], &[127, 0, 0, 1]);
        assert_eq!(&key.addr[4..], &[0; 12]);
        let mapped = peer_key("[::ffff:127.0.0.1]:40000".parse().unwrap());
        assert_eq!(mapped, key);
        let v6 = peer_key("[::1]:5".parse().unwrap());
        assert_eq!((v6.ip_version, v6.addr[15]), (6, 1));
    }

    #[test]
    fn destinations_read_back() {
        let mut origin = TunnelOrigin {
            port: 8080,
            ip_version: 4,
            ..TunnelOrigin::default()
        };
        origin.addr[..4].copy_from_slice(&[10, 9, 0, 3]);
        assert_eq!(destination(&origin), "10.9.0.3:8080".parse().unwrap());
    }
}

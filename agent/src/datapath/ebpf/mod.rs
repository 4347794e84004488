//! The eBPF backend: loads the embedded object with its maps pinned under the bpffs directory,
//! attaches the TC programs, and keeps the maps equal to the desired pipeline.
//!
//! Everything it creates outlives the agent process: maps are pinned, tcx links are pinned,
//! netlink filters belong to the interface. A restarted agent adopts them (the same pins are
//! reused, attachments are replaced in place), so forwarding never stops with the agent; a pin
//! of another layout than this agent's is replaced instead (`layout`).

pub mod layout;
mod maps;
mod policy_maps;
mod service_flush;
mod sockets;
pub use sockets::netns_cookie;

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use anyhow::{anyhow, bail, Context, Result};
use aya::{
    programs::{
        links::{FdLink, PinnedLink},
        tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions, TcHandle},
        LinkOrder, SchedClassifier, TcAttachType,
    },
    util::KernelVersion,
    Ebpf, EbpfLoader,
};
pub use maps::{Counters, Maps};
use sluice_common::{map_names, program_names, ExternalIp, IpKey, NodeConfig};

use crate::{
    config::TcAttachMode,
    datapath::{Datapath, NodeWiring, SyncReport},
    model::{policy::PolicyTables, service::ServiceTables, Pipeline},
};

/// The compiled TC programs, built by `cargo xtask build` and embedded at compile time.
pub static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/sluice-ebpf"));

/// The netlink filter slot Sluice owns on each interface, so a restarted agent finds it again.
const NL_PRIORITY: u16 = 1;
const NL_HANDLE: TcHandle = TcHandle::new(0, 1);

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// How programs are attached on this node, resolved from the configured mode and the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attach {
    Tcx,
    Netlink,
}

impl Attach {
    pub fn resolve(mode: TcAttachMode) -> Result<Attach> {
        let tcx_supported =
            KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 6, 0));
        match mode {
            TcAttachMode::Netlink => Ok(Attach::Netlink),
            TcAttachMode::Auto if tcx_supported => Ok(Attach::Tcx),
            TcAttachMode::Auto => Ok(Attach::Netlink),
            TcAttachMode::Tcx if tcx_supported => Ok(Attach::Tcx),
            TcAttachMode::Tcx => {
                bail!("field `tcAttachMode`: tcx needs kernel 6.6 or later; use netlink or auto")
            }
        }
    }
}

pub struct EbpfDatapath {
    bpf: Ebpf,
    maps: Maps,
    pin_dir: PathBuf,
    attach: Attach,
    /// The maps whose pins were of another layout, replaced at load.
    replaced: Vec<&'static str>,
    /// The node's network namespace, whose sockets `sock_connect4` balances (0: none).
    host_netns_cookie: u64,
}

/// Makes sure `dir` lives on a bpffs, mounting one at /sys/fs/bpf if nothing is mounted there.
pub fn ensure_bpffs(dir: &Path) -> Result<()> {
    let existing = dir
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"));
    let on_bpffs =
        |p: &Path| nix::sys::statfs::statfs(p).is_ok_and(|s| s.filesystem_type().0 == BPF_FS_MAGIC);
    if !on_bpffs(existing) {
        let root = Path::new("/sys/fs/bpf");
        if dir.starts_with(root) && root.is_dir() && !on_bpffs(root) {
            nix::mount::mount(
                Some("bpffs"),
                root,
                Some("bpf"),
                nix::mount::MsFlags::empty(),
                None::<&str>,
            )
            .context("mounting bpffs at /sys/fs/bpf")?;
        } else {
            bail!(
                "{} is not on a bpffs mount: maps could not be pinned there",
                dir.display()
            );
        }
    }
    std::fs::create_dir_all(dir.join("links"))
        .with_context(|| format!("creating {}", dir.display()))
}

impl EbpfDatapath {
    /// `map_sizes`: the size each resizable map is to have (`Settings::map_sizes`).
    pub fn load(
        pin_dir: &Path,
        mode: TcAttachMode,
        map_sizes: &[(&'static str, u32)],
    ) -> Result<EbpfDatapath> {
        let attach = Attach::resolve(mode)?;
        ensure_bpffs(pin_dir)?;
        let declared = layout::declared(EBPF_OBJECT, map_sizes)?;
        let replaced = layout::replace_mismatched(pin_dir, &declared)?;
        let mut loader = EbpfLoader::new();
        for name in map_names::ALL {
            loader.map_pin_path(name, pin_dir.join(name));
        }
        for &(name, size) in map_sizes {
            loader.map_max_entries(name, size);
        }
        let mut bpf = loader
            .load(EBPF_OBJECT)
            .context("loading the eBPF object")?;
        layout::record(&mut bpf, &declared)?;
        for name in [
            program_names::FROM_POD,
            program_names::FROM_GATEWAY,
            program_names::FROM_TUNNEL,
            program_names::FROM_UPLINK,
        ] {
            let program: &mut SchedClassifier = bpf
                .program_mut(name)
                .ok_or_else(|| anyhow!("the eBPF object has no program {name}"))?
                .try_into()?;
            program
                .load()
                .with_context(|| format!("loading program {name} (verifier)"))?;
        }
        let maps = Maps::take(&mut bpf)?;
        Ok(EbpfDatapath {
            bpf,
            maps,
            pin_dir: pin_dir.to_path_buf(),
            attach,
            replaced,
            host_netns_cookie: 0,
        })
    }

    /// Balances the node's own connects to its NodePorts (`sock_connect4` on the cgroup v2
    /// hierarchy at `cgroup_dir`, see `sockets`). Before `install_node`, which hands the
    /// program the node's network namespace.
    pub fn attach_sockets(&mut self, cgroup_dir: &Path) -> Result<()> {
        let cgroup = sockets::resolve_cgroup(cgroup_dir)?;
        let Some(cookie) = sockets::netns_cookie() else {
            return Ok(());
        };
        let pin = self
            .pin_dir
            .join("links")
            .join(format!("cgroup-{}", program_names::SOCK_CONNECT4));
        sockets::attach_connect4(&mut self.bpf, &cgroup, &pin)?;
        self.host_netns_cookie = cookie;
        Ok(())
    }

    pub fn maps(&self) -> &Maps {
        &self.maps
    }

    pub fn attach_mode(&self) -> Attach {
        self.attach
    }

    fn link_pin(&self, ifname: &str, program: &str) -> PathBuf {
        self.pin_dir
            .join("links")
            .join(format!("{ifname}-{program}"))
    }

    fn program(&mut self, name: &str) -> Result<&mut SchedClassifier> {
        Ok(self
            .bpf
            .program_mut(name)
            .ok_or_else(|| anyhow!("no program {name}"))?
            .try_into()?)
    }

    /// Attaches `program` to tc ingress of `ifname`, replacing a previous attachment of ours in
    /// place (no window without a program).
    fn attach_ingress(&mut self, program: &str, ifname: &str) -> Result<()> {
        let pin = self.link_pin(ifname, program);
        let attach = self.attach;
        let prog = self.program(program)?;
        match attach {
            Attach::Tcx => {
                let replaced = match PinnedLink::from_pin(&pin) {
                    Ok(old) => {
                        let link = SchedClassifierLink::try_from(old.unpin()?)?;
                        prog.attach_to_link(link).ok()
                    }
                    Err(_) => None,
                };
                let id = match replaced {
                    Some(id) => id,
                    None => prog.attach_with_options(
                        ifname,
                        TcAttachType::Ingress,
                        TcAttachOptions::TcxOrder(LinkOrder::default()),
                    )?,
                };
                let link: FdLink = prog.take_link(id)?.try_into()?;
                link.pin(&pin)
                    .with_context(|| format!("pinning the tcx link at {}", pin.display()))?;
            }
            Attach::Netlink => {
                if let Err(e) = tc::qdisc_add_clsact(ifname) {
                    if !matches!(&e, tc::TcError::NetlinkError(n) if n.raw_os_error() == Some(libc::EEXIST))
                    {
                        return Err(e)
                            .with_context(|| format!("adding the clsact qdisc to {ifname}"));
                    }
                }
                let ours = SchedClassifierLink::attached(
                    ifname,
                    TcAttachType::Ingress,
                    NL_PRIORITY,
                    NL_HANDLE,
                    None,
                )?;
                let id = match prog.attach_to_link(ours) {
                    Ok(id) => id,
                    Err(_) => prog.attach_with_options(
                        ifname,
                        TcAttachType::Ingress,
                        TcAttachOptions::Netlink(NlOptions {
                            priority: NL_PRIORITY,
                            handle: NL_HANDLE,
                            classid: None,
                        }),
                    )?,
                };
                // The filter belongs to the interface; dropping the link would delete it.
                std::mem::forget(prog.take_link(id)?);
            }
        }
        Ok(())
    }
}

impl Datapath for EbpfDatapath {
    fn install_node(&mut self, wiring: &NodeWiring) -> Result<()> {
        let config = NodeConfig {
            gateway_ifindex: wiring.gateway.ifindex,
            tunnel_ifindex: wiring.tunnel.as_ref().map_or(0, |(_, index)| *index),
            gateway_mac: wiring.gateway.mac.0,
            _pad: [0; 2],
            gateway_ipv4: wiring.gateway_ip.octets(),
            _pad2: 0,
            host_netns_cookie: self.host_netns_cookie,
        };
        self.maps
            .node_config
            .set(0, config, 0)
            .context("writing NODE_CONFIG")?;
        self.attach_ingress(program_names::FROM_GATEWAY, &wiring.gateway.peer_name)?;
        if let Some((name, _)) = &wiring.tunnel {
            self.attach_ingress(program_names::FROM_TUNNEL, name)?;
        }
        Ok(())
    }

    fn attach_port(&mut self, host_ifname: &str) -> Result<()> {
        self.attach_ingress(program_names::FROM_POD, host_ifname)
    }

    fn detach_port(&mut self, host_ifname: &str) -> Result<()> {
        let pin = self.link_pin(host_ifname, program_names::FROM_POD);
        if let Ok(link) = PinnedLink::from_pin(&pin) {
            // Dropping the unpinned link releases the tcx attachment.
            link.unpin()
                .with_context(|| format!("unpinning {}", pin.display()))?;
        }
        if self.attach == Attach::Netlink {
            if let Ok(link) = SchedClassifierLink::attached(
                host_ifname,
                TcAttachType::Ingress,
                NL_PRIORITY,
                NL_HANDLE,
                None,
            ) {
                // The interface may already be gone, and its filters with it.
                let _ = aya::programs::Link::detach(link);
            }
        }
        Ok(())
    }

    fn sync(&mut self, desired: &Pipeline) -> Result<SyncReport> {
        self.maps.sync(desired)
    }

    fn current(&self) -> Result<Pipeline> {
        self.maps.pipeline()
    }

    fn sync_policy(&mut self, desired: &PolicyTables) -> Result<SyncReport> {
        self.maps.sync_policy(desired)
    }

    fn current_policy(&self) -> Result<PolicyTables> {
        self.maps.policy_tables()
    }

    fn isolate_pending(&mut self, addrs: &[IpKey]) -> Result<()> {
        self.maps.isolate_pending(addrs)
    }

    fn attach_uplink(&mut self, ifname: &str) -> Result<()> {
        self.attach_ingress(program_names::FROM_UPLINK, ifname)
    }

    fn isolation_lost(&self) -> bool {
        self.replaced.contains(&map_names::ENDPOINT_POLICY)
    }

    fn sync_services(&mut self, desired: &ServiceTables) -> Result<SyncReport> {
        self.maps.sync_services(desired)
    }

    fn sync_external_ips(&mut self, owned: &BTreeMap<IpKey, ExternalIp>) -> Result<()> {
        self.maps.sync_external_ips(owned)
    }
}

//! The agent side of the CNI: veth pairs, IPAM, endpoint records, datapath entries and
//! attachments, behind a unix socket only root can open. Requests are served one at a time, so
//! two calls never race on a pod's state.

use std::{
    fs::File,
    net::{IpAddr, Ipv4Addr},
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::{Context, Result};
use ipnetwork::IpNetwork;
use sluice_common::HAIRPIN_IPV4;
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
    sync::Mutex,
};
use tracing::{info, warn};

use super::{
    code, rounds::ProgramRounds, AgentReply, AgentRequest, CniError, CniResult, Command, Interface,
    IpConfig, Route,
};
use crate::{
    config::{EncapMode, NodeNetwork},
    datapath::{Datapath, NodeWiring},
    endpoints::Store,
    health::Health,
    ipam::{Ipam, IpamError},
    masquerade,
    model::{ip_key, LocalEndpoint, Mac, Pipeline, RemoteRoute},
    net::{self, Gateway, ManagedRoute, Netlink, PodInterface},
};

/// The tunnel device in encap mode (Antrea's is antrea-tun0).
pub const TUNNEL_DEVICE: &str = "sluice-tun0";

pub struct PodNetwork {
    node: NodeNetwork,
    gateway: Gateway,
    datapath: Box<dyn Datapath>,
    ipam: Ipam,
    store: Store,
    nl: Netlink,
    /// Other nodes' pod CIDRs, from the Node objects (empty without Kubernetes).
    remotes: Vec<RemoteRoute>,
    /// Whether the node's routes and masquerade have been programmed once: on a single node
    /// there are no remotes, yet the Service CIDR's route and masquerading are needed.
    routes_programmed: bool,
}

/// What a reconcile found.
#[derive(Debug, Default)]
pub struct ReconcileReport {
    pub live: usize,
    pub stale: Vec<String>,
    pub orphan_addresses: Vec<IpAddr>,
    pub orphan_links: Vec<String>,
}

pub(super) fn io(msg: &str) -> impl FnOnce(anyhow::Error) -> CniError + '_ {
    move |e| CniError::new(code::IO_FAILURE, msg).with_details(format!("{e:#}"))
}

fn datapath_err(msg: &str) -> impl FnOnce(anyhow::Error) -> CniError + '_ {
    move |e| CniError::new(code::DATAPATH, msg).with_details(format!("{e:#}"))
}

/// Interface names derived from the pod's identity (FNV-1a), short enough for IFNAMSIZ.
fn port_names(container_id: &str, ifname: &str) -> (String, String) {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in container_id.bytes().chain([b'/']).chain(ifname.bytes()) {
        hash = (hash ^ b as u64).wrapping_mul(0x0100_0000_01b3);
    }
    let hex = format!("{hash:016x}");
    (format!("sl{}", &hex[..12]), format!("sp{}", &hex[..12]))
}

/// Whether `name` is one of `port_names`' (`sl`/`sp` and 12 hex digits).
fn is_port_name(name: &str) -> bool {
    (name.starts_with("sl") || name.starts_with("sp"))
        && name.len() == 14
        && name[2..].bytes().all(|b| b.is_ascii_hexdigit())
}

impl PodNetwork {
    /// Wires the node (gateway, forwarding, masquerade), then reconciles with what the previous
    /// agent left: pinned maps, attachments, records.
    pub async fn start(
        node: NodeNetwork,
        datapath: Box<dyn Datapath>,
        state_dir: &Path,
    ) -> Result<PodNetwork> {
        let nl = Netlink::new()?;
        let gateway = nl
            .ensure_gateway(
                &node.gateway_name,
                node.gateway_ip,
                node.pod_cidr.prefix(),
                node.mtu,
            )
            .await
            .context("setting up the gateway")?;
        net::write_sysctl("/proc/sys/net/ipv4/ip_forward", "1")?;
        masquerade::install(node.pod_cidr, &[], &node.gateway_name, node.masquerade)?;
        let tunnel = match node.encap {
            EncapMode::Encap => {
                let link = nl
                    .ensure_tunnel(TUNNEL_DEVICE, node.tunnel_type, node.mtu)
                    .await?;
                Some((TUNNEL_DEVICE.to_string(), link.index))
            }
            EncapMode::NoEncap => None,
        };
        let ipam = Ipam::open(&state_dir.join("ipam"), node.pod_cidr, node.gateway_ip)?;
        let store = Store::open(&state_dir.join("endpoints"))?;
        let mut pods = PodNetwork {
            node,
            gateway,
            datapath,
            ipam,
            store,
            nl,
            remotes: Vec::new(),
            routes_programmed: false,
        };
        let IpAddr::V4(gateway_ip) = pods.node.gateway_ip else {
            unreachable!("validated as IPv4")
        };
        let wiring = NodeWiring {
            gateway: pods.gateway.clone(),
            gateway_ip,
            tunnel,
        };
        // Maps that could not be adopted start empty: the pods are isolated (allowing nothing
        // until the first policy round) and the maps filled before any new program runs on them.
        if pods.node.isolate_new_pods && pods.datapath.isolation_lost() {
            let addrs: Vec<_> = pods
                .store
                .list()?
                .iter()
                .flat_map(|ep| ep.ips.iter().map(|n| ip_key(n.ip())))
                .collect();
            warn!(pods = addrs.len(), "the previous agent's policy maps were replaced: every pod allows nothing until NetworkPolicy is programmed");
            pods.datapath.isolate_pending(&addrs)?;
        }
        let report = pods.reconcile().await?;
        pods.datapath
            .install_node(&wiring)
            .context("attaching the gateway and tunnel programs")?;
        pods.attach_ports()?;
        info!(live = report.live, stale = ?report.stale, orphan_addresses = ?report.orphan_addresses, orphan_links = ?report.orphan_links, "reconciled with the previous state");
        Ok(pods)
    }

    /// Drops the records, reservations and entries of pods whose interface is gone, and makes
    /// the maps hold the live ones.
    async fn reconcile(&mut self) -> Result<ReconcileReport> {
        let mut report = ReconcileReport::default();
        let mut live = Vec::new();
        for ep in self.store.list()? {
            let present = self
                .nl
                .link(&ep.host_ifname)
                .await?
                .is_some_and(|l| l.index == ep.host_ifindex);
            if present {
                live.push(ep);
            } else {
                self.datapath.detach_port(&ep.host_ifname)?;
                self.store.remove(&ep.container_id, &ep.ifname)?;
                self.ipam.release(&ep.container_id, &ep.ifname)?;
                report
                    .stale
                    .push(format!("{}/{}", ep.container_id, ep.ifname));
            }
        }
        report.orphan_addresses = self.release_unrecorded(&Default::default())?;
        // Veths of an ADD that died before writing its record (both ends still here if it died
        // before moving one into the pod).
        for (name, index) in self.nl.links().await? {
            if is_port_name(&name) && !live.iter().any(|ep| ep.host_ifname == name) {
                self.datapath.detach_port(&name)?;
                self.nl.delete_link(index).await?;
                report.orphan_links.push(name);
            }
        }
        self.datapath.sync(&self.desired(&live))?;
        report.live = live.len();
        Ok(report)
    }

    /// Attaches the (possibly newer) program to every live pod's port, replacing the old one.
    fn attach_ports(&mut self) -> Result<()> {
        for ep in self.store.list()? {
            self.datapath.attach_port(&ep.host_ifname)?;
        }
        Ok(())
    }

    fn desired(&self, endpoints: &[LocalEndpoint]) -> Pipeline {
        let tunneled: &[RemoteRoute] = match self.node.encap {
            EncapMode::Encap => &self.remotes,
            EncapMode::NoEncap => &[],
        };
        Pipeline::compile(endpoints, tunneled)
    }

    fn sync(&mut self) -> Result<()> {
        let endpoints = self.store.list()?;
        self.datapath.sync(&self.desired(&endpoints))?;
        Ok(())
    }

    /// The NetworkPolicy entries the datapath holds (what the previous agent left, at start).
    pub fn current_policy(&self) -> Result<crate::model::policy::PolicyTables> {
        self.datapath.current_policy()
    }

    /// Programs the NetworkPolicy entries; the gateway address counts as this node's own.
    pub fn set_policy(&mut self, tables: &crate::model::policy::PolicyTables) -> Result<()> {
        self.datapath.sync_policy(tables)?;
        Ok(())
    }

    /// Programs the Service frontends and backends (see `Datapath::sync_services`).
    pub fn set_services(
        &mut self,
        tables: &crate::model::service::ServiceTables,
    ) -> Result<crate::datapath::SyncReport> {
        self.datapath.sync_services(tables)
    }

    /// The LoadBalancer IPs this node answers ARP for.
    pub fn set_external_ips(
        &mut self,
        owned: &std::collections::BTreeMap<sluice_common::IpKey, sluice_common::ExternalIp>,
    ) -> Result<()> {
        self.datapath.sync_external_ips(owned)
    }

    /// Attaches the uplink program to the interface holding one of the node's addresses;
    /// returns its name and MAC.
    pub async fn attach_uplink(&mut self, node_addresses: &[IpAddr]) -> Result<(String, Mac)> {
        let (name, link) = self
            .nl
            .interface_with_address(node_addresses)
            .await?
            .with_context(|| {
                format!("no interface holds one of the node's addresses {node_addresses:?}")
            })?;
        self.datapath.attach_uplink(&name)?;
        let mac = link
            .mac
            .with_context(|| format!("the uplink {name} has no MAC address"))?;
        Ok((name, mac))
    }

    /// The node reaches ClusterIPs through the datapath (`from_gateway` balances them). Its
    /// connections to its own host-network endpoints come in from the hairpin address, so the
    /// answers go back out through the gateway, where the datapath undoes both rewrites.
    fn service_routes(&self) -> Vec<ManagedRoute> {
        let (Some(cidr), IpAddr::V4(gateway)) = (self.node.service_cidr, self.node.gateway_ip)
        else {
            return Vec::new();
        };
        let hairpin = IpNetwork::new(IpAddr::V4(Ipv4Addr::from(HAIRPIN_IPV4)), 32)
            .expect("a /32 is a valid prefix");
        [cidr, hairpin]
            .into_iter()
            .map(|dst| ManagedRoute {
                dst,
                via: None,
                oif: Some(self.gateway.ifindex),
                src: Some(gateway),
            })
            .collect()
    }

    pub fn gateway_ip(&self) -> IpAddr {
        self.node.gateway_ip
    }

    pub fn pod_cidr(&self) -> IpNetwork {
        self.node.pod_cidr
    }

    /// Programs the other nodes' pod CIDRs: datapath entries (encap), node routes, and the
    /// masquerade exceptions. Only what changed is rewritten.
    pub async fn set_remote_routes(&mut self, mut remotes: Vec<RemoteRoute>) -> Result<()> {
        remotes.sort();
        if self.routes_programmed && remotes == self.remotes {
            return Ok(());
        }
        self.remotes = remotes;
        self.sync()?;
        let routes: Vec<ManagedRoute> = self
            .remotes
            .iter()
            .filter_map(|r| match (self.node.encap, r.node_ip) {
                // Into the datapath through the gateway, which tunnels it.
                (EncapMode::Encap, _) => Some(ManagedRoute {
                    dst: r.pod_cidr,
                    via: None,
                    oif: Some(self.gateway.ifindex),
                    src: None,
                }),
                (EncapMode::NoEncap, IpAddr::V4(via)) => Some(ManagedRoute {
                    dst: r.pod_cidr,
                    via: Some(via),
                    oif: None,
                    src: None,
                }),
                (EncapMode::NoEncap, IpAddr::V6(_)) => None,
            })
            .chain(self.service_routes())
            .collect();
        self.nl.sync_routes(&routes).await?;
        let cluster: Vec<IpNetwork> = self.remotes.iter().map(|r| r.pod_cidr).collect();
        masquerade::install(
            self.node.pod_cidr,
            &cluster,
            &self.node.gateway_name,
            self.node.masquerade,
        )?;
        self.routes_programmed = true;
        info!(
            remote_nodes = self.remotes.len(),
            "programmed routes to other nodes"
        );
        Ok(())
    }

    pub async fn handle(&mut self, request: AgentRequest) -> AgentReply {
        let reply = match request.command {
            Command::Add => self.add(&request).await.map(Some),
            Command::Del => self.del(&request).await.map(|()| None),
            Command::Check => self.check(&request).await.map(|()| None),
            // Answered by `serve_one` without waiting for the node's lock.
            Command::Status => Ok(None),
            Command::Gc => self.gc(&request.valid_attachments).await.map(|()| None),
        };
        match reply {
            Ok(result) => AgentReply::Ok(result),
            Err(err) => {
                warn!(command = ?request.command, container = %request.container_id, %err, "CNI request failed");
                AgentReply::Error(err)
            }
        }
    }

    fn result(&self, ep: &LocalEndpoint) -> CniResult {
        CniResult {
            cni_version: String::new(),
            interfaces: vec![Interface {
                name: ep.ifname.clone(),
                mac: ep.mac.to_string(),
                sandbox: Some(ep.netns.clone()),
            }],
            ips: ep
                .ips
                .iter()
                .map(|net| IpConfig {
                    address: net.to_string(),
                    gateway: self.node.gateway_ip.to_string(),
                    interface: 0,
                })
                .collect(),
            routes: vec![Route {
                dst: "0.0.0.0/0".into(),
                gw: Some(self.node.gateway_ip.to_string()),
            }],
            dns: serde_json::json!({}),
        }
    }

    async fn add(&mut self, req: &AgentRequest) -> Result<CniResult, CniError> {
        if !Path::new(&req.netns).exists() {
            return Err(CniError::new(
                code::UNKNOWN_CONTAINER,
                format!("network namespace {} does not exist", req.netns),
            ));
        }
        if let Some(ep) = self
            .store
            .get(&req.container_id, &req.ifname)
            .map_err(|e| io("reading endpoint records")(e.into()))?
        {
            // A repeated ADD for a pod that is still wired gets the same answer.
            if self
                .nl
                .link(&ep.host_ifname)
                .await
                .ok()
                .flatten()
                .is_some_and(|l| l.index == ep.host_ifindex)
            {
                return Ok(self.result(&ep));
            }
        }
        let ip = self
            .ipam
            .reserve(&req.container_id, &req.ifname)
            .map_err(|e| match e {
                IpamError::Exhausted { .. } => CniError::new(code::POOL_EXHAUSTED, e.to_string()),
                IpamError::Io { .. } => {
                    CniError::new(code::IO_FAILURE, "IPAM store failed").with_details(e)
                }
            })?;
        match self.wire(req, ip).await {
            Ok(ep) => {
                info!(container = %req.container_id, ip = %ip, port = %ep.host_ifname, "pod added");
                Ok(self.result(&ep))
            }
            Err(err) => {
                // Leave nothing behind: the runtime will call ADD again or DEL.
                let (host, _) = port_names(&req.container_id, &req.ifname);
                let _ = self.datapath.detach_port(&host);
                if let Ok(Some(link)) = self.nl.link(&host).await {
                    let _ = self.nl.delete_link(link.index).await;
                }
                let _ = self.store.remove(&req.container_id, &req.ifname);
                let _ = self.sync();
                let _ = self.ipam.release(&req.container_id, &req.ifname);
                Err(err)
            }
        }
    }

    async fn wire(&mut self, req: &AgentRequest, ip: IpAddr) -> Result<LocalEndpoint, CniError> {
        let IpAddr::V4(ipv4) = ip else {
            return Err(CniError::new(
                code::INVALID_CONFIG,
                "IPv6 pod addresses are not supported yet",
            ));
        };
        let IpAddr::V4(gateway) = self.node.gateway_ip else {
            unreachable!("validated as IPv4")
        };
        let (host, temp) = port_names(&req.container_id, &req.ifname);
        if let Some(leftover) = self.nl.link(&host).await.map_err(io("looking up links"))? {
            self.nl
                .delete_link(leftover.index)
                .await
                .map_err(io("deleting a leftover veth"))?;
        }
        self.nl
            .create_veth(&host, &temp)
            .await
            .map_err(io("creating the veth pair"))?;
        let peer = self
            .nl
            .link(&temp)
            .await
            .map_err(io("looking up links"))?
            .ok_or_else(|| {
                CniError::new(
                    code::IO_FAILURE,
                    format!("veth end {temp} vanished right after creation"),
                )
            })?;
        let netns = File::open(&req.netns).map_err(|e| {
            CniError::new(
                code::UNKNOWN_CONTAINER,
                format!("cannot open network namespace {}", req.netns),
            )
            .with_details(e)
        })?;
        self.nl
            .move_to_netns(peer.index, &netns)
            .await
            .map_err(io("moving the veth into the pod"))?;
        let mac = Mac::for_ipv4(ipv4);
        let pod = PodInterface {
            temp_name: temp,
            ifname: req.ifname.clone(),
            mac,
            ip: ipv4,
            prefix: self.node.pod_cidr.prefix(),
            gateway,
            mtu: self.node.mtu,
        };
        let netns_path = PathBuf::from(&req.netns);
        tokio::task::spawn_blocking(move || net::configure_pod(&netns_path, pod))
            .await
            .map_err(|e| io("configuring the pod interface")(e.into()))?
            .map_err(io("configuring the pod interface"))?;
        let host_link = self
            .nl
            .link(&host)
            .await
            .map_err(io("looking up links"))?
            .ok_or_else(|| {
                CniError::new(
                    code::IO_FAILURE,
                    format!("host end {host} of the pod's veth vanished"),
                )
            })?;
        let ep = LocalEndpoint {
            container_id: req.container_id.clone(),
            ifname: req.ifname.clone(),
            netns: req.netns.clone(),
            host_ifname: host.clone(),
            host_ifindex: host_link.index,
            mac,
            ips: vec![
                IpNetwork::new(ip, self.node.pod_cidr.prefix()).expect("prefix of a valid CIDR")
            ],
            pod: req.pod.clone(),
        };
        // Everything that judges the pod's packets is in place before its port comes up (with
        // the host end down the pod cannot send): under Kubernetes the pod allows nothing until
        // the policy compiler has seen it.
        if self.node.isolate_new_pods {
            let addrs: Vec<_> = ep.ips.iter().map(|n| ip_key(n.ip())).collect();
            self.datapath
                .isolate_pending(&addrs)
                .map_err(datapath_err("isolating the new pod"))?;
        }
        self.store
            .put(&ep)
            .map_err(|e| io("writing the endpoint record")(e.into()))?;
        self.sync()
            .map_err(datapath_err("programming the datapath"))?;
        self.datapath
            .attach_port(&host)
            .map_err(datapath_err("attaching the datapath to the pod's port"))?;
        self.nl
            .set_up(host_link.index, self.node.mtu)
            .await
            .map_err(io("bringing the host end up"))?;
        Ok(ep)
    }

    /// Idempotent: an unknown container or a second DEL is success, as the spec requires.
    async fn del(&mut self, req: &AgentRequest) -> Result<(), CniError> {
        self.remove(&req.container_id, &req.ifname).await
    }

    /// Removes a pod interface's entries, veth and address, whatever is left of them.
    pub(super) async fn remove(
        &mut self,
        container_id: &str,
        ifname: &str,
    ) -> Result<(), CniError> {
        let record = self
            .store
            .get(container_id, ifname)
            .map_err(|e| io("reading endpoint records")(e.into()))?;
        let host = record.as_ref().map_or_else(
            || port_names(container_id, ifname).0,
            |ep| ep.host_ifname.clone(),
        );
        // Entries go first, the address last, so no address is reused while still programmed.
        self.store
            .remove(container_id, ifname)
            .map_err(|e| io("removing the endpoint record")(e.into()))?;
        self.sync()
            .map_err(datapath_err("removing datapath entries"))?;
        self.datapath
            .detach_port(&host)
            .map_err(datapath_err("detaching the datapath"))?;
        if let Some(link) = self.nl.link(&host).await.map_err(io("looking up links"))? {
            self.nl
                .delete_link(link.index)
                .await
                .map_err(io("deleting the veth"))?;
        }
        let released = self
            .ipam
            .release(container_id, ifname)
            .map_err(|e| io("releasing the address")(e.into()))?;
        info!(container = %container_id, released = ?released, "pod deleted");
        Ok(())
    }

    /// Releases the addresses reserved for attachments neither recorded nor in `keep`: what an
    /// ADD that died between its reservation and its record left. Returns them.
    pub(super) fn release_unrecorded(
        &mut self,
        keep: &std::collections::BTreeSet<(&str, &str)>,
    ) -> Result<Vec<IpAddr>> {
        let recorded = self.store.list()?;
        let mut released = Vec::new();
        for (ip, id, ifname) in self.ipam.reservations()? {
            let known = keep.contains(&(id.as_str(), ifname.as_str()))
                || recorded
                    .iter()
                    .any(|ep| ep.container_id == id && ep.ifname == ifname);
            if !known {
                self.ipam.release(&id, &ifname)?;
                released.push(ip);
            }
        }
        Ok(released)
    }

    async fn check(&mut self, req: &AgentRequest) -> Result<(), CniError> {
        let failed = |what: String| CniError::new(code::CHECK_FAILED, what);
        let ep = self
            .store
            .get(&req.container_id, &req.ifname)
            .map_err(|e| io("reading endpoint records")(e.into()))?
            .ok_or_else(|| {
                CniError::new(
                    code::UNKNOWN_CONTAINER,
                    format!(
                        "no pod interface {}/{} on this node",
                        req.container_id, req.ifname
                    ),
                )
            })?;
        match self
            .nl
            .link(&ep.host_ifname)
            .await
            .map_err(io("looking up links"))?
        {
            Some(link) if link.index == ep.host_ifindex => {}
            _ => {
                return Err(failed(format!(
                    "host end {} of the pod's veth is missing",
                    ep.host_ifname
                )))
            }
        }
        let netns = PathBuf::from(&req.netns);
        let ifname = req.ifname.clone();
        let pod_link = tokio::task::spawn_blocking(move || net::inspect_pod(&netns, ifname))
            .await
            .map_err(|e| io("inspecting the pod")(e.into()))?
            .map_err(io("inspecting the pod"))?;
        match pod_link {
            Some(link) if link.mac == Some(ep.mac) => {}
            Some(_) => {
                return Err(failed(format!(
                    "{} in the pod does not have MAC {}",
                    req.ifname, ep.mac
                )))
            }
            None => {
                return Err(failed(format!(
                    "{} is missing in the pod's namespace",
                    req.ifname
                )))
            }
        }
        let expected = Pipeline::compile([&ep], []);
        let actual = self
            .current_pipeline()
            .map_err(datapath_err("reading the datapath"))?;
        let programmed = expected
            .spoof_guard
            .iter()
            .all(|(k, v)| actual.spoof_guard.get(k) == Some(v))
            && expected
                .l3_forwarding
                .iter()
                .all(|(k, v)| actual.l3_forwarding.get(k) == Some(v));
        if !programmed {
            return Err(failed(format!(
                "the datapath entries of {}/{} are missing",
                req.container_id, req.ifname
            )));
        }
        Ok(())
    }

    /// The pod interfaces this node has wired.
    pub fn endpoints(&self) -> Result<Vec<LocalEndpoint>> {
        Ok(self.store.list()?)
    }

    fn current_pipeline(&self) -> Result<Pipeline> {
        self.datapath.current()
    }
}

/// How long ADD waits for the policy round that judges the new pod. Past it the pod stays
/// isolated (allowing nothing) until its Pod shows up in the watch, and ADD answers anyway.
const ADD_POLICY_WAIT: Duration = Duration::from_secs(10);

/// Serves CNI requests until the listener fails. The socket's directory is root-only. With
/// `rounds` (policy from Kubernetes), ADD answers after the pod's policies are programmed.
pub async fn serve(
    socket: &Path,
    pods: Arc<Mutex<PodNetwork>>,
    rounds: Option<ProgramRounds>,
    health: Arc<Health>,
) -> Result<()> {
    let dir = socket
        .parent()
        .context("the CNI socket path has no directory")?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    let _ = std::fs::remove_file(socket);
    let listener =
        UnixListener::bind(socket).with_context(|| format!("binding {}", socket.display()))?;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))?;
    info!(socket = %socket.display(), "serving CNI requests");
    loop {
        let (stream, _) = listener.accept().await?;
        let pods = pods.clone();
        let rounds = rounds.clone();
        let health = health.clone();
        tokio::spawn(async move {
            if let Err(e) = serve_one(stream, pods, rounds, &health).await {
                warn!("CNI connection failed: {e:#}");
            }
        });
    }
}

async fn serve_one(
    stream: UnixStream,
    pods: Arc<Mutex<PodNetwork>>,
    rounds: Option<ProgramRounds>,
    health: &Health,
) -> Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    BufReader::new(read).read_line(&mut line).await?;
    let reply = match serde_json::from_str::<AgentRequest>(&line) {
        Ok(request) if request.command == Command::Status => match health.check() {
            Ok(()) => AgentReply::Ok(None),
            Err(why) => AgentReply::Error(CniError::new(code::LIMITED_CONNECTIVITY, why)),
        },
        Ok(request) => {
            let add = request.command == Command::Add;
            let pod = request.pod.clone();
            // The lock is released before waiting: the round needs it.
            let reply = pods.lock().await.handle(request).await;
            if let (true, AgentReply::Ok(_), Some(rounds)) = (add, &reply, rounds) {
                if !rounds.request(ADD_POLICY_WAIT).await {
                    warn!(pod = ?pod, "no policy round finished within {ADD_POLICY_WAIT:?} of ADD: the pod allows nothing until one does");
                }
            }
            reply
        }
        Err(e) => AgentReply::Error(
            CniError::new(code::DECODE_FAILED, "malformed request from the CNI plugin")
                .with_details(e),
        ),
    };
    let mut out = serde_json::to_vec(&reply)?;
    out.push(b'\n');
    write.write_all(&out).await?;
    Ok(())
}

//! The lab: a multi-node cluster on one machine. A lab namespace holds the lab switch (a bridge)
//! and the embedded API server; each node is a network namespace with its own agent process and
//! bpffs directory, wired to the switch. A kubelet simulator wires pods through the real
//! `sluice-cni`; an EndpointSlice controller derives slices from Services. An external client on
//! the switch plays a host outside the cluster. Everything is deleted when the `Lab` drops.

pub mod controller;
pub mod controllers;
pub mod kubelet;
pub mod manifests;
pub mod report;
pub mod services;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, TcpListener},
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context, Result};
use ipnetwork::IpNetwork;
use serde_json::{json, Value};
use sluice_agent::model::{ip_key, CidrKey};
use sluice_common::HAIRPIN_IPV4;

use crate::{
    apiserver::{kubeconfig, ApiServer},
    in_netns, Netns, Node,
};
pub use kubelet::Kubelet;

pub const SWITCH_IP: &str = "192.168.77.254";
pub const API_PORT: u16 = 6443;
/// The cluster CIDR; node i gets 10.244.i.0/24 (the lab plays NodeIPAM).
pub const CLUSTER_CIDR: &str = "10.244.0.0/16";
/// What the chart's values configure in the lab (`Lab::up_with_values`).
pub struct Values<'a> {
    /// A values file for the chart `deploy/chart/sluice`.
    pub file: &'a std::path::Path,
    /// Controller settings replacing the chart's (YAML lines), e.g. a short Lease.
    pub controller: &'a str,
}

/// The external client's address, on the switch's subnet with the nodes (192.168.77.i).
pub const EXTERNAL_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 77, 200);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Encap {
    Vxlan,
    /// Kernels without Geneve (like the lab machine's) make the agent refuse to start.
    Geneve,
    NoEncap,
}

impl Encap {
    pub fn parse(text: &str) -> Result<Encap> {
        match text {
            "vxlan" => Ok(Encap::Vxlan),
            "geneve" => Ok(Encap::Geneve),
            "noencap" => Ok(Encap::NoEncap),
            other => bail!("--encap {other:?}: expected vxlan, geneve or noencap"),
        }
    }

    /// The agent config keys, which are also the chart's values of the same names.
    pub fn config(self) -> &'static str {
        match self {
            Encap::Vxlan => "trafficEncapMode: encap\ntunnelType: vxlan\n",
            Encap::Geneve => "trafficEncapMode: encap\ntunnelType: geneve\n",
            Encap::NoEncap => "trafficEncapMode: noEncap\n",
        }
    }
}

#[derive(Clone, Debug)]
pub struct LabOptions {
    pub nodes: usize,
    pub encap: Encap,
    pub attach_mode: String,
    /// Ports every pod serves (TCP and UDP) besides its containerPorts.
    pub ports: Vec<u16>,
}

impl LabOptions {
    /// One node, VXLAN, the kernel's attach mode, serving `ports`.
    pub fn single_node(ports: &[u16]) -> LabOptions {
        LabOptions {
            nodes: 1,
            encap: Encap::Vxlan,
            attach_mode: "auto".into(),
            ports: ports.to_vec(),
        }
    }
}

pub struct LabNode {
    pub name: String,
    pub ip: Ipv4Addr,
    pub pod_cidr: IpNetwork,
    pub node: Node,
}

/// The field of `names.json` the lab waits on. Read alone: the file also names every rule, pod
/// and Service (hundreds of KiB with 10,000 Services), which need not become a `Value` on every
/// poll.
#[derive(serde::Deserialize)]
struct Reported {
    #[serde(rename = "programmedResourceVersions")]
    programmed: BTreeMap<String, u64>,
}

/// The watched kinds, as the agent names them, with their API resource.
pub(crate) const WATCHED: [(&str, &str); 6] = [
    ("Node", "nodes"),
    ("Namespace", "namespaces"),
    ("Pod", "pods"),
    ("Service", "services"),
    ("EndpointSlice", "endpointslices"),
    ("NetworkPolicy", "networkpolicies"),
];

impl LabNode {
    /// Per kind, the resourceVersion up to which the agent reports that kind programmed (in
    /// `names.json`); empty before its first report.
    pub fn programmed_revisions(&self) -> BTreeMap<String, u64> {
        programmed_revisions(&self.node.dir.join("state/names.json"))
    }

    /// The kinds whose `targets` revision the agent has not reported programmed yet.
    pub fn behind(&self, targets: &BTreeMap<String, u64>) -> Vec<String> {
        behind(&self.programmed_revisions(), targets)
    }

    /// The routes the agent owns on this node other than the two every node has for Services
    /// (the Service CIDR and the hairpin address, through the gateway): other nodes' pod CIDRs.
    /// An error when one of those two is missing.
    pub fn pod_cidr_routes(&self) -> Result<BTreeSet<IpNetwork>, String> {
        let routes = self
            .node
            .ns
            .exec(&["ip", "-o", "route", "show", "proto", "200"])
            .map_err(|e| e.to_string())?;
        let mut routed: BTreeSet<IpNetwork> = routes
            .lines()
            .filter_map(|l| l.split_whitespace().next()?.parse().ok())
            .collect();
        let hairpin = IpNetwork::new(IpAddr::V4(Ipv4Addr::from(HAIRPIN_IPV4)), 32)
            .expect("a /32 is a valid prefix");
        let services: IpNetwork = crate::apiserver::SERVICE_CIDR.parse().expect("a CIDR");
        for (route, what) in [
            (services, "the Service CIDR"),
            (hairpin, "the hairpin address"),
        ] {
            if !routed.remove(&route) {
                return Err(format!("{}: no route to {what} {route}", self.name));
            }
        }
        Ok(routed)
    }
}

/// Per kind, the resourceVersion up to which an agent reports that kind programmed, read from
/// its `names.json`; empty before its first report.
pub fn programmed_revisions(names_json: &std::path::Path) -> BTreeMap<String, u64> {
    let names = std::fs::read(names_json).unwrap_or_default();
    serde_json::from_slice::<Reported>(&names).map_or_else(|_| BTreeMap::new(), |r| r.programmed)
}

/// The kinds whose `targets` revision is above what `reported` says programmed, as
/// "Pod at 12 of 15".
pub fn behind(reported: &BTreeMap<String, u64>, targets: &BTreeMap<String, u64>) -> Vec<String> {
    targets
        .iter()
        .filter(|(kind, target)| reported.get(*kind).copied().unwrap_or(0) < **target)
        .map(|(kind, target)| {
            let at = reported.get(kind).copied().unwrap_or(0);
            format!("{kind} at {at} of {target}")
        })
        .collect()
}

/// Fields drop in order: pods, then agents and node namespaces, then the API server, then the
/// external client and the switch they were linked to.
pub struct Lab {
    pub kubelet: Kubelet,
    pub nodes: Vec<LabNode>,
    /// `sluice-controller` replicas (with `Lab::up_with_values`).
    pub controllers: Vec<controller::Controller>,
    pub api: ApiServer,
    pub options: LabOptions,
    /// Added to every agent's config file.
    agent_config: String,
    /// The chart's controller config and the lab's additions, when controllers run.
    controller_config: Option<(String, String)>,
    /// Nodes register without a podCIDR: the controller's NodeIPAM gives them one.
    node_ipam: bool,
    pub dir: PathBuf,
    external: Netns,
    pub switch: Netns,
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Lab {
    pub fn up(options: LabOptions) -> Result<Lab> {
        Lab::up_with_agent_config(options, "")
    }

    /// A lab whose agents get `agent_config` (YAML lines) added to their config file.
    pub fn up_with_agent_config(options: LabOptions, agent_config: &str) -> Result<Lab> {
        Lab::build(options, agent_config, None)
    }

    /// A lab with `sluice-controller` configured from a chart values file, as the chart
    /// configures it; with NodeIPAM on, Nodes register without a podCIDR and get theirs from
    /// the controller.
    pub fn up_with_values(options: LabOptions, values: Values) -> Result<Lab> {
        let config = controller::render_config(values.file)?;
        Lab::build(options, "", Some((config, values.controller.to_string())))
    }

    fn build(
        options: LabOptions,
        agent_config: &str,
        controller_config: Option<(String, String)>,
    ) -> Result<Lab> {
        crate::require_root();
        let node_ipam = match &controller_config {
            Some((config, _)) => sluice_agent::controller::config::ControllerConfig::parse(config)?
                .node_ipam()?
                .is_some(),
            None => false,
        };
        let (switch, external) = switch()?;
        let api = ApiServer::start(bind_api(&switch)?);
        let dir = std::env::temp_dir().join(&switch.name);
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("kubeconfig"), kubeconfig(&api.url()))?;
        let mut lab = Lab {
            kubelet: Kubelet::default(),
            nodes: Vec::new(),
            controllers: Vec::new(),
            api,
            options: options.clone(),
            agent_config: agent_config.to_string(),
            controller_config,
            node_ipam,
            dir,
            external,
            switch,
        };
        lab.create(
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "default"}}),
        )?;
        if lab.controller_config.is_some() {
            lab.start_controller()?;
        }
        for index in 0..options.nodes {
            lab.add_node(index)?;
        }
        Ok(lab)
    }

    /// A host outside the cluster at [`EXTERNAL_IP`], on the switch with the nodes. Its default
    /// route is the switch, which does not forward: it reaches addresses on the switch's subnet
    /// (nodes, load-balancer IPs there) and what [`Lab::route_from_external`] routes to a node.
    pub fn external(&self) -> &Netns {
        &self.external
    }

    pub fn kubeconfig_path(&self) -> PathBuf {
        self.dir.join("kubeconfig")
    }

    /// Starts one more `sluice-controller` replica (`Lab::up_with_values` starts the first).
    pub fn start_controller(&mut self) -> Result<()> {
        let (config, extra) = self
            .controller_config
            .clone()
            .context("this lab was not configured from chart values")?;
        let replica = controller::Controller::start(
            &self.dir,
            &self.switch,
            &config,
            &self.kubeconfig_path(),
            &extra,
            self.controllers.len(),
        )?;
        self.controllers.push(replica);
        Ok(())
    }

    /// Registers node `index` (as its kubelet would) and starts its agent. Without NodeIPAM the
    /// lab plays it (node i gets 10.244.i.0/24); with it, the Node registers without a podCIDR
    /// and its agent waits for the controller to assign one.
    pub fn add_node(&mut self, index: usize) -> Result<()> {
        let name = format!("node-{}", index + 1);
        let ip = Ipv4Addr::new(192, 168, 77, index as u8 + 1);
        let ns = Netns::new("sln")?;
        plug(&self.switch, &format!("p{index}"), &ns, ip)?;
        let spec = if self.node_ipam {
            json!({})
        } else {
            let pod_cidr = format!("10.244.{index}.0/24");
            json!({"podCIDR": pod_cidr, "podCIDRs": [pod_cidr]})
        };
        self.create(json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
            "spec": spec,
            "status": {
                "addresses": [{"type": "InternalIP", "address": ip.to_string()}, {"type": "Hostname", "address": name}],
                "conditions": [{"type": "Ready", "status": "True"}],
            },
        }))?;
        let config = format!(
            "nodeName: {name}\nkubeconfig: {}\n{}tcAttachMode: {}\nhealthAddress: 127.0.0.1:9421\n\
             serviceCIDR: {}\nfeatureGates: {{ServiceExternalIP: true}}\n{}",
            self.kubeconfig_path().display(),
            self.options.encap.config(),
            self.options.attach_mode,
            crate::apiserver::SERVICE_CIDR,
            self.agent_config,
        );
        let node = Node::start_in(ns, config, vec![("NODE_NAME".into(), name.clone())])
            .with_context(|| format!("starting the agent of {name}"))?;
        // The agent serves only once it knows its podCIDR.
        let pod_cidr: IpNetwork = self
            .api
            .get("nodes", None, &name)
            .and_then(|n| n["spec"]["podCIDR"].as_str()?.parse().ok())
            .with_context(|| format!("{name} has no podCIDR after its agent started"))?;
        self.nodes.push(LabNode {
            name,
            ip,
            pod_cidr,
            node,
        });
        Ok(())
    }

    /// Creates an object through the API server's write path.
    pub fn create(&self, obj: Value) -> Result<Value> {
        self.api.create(obj).map_err(|e| anyhow!("{e:?}"))
    }

    /// Applies manifests: Namespaces first; a Pod without `spec.nodeName` is scheduled round robin.
    pub fn apply(&mut self, objects: Vec<Value>) -> Result<()> {
        let (namespaces, others): (Vec<Value>, Vec<Value>) =
            objects.into_iter().partition(|o| o["kind"] == "Namespace");
        for mut obj in namespaces.into_iter().chain(others) {
            manifests::complete(&mut obj, &self.node_names(), self.pod_count())?;
            manifests::create_or_replace(&self.api, obj)?;
        }
        self.sync()
    }

    pub fn node_names(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.name.clone()).collect()
    }

    fn pod_count(&self) -> usize {
        self.api.list("pods", None).len()
    }

    /// One round of the simulated control plane: kubelets wire and unwire pods, then the
    /// EndpointSlice controller follows Services and ready pods.
    pub fn sync(&mut self) -> Result<()> {
        self.kubelet
            .sync(&self.api, &self.nodes, &self.options.ports)?;
        controllers::sync_endpoint_slices(&self.api)
    }

    /// Waits until every agent reports the API server's current state programmed (NetworkPolicy
    /// included) and holds exactly the expected forwarding state: its own running pods in
    /// L3Forwarding, and every other node's pod CIDR (encap: REMOTE_NODES; noEncap: routes).
    pub fn wait_programmed(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let target = self.revisions();
        loop {
            let pending: Vec<String> = self
                .nodes
                .iter()
                .filter_map(|n| self.unprogrammed(n, &target).err())
                .collect();
            if pending.is_empty() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "agents did not program the cluster state within {timeout:?}: {}",
                    pending.join("; ")
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Per watched kind, the newest resourceVersion among its objects that exist. (A deletion's
    /// version is not among them: an agent that relisted never saw it. Deletions are checked by
    /// their effect.) The lab's API server numbers versions, so the lab may compare them within
    /// a kind; the agent only reports them.
    pub fn revisions(&self) -> BTreeMap<String, u64> {
        WATCHED
            .iter()
            .filter_map(|(kind, resource)| {
                let newest = self
                    .api
                    .list(resource, None)
                    .iter()
                    .filter_map(|o| o["metadata"]["resourceVersion"].as_str()?.parse().ok())
                    .max()?;
                Some((kind.to_string(), newest))
            })
            .collect()
    }

    /// What `node`'s agent has not programmed yet: API objects up to `target` (it reports how
    /// far it got in `names.json`), its pods, the other nodes' pod CIDRs.
    fn unprogrammed(&self, node: &LabNode, target: &BTreeMap<String, u64>) -> Result<(), String> {
        let behind = node.behind(target);
        if !behind.is_empty() {
            return Err(format!("{}: programmed {}", node.name, behind.join(", ")));
        }
        let pipeline = sluice_agent::datapath::ebpf::Maps::from_pins(&node.node.bpffs)
            .and_then(|m| m.pipeline())
            .map_err(|e| format!("{}: {e:#}", node.name))?;
        let local: BTreeSet<_> = self
            .kubelet
            .pods_on(&node.name)
            .into_iter()
            .map(|ip| ip_key(ip.into()))
            .collect();
        let programmed: BTreeSet<_> = pipeline.l3_forwarding.keys().copied().collect();
        if local != programmed {
            return Err(format!(
                "{}: L3Forwarding has {} pods, expected {}",
                node.name,
                programmed.len(),
                local.len()
            ));
        }
        let others: BTreeSet<IpNetwork> = self
            .nodes
            .iter()
            .filter(|n| n.name != node.name)
            .map(|n| n.pod_cidr)
            .collect();
        match self.options.encap {
            Encap::Vxlan | Encap::Geneve => {
                let remote: BTreeSet<IpNetwork> = pipeline
                    .remote_nodes
                    .keys()
                    .filter_map(CidrKey::cidr)
                    .collect();
                if remote != others {
                    return Err(format!(
                        "{}: REMOTE_NODES has {remote:?}, expected {others:?}",
                        node.name
                    ));
                }
            }
            Encap::NoEncap => {
                let routed = node.pod_cidr_routes()?;
                if routed != others {
                    return Err(format!(
                        "{}: routes to {routed:?}, expected {others:?}",
                        node.name
                    ));
                }
            }
        }
        Ok(())
    }

    /// Every node's agent answers /readyz.
    pub fn agents_ready(&self) -> bool {
        self.nodes.iter().all(|n| {
            in_netns(&n.node.ns.path(), || {
                crate::probe::http_get("127.0.0.1:9421", "/readyz")
            })
            .is_some_and(|(status, _)| status == 200)
        })
    }

    /// Stops the API server (watches break, connections are refused), keeps its state for
    /// `downtime`, then serves the same state again at the same address: an API server restart.
    pub fn restart_api(&mut self, downtime: Duration) -> Result<()> {
        let stand_in = in_netns(&self.switch.path(), || TcpListener::bind((SWITCH_IP, 0)))?;
        let old = std::mem::replace(&mut self.api, ApiServer::start(stand_in));
        let state = old.stop();
        std::thread::sleep(downtime);
        let restarted = ApiServer::start_with_state(bind_api(&self.switch)?, state);
        drop(std::mem::replace(&mut self.api, restarted));
        Ok(())
    }

    pub fn node(&self, name: &str) -> Option<&LabNode> {
        self.nodes.iter().find(|n| n.name == name)
    }

    pub fn pod_ips(&self) -> BTreeMap<String, Ipv4Addr> {
        self.kubelet.pod_ips()
    }
}

/// The lab namespace with the switch (the bridge `br0` at [`SWITCH_IP`]), and the external
/// client plugged into it.
pub(crate) fn switch() -> Result<(Netns, Netns)> {
    let switch = Netns::new("slab")?;
    switch.exec(&["ip", "link", "add", "br0", "type", "bridge"])?;
    switch.exec(&[
        "ip",
        "addr",
        "add",
        &format!("{SWITCH_IP}/24"),
        "dev",
        "br0",
    ])?;
    switch.exec(&["ip", "link", "set", "br0", "up"])?;
    let external = Netns::new("slx")?;
    plug(&switch, "px", &external, EXTERNAL_IP)?;
    Ok((switch, external))
}

/// Links `ns` to the switch through port `port` of the bridge, as `eth0` with `ip`/24 and a
/// default route via the switch.
pub(crate) fn plug(switch: &Netns, port: &str, ns: &Netns, ip: Ipv4Addr) -> Result<()> {
    switch.exec(&[
        "ip", "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", &ns.name,
    ])?;
    switch.exec(&["ip", "link", "set", port, "master", "br0", "up"])?;
    ns.exec(&["ip", "addr", "add", &format!("{ip}/24"), "dev", "eth0"])?;
    ns.exec(&["ip", "link", "set", "eth0", "up"])?;
    ns.exec(&["ip", "route", "add", "default", "via", SWITCH_IP])?;
    Ok(())
}

fn bind_api(switch: &Netns) -> Result<TcpListener> {
    in_netns(&switch.path(), || TcpListener::bind((SWITCH_IP, API_PORT)))
        .context("binding the API server in the lab namespace")
}

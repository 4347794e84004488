//! The names `sluicectl` shows: rule ids → policy rules, backend sets → Services, pod
//! addresses → pods. Answered on demand on a unix socket in the agent's state directory, for
//! the addresses asked about, rather than written to a file: with 30,000 pods such a file is
//! megabytes, and every pod event would rewrite it whole.

use std::{
    collections::{BTreeMap, BTreeSet},
    io::{BufRead, BufReader, Write},
    net::IpAddr,
    os::unix::{fs::PermissionsExt, net::UnixStream as StdUnixStream},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context, Result};
use kube::runtime::reflector::Store;
use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt},
    net::UnixListener,
};
use tracing::warn;

use crate::k8s::Pod;

/// The socket's name in the state directory.
pub const SOCKET: &str = "names.sock";

pub fn socket(state_dir: &Path) -> PathBuf {
    state_dir.join(SOCKET)
}

/// The rule and Service names of the last programmed round, shared with the socket's server.
#[derive(Clone, Default)]
pub struct Names(Arc<Mutex<Answer>>);

impl Names {
    pub fn set_rules(&self, rules: BTreeMap<u32, String>) {
        self.0.lock().expect("names lock").rules = rules;
    }

    pub fn set_services(&self, services: BTreeMap<u32, String>) {
        self.0.lock().expect("names lock").services = services;
    }
}

/// What `sluicectl` asks for.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Query {
    #[serde(default)]
    pub rules: bool,
    #[serde(default)]
    pub services: bool,
    /// Pod addresses to name.
    #[serde(default)]
    pub addresses: Vec<IpAddr>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Answer {
    /// Rule id → "namespace/name direction[index]".
    #[serde(default)]
    pub rules: BTreeMap<u32, String>,
    /// Backend set id → "namespace/name:port".
    #[serde(default)]
    pub services: BTreeMap<u32, String>,
    /// Of the addresses asked about, those of a pod → "namespace/name".
    #[serde(default)]
    pub pods: BTreeMap<IpAddr, String>,
}

impl Answer {
    pub fn rule(&self, id: u32) -> String {
        self.rules
            .get(&id)
            .cloned()
            .unwrap_or_else(|| format!("rule {id}"))
    }

    /// "ip:port (namespace/name)", or without the pod when the address is none's.
    pub fn endpoint(&self, ip: Option<IpAddr>, port: u16) -> String {
        let Some(ip) = ip else { return "?".into() };
        let who = self
            .pods
            .get(&ip)
            .map_or(String::new(), |p| format!(" ({p})"));
        format!("{ip}:{port}{who}")
    }
}

/// Serves queries until the listener fails; one line of JSON in, one out. Only root can
/// connect (the socket is 0600 in the root-only state directory).
pub async fn serve(path: &Path, names: Names, pods: Store<Pod>) -> Result<()> {
    let _ = std::fs::remove_file(path);
    let listener =
        UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    loop {
        let (stream, _) = listener.accept().await?;
        let names = names.clone();
        let pods = pods.clone();
        tokio::spawn(async move {
            let (read, mut write) = stream.into_split();
            let mut line = String::new();
            let answered = async {
                tokio::io::BufReader::new(read).read_line(&mut line).await?;
                let query: Query = serde_json::from_str(&line).context("malformed query")?;
                let mut out = serde_json::to_vec(&answer(&query, &names, &pods))?;
                out.push(b'\n');
                write.write_all(&out).await?;
                anyhow::Ok(())
            };
            if let Err(e) = answered.await {
                warn!("answering a names query: {e:#}");
            }
        });
    }
}

fn answer(query: &Query, names: &Names, pods: &Store<Pod>) -> Answer {
    let mut out = Answer::default();
    {
        let published = names.0.lock().expect("names lock");
        if query.rules {
            out.rules = published.rules.clone();
        }
        if query.services {
            out.services = published.services.clone();
        }
    }
    let wanted: BTreeSet<IpAddr> = query.addresses.iter().copied().collect();
    if wanted.is_empty() {
        return out;
    }
    for pod in pods.state() {
        let ips = pod.status.iter().flat_map(|s| s.pod_ips.iter().flatten());
        for ip in ips.filter_map(|p| p.ip.parse().ok()) {
            if wanted.contains(&ip) {
                let namespace = pod.metadata.namespace.as_deref().unwrap_or_default();
                let name = pod.metadata.name.as_deref().unwrap_or_default();
                out.pods.insert(ip, format!("{namespace}/{name}"));
            }
        }
    }
    out
}

/// Asks the agent of this node (`sluicectl`).
pub fn ask(state_dir: &Path, query: &Query) -> Result<Answer> {
    let path = socket(state_dir);
    let asked = || -> Result<Answer> {
        let mut stream = StdUnixStream::connect(&path)?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut line = serde_json::to_vec(query)?;
        line.push(b'\n');
        stream.write_all(&line)?;
        let mut reply = String::new();
        BufReader::new(stream).read_line(&mut reply)?;
        Ok(serde_json::from_str(&reply)?)
    };
    asked().with_context(|| format!("asking the agent for names on {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::runtime::{reflector::store::Writer, watcher};

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("sluice-names-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn pod(namespace: &str, name: &str, ip: &str) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"namespace": namespace, "name": name},
            "status": {"podIPs": [{"ip": ip}]},
        }))
        .unwrap()
    }

    #[tokio::test]
    async fn names_the_addresses_asked_about_and_the_published_rules() {
        let dir = temp_dir("answer");
        let mut writer = Writer::<Pod>::default();
        for (name, ip) in [("a", "10.0.0.1"), ("b", "10.0.0.2")] {
            writer.apply_watcher_event(&watcher::Event::Apply(pod("ns", name, ip)));
        }
        let names = Names::default();
        names.set_rules(BTreeMap::from([(7, "ns/p ingress[0]".to_string())]));
        names.set_services(BTreeMap::from([(3, "ns/svc:80".to_string())]));
        let path = socket(&dir);
        let server = tokio::spawn({
            let (path, names, pods) = (path.clone(), names.clone(), writer.as_reader());
            async move { serve(&path, names, pods).await }
        });
        while !path.exists() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let state_dir = dir.clone();
        let answer = tokio::task::spawn_blocking(move || {
            ask(
                &state_dir,
                &Query {
                    rules: true,
                    services: false,
                    addresses: vec!["10.0.0.2".parse().unwrap(), "10.9.9.9".parse().unwrap()],
                },
            )
        })
        .await
        .unwrap()
        .unwrap();
        assert_eq!(answer.rule(7), "ns/p ingress[0]");
        assert_eq!(answer.rule(8), "rule 8");
        assert!(answer.services.is_empty(), "not asked for");
        assert_eq!(
            answer.endpoint(Some("10.0.0.2".parse().unwrap()), 80),
            "10.0.0.2:80 (ns/b)"
        );
        assert_eq!(
            answer.endpoint(Some("10.9.9.9".parse().unwrap()), 80),
            "10.9.9.9:80"
        );
        server.abort();
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn an_agent_that_does_not_answer_is_named_in_the_error() {
        let dir = temp_dir("silent");
        let error = ask(&dir, &Query::default()).unwrap_err();
        let _ = std::fs::remove_dir_all(&dir);
        assert!(format!("{error:#}").contains("names.sock"), "{error:#}");
    }
}

//! The local endpoints the CNI created, one JSON record per pod interface, written atomically
//! (temp file + rename). With the IPAM files they are what a restarted agent reconciles from.

use std::{
    fs,
    io::ErrorKind,
    path::{Path, PathBuf},
};

use crate::model::LocalEndpoint;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("endpoint store {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("endpoint record {path} is corrupt: {reason}")]
    Corrupt { path: PathBuf, reason: String },
}

pub struct Store {
    dir: PathBuf,
}

impl Store {
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        fs::create_dir_all(dir).map_err(|source| StoreError::Io {
            path: dir.into(),
            source,
        })?;
        Ok(Store {
            dir: dir.to_path_buf(),
        })
    }

    fn path(&self, container_id: &str, ifname: &str) -> PathBuf {
        self.dir.join(format!("{container_id}_{ifname}.json"))
    }

    pub fn put(&self, ep: &LocalEndpoint) -> Result<(), StoreError> {
        let path = self.path(&ep.container_id, &ep.ifname);
        let tmp = path.with_extension("tmp");
        let json = serde_json::to_vec_pretty(ep).expect("endpoint records always serialize");
        fs::write(&tmp, json)
            .and_then(|()| fs::rename(&tmp, &path))
            .map_err(|source| StoreError::Io { path, source })
    }

    pub fn get(
        &self,
        container_id: &str,
        ifname: &str,
    ) -> Result<Option<LocalEndpoint>, StoreError> {
        read(&self.path(container_id, ifname))
    }

    pub fn remove(&self, container_id: &str, ifname: &str) -> Result<(), StoreError> {
        let path = self.path(container_id, ifname);
        match fs::remove_file(&path) {
            Err(e) if e.kind() != ErrorKind::NotFound => Err(StoreError::Io { path, source: e }),
            _ => Ok(()),
        }
    }

    /// Every record. A corrupt record is an error, not silently skipped: its pod would lose
    /// connectivity without a trace.
    pub fn list(&self) -> Result<Vec<LocalEndpoint>, StoreError> {
        let entries = fs::read_dir(&self.dir).map_err(|source| StoreError::Io {
            path: self.dir.clone(),
            source,
        })?;
        let mut out = Vec::new();
        for entry in entries {
            let path = entry
                .map_err(|source| StoreError::Io {
                    path: self.dir.clone(),
                    source,
                })?
                .path();
            if path.extension().is_some_and(|ext| ext == "json") {
                out.extend(read(&path)?);
            }
        }
        out.sort_by(|a, b| (&a.container_id, &a.ifname).cmp(&(&b.container_id, &b.ifname)));
        Ok(out)
    }
}

fn read(path: &Path) -> Result<Option<LocalEndpoint>, StoreError> {
    match fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| StoreError::Corrupt {
                path: path.into(),
                reason: e.to_string(),
            }),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
        Err(source) => Err(StoreError::Io {
            path: path.into(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Mac;

    #[test]
    fn put_get_list_remove_and_corrupt_records() {
        let dir = std::env::temp_dir().join(format!("sluice-store-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let store = Store::open(&dir).unwrap();
        let ep = LocalEndpoint {
            container_id: "abc".into(),
            ifname: "eth0".into(),
            netns: "/run/netns/x".into(),
            host_ifname: "slabc".into(),
            host_ifindex: 4,
            mac: Mac([0x0a, 0x58, 1, 2, 3, 4]),
            ips: vec!["10.0.0.2/24".parse().unwrap()],
            pod: Some(crate::model::PodRef {
                namespace: "shop".into(),
                name: "web-0".into(),
            }),
        };
        store.put(&ep).unwrap();
        assert_eq!(store.get("abc", "eth0").unwrap(), Some(ep.clone()));
        assert_eq!(store.list().unwrap(), vec![ep]);
        store.remove("abc", "eth0").unwrap();
        store.remove("abc", "eth0").unwrap();
        assert!(store.list().unwrap().is_empty());
        fs::write(dir.join("bad_eth0.json"), "{").unwrap();
        let err = store.list().unwrap_err().to_string();
        assert!(err.contains("bad_eth0.json is corrupt"), "{err}");
        fs::remove_dir_all(dir).unwrap();
    }
}

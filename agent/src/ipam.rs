//! host-local style IPAM: one file per reserved address, created with O_EXCL, holding the owner
//! (`container_id` and interface name). The files are the truth, so an agent restart never hands
//! out an address twice.

use std::{
    fs,
    io::{ErrorKind, Write},
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
};

use ipnetwork::IpNetwork;

#[derive(Debug, thiserror::Error)]
pub enum IpamError {
    #[error("IP pool {pool} is exhausted: all {size} addresses are reserved")]
    Exhausted { pool: IpNetwork, size: u32 },
    #[error("IPAM store {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

pub struct Ipam {
    dir: PathBuf,
    pool: IpNetwork,
    gateway: IpAddr,
}

const LAST_RESERVED: &str = "last_reserved_ip";

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> IpamError + '_ {
    move |source| IpamError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl Ipam {
    pub fn open(dir: &Path, pool: IpNetwork, gateway: IpAddr) -> Result<Ipam, IpamError> {
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        Ok(Ipam {
            dir: dir.to_path_buf(),
            pool,
            gateway,
        })
    }

    /// The usable host addresses: not the network, broadcast or gateway address.
    fn candidates(&self) -> Vec<Ipv4Addr> {
        let IpNetwork::V4(net) = self.pool else {
            return Vec::new();
        };
        let first = u32::from(net.network()) + 1;
        let last = u32::from(net.broadcast()) - 1;
        (first..=last)
            .map(Ipv4Addr::from)
            .filter(|ip| IpAddr::V4(*ip) != self.gateway)
            .collect()
    }

    /// Reserves the next free address after the last one handed out (round robin, as host-local
    /// does, so a freed address is not reused right away). An owner that already holds an address
    /// gets the same one back: ADD is retried by runtimes.
    pub fn reserve(&self, container_id: &str, ifname: &str) -> Result<IpAddr, IpamError> {
        if let Some(ip) = self.find(container_id, ifname)? {
            return Ok(ip);
        }
        let candidates = self.candidates();
        let last = fs::read_to_string(self.dir.join(LAST_RESERVED))
            .ok()
            .and_then(|text| text.trim().parse::<Ipv4Addr>().ok());
        let start = last
            .and_then(|ip| candidates.iter().position(|c| *c == ip))
            .map_or(0, |pos| pos + 1);
        for offset in 0..candidates.len() {
            let ip = candidates[(start + offset) % candidates.len()];
            let path = self.dir.join(ip.to_string());
            match fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
            {
                Ok(mut file) => {
                    file.write_all(format!("{container_id}\n{ifname}").as_bytes())
                        .and_then(|()| file.sync_all())
                        .map_err(io_err(&path))?;
                    let last_path = self.dir.join(LAST_RESERVED);
                    fs::write(&last_path, ip.to_string()).map_err(io_err(&last_path))?;
                    return Ok(IpAddr::V4(ip));
                }
                Err(e) if e.kind() == ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(io_err(&path)(e)),
            }
        }
        Err(IpamError::Exhausted {
            pool: self.pool,
            size: candidates.len() as u32,
        })
    }

    /// All reservations: (address, container_id, ifname).
    pub fn reservations(&self) -> Result<Vec<(IpAddr, String, String)>, IpamError> {
        let mut out = Vec::new();
        for entry in fs::read_dir(&self.dir).map_err(io_err(&self.dir))? {
            let entry = entry.map_err(io_err(&self.dir))?;
            let Ok(ip) = entry.file_name().to_string_lossy().parse::<IpAddr>() else {
                continue;
            };
            let text = fs::read_to_string(entry.path()).map_err(io_err(&entry.path()))?;
            let mut lines = text.lines();
            let id = lines.next().unwrap_or_default().to_string();
            let ifname = lines.next().unwrap_or_default().to_string();
            out.push((ip, id, ifname));
        }
        out.sort();
        Ok(out)
    }

    pub fn find(&self, container_id: &str, ifname: &str) -> Result<Option<IpAddr>, IpamError> {
        Ok(self
            .reservations()?
            .into_iter()
            .find(|(_, id, name)| id == container_id && name == ifname)
            .map(|(ip, _, _)| ip))
    }

    /// Releases every address the owner holds. Releasing nothing is not an error (DEL is idempotent).
    pub fn release(&self, container_id: &str, ifname: &str) -> Result<Vec<IpAddr>, IpamError> {
        let mut released = Vec::new();
        for (ip, id, name) in self.reservations()? {
            if id == container_id && name == ifname {
                let path = self.dir.join(ip.to_string());
                match fs::remove_file(&path) {
                    Ok(()) => released.push(ip),
                    Err(e) if e.kind() == ErrorKind::NotFound => {}
                    Err(e) => return Err(io_err(&path)(e)),
                }
            }
        }
        Ok(released)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("sluice-ipam-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    fn ipam(dir: &Path, cidr: &str) -> Ipam {
        let pool: IpNetwork = cidr.parse().unwrap();
        let gw = IpAddr::V4(Ipv4Addr::from(
            u32::from_be_bytes(match pool.network() {
                IpAddr::V4(v4) => v4.octets(),
                _ => unreachable!(),
            }) + 1,
        ));
        Ipam::open(dir, pool, gw).unwrap()
    }

    #[test]
    fn skips_network_gateway_broadcast_and_exhausts_with_a_clear_error() {
        let dir = temp_dir("exhaust");
        let ipam = ipam(&dir, "10.1.0.0/29");
        let got: Vec<String> = (0..5)
            .map(|i| ipam.reserve(&format!("c{i}"), "eth0").unwrap().to_string())
            .collect();
        assert_eq!(
            got,
            ["10.1.0.2", "10.1.0.3", "10.1.0.4", "10.1.0.5", "10.1.0.6"]
        );
        let err = ipam.reserve("c5", "eth0").unwrap_err();
        assert_eq!(
            err.to_string(),
            "IP pool 10.1.0.0/29 is exhausted: all 5 addresses are reserved"
        );
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn survives_reopen_and_never_hands_out_twice() {
        let dir = temp_dir("reopen");
        let a = ipam(&dir, "10.1.0.0/24").reserve("a", "eth0").unwrap();
        let reopened = ipam(&dir, "10.1.0.0/24");
        let b = reopened.reserve("b", "eth0").unwrap();
        assert_ne!(a, b);
        assert_eq!(
            reopened.reserve("a", "eth0").unwrap(),
            a,
            "a retried ADD gets its address back"
        );
        assert_eq!(reopened.release("a", "eth0").unwrap(), vec![a]);
        assert!(
            reopened.release("a", "eth0").unwrap().is_empty(),
            "release is idempotent"
        );
        // Round robin: the freed address is not the next one handed out.
        assert_ne!(reopened.reserve("c", "eth0").unwrap(), a);
        fs::remove_dir_all(dir).unwrap();
    }
}

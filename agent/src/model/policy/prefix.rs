//! Address prefixes as plain integers, so containment is a mask and the prefixes inside a CIDR
//! are one ordered range of a `BTreeMap`.

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    ops::RangeInclusive,
};

use ipnetwork::IpNetwork;

use crate::model::CidrKey;

/// A network: family (4 or 6), network address (host bits zero, IPv4 in the low 32 bits) and
/// length. The derived order (family, address, length) puts every prefix inside a CIDR between
/// its first and its last address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(super) struct Prefix {
    family: u8,
    net: u128,
    len: u8,
}

impl Prefix {
    pub(super) fn new(ip: IpAddr, len: u8) -> Option<Prefix> {
        let host = Prefix::host(ip);
        (len <= host.len).then(|| {
            let mut prefix = Prefix { len, ..host };
            prefix.net &= !prefix.host_mask();
            prefix
        })
    }

    pub(super) fn host(ip: IpAddr) -> Prefix {
        match ip {
            IpAddr::V4(v4) => Prefix {
                family: 4,
                net: u32::from(v4).into(),
                len: 32,
            },
            IpAddr::V6(v6) => Prefix {
                family: 6,
                net: v6.into(),
                len: 128,
            },
        }
    }

    /// Kubernetes' CIDR syntax: address, slash, decimal length (no netmask form). Host bits
    /// are cleared, as the API server's own parser does.
    pub(super) fn parse(text: &str) -> Result<Prefix, &'static str> {
        let Some((addr, len)) = text.split_once('/') else {
            return Err("not a CIDR: want address/prefix-length");
        };
        let addr: IpAddr = addr.parse().map_err(|_| "not a valid IP address")?;
        let len: u8 =
            (!len.is_empty() && len.len() <= 3 && len.bytes().all(|b| b.is_ascii_digit()))
                .then(|| len.parse().ok())
                .flatten()
                .ok_or("not a valid prefix length")?;
        Prefix::new(addr, len).ok_or("prefix length longer than the address")
    }

    pub(super) fn len(&self) -> u8 {
        self.len
    }

    fn bits(&self) -> u8 {
        if self.family == 4 {
            32
        } else {
            128
        }
    }

    fn host_mask(&self) -> u128 {
        match self.bits() - self.len {
            0 => 0,
            host => u128::MAX >> (128 - u32::from(host)),
        }
    }

    /// `other` is this prefix or a narrower one inside it.
    pub(super) fn contains(&self, other: &Prefix) -> bool {
        self.family == other.family
            && other.len >= self.len
            && other.net & !self.host_mask() == self.net
    }

    /// Bounds of a `BTreeMap<Prefix, _>` range holding every prefix whose network address lies
    /// in this one (the wider ones among them still fail `contains`).
    pub(super) fn range(&self) -> RangeInclusive<Prefix> {
        let first = Prefix { len: 0, ..*self };
        let last = Prefix {
            net: self.net | self.host_mask(),
            len: u8::MAX,
            ..*self
        };
        first..=last
    }

    pub(super) fn network(&self) -> IpNetwork {
        let addr = if self.family == 4 {
            IpAddr::V4(Ipv4Addr::from(self.net as u32))
        } else {
            IpAddr::V6(Ipv6Addr::from(self.net))
        };
        IpNetwork::new(addr, self.len).expect("length checked at construction")
    }

    pub(super) fn cidr_key(&self) -> CidrKey {
        CidrKey::new(self.network())
    }
}

impl fmt::Display for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.network().fmt(f)
    }
}

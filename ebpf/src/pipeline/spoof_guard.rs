//! SpoofGuard: a pod may only send from its own addresses and its own MAC, ARP included.

use sluice_common::{DropReason, IpKey, SpoofGuardKey, Stage};

use super::classifier::{ArpMeta, IpMeta};
use crate::SPOOF_GUARD;

#[inline(always)]
pub fn check_ip(port: u32, meta: &IpMeta) -> Result<(), DropReason> {
    check(port, meta.src, meta.src_mac, DropReason::SpoofedSourceIp)?;
    super::passed(Stage::SpoofGuard);
    Ok(())
}

/// The frame's source MAC and the ARP sender MAC must both be the pod's.
#[inline(always)]
pub fn check_arp(port: u32, arp: &ArpMeta) -> Result<(), DropReason> {
    if arp.sender_mac != arp.src_mac {
        return Err(DropReason::SpoofedSourceMac);
    }
    check(
        port,
        IpKey::v4(arp.sender_ip),
        arp.src_mac,
        DropReason::SpoofedArp,
    )?;
    super::passed(Stage::SpoofGuard);
    Ok(())
}

#[inline(always)]
fn check(port: u32, addr: IpKey, mac: [u8; 6], unknown: DropReason) -> Result<(), DropReason> {
    let key = SpoofGuardKey {
        ifindex: port,
        addr,
    };
    match SPOOF_GUARD.get_ptr(key) {
        // SAFETY: the pointer comes from a successful lookup and is read once.
        Some(entry) if unsafe { (*entry).mac } == mac => Ok(()),
        Some(_) => Err(DropReason::SpoofedSourceMac),
        None => Err(unknown),
    }
}

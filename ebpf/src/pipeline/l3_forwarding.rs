//! L3Forwarding: the local pod that owns the destination address, if any.

use sluice_common::{Endpoint, Stage};

use super::classifier::IpMeta;
use crate::ENDPOINTS;

#[inline(always)]
pub fn lookup(meta: &IpMeta) -> Option<Endpoint> {
    super::passed(Stage::L3Forwarding);
    // SAFETY: the value is copied out right away.
    ENDPOINTS
        .get_ptr(meta.dst)
        .map(|endpoint| unsafe { *endpoint })
}

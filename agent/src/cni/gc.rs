//! CNI 1.1's GC: the runtime names the attachments it still uses, and every other pod interface
//! this node wired is removed as a DEL would (entries, veth, address), so nothing outlives a
//! container whose DEL the runtime never got to send.

use std::collections::BTreeSet;

use tracing::info;

use super::{
    server::{io, PodNetwork},
    Attachment, CniError,
};

impl PodNetwork {
    pub(super) async fn gc(&mut self, valid: &[Attachment]) -> Result<(), CniError> {
        let keep: BTreeSet<(&str, &str)> = valid
            .iter()
            .map(|a| (a.container_id.as_str(), a.ifname.as_str()))
            .collect();
        let endpoints = self.endpoints().map_err(io("reading endpoint records"))?;
        let mut removed = Vec::new();
        for ep in endpoints {
            if !keep.contains(&(ep.container_id.as_str(), ep.ifname.as_str())) {
                self.remove(&ep.container_id, &ep.ifname).await?;
                removed.push(format!("{}/{}", ep.container_id, ep.ifname));
            }
        }
        self.release_unrecorded(&keep)
            .map_err(io("releasing addresses"))?;
        info!(?removed, kept = keep.len(), "CNI GC");
        Ok(())
    }
}

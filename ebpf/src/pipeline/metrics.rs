//! Per-CPU packet counters: packets that passed each stage, and drops by reason.

use sluice_common::{DropReason, Stage};

use crate::{DROPS, RULE_STATS, STAGE_PACKETS};

#[inline(always)]
pub fn count_stage(stage: Stage) {
    if let Some(counter) = STAGE_PACKETS.get_ptr_mut(stage as u32) {
        // SAFETY: per-CPU slot; no other program instance writes it concurrently.
        unsafe { *counter += 1 };
    }
}

#[inline(always)]
pub fn count_drop(reason: DropReason) {
    if let Some(counter) = DROPS.get_ptr_mut(reason as u32) {
        // SAFETY: as above.
        unsafe { *counter += 1 };
    }
}

/// EgressMetric / IngressMetric: a packet of a connection `rule` allowed (0: none).
#[inline(always)]
pub fn count_rule(rule: u32, bytes: u32) {
    if rule == 0 {
        return;
    }
    if let Some(stats) = RULE_STATS.get_ptr_mut(rule) {
        // SAFETY: per-CPU slot.
        unsafe {
            (*stats).packets += 1;
            (*stats).bytes += bytes as u64;
        }
    }
}

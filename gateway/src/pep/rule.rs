//! Checking a new flow against a grant's rules. The rule types live in
//! `wardgate_common::rule`, shared with the client and the controller.
//!
//! Rules are checked only when a client opens a flow; packets of an existing flow skip them,
//! which is sound because a peer's rules never change while it is in the table (a changed
//! grant is a new peer). A peer holds at most
//! [`MAX_RULES_PER_PEER`](super::MAX_RULES_PER_PEER) rules, so the linear scan stays short.

use std::net::IpAddr;

use super::DropReason;
pub use wardgate_common::rule::{IpPrefix, PortRange, PrefixError, Proto, Rule};

/// Checks a new flow's first packet against a peer's rules.
///
/// On refusal the reason is the most specific one: a rule that matched destination and
/// protocol but not the port gives [`DropReason::PortNotAllowed`], one that matched only the
/// destination gives [`DropReason::ProtocolNotAllowed`], none gives
/// [`DropReason::DestinationNotAllowed`]. That tells a clinician or an admin what to ask for.
pub(crate) fn evaluate(
    rules: &[Rule],
    dst: IpAddr,
    proto: u8,
    dst_port: Option<u16>,
) -> Result<(), DropReason> {
    let mut reason = DropReason::DestinationNotAllowed;
    for rule in rules {
        if !rule.dst.contains(dst) {
            continue;
        }
        if !rule.proto.matches(proto, dst) {
            if reason == DropReason::DestinationNotAllowed {
                reason = DropReason::ProtocolNotAllowed;
            }
            continue;
        }
        match (rule.ports, dst_port) {
            (None, _) => return Ok(()),
            (Some(range), Some(port)) if range.contains(port) => return Ok(()),
            _ => reason = DropReason::PortNotAllowed,
        }
    }
    Err(reason)
}

//! The host side of a VM's NICs: one TAP device per NIC, named from the node and the MAC
//! (`state::vm_spec::nic_tap_name`), with the NIC's MTU, attached to the bridge the node's
//! config maps the NIC's network to. Created with iproute2 (`ip tuntap add`, `ip link set
//! mtu`, `ip link set master`) before the VMM opens them, deleted once the VM stopped or
//! left. The agent never creates or changes a bridge: a missing one is an error naming it.
//!
//! MTU: the TAP gets the NIC's MTU before it joins the bridge. The bridge forwards a frame
//! to a port only if it fits that port's MTU, so jumbo frames pass between ports that all
//! have the larger MTU. The bridge device's own MTU (what the host's address on it sends
//! with) follows the smallest port unless an administrator set it (`ip link set BR mtu
//! 9000`): a 1500-byte NIC on the same bridge lowers it. The agent logs a warning when the
//! bridge's MTU is below the NIC's after the TAP joined.
//!
//! MAC: a TAP's own address is [`tap_mac`] of the NIC's MAC (`fe:` and the NIC's last five
//! bytes, as libvirt does), set before it joins the bridge, never the random one
//! `ip tuntap add` gives it. A bridge whose address nobody set follows the lowest address
//! of its ports; with random TAP addresses every TAP that joined or left could change the
//! bridge's address, and each change drops the frames in flight to the old one (the
//! guest's replies to the host's address on the bridge) and flushes the bridge's
//! neighbour table. Both TAPs of a migrating NIC (source and target) have the same
//! address, so the source's TAP leaving after a live migration changes nothing, and
//! `fe:` sorts above the addresses of real NICs, so a TAP never becomes the address of
//! a bridge that has one.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use super::spec::VmSpec;
use super::VmHostError;
use crate::state::vm_spec::nic_tap_name;

/// Network name → host bridge, from the node's config.
pub type Networks = BTreeMap<String, String>;

/// Errors creating a VM's TAP devices.
#[derive(Debug, thiserror::Error)]
pub enum NicError {
    #[error("network {network:?} is not configured on this node (its config has [[networks]] for: {known})")]
    UnknownNetwork { network: String, known: String },
    #[error("bridge {bridge} of network {network:?} does not exist on this node (the agent does not create bridges)")]
    NoBridge { network: String, bridge: String },
    #[error("`ip {args}` failed: {stderr}")]
    Ip { args: String, stderr: String },
    #[error("NIC MAC {mac:?} does not parse")]
    Mac { mac: String },
    #[error("cannot run `ip` (iproute2 is needed for VM NICs)")]
    Spawn(#[source] std::io::Error),
}

fn ip(args: &[&str]) -> Result<(), NicError> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(NicError::Spawn)?;
    if out.status.success() {
        Ok(())
    } else {
        Err(NicError::Ip {
            args: args.join(" "),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

/// The address of the TAP of the NIC with `mac` (see the module docs): `fe:` and the
/// NIC's last five bytes (`fa:` for a NIC whose MAC starts with `fe:`, so the TAP never
/// has the guest's address). `None` if `mac` does not parse.
pub fn tap_mac(mac: &str) -> Option<String> {
    let mut b = vmm_node::config::parse_mac(mac)?;
    b[0] = if b[0] == 0xfe { 0xfa } else { 0xfe };
    Some(vmm_node::config::format_mac(&b))
}

/// The TAP names of `spec`'s NICs on node `node`, in slot order.
pub fn tap_names(node: u64, spec: &VmSpec) -> Vec<String> {
    spec.nics
        .iter()
        .map(|n| nic_tap_name(node, &n.mac))
        .collect()
}

/// TAPs created for a VM; deleted on drop unless [`Taps::keep`] was called (a start or
/// receive that fails half-way leaves none behind).
pub struct Taps {
    names: Vec<String>,
    armed: bool,
}

impl Taps {
    /// The VM now owns its TAPs; [`delete_taps`] removes them when it stops or leaves.
    pub fn keep(mut self) {
        self.armed = false;
    }
}

impl Drop for Taps {
    fn drop(&mut self) {
        if self.armed {
            delete(&self.names);
        }
    }
}

/// Creates (replacing a stale one of the same name) and attaches the TAP of each NIC of
/// `spec` on node `node`.
pub fn create_taps(node: u64, networks: &Networks, spec: &VmSpec) -> Result<Taps, VmHostError> {
    let err = |source| VmHostError::Nic {
        vm: spec.name.clone(),
        source,
    };
    let mut taps = Taps {
        names: Vec::new(),
        armed: true,
    };
    for (nic, tap) in spec.nics.iter().zip(tap_names(node, spec)) {
        let bridge = networks.get(&nic.network).ok_or_else(|| {
            err(NicError::UnknownNetwork {
                network: nic.network.clone(),
                known: networks.keys().cloned().collect::<Vec<_>>().join(", "),
            })
        })?;
        if !Path::new("/sys/class/net")
            .join(bridge)
            .join("bridge")
            .exists()
        {
            return Err(err(NicError::NoBridge {
                network: nic.network.clone(),
                bridge: bridge.clone(),
            }));
        }
        delete(std::slice::from_ref(&tap));
        ip(&["tuntap", "add", "dev", &tap, "mode", "tap"]).map_err(err)?;
        taps.names.push(tap.clone());
        let mtu = nic.mtu().to_string();
        let mac = tap_mac(&nic.mac).ok_or_else(|| {
            err(NicError::Mac {
                mac: nic.mac.clone(),
            })
        })?;
        // No IPv6 link-local address on the host's side of a VM port: the host has no
        // address on VM networks (and sends no router solicitation or DAD there).
        ip(&[
            "link",
            "set",
            "dev",
            &tap,
            "address",
            &mac,
            "mtu",
            &mtu,
            "addrgenmode",
            "none",
        ])
        .map_err(err)?;
        ip(&["link", "set", "dev", &tap, "master", bridge, "up"]).map_err(err)?;
        if let Some(bridge_mtu) = link_mtu(bridge).filter(|m| *m < nic.mtu()) {
            tracing::warn!(
                vm = %spec.name, tap = %tap, bridge = %bridge, nic_mtu = nic.mtu(), bridge_mtu,
                "the bridge's MTU is below the NIC's: frames from the host's address on the \
                 bridge stay at the bridge's MTU (set it with `ip link set BRIDGE mtu N`)"
            );
        }
    }
    Ok(taps)
}

/// Creates and attaches the TAP of one NIC `nic` of VM `vm` on node `node` (hot add).
pub fn create_tap(
    node: u64,
    networks: &Networks,
    vm: &str,
    nic: &super::spec::NicSpec,
) -> Result<Taps, VmHostError> {
    let mut one = VmSpec::test_guest(
        vm,
        1,
        crate::state::vm_spec::MEMORY_MIB_MIN,
        crate::state::vm_spec::TestWorkload::new(crate::state::vm_spec::WorkloadName::Idle),
    );
    one.nics = vec![nic.clone()];
    create_taps(node, networks, &one)
}

/// Deletes the TAP of the NIC with `mac` on node `node` (hot remove; a missing one is
/// ignored).
pub fn delete_tap(node: u64, mac: &str) {
    delete(&[nic_tap_name(node, mac)]);
}

/// Deletes the TAPs of `spec`'s NICs on node `node` (missing ones are ignored).
pub fn delete_taps(node: u64, spec: &VmSpec) {
    delete(&tap_names(node, spec));
}

/// The MTU of interface `name` in this network namespace (`None` if unreadable).
pub fn link_mtu(name: &str) -> Option<u16> {
    std::fs::read_to_string(Path::new("/sys/class/net").join(name).join("mtu"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

fn delete(names: &[String]) {
    for t in names {
        if Path::new("/sys/class/net").join(t).exists() {
            if let Err(e) = ip(&["link", "del", "dev", t]) {
                tracing::warn!(tap = %t, error = %e, "cannot delete a VM's TAP");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_taps_address_follows_the_nics_mac_and_is_never_the_guests() {
        assert_eq!(
            tap_mac("52:54:00:12:34:56").as_deref(),
            Some("fe:54:00:12:34:56")
        );
        assert_eq!(
            tap_mac("FE:54:00:12:34:56").as_deref(),
            Some("fa:54:00:12:34:56")
        );
        assert_eq!(tap_mac("not a mac"), None);
    }
}

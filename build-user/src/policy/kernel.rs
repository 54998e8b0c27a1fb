//! From a resolved policy to what the kernel programs read.

use buildcage_common::{
    BuildPolicy,
    policy::{NET_ALLOW, NET_LOOPBACK, NET_NONE, POLICY_AUDIT, POLICY_KILL, POLICY_UNIX_CONNECT},
};

use super::{Enforcement, Network, Policy};

#[derive(Debug, thiserror::Error)]
pub enum KernelPolicyError {}

impl crate::hint::Hint for KernelPolicyError {
    fn hint(&self) -> Option<String> {
        match *self {}
    }
}

impl Policy {
    /// The compiled form the kernel programs look up by cgroup id. A policy that
    /// asks for something the programs cannot enforce is an error, never a
    /// silent approximation (fail closed).
    pub fn kernel(&self) -> Result<BuildPolicy, KernelPolicyError> {
        let mut flags = 0;
        if self.action == Enforcement::Audit {
            flags |= POLICY_AUDIT;
        }
        if self.kill_on_violation {
            flags |= POLICY_KILL;
        }
        if self.unix_connect {
            flags |= POLICY_UNIX_CONNECT;
        }
        Ok(BuildPolicy {
            socket_families: self.socket_families(),
            flags,
            net: match self.network {
                Network::None => NET_NONE,
                Network::Loopback => NET_LOOPBACK,
                Network::Allow => NET_ALLOW,
            },
        })
    }
}

//! From a resolved policy to what the kernel programs read.

use buildcage_common::{
    BuildPolicy,
    policy::{POLICY_AUDIT, POLICY_KILL},
};

use super::{Enforcement, Network, Policy};

#[derive(Debug, thiserror::Error)]
pub enum KernelPolicyError {
    #[error("policy {policy} ({source_file}): network = \"loopback\" is not enforced by this version of buildcage, so the build will not start\nhint: use network = \"none\" or \"allow\" until loopback isolation lands")]
    Loopback { policy: String, source_file: String },
}

impl Policy {
    /// The compiled form the kernel programs look up by cgroup id. A policy that
    /// asks for something the programs cannot enforce is an error, never a
    /// silent approximation (fail closed).
    pub fn kernel(&self) -> Result<BuildPolicy, KernelPolicyError> {
        if self.network == Network::Loopback {
            return Err(KernelPolicyError::Loopback {
                policy: self.name.clone(),
                source_file: self.source.display().to_string(),
            });
        }
        let mut flags = 0;
        if self.action == Enforcement::Audit {
            flags |= POLICY_AUDIT;
        }
        if self.kill_on_violation {
            flags |= POLICY_KILL;
        }
        Ok(BuildPolicy {
            socket_families: self.socket_families(),
            flags,
            _pad: 0,
        })
    }
}

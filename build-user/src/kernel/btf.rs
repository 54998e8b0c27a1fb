//! Kernel struct offsets from the running kernel's BTF.
//!
//! Rust eBPF emits no CO-RE relocations, so the programs cannot have the kernel fix
//! up their field accesses. Instead we look the offsets up here, once per load, and
//! hand them to the programs as a global. One binary is then right on every kernel
//! with BTF (6.1 and 6.12 lay `task_struct` out differently).

use std::path::Path;

use btf_rs::{Btf, BtfType as _, Type};
use buildcage_common::Offsets;

/// Where the kernel exposes its own BTF (CONFIG_DEBUG_INFO_BTF=y).
pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error("cannot read kernel BTF from {path}")]
    Read {
        path: String,
        #[source]
        source: btf_rs::Error,
    },
    #[error("kernel BTF has no struct {0}")]
    NoStruct(&'static str),
    #[error("kernel BTF has no field {field} in struct {ty}")]
    NoField {
        ty: &'static str,
        field: &'static str,
    },
    #[error("field {ty}.{field} is a bitfield or not byte aligned; cannot read it")]
    Unaligned {
        ty: &'static str,
        field: &'static str,
    },
    #[error("kernel BTF has no LSM hook {0}")]
    NoHook(String),
    #[error("kernel BTF is inconsistent")]
    Parse(#[from] btf_rs::Error),
}

impl crate::hint::Hint for BtfError {
    fn hint(&self) -> Option<String> {
        Some(
            match self {
                Self::Read { .. } => "buildcage needs a kernel built with CONFIG_DEBUG_INFO_BTF=y",
                Self::NoStruct(_) | Self::NoField { .. } | Self::Unaligned { .. } | Self::Parse(_) => {
                    "this kernel is too different from the ones buildcage knows (6.1 to 6.18); please report it"
                }
                Self::NoHook(_) => "the kernel lacks CONFIG_BPF_LSM=y, or names the hook differently",
            }
            .to_owned(),
        )
    }
}

/// The kernel's BTF, parsed once.
pub struct KernelBtf {
    btf: Btf,
}

impl std::fmt::Debug for KernelBtf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KernelBtf").finish_non_exhaustive()
    }
}

impl KernelBtf {
    pub fn from_sys_fs() -> Result<Self, BtfError> {
        Self::from_file(Path::new(VMLINUX_BTF))
    }

    pub fn from_file(path: &Path) -> Result<Self, BtfError> {
        let btf = Btf::from_file(path).map_err(|source| BtfError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Ok(Self { btf })
    }

    /// Everything the kernel programs need.
    pub fn offsets(&self) -> Result<Offsets, BtfError> {
        Ok(Offsets {
            task_real_parent: self.field_offset("task_struct", "real_parent")?,
            task_tgid: self.field_offset("task_struct", "tgid")?,
            task_cred: self.field_offset("task_struct", "cred")?,
            task_real_cred: self.field_offset("task_struct", "real_cred")?,
            dentry_parent: self.field_offset("dentry", "d_parent")?,
            dentry_inode: self.field_offset("dentry", "d_inode")?,
            dentry_name: self.field_offset("dentry", "d_name")?
                + self.field_offset("qstr", "name")?,
            dentry_sb: self.field_offset("dentry", "d_sb")?,
            inode_mode: self.field_offset("inode", "i_mode")?,
            sb_dev: self.field_offset("super_block", "s_dev")?,
            sb_magic: self.field_offset("super_block", "s_magic")?,
            file_dentry: self.field_offset("file", "f_path")?
                + self.field_offset("path", "dentry")?,
            file_mode: self.field_offset("file", "f_mode")?,
            setattr_dentry_arg: self.hook_param("inode_setattr", "dentry")?,
            socket_sk: self.field_offset("socket", "sk")?,
            sock_family: self.field_offset("sock_common", "skc_family")?,
            sock_num: self.field_offset("sock_common", "skc_num")?,
            msghdr_name: self.field_offset("msghdr", "msg_name")?,
            msghdr_control: self.field_offset("msghdr", "msg_control")?,
            msghdr_controllen: self.field_offset("msghdr", "msg_controllen")?,
            sock_addr_sk: self.field_offset("bpf_sock_addr_kern", "sk")?,
            inode_ino: self.field_offset("inode", "i_ino")?,
            unix_dentry: self.field_offset("unix_sock", "path")?
                + self.field_offset("path", "dentry")?,
            file_flags: self.field_offset("file", "f_flags")?,
            path_dentry: self.field_offset("path", "dentry")?,
            task_cgroups: self.field_offset("task_struct", "cgroups")?,
            css_set_dfl_cgrp: self.field_offset("css_set", "dfl_cgrp")?,
            cgroup_kn: self.field_offset("cgroup", "kn")?,
            kernfs_node_id: self.field_offset("kernfs_node", "id")?,
            cred_cap_effective: self.field_offset("cred", "cap_effective")?,
            sock_cgroup: self.field_offset("sock", "sk_cgrp_data")?
                + self.field_offset("sock_cgroup_data", "cgroup")?,
        })
    }

    /// Whether the kernel has LSM hook `hook` (some arrived after 6.1).
    pub fn has_hook(&self, hook: &str) -> bool {
        self.hook_args(hook).is_ok()
    }

    /// Index of the parameter called `name` of LSM hook `hook`.
    pub fn hook_param(&self, hook: &str, name: &str) -> Result<u32, BtfError> {
        let fn_name = format!("bpf_lsm_{hook}");
        for t in self.btf.resolve_types_by_name(&fn_name).unwrap_or_default() {
            if let Type::Func(func) = t
                && let Type::FuncProto(proto) = self.btf.resolve_chained_type(&func)?
            {
                for (i, param) in proto.parameters.iter().enumerate() {
                    if self.btf.resolve_name(param).is_ok_and(|n| n == name) {
                        return u32::try_from(i).map_err(|_| BtfError::NoHook(fn_name.clone()));
                    }
                }
            }
        }
        Err(BtfError::NoHook(format!("{hook}({name})")))
    }

    /// Byte offset of `field` in `struct name`, looking through anonymous structs
    /// and unions, which the kernel uses a lot (`struct dentry`, `struct inode`).
    pub fn field_offset(&self, name: &'static str, field: &'static str) -> Result<u32, BtfError> {
        let candidates = self.btf.resolve_types_by_name(name).unwrap_or_default();
        let members = candidates
            .iter()
            .find_map(|t| match t {
                Type::Struct(s) => Some(s),
                _ => None,
            })
            .ok_or(BtfError::NoStruct(name))?;
        let bits = self
            .find_member(&members.members, field, 0)?
            .ok_or(BtfError::NoField { ty: name, field })?;
        if bits % 8 != 0 {
            return Err(BtfError::Unaligned { ty: name, field });
        }
        Ok(bits / 8)
    }

    fn find_member(
        &self,
        members: &[btf_rs::Member],
        field: &str,
        base_bits: u32,
    ) -> Result<Option<u32>, BtfError> {
        for member in members {
            let name = self.btf.resolve_name(member).unwrap_or_default();
            if name == field {
                if member.bitfield_size().is_some_and(|size| size != 0) {
                    return Ok(None);
                }
                return Ok(Some(base_bits + member.bit_offset()));
            }
            if name.is_empty() && member.get_type_id().is_some() {
                // An anonymous struct or union: its members belong to the parent.
                if let Type::Struct(inner) | Type::Union(inner) =
                    self.btf.resolve_chained_type(member)?
                    && let Some(found) =
                        self.find_member(&inner.members, field, base_bits + member.bit_offset())?
                {
                    return Ok(Some(found));
                }
            }
        }
        Ok(None)
    }

    /// Number of parameters of an LSM hook, from `bpf_lsm_<hook>`'s prototype. The
    /// verdict of the previous program sits in the slot after the last one.
    pub fn hook_args(&self, hook: &str) -> Result<usize, BtfError> {
        let name = format!("bpf_lsm_{hook}");
        for t in self.btf.resolve_types_by_name(&name).unwrap_or_default() {
            if let Type::Func(func) = t
                && let Type::FuncProto(proto) = self.btf.resolve_chained_type(&func)?
            {
                return Ok(proto.parameters.len());
            }
        }
        Err(BtfError::NoHook(hook.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The host's own BTF: the offsets must be found, be distinct and lie inside
    /// the struct. This runs on the host (no BPF needed) and in the VM on 6.1 and 6.12.
    #[test]
    fn task_struct_offsets_from_running_kernel() {
        let btf = KernelBtf::from_sys_fs().expect("kernel BTF");
        let offsets = btf.offsets().expect("offsets");
        assert_ne!(offsets.task_real_parent, offsets.task_tgid);
        assert!(offsets.task_real_parent > 0 && offsets.task_real_parent < 16384);
        assert!(offsets.task_tgid > 0 && offsets.task_tgid < 16384);
        assert_eq!(btf.hook_args("socket_create").expect("socket_create"), 4);
        // The dentry moved from first to second argument in Linux 6.3.
        let setattr = btf
            .hook_param("inode_setattr", "dentry")
            .expect("inode_setattr");
        assert!(setattr == 0 || setattr == 1);
        assert_eq!(offsets.setattr_dentry_arg, setattr);
        // d_name.name and f_path.dentry are one pointer into their structs.
        assert_eq!(
            offsets.dentry_name,
            btf.field_offset("dentry", "d_name").unwrap() + 8
        );
        assert_eq!(
            offsets.file_dentry,
            btf.field_offset("file", "f_path").unwrap() + 8
        );
    }

    #[test]
    fn unknown_field_is_named() {
        let btf = KernelBtf::from_sys_fs().expect("kernel BTF");
        let err = btf
            .field_offset("task_struct", "no_such_field")
            .unwrap_err();
        assert_eq!(
            err.to_string().lines().next(),
            Some("kernel BTF has no field no_such_field in struct task_struct")
        );
    }
}

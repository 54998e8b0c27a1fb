//! Another tool's hold on the kernel's cgroup LSM slots. The kernel has 10
//! for all `BPF_LSM_CGROUP` programs on the machine, one per hook
//! (CGROUP_LSM_NUM, include/linux/bpf-cgroup-defs.h); a program that would
//! need an 11th hook is refused at attach (kernel/bpf/cgroup.c,
//! bpf_cgroup_atype_find). To show what buildcage does then, a test takes one
//! slot itself, with the smallest program there is (allow, on a hook buildcage
//! does not use), loaded and attached through bpf(2) directly so that nothing
//! of buildcage's is involved.
#![expect(
    clippy::as_conversions,
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    reason = "bpf(2)'s attributes hold fds, pointers and enum values in the u32 and u64 fields the kernel's ABI gives them"
)]

use std::{
    ffi::CStr,
    fs::File,
    io,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::Path,
    time::{Duration, Instant},
};

use aya::Btf;
use aya_obj::{
    btf::BtfKind,
    generated::{bpf_attach_type, bpf_attr, bpf_cmd, bpf_insn, bpf_prog_type},
};

/// The occupying program's name, as the kernel lists it.
pub const NAME: &str = "slot_occupier";

/// A slot taken, for as long as this lives: the program and its link to a
/// cgroup of its own.
#[derive(Debug)]
pub struct Occupier {
    _prog: OwnedFd,
    _link: OwnedFd,
}

/// bpf(2) with `attr`, returning the new fd.
fn bpf(cmd: bpf_cmd, attr: &mut bpf_attr) -> io::Result<OwnedFd> {
    // SAFETY: `attr` is a whole, zero-initialised union as the kernel reads
    // it, and lives across the call; the kernel returns a new fd or -1.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd as libc::c_int,
            std::ptr::from_mut(attr),
            size_of::<bpf_attr>(),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new fd, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// `r0 = 1; exit`: a `BPF_LSM_CGROUP` program that allows.
fn allow() -> [bpf_insn; 2] {
    // SAFETY: bpf_insn is plain data; all zeroes is a valid value.
    let mut insns: [bpf_insn; 2] = unsafe { std::mem::zeroed() };
    // BPF_ALU64 | BPF_MOV | BPF_K, dst r0 (include/uapi/linux/bpf_common.h).
    insns[0].code = 0x07 | 0xb0;
    insns[0].imm = 1;
    // BPF_JMP | BPF_EXIT.
    insns[1].code = 0x05 | 0x90;
    insns
}

/// Takes the cgroup LSM slot of `hook` with a program attached to `cgroup`
/// (which must exist). The slots of programs detached a moment ago are given
/// back only after an RCU grace period, so this tries again for a while.
///
/// # Panics
///
/// When the kernel refuses the program, or no slot is free within 60 s.
pub fn occupy(hook: &str, cgroup: &Path) -> Occupier {
    let btf = Btf::from_sys_fs().expect("the kernel's BTF");
    let btf_id = btf
        .id_by_type_name_kind(&format!("bpf_lsm_{hook}"), BtfKind::Func)
        .unwrap_or_else(|e| panic!("bpf_lsm_{hook} in the kernel's BTF: {e}"));
    let insns = allow();
    let license: &CStr = c"GPL";
    // SAFETY: all zeroes is the kernel's default for every field of bpf_attr.
    let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
    // SAFETY: writing the fields of the union's prog-load member.
    let load = unsafe { &mut attr.__bindgen_anon_3 };
    load.prog_type = bpf_prog_type::BPF_PROG_TYPE_LSM as u32;
    load.expected_attach_type = bpf_attach_type::BPF_LSM_CGROUP as u32;
    load.attach_btf_id = btf_id;
    load.insn_cnt = insns.len() as u32;
    load.insns = insns.as_ptr() as u64;
    load.license = license.as_ptr() as u64;
    for (slot, byte) in load.prog_name.iter_mut().zip(NAME.bytes()) {
        *slot = byte as libc::c_char;
    }
    let prog = bpf(bpf_cmd::BPF_PROG_LOAD, &mut attr)
        .unwrap_or_else(|e| panic!("loading a program for bpf_lsm_{hook}: {e}"));
    let dir = File::open(cgroup).unwrap_or_else(|e| panic!("{}: {e}", cgroup.display()));
    let until = Instant::now() + Duration::from_secs(60);
    loop {
        // SAFETY: as above.
        let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
        attr.link_create.__bindgen_anon_1.prog_fd = prog.as_raw_fd() as u32;
        attr.link_create.__bindgen_anon_2.target_fd = dir.as_raw_fd() as u32;
        attr.link_create.attach_type = bpf_attach_type::BPF_LSM_CGROUP as u32;
        match bpf(bpf_cmd::BPF_LINK_CREATE, &mut attr) {
            Ok(link) => {
                return Occupier {
                    _prog: prog,
                    _link: link,
                };
            }
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) && Instant::now() < until => {
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(e) => panic!("attaching a program to bpf_lsm_{hook}: {e}"),
        }
    }
}

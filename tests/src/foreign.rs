//! Another tool's program on the server veth's ingress hook (Cilium, a traffic shaper, a
//! firewall), which the watchdog must neither disturb nor be stopped by.
//!
//! Either way it passes every packet and ends classification there, as Cilium's programs and
//! an `action ok` filter do: a classifier behind it would never see a SYN. On TCX kernels it is
//! a TCX link to `foreign_pass`, a two-instruction classifier that returns `TC_ACT_OK`, loaded
//! and linked with the `bpf` syscall directly (the test bed has no eBPF object of its own).
//! Before TCX it is a `matchall` filter with `action pass` on the interface's clsact qdisc. It
//! stays until dropped.
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use anyhow::{Context, Result};
use aya_obj::generated::{bpf_attach_type, bpf_attr, bpf_cmd, bpf_prog_type};

use crate::hooks::{kernel_has_tcx, tcx_ingress_programs};
use crate::netns::{TestNet, current_ifindex, ns_exec, run_in_ns};

/// The `matchall` filter's priority, so that it can be found and removed again.
const MATCHALL_PRIORITY: &str = "7";

pub struct ForeignProgram {
    kind: Kind,
    ns: String,
    iface: String,
}

enum Kind {
    /// The TCX link (the program is detached when it closes) and the program's id.
    Tcx {
        _link: OwnedFd,
        program_id: u32,
    },
    Matchall,
}

impl ForeignProgram {
    /// Attaches the foreign program to the server veth's ingress.
    pub fn attach(net: &TestNet) -> Result<ForeignProgram> {
        let (ns, iface) = (net.server_ns().to_owned(), net.server_iface().to_owned());
        let kind = if kernel_has_tcx() {
            let before = tcx_ingress_programs(net)?;
            let name = iface.clone();
            let link = run_in_ns(&ns, move || tcx_pass_link(&name))?;
            let program_id = tcx_ingress_programs(net)?
                .into_iter()
                .find(|id| !before.contains(id))
                .context("the foreign TCX program is not listed on the interface")?;
            Kind::Tcx {
                _link: link,
                program_id,
            }
        } else {
            let qdiscs = ns_exec(&ns, "tc", &["qdisc", "show", "dev", &iface])?;
            if !qdiscs.contains("clsact") {
                ns_exec(&ns, "tc", &["qdisc", "add", "dev", &iface, "clsact"])?;
            }
            ns_exec(
                &ns,
                "tc",
                &[
                    "filter",
                    "add",
                    "dev",
                    &iface,
                    "ingress",
                    "prio",
                    MATCHALL_PRIORITY,
                    "matchall",
                    "action",
                    "pass",
                ],
            )?;
            Kind::Matchall
        };
        Ok(ForeignProgram { kind, ns, iface })
    }

    /// Whether it still hangs on the interface.
    pub fn is_attached(&self, net: &TestNet) -> Result<bool> {
        match &self.kind {
            Kind::Tcx { program_id, .. } => Ok(tcx_ingress_programs(net)?.contains(program_id)),
            Kind::Matchall => {
                let filters = ns_exec(
                    &self.ns,
                    "tc",
                    &["filter", "show", "dev", &self.iface, "ingress"],
                )?;
                Ok(filters.contains("matchall"))
            }
        }
    }

    /// The program id (TCX) the hook checks should expect besides the agent's.
    pub fn program_id(&self) -> Option<u32> {
        match &self.kind {
            Kind::Tcx { program_id, .. } => Some(*program_id),
            Kind::Matchall => None,
        }
    }
}

impl Drop for ForeignProgram {
    fn drop(&mut self) {
        if let Kind::Matchall = self.kind {
            let _ = ns_exec(
                &self.ns,
                "tc",
                &[
                    "filter",
                    "del",
                    "dev",
                    &self.iface,
                    "ingress",
                    "prio",
                    MATCHALL_PRIORITY,
                ],
            );
        }
    }
}

/// One eBPF instruction (`struct bpf_insn`): opcode, destination and source registers (4 bits
/// each), offset, immediate.
#[repr(C)]
struct Insn {
    code: u8,
    regs: u8,
    off: i16,
    imm: i32,
}

/// Loads `r0 = 0 (TC_ACT_OK); exit` as a classifier and links it to `iface`'s TCX ingress
/// in the calling thread's namespace; returns the link.
fn tcx_pass_link(iface: &str) -> Result<OwnedFd> {
    const BPF_ALU64_MOV_K: u8 = 0xb7;
    const BPF_EXIT: u8 = 0x95;
    let program = [
        Insn {
            code: BPF_ALU64_MOV_K,
            regs: 0,
            off: 0,
            imm: 0,
        },
        Insn {
            code: BPF_EXIT,
            regs: 0,
            off: 0,
            imm: 0,
        },
    ];
    let license = c"GPL";
    // SAFETY: all-zero is a valid `bpf_attr`.
    let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
    // SAFETY: writing plain fields of the union's BPF_PROG_LOAD member.
    let load = unsafe { &mut attr.__bindgen_anon_3 };
    load.prog_type = bpf_prog_type::BPF_PROG_TYPE_SCHED_CLS as u32;
    load.insn_cnt = program.len() as u32;
    load.insns = program.as_ptr() as u64;
    load.license = license.as_ptr() as u64;
    for (to, from) in load.prog_name.iter_mut().zip(b"foreign_pass") {
        *to = *from as libc::c_char;
    }
    let program_fd =
        bpf(bpf_cmd::BPF_PROG_LOAD, &mut attr).context("loading the foreign program")?;

    let ifindex = current_ifindex(iface)?;
    // SAFETY: as above.
    let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
    // SAFETY: writing plain fields of the union's BPF_LINK_CREATE member.
    let link = unsafe { &mut attr.link_create };
    link.__bindgen_anon_1.prog_fd = program_fd.as_raw_fd() as u32;
    link.__bindgen_anon_2.target_ifindex = ifindex;
    link.attach_type = bpf_attach_type::BPF_TCX_INGRESS as u32;
    // The link holds the program; the program's own descriptor goes at the end of this call.
    bpf(bpf_cmd::BPF_LINK_CREATE, &mut attr).context("linking the foreign program to TCX ingress")
}

/// One `bpf(2)` command that returns a new descriptor.
fn bpf(cmd: bpf_cmd, attr: &mut bpf_attr) -> Result<OwnedFd> {
    // SAFETY: `attr` is a valid request for `cmd`; what it points at outlives the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd as libc::c_int,
            attr as *mut bpf_attr,
            size_of::<bpf_attr>() as libc::c_uint,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    // SAFETY: a fresh descriptor the kernel just gave us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

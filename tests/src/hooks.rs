//! What hangs on the server veth's ingress hook: the agent's classifier, or nothing.
//!
//! On ≥ 6.6 kernels the agent attaches through a TCX link owned by its process, so the kernel's
//! own list of TCX ingress programs tells whether an agent is attached (and which one, by program
//! id, as its `attached` event reports it). Before TCX the hook is a BPF filter on a `clsact`
//! qdisc, which `tc filter show` lists with its program id. The checks below look at both, so
//! they mean the same on every kernel.

use anyhow::{Context, Result, ensure};
use aya::{
    programs::{SchedClassifier, TcAttachType},
    util::KernelVersion,
};

use crate::netns::{TestNet, ns_exec, run_in_ns};

/// Whether this kernel attaches TC programs through TCX links (Linux ≥ 6.6), as aya and the
/// agent decide it; older kernels use a `clsact` qdisc filter.
pub fn kernel_has_tcx() -> bool {
    KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 6, 0))
}

/// Ids of the programs attached to the server veth's TCX ingress hook, in hook order; empty on
/// kernels without TCX.
pub fn tcx_ingress_programs(net: &TestNet) -> Result<Vec<u32>> {
    if !kernel_has_tcx() {
        return Ok(Vec::new());
    }
    let iface = net.server_iface().to_owned();
    run_in_ns(net.server_ns(), move || {
        let (_revision, programs) = SchedClassifier::query_tcx(&iface, TcAttachType::Ingress)
            .with_context(|| format!("querying the TCX ingress programs of {iface}"))?;
        Ok(programs.iter().map(|p| p.id()).collect())
    })
}

/// Ids of the BPF programs in the server veth's `clsact` ingress filters (the pre-TCX hook).
pub fn clsact_ingress_programs(net: &TestNet) -> Result<Vec<u32>> {
    if !clsact_present(net)? {
        return Ok(Vec::new());
    }
    let filters = ns_exec(
        net.server_ns(),
        "tc",
        &["filter", "show", "dev", net.server_iface(), "ingress"],
    )?;
    Ok(bpf_filter_program_ids(&filters))
}

/// The program ids in `tc filter show` output: `... bpf ... name direct-action ... id 42 tag ..`.
fn bpf_filter_program_ids(filters: &str) -> Vec<u32> {
    filters
        .lines()
        .filter(|line| line.split_whitespace().any(|word| word == "bpf"))
        .filter_map(|line| {
            let words: Vec<&str> = line.split_whitespace().collect();
            words
                .windows(2)
                .find(|pair| pair[0] == "id")
                .and_then(|pair| pair[1].parse().ok())
        })
        .collect()
}

/// Every program on the server veth's ingress hook: TCX links, then `clsact` filters.
pub fn ingress_programs(net: &TestNet) -> Result<Vec<u32>> {
    let mut programs = tcx_ingress_programs(net)?;
    programs.extend(clsact_ingress_programs(net)?);
    Ok(programs)
}

/// Whether a `clsact` qdisc (the pre-TCX hook) sits on the server veth.
pub fn clsact_present(net: &TestNet) -> Result<bool> {
    let qdiscs = ns_exec(
        net.server_ns(),
        "tc",
        &["qdisc", "show", "dev", net.server_iface()],
    )?;
    Ok(qdiscs.contains("clsact"))
}

/// Nothing of an agent is left on the server veth: no TCX program, no `clsact` qdisc.
pub fn assert_nothing_attached(net: &TestNet) -> Result<()> {
    let programs = ingress_programs(net)?;
    ensure!(
        programs.is_empty(),
        "programs still attached to {} ingress: {programs:?}",
        net.server_iface()
    );
    ensure!(
        !clsact_present(net)?,
        "a clsact qdisc was left on {}",
        net.server_iface()
    );
    Ok(())
}

/// Exactly the program `program_id` hangs on the server veth's ingress hook (TCX or clsact).
pub fn assert_only_program_attached(net: &TestNet, program_id: u32) -> Result<()> {
    let programs = ingress_programs(net)?;
    ensure!(
        programs == vec![program_id],
        "expected exactly program {program_id} on {} ingress, found {programs:?}",
        net.server_iface()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::bpf_filter_program_ids;

    #[test]
    fn program_ids_are_read_from_tc_filter_show() {
        let out = "filter protocol all pref 49152 bpf chain 0 \n\
                   filter protocol all pref 49152 bpf chain 0 handle 0x1 stale_syn_classifier \
                   direct-action not_in_hw id 42 name stale_syn_class tag 0123456789abcdef jited \n";
        assert_eq!(bpf_filter_program_ids(out), vec![42]);
        assert!(bpf_filter_program_ids("").is_empty());
    }
}

//! What hangs on the server veth's ingress hook: the agent's classifier, or nothing.
//!
//! On ≥ 6.6 kernels the agent attaches through a TCX link owned by its process, so the kernel's
//! own list of TCX ingress programs tells whether an agent is attached (and which one, by program
//! id, as its `attached` event reports it). Before TCX the hook is a `clsact` qdisc filter.

use anyhow::{Context, Result, ensure};
use aya::programs::{SchedClassifier, TcAttachType};

use crate::netns::{TestNet, ns_exec, run_in_ns};

/// Ids of the programs attached to the server veth's TCX ingress hook, in hook order.
pub fn tcx_ingress_programs(net: &TestNet) -> Result<Vec<u32>> {
    let iface = net.server_iface().to_owned();
    run_in_ns(net.server_ns(), move || {
        let (_revision, programs) = SchedClassifier::query_tcx(&iface, TcAttachType::Ingress)
            .with_context(|| format!("querying the TCX ingress programs of {iface}"))?;
        Ok(programs.iter().map(|p| p.id()).collect())
    })
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
    let programs = tcx_ingress_programs(net)?;
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

/// Exactly the program `program_id` hangs on the server veth's TCX ingress hook.
pub fn assert_only_program_attached(net: &TestNet, program_id: u32) -> Result<()> {
    let programs = tcx_ingress_programs(net)?;
    ensure!(
        programs == vec![program_id],
        "expected exactly program {program_id} on {} ingress, found {programs:?}",
        net.server_iface()
    );
    Ok(())
}

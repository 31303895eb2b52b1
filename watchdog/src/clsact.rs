//! The pre-TCX hook (Linux < 6.6): a BPF filter on the interface's `clsact` qdisc.
//!
//! Unlike a TCX link, such a filter belongs to the interface, not to the agent's process: it
//! stays when the agent is killed, and nothing stops a second agent from attaching beside a
//! running one. So, before attaching, the agent lists the watchdog filters already on the
//! interface and reads each one's `HEARTBEAT` map (through the program's map ids):
//!
//! * a heartbeat younger than the classifier's own timeout means another agent is running:
//!   the start is refused, as with TCX;
//! * an older (or cleared) one was left by a killed agent: that filter already passes
//!   everything, and it is removed before this agent attaches.
//!
//! Reading another program's maps by id needs `CAP_SYS_ADMIN`, which the systemd unit does not
//! grant. So an agent also holds a lock for each interface it watches this way
//! (`/run/watchdog/clsact-<netns>-<ifindex>.lock`, `flock`): the kernel drops it when the process
//! dies, whatever killed it, so a lock held elsewhere is a running (perhaps frozen) agent and the
//! start is refused without reading anything. An unreadable heartbeat with the lock free is
//! taken for a dead agent's (an agent in another mount namespace, with another `/run`, is the
//! case neither check sees).
//!
//! At exit aya removes this agent's filter; the `clsact` qdisc goes too when this agent added it
//! and nothing else hangs on it, so a clean run leaves the interface as it found it.
//!
//! aya lists TCX programs but not netlink filters, so this module asks rtnetlink itself
//! (`netlink-packet-route` messages over [`Channel`]): a filter dump and a qdisc delete.
use std::{
    fs::{File, OpenOptions},
    io,
    os::{fd::AsRawFd, unix::fs::MetadataExt},
    path::PathBuf,
    time::Duration,
};

use anyhow::{Context, Result, bail};
use aya::{
    maps::{Array, Map, MapData, MapInfo},
    programs::{TcAttachType, loaded_programs, tc},
};
use netlink_packet_core::{NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, NetlinkPayload};
use netlink_packet_route::{
    RouteNetlinkMessage,
    tc::{TcAttribute, TcFilterBpfOption, TcHandle, TcMessage, TcOption},
};
use netlink_sys::protocols::NETLINK_ROUTE;
use watchdog_common::{HEARTBEAT_TIMEOUT_NS, names};

use crate::{config::Interface, events::monotonic_ns, netlink::Channel};

/// The clsact hooks filters hang on.
const CLSACT_INGRESS: TcHandle = TcHandle {
    major: TcHandle::CLSACT.major,
    minor: TcHandle::MIN_INGRESS,
};
const CLSACT_EGRESS: TcHandle = TcHandle {
    major: TcHandle::CLSACT.major,
    minor: TcHandle::MIN_EGRESS,
};
/// The clsact qdisc's own handle, `ffff:`.
const CLSACT_HANDLE: TcHandle = TcHandle {
    major: 0xffff,
    minor: 0,
};

/// A BPF filter found on a clsact hook.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BpfFilter {
    /// `TCA_BPF_NAME`: aya names a filter after its program's function.
    pub name: String,
    /// `TCA_BPF_ID`: the program's id.
    pub program_id: u32,
}

/// Where the per-interface locks live.
const LOCK_DIR: &str = "/run/watchdog";

/// This agent's claim on an interface it watches through clsact; released when the agent exits
/// or dies. `None` inside when the lock could not be made (a read-only `/run`, say): then only
/// the heartbeat tells.
pub struct InterfaceLock {
    _file: Option<File>,
}

/// How a watchdog filter's agent looks from here.
enum Heartbeat {
    Age(Duration),
    /// Cleared by an agent on its way out, or never set.
    Cleared,
    /// The program is gone (the filter with it, meanwhile).
    Gone,
    /// Its maps cannot be read from here (no `CAP_SYS_ADMIN`).
    Unreadable(String),
}

/// Makes sure `iface` has a clsact qdisc and that no other live agent watches it; removes the
/// filters of dead ones. Returns whether this call added the qdisc (see [`remove_if_unused`])
/// and the interface's lock, to keep while attached.
pub fn prepare(iface: &Interface) -> Result<(bool, InterfaceLock)> {
    let lock = lock(iface)?;
    let added = match tc::qdisc_add_clsact(&iface.name) {
        Ok(()) => true,
        Err(tc::TcError::AlreadyAttached) => false,
        Err(tc::TcError::NetlinkError(e)) if e.raw_os_error() == Some(libc::EEXIST) => false,
        Err(e) => return Err(e).with_context(|| format!("adding clsact to {}", iface.name)),
    };
    let ours: Vec<BpfFilter> = filters(iface.index, CLSACT_INGRESS)
        .with_context(|| format!("listing the clsact filters of {}", iface.name))?
        .into_iter()
        .filter(|f| f.name == names::CLASSIFIER)
        .collect();
    if ours.is_empty() {
        return Ok((added, lock));
    }
    let mut why = Vec::new();
    for filter in &ours {
        match heartbeat(filter.program_id)? {
            Heartbeat::Age(age) if age < Duration::from_nanos(HEARTBEAT_TIMEOUT_NS) => bail!(
                "another watchdog agent is attached to {} (program id {}, heartbeat {} ms ago): \
                 stop it first",
                iface.name,
                filter.program_id,
                age.as_millis()
            ),
            Heartbeat::Age(age) => why.push(format!(
                "program {}: heartbeat {} ms old",
                filter.program_id,
                age.as_millis()
            )),
            Heartbeat::Cleared => why.push(format!("program {}: heartbeat cleared", filter.program_id)),
            Heartbeat::Gone => why.push(format!("program {}: gone", filter.program_id)),
            Heartbeat::Unreadable(error) => why.push(format!(
                "program {}: heartbeat unreadable ({error}), and no agent holds the interface's lock",
                filter.program_id
            )),
        }
    }
    tracing::info!(
        event = "stale_filter_removed",
        iface = %iface.name,
        program_ids = %ours.iter().map(|f| f.program_id.to_string()).collect::<Vec<_>>().join(","),
        why = %why.join("; "),
        "removing the clsact filter of an agent that is gone"
    );
    tc::qdisc_detach_program(&iface.name, TcAttachType::Ingress, names::CLASSIFIER)
        .with_context(|| format!("removing a dead agent's clsact filter from {}", iface.name))?;
    Ok((added, lock))
}

/// Takes the interface's lock, or refuses the start when another process holds it.
fn lock(iface: &Interface) -> Result<InterfaceLock> {
    let netns = match std::fs::metadata("/proc/thread-self/ns/net") {
        Ok(meta) => meta.ino(),
        Err(_) => return Ok(InterfaceLock { _file: None }),
    };
    let path = PathBuf::from(LOCK_DIR).join(format!("clsact-{netns}-{}.lock", iface.index));
    let file = std::fs::create_dir_all(LOCK_DIR).and_then(|()| {
        OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
    });
    let Ok(file) = file else {
        return Ok(InterfaceLock { _file: None });
    };
    // SAFETY: plain syscall on an fd we own.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let error = io::Error::last_os_error();
        if error.raw_os_error() == Some(libc::EWOULDBLOCK) {
            bail!(
                "another watchdog agent is attached to {} (it holds {}): stop it first",
                iface.name,
                path.display()
            );
        }
        return Ok(InterfaceLock { _file: None });
    }
    Ok(InterfaceLock { _file: Some(file) })
}

/// Deletes the clsact qdisc of `ifindex` when only watchdog filters (or none) hang on it. Call
/// only for a qdisc this agent added: an empty clsact someone else set up is theirs to keep.
pub fn remove_if_unused(ifindex: u32) -> Result<()> {
    for parent in [CLSACT_INGRESS, CLSACT_EGRESS] {
        let foreign = filters(ifindex, parent)?
            .into_iter()
            .any(|f| f.name != names::CLASSIFIER);
        if foreign {
            return Ok(());
        }
    }
    let mut request = TcMessage::with_index(ifindex as i32);
    request.header.parent = TcHandle::CLSACT;
    request.header.handle = CLSACT_HANDLE;
    request.attributes.push(TcAttribute::Kind("clsact".into()));
    let mut channel = Channel::open(NETLINK_ROUTE)?;
    let seq = channel.send(
        RouteNetlinkMessage::DelQueueDiscipline(request),
        NLM_F_REQUEST | NLM_F_ACK,
    )?;
    channel
        .acknowledged::<RouteNetlinkMessage>(seq)
        .context("deleting the clsact qdisc this agent added")
}

/// How long ago the program's agent last beat.
fn heartbeat(program_id: u32) -> Result<Heartbeat> {
    let mut unreadable = None;
    let mut program = None;
    for info in loaded_programs() {
        match info {
            Ok(info) if info.id() == program_id => {
                program = Some(info);
                break;
            }
            Ok(_) => {}
            // Listing or opening programs by id needs CAP_SYS_ADMIN.
            Err(error) => unreadable = Some(format!("{error}")),
        }
    }
    let Some(program) = program else {
        return Ok(match unreadable {
            Some(error) => Heartbeat::Unreadable(error),
            None => Heartbeat::Gone,
        });
    };
    let map_ids = match program.map_ids() {
        Ok(ids) => ids.unwrap_or_default(),
        Err(error) => return Ok(Heartbeat::Unreadable(format!("{error}"))),
    };
    for map_id in map_ids {
        let Ok(info) = MapInfo::from_id(map_id) else {
            continue;
        };
        if info.name_as_str() != Some(names::HEARTBEAT) {
            continue;
        }
        let data = match MapData::from_id(map_id) {
            Ok(data) => data,
            Err(error) => return Ok(Heartbeat::Unreadable(format!("{error}"))),
        };
        let heartbeat: Array<MapData, u64> = Array::try_from(Map::from_map_data(data)?)?;
        let beat = heartbeat.get(&0, 0)?;
        if beat == 0 {
            return Ok(Heartbeat::Cleared);
        }
        return Ok(Heartbeat::Age(Duration::from_nanos(
            monotonic_ns().saturating_sub(beat),
        )));
    }
    Ok(Heartbeat::Unreadable(format!(
        "program {program_id} has no readable {} map",
        names::HEARTBEAT
    )))
}

/// The BPF filters under `parent` (a clsact hook) of `ifindex`.
fn filters(ifindex: u32, parent: TcHandle) -> io::Result<Vec<BpfFilter>> {
    let mut request = TcMessage::with_index(ifindex as i32);
    request.header.parent = parent;
    let mut channel = Channel::open(NETLINK_ROUTE)?;
    let seq = channel.send(
        RouteNetlinkMessage::GetTrafficFilter(request),
        NLM_F_REQUEST | NLM_F_DUMP,
    )?;
    let mut found = Vec::new();
    loop {
        for payload in channel.receive_all::<RouteNetlinkMessage>(seq)? {
            match payload {
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewTrafficFilter(filter)) => {
                    found.extend(bpf_filter(&filter));
                }
                NetlinkPayload::Error(error) if error.code.is_some() => return Err(error.to_io()),
                NetlinkPayload::Done(_) | NetlinkPayload::Error(_) => return Ok(found),
                _ => {}
            }
        }
    }
}

/// A dumped filter as a BPF filter, if it is one with a program (a dump also lists each
/// priority's empty chain head).
fn bpf_filter(filter: &TcMessage) -> Option<BpfFilter> {
    let mut kind = None;
    let mut options: &[TcOption] = &[];
    for attribute in &filter.attributes {
        match attribute {
            TcAttribute::Kind(k) => kind = Some(k.as_str()),
            TcAttribute::Options(o) => options = o,
            _ => {}
        }
    }
    if kind != Some("bpf") {
        return None;
    }
    let (mut name, mut program_id) = (None, None);
    for option in options {
        match option {
            TcOption::Bpf(TcFilterBpfOption::ProgName(n)) => name = Some(n.clone()),
            TcOption::Bpf(TcFilterBpfOption::ProgId(id)) => program_id = Some(*id),
            _ => {}
        }
    }
    Some(BpfFilter {
        name: name.unwrap_or_default(),
        program_id: program_id?,
    })
}

#[cfg(test)]
mod tests {
    use netlink_packet_core::{NetlinkHeader, NetlinkMessage, NetlinkPayload};

    use super::*;

    /// A filter as the kernel dumps it, through the crate's own serializer and parser.
    fn dumped(attributes: Vec<TcAttribute>) -> TcMessage {
        let mut message = TcMessage::with_index(7);
        message.header.parent = CLSACT_INGRESS;
        message.attributes = attributes;
        let mut packet = NetlinkMessage::new(
            NetlinkHeader::default(),
            NetlinkPayload::from(RouteNetlinkMessage::NewTrafficFilter(message)),
        );
        packet.finalize();
        let mut bytes = vec![0; packet.buffer_len()];
        packet.serialize(&mut bytes);
        match NetlinkMessage::<RouteNetlinkMessage>::deserialize(&bytes)
            .expect("parses")
            .payload
        {
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewTrafficFilter(m)) => m,
            other => panic!("not a filter: {other:?}"),
        }
    }

    #[test]
    fn a_bpf_filter_is_read_from_its_dump_message() {
        let filter = dumped(vec![
            TcAttribute::Kind("bpf".into()),
            TcAttribute::Options(vec![
                TcOption::Bpf(TcFilterBpfOption::ProgName("stale_syn_classifier".into())),
                TcOption::Bpf(TcFilterBpfOption::ProgId(42)),
            ]),
        ]);
        assert_eq!(
            bpf_filter(&filter),
            Some(BpfFilter {
                name: "stale_syn_classifier".into(),
                program_id: 42
            })
        );
        // A chain head: kind only.
        assert_eq!(
            bpf_filter(&dumped(vec![TcAttribute::Kind("bpf".into())])),
            None
        );
        // Another kind of filter.
        assert_eq!(
            bpf_filter(&dumped(vec![TcAttribute::Kind("u32".into())])),
            None
        );
    }

    #[test]
    fn the_hooks_are_clsact_ingress_and_egress() {
        assert_eq!(u32::from(CLSACT_INGRESS), 0xffff_fff2);
        assert_eq!(u32::from(CLSACT_EGRESS), 0xffff_fff3);
        assert_eq!(u32::from(TcHandle::CLSACT), 0xffff_fff1);
        assert_eq!(u32::from(CLSACT_HANDLE), 0xffff_0000);
    }
}

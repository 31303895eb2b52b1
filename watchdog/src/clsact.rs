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
//! grant; a running agent is then told by its [`crate::interface_lock`], taken before this
//! module runs. An unreadable heartbeat with the lock free is taken for a dead agent's (an agent
//! in another mount namespace, with another `/run`, is the case neither check sees).
//!
//! At exit aya removes this agent's filter; the `clsact` qdisc goes too when this agent added it
//! and nothing else hangs on it, so a clean run leaves the interface as it found it.
//!
//! aya lists TCX programs but not netlink filters, so this module asks rtnetlink itself
//! (`netlink-packet-route` messages over [`Channel`]): a filter dump and a qdisc delete.
use std::{io, time::Duration};

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

/// A filter found on a clsact hook (a dump also lists each priority's chain head: kind only).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filter {
    /// `TCA_KIND`: `bpf`, `matchall`, `u32` …
    pub kind: String,
    /// Lower runs first.
    pub priority: u16,
    /// A BPF filter's program.
    pub bpf: Option<BpfProgram>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BpfProgram {
    /// `TCA_BPF_NAME`: aya names a filter after its program's function.
    pub name: String,
    /// `TCA_BPF_ID`: the program's id.
    pub id: u32,
}

impl Filter {
    fn is_ours(&self) -> bool {
        self.bpf
            .as_ref()
            .is_some_and(|b| b.name == names::CLASSIFIER)
    }
}

/// The priorities of the filters that are not the watchdog's (a priority's chain head goes
/// with the filters at that priority).
fn foreign_priorities(filters: &[Filter]) -> impl Iterator<Item = u16> + '_ {
    filters
        .iter()
        .map(|f| f.priority)
        .filter(|&p| !filters.iter().any(|f| f.priority == p && f.is_ours()))
}

/// What [`prepare`] found.
pub struct Prepared {
    /// This call added the clsact qdisc (see [`remove_if_unused`]).
    pub added_qdisc: bool,
    /// The priority to attach the classifier with: ahead of every other filter, so that none
    /// that ends classification (`action ok`, a program returning `TC_ACT_OK`) keeps SYNs from
    /// it. 0 (the kernel's choice) when the hook is empty, or when a filter already sits at the
    /// first priority.
    pub priority: u16,
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
/// filters of dead ones; picks the priority to attach with. Call with the interface's
/// [`crate::interface_lock`] held.
pub fn prepare(iface: &Interface) -> Result<Prepared> {
    let added = match tc::qdisc_add_clsact(&iface.name) {
        Ok(()) => true,
        Err(tc::TcError::AlreadyAttached) => false,
        Err(tc::TcError::NetlinkError(e)) if e.raw_os_error() == Some(libc::EEXIST) => false,
        Err(e) => return Err(e).with_context(|| format!("adding clsact to {}", iface.name)),
    };
    let filters = filters(iface.index, CLSACT_INGRESS)
        .with_context(|| format!("listing the clsact filters of {}", iface.name))?;
    let prepared = Prepared {
        added_qdisc: added,
        priority: attach_priority(iface, &filters),
    };
    let ours: Vec<&BpfProgram> = filters
        .iter()
        .filter(|f| f.is_ours())
        .filter_map(|f| f.bpf.as_ref())
        .collect();
    if ours.is_empty() {
        return Ok(prepared);
    }
    let mut why = Vec::new();
    for filter in &ours {
        match heartbeat(filter.id)? {
            Heartbeat::Age(age) if age < Duration::from_nanos(HEARTBEAT_TIMEOUT_NS) => bail!(
                "another watchdog agent is attached to {} (program id {}, heartbeat {} ms ago): \
                 stop it first",
                iface.name,
                filter.id,
                age.as_millis()
            ),
            Heartbeat::Age(age) => why.push(format!(
                "program {}: heartbeat {} ms old",
                filter.id,
                age.as_millis()
            )),
            Heartbeat::Cleared => why.push(format!("program {}: heartbeat cleared", filter.id)),
            Heartbeat::Gone => why.push(format!("program {}: gone", filter.id)),
            Heartbeat::Unreadable(error) => why.push(format!(
                "program {}: heartbeat unreadable ({error}), and no agent holds the interface's lock",
                filter.id
            )),
        }
    }
    tracing::info!(
        event = "stale_filter_removed",
        iface = %iface.name,
        program_ids = %ours.iter().map(|f| f.id.to_string()).collect::<Vec<_>>().join(","),
        why = %why.join("; "),
        "removing the clsact filter of an agent that is gone"
    );
    tc::qdisc_detach_program(&iface.name, TcAttachType::Ingress, names::CLASSIFIER)
        .with_context(|| format!("removing a dead agent's clsact filter from {}", iface.name))?;
    Ok(prepared)
}

/// One ahead of the first foreign filter (see [`Prepared::priority`]).
fn attach_priority(iface: &Interface, filters: &[Filter]) -> u16 {
    match foreign_priorities(filters).min() {
        None => 0,
        Some(first) if first > 1 => first - 1,
        Some(first) => {
            tracing::warn!(
                event = "classifier_not_first",
                iface = %iface.name,
                priority = first,
                "a filter at the first priority runs before the watchdog's classifier: if it \
                 ends classification, stale SYNs never reach the watchdog"
            );
            0
        }
    }
}

/// Deletes the clsact qdisc of `ifindex` when only watchdog filters (or none) hang on it. Call
/// only for a qdisc this agent added: an empty clsact someone else set up is theirs to keep.
pub fn remove_if_unused(ifindex: u32) -> Result<()> {
    for parent in [CLSACT_INGRESS, CLSACT_EGRESS] {
        if foreign_priorities(&filters(ifindex, parent)?)
            .next()
            .is_some()
        {
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
fn filters(ifindex: u32, parent: TcHandle) -> io::Result<Vec<Filter>> {
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
                    found.extend(parse_filter(&filter));
                }
                NetlinkPayload::Error(error) if error.code.is_some() => return Err(error.to_io()),
                NetlinkPayload::Done(_) | NetlinkPayload::Error(_) => return Ok(found),
                _ => {}
            }
        }
    }
}

/// A dumped filter; `None` for a message without a kind.
fn parse_filter(filter: &TcMessage) -> Option<Filter> {
    let mut kind = None;
    let mut options: &[TcOption] = &[];
    for attribute in &filter.attributes {
        match attribute {
            TcAttribute::Kind(k) => kind = Some(k.clone()),
            TcAttribute::Options(o) => options = o,
            _ => {}
        }
    }
    let (mut name, mut id) = (None, None);
    for option in options {
        match option {
            TcOption::Bpf(TcFilterBpfOption::ProgName(n)) => name = Some(n.clone()),
            TcOption::Bpf(TcFilterBpfOption::ProgId(i)) => id = Some(*i),
            _ => {}
        }
    }
    Some(Filter {
        kind: kind?,
        // `tcm_info` of a filter: priority in the upper 16 bits, protocol in the lower.
        priority: (filter.header.info >> 16) as u16,
        bpf: id.map(|id| BpfProgram {
            name: name.unwrap_or_default(),
            id,
        }),
    })
}

#[cfg(test)]
mod tests {
    use netlink_packet_core::{NetlinkHeader, NetlinkMessage, NetlinkPayload};

    use super::*;

    /// A filter as the kernel dumps it, through the crate's own serializer and parser.
    fn dumped(priority: u16, attributes: Vec<TcAttribute>) -> TcMessage {
        let mut message = TcMessage::with_index(7);
        message.header.parent = CLSACT_INGRESS;
        // ETH_P_ALL, in network byte order as the kernel keeps it.
        message.header.info = (u32::from(priority) << 16) | u32::from(0x0003u16.to_be());
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
    fn filters_are_read_from_their_dump_messages() {
        let ours = parse_filter(&dumped(
            5,
            vec![
                TcAttribute::Kind("bpf".into()),
                TcAttribute::Options(vec![
                    TcOption::Bpf(TcFilterBpfOption::ProgName("stale_syn_classifier".into())),
                    TcOption::Bpf(TcFilterBpfOption::ProgId(42)),
                ]),
            ],
        ))
        .expect("a filter");
        assert_eq!(
            ours,
            Filter {
                kind: "bpf".into(),
                priority: 5,
                bpf: Some(BpfProgram {
                    name: "stale_syn_classifier".into(),
                    id: 42
                }),
            }
        );
        assert!(ours.is_ours());
        // A chain head: kind only.
        let head = parse_filter(&dumped(5, vec![TcAttribute::Kind("bpf".into())])).unwrap();
        assert_eq!((head.priority, head.bpf.as_ref()), (5, None));
        let matchall =
            parse_filter(&dumped(7, vec![TcAttribute::Kind("matchall".into())])).unwrap();
        // The chain head goes with the filter of ours at its priority; the matchall is foreign.
        let all = [ours, head, matchall];
        assert_eq!(foreign_priorities(&all).collect::<Vec<_>>(), [7]);
        assert_eq!(foreign_priorities(&all[..2]).next(), None);
    }

    #[test]
    fn the_hooks_are_clsact_ingress_and_egress() {
        assert_eq!(u32::from(CLSACT_INGRESS), 0xffff_fff2);
        assert_eq!(u32::from(CLSACT_EGRESS), 0xffff_fff3);
        assert_eq!(u32::from(TcHandle::CLSACT), 0xffff_fff1);
        assert_eq!(u32::from(CLSACT_HANDLE), 0xffff_0000);
    }
}

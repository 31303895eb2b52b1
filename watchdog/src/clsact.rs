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
//! aya lists TCX programs but not netlink filters, so this module speaks rtnetlink itself: a
//! filter dump (`RTM_GETTFILTER`) and a qdisc delete (`RTM_DELQDISC`).
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
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};
use watchdog_common::{HEARTBEAT_TIMEOUT_NS, names};

use crate::{config::Interface, events::monotonic_ns};

const RTM_DELQDISC: u16 = 37;
const RTM_GETTFILTER: u16 = 46;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_HDRLEN: usize = 16;
const TCMSG_LEN: usize = 20;
const TCA_KIND: u16 = 1;
const TCA_OPTIONS: u16 = 2;
const TCA_BPF_NAME: u16 = 7;
const TCA_BPF_ID: u16 = 11;
/// `TC_H_CLSACT` (= `TC_H_INGRESS`): the clsact qdisc's parent.
const TC_H_CLSACT: u32 = 0xffff_fff1;
/// The clsact qdisc's own handle, `ffff:`.
const CLSACT_HANDLE: u32 = 0xffff_0000;
/// Filter parents: `TC_H_MAKE(TC_H_CLSACT, TC_H_MIN_INGRESS / TC_H_MIN_EGRESS)`.
const CLSACT_INGRESS: u32 = 0xffff_fff2;
const CLSACT_EGRESS: u32 = 0xffff_fff3;
/// Upper bound on one request/answer exchange.
const REPLY_TIMEOUT: Duration = Duration::from_secs(1);

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
    let mut request = request(
        RTM_DELQDISC,
        NLM_F_REQUEST | NLM_F_ACK,
        ifindex,
        TC_H_CLSACT,
    );
    // tcm_handle
    request[NLMSG_HDRLEN + 8..NLMSG_HDRLEN + 12].copy_from_slice(&CLSACT_HANDLE.to_ne_bytes());
    push_attribute(&mut request, TCA_KIND, b"clsact\0");
    exchange(&request).context("deleting the clsact qdisc this agent added")
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
fn filters(ifindex: u32, parent: u32) -> io::Result<Vec<BpfFilter>> {
    let request = request(RTM_GETTFILTER, NLM_F_REQUEST | NLM_F_DUMP, ifindex, parent);
    let socket = open()?;
    socket.send(&request, 0)?;
    let mut found = Vec::new();
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        let len = socket.recv(&mut &mut buffer[..], 0)?;
        for (kind, payload) in messages(&buffer[..len]) {
            match kind {
                NLMSG_DONE => return Ok(found),
                NLMSG_ERROR => {
                    let code = payload
                        .get(..4)
                        .map(|b| i32::from_ne_bytes(b.try_into().expect("4 bytes")))
                        .unwrap_or(-libc::EIO);
                    if code != 0 {
                        return Err(io::Error::from_raw_os_error(-code));
                    }
                    return Ok(found);
                }
                _ => found.extend(parse_filter(payload)),
            }
        }
    }
}

/// Sends one request that asks for an acknowledgement and waits for it.
fn exchange(request: &[u8]) -> io::Result<()> {
    let socket = open()?;
    socket.send(request, 0)?;
    let mut buffer = vec![0u8; 8 * 1024];
    loop {
        let len = socket.recv(&mut &mut buffer[..], 0)?;
        for (kind, payload) in messages(&buffer[..len]) {
            if kind == NLMSG_ERROR {
                let code = payload
                    .get(..4)
                    .map(|b| i32::from_ne_bytes(b.try_into().expect("4 bytes")))
                    .unwrap_or(-libc::EIO);
                return if code == 0 {
                    Ok(())
                } else {
                    Err(io::Error::from_raw_os_error(-code))
                };
            }
        }
    }
}

fn open() -> io::Result<Socket> {
    let mut socket = Socket::new(NETLINK_ROUTE)?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    let tv = libc::timeval {
        tv_sec: REPLY_TIMEOUT.as_secs() as libc::time_t,
        tv_usec: 0,
    };
    // SAFETY: valid fd and a correctly sized `timeval`.
    let rc = unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&socket),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(socket)
}

/// A netlink header and a `tcmsg` for `ifindex` and `parent`; the length is kept up to date by
/// [`push_attribute`].
fn request(kind: u16, flags: u16, ifindex: u32, parent: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    out.extend_from_slice(&((NLMSG_HDRLEN + TCMSG_LEN) as u32).to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(&flags.to_ne_bytes());
    out.extend_from_slice(&1u32.to_ne_bytes()); // seq
    out.extend_from_slice(&0u32.to_ne_bytes()); // pid: the kernel fills it in
    out.push(libc::AF_UNSPEC as u8); // tcm_family
    out.extend_from_slice(&[0; 3]); // padding
    out.extend_from_slice(&(ifindex as i32).to_ne_bytes());
    out.extend_from_slice(&0u32.to_ne_bytes()); // tcm_handle
    out.extend_from_slice(&parent.to_ne_bytes());
    out.extend_from_slice(&0u32.to_ne_bytes()); // tcm_info
    out
}

fn push_attribute(message: &mut Vec<u8>, kind: u16, value: &[u8]) {
    let len = 4 + value.len();
    message.extend_from_slice(&(len as u16).to_ne_bytes());
    message.extend_from_slice(&kind.to_ne_bytes());
    message.extend_from_slice(value);
    message.resize(align4(message.len()), 0);
    let total = message.len() as u32;
    message[..4].copy_from_slice(&total.to_ne_bytes());
}

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// The netlink messages in one datagram: (type, payload).
fn messages(mut buffer: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    while buffer.len() >= NLMSG_HDRLEN {
        let len = u32::from_ne_bytes(buffer[..4].try_into().expect("4 bytes")) as usize;
        let kind = u16::from_ne_bytes(buffer[4..6].try_into().expect("2 bytes"));
        if len < NLMSG_HDRLEN || len > buffer.len() {
            break;
        }
        out.push((kind, &buffer[NLMSG_HDRLEN..len]));
        buffer = &buffer[align4(len).min(buffer.len())..];
    }
    out
}

/// The attributes in `buffer`: (type without flag bits, value).
fn attributes(mut buffer: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    while buffer.len() >= 4 {
        let len = usize::from(u16::from_ne_bytes([buffer[0], buffer[1]]));
        let kind = u16::from_ne_bytes([buffer[2], buffer[3]]) & 0x3fff;
        if len < 4 || len > buffer.len() {
            break;
        }
        out.push((kind, &buffer[4..len]));
        buffer = &buffer[align4(len).min(buffer.len())..];
    }
    out
}

/// A `RTM_NEWTFILTER` payload (a `tcmsg` and attributes) as a BPF filter, if it is one with a
/// program (a dump also lists each priority's empty chain head).
fn parse_filter(payload: &[u8]) -> Option<BpfFilter> {
    let attrs = attributes(payload.get(TCMSG_LEN..)?);
    let kind = attrs.iter().find(|(k, _)| *k == TCA_KIND)?.1;
    if kind.strip_suffix(b"\0").unwrap_or(kind) != b"bpf" {
        return None;
    }
    let options = attributes(attrs.iter().find(|(k, _)| *k == TCA_OPTIONS)?.1);
    let name = options
        .iter()
        .find(|(k, _)| *k == TCA_BPF_NAME)
        .map(|(_, v)| String::from_utf8_lossy(v.strip_suffix(b"\0").unwrap_or(v)).into_owned());
    let id = options
        .iter()
        .find(|(k, _)| *k == TCA_BPF_ID)
        .and_then(|(_, v)| Some(u32::from_ne_bytes(v.get(..4)?.try_into().ok()?)))?;
    Some(BpfFilter {
        name: name.unwrap_or_default(),
        program_id: id,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attribute(kind: u16, value: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&((4 + value.len()) as u16).to_ne_bytes());
        out.extend_from_slice(&kind.to_ne_bytes());
        out.extend_from_slice(value);
        out.resize(align4(out.len()), 0);
        out
    }

    #[test]
    fn a_bpf_filter_is_read_from_its_dump_message() {
        let mut options = attribute(TCA_BPF_NAME, b"stale_syn_classifier\0");
        options.extend(attribute(TCA_BPF_ID, &42u32.to_ne_bytes()));
        let mut payload = vec![0u8; TCMSG_LEN];
        payload.extend(attribute(TCA_KIND, b"bpf\0"));
        // NLA_F_NESTED set, as the kernel sends it.
        payload.extend(attribute(TCA_OPTIONS | 0x8000, &options));
        assert_eq!(
            parse_filter(&payload),
            Some(BpfFilter {
                name: "stale_syn_classifier".into(),
                program_id: 42
            })
        );
        // A chain head: kind only.
        let mut head = vec![0u8; TCMSG_LEN];
        head.extend(attribute(TCA_KIND, b"bpf\0"));
        assert_eq!(parse_filter(&head), None);
    }

    #[test]
    fn requests_carry_their_length() {
        let mut message = request(RTM_DELQDISC, NLM_F_REQUEST | NLM_F_ACK, 7, TC_H_CLSACT);
        push_attribute(&mut message, TCA_KIND, b"clsact\0");
        assert_eq!(message.len(), NLMSG_HDRLEN + TCMSG_LEN + 12);
        assert_eq!(
            u32::from_ne_bytes(message[..4].try_into().unwrap()) as usize,
            message.len()
        );
        let parsed = messages(&message);
        assert_eq!(parsed.len(), 1);
        assert_eq!(parsed[0].0, RTM_DELQDISC);
    }
}

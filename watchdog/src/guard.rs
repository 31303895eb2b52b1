//! Guards: the agent's decision whether a reported stale socket may be destroyed.
//!
//! The classifier already limits reports to watched ports and clients and never reports an old
//! duplicate of a connection's own SYN; the guards here are the agent's last word and every
//! refusal carries its reason into the log.
use crate::{
    config::{Mode, RunConfig},
    events::StaleSyn,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Destroy,
    /// Leave the socket alone, for this reason.
    Refuse(&'static str),
}

pub fn decide(config: &RunConfig, syn: &StaleSyn) -> Decision {
    if config.mode == Mode::Observe {
        return Decision::Refuse("dry run (observe mode)");
    }
    if !config.ports.contains(&syn.server.port()) {
        return Decision::Refuse("server port is not watched");
    }
    if !config.clients.is_empty()
        && !config
            .clients
            .iter()
            .any(|net| net.contains(&syn.client.ip()))
    {
        return Decision::Refuse("client is outside the watched prefixes");
    }
    Decision::Destroy
}

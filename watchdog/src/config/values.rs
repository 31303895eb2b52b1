//! Parsers for the values a user writes, shared by the command line and the config file so that
//! both accept the same spellings and reject them with the same words.
use std::{fmt, net::IpAddr, str::FromStr, time::Duration};

use ipnet::IpNet;

/// A TCP port a server listens on: 1-65535.
pub fn port(value: &str) -> Result<u16, String> {
    match value.parse::<u16>() {
        Ok(0) => Err("port 0 is not a port a server listens on; use 1-65535".into()),
        Ok(port) => Ok(port),
        Err(_) => Err(format!("`{value}` is not a TCP port (1-65535)")),
    }
}

/// A client prefix; a bare address means that one host. Says which part is wrong.
pub fn client_prefix(value: &str) -> Result<IpNet, String> {
    let (addr, len) = match value.split_once('/') {
        Some((addr, len)) => (addr, Some(len)),
        None => (value, None),
    };
    let addr: IpAddr = addr
        .parse()
        .map_err(|_| format!("`{addr}` is not an IPv4 or IPv6 address"))?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let len = match len {
        None => max,
        Some(len) => len
            .parse::<u8>()
            .ok()
            .filter(|len| *len <= max)
            .ok_or_else(|| format!("prefix length `/{len}` must be 0-{max} for {addr}"))?,
    };
    IpNet::new(addr, len)
        .map(|net| net.trunc())
        .map_err(|e| e.to_string())
}

/// A listening address; a bare port means loopback, so metrics are never exposed by accident.
pub fn listen_addr(value: &str) -> Result<std::net::SocketAddr, String> {
    if let Ok(port) = value.parse::<u16>() {
        return Ok(std::net::SocketAddr::from(([127, 0, 0, 1], port)));
    }
    value
        .parse()
        .map_err(|_| format!("`{value}` is not PORT or IP:PORT (e.g. 127.0.0.1:9464)"))
}

/// A duration such as `500ms`, `2s` or `1m 30s`.
pub fn duration(value: &str) -> Result<Duration, String> {
    humantime::parse_duration(value)
        .map_err(|e| format!("`{value}` is not a duration like `500ms` or `2s`: {e}"))
}

/// At most `count` events per `period`, with bursts of up to `count`: written `5/10s`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    pub count: u32,
    pub period: Duration,
}

impl FromStr for RateLimit {
    type Err = String;

    fn from_str(value: &str) -> Result<Self, String> {
        let (count, period) = value
            .split_once('/')
            .ok_or_else(|| format!("`{value}` is not a rate like `5/10s` (count/period)"))?;
        let count: u32 = count
            .trim()
            .parse()
            .ok()
            .filter(|c| *c > 0)
            .ok_or_else(|| format!("`{count}` in `{value}` must be a count of at least 1"))?;
        let period = duration(period.trim())?;
        if period.is_zero() {
            return Err(format!("the period in `{value}` must be longer than 0"));
        }
        Ok(RateLimit { count, period })
    }
}

impl fmt::Display for RateLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}/{}",
            self.count,
            humantime::format_duration(self.period)
        )
    }
}

/// Keepalive timers written `IDLE,INTERVAL,COUNT`, e.g. `5s,1s,3`: the first probe after IDLE
/// of silence, then one every INTERVAL, the peer declared dead after COUNT unanswered probes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keepalive {
    pub idle: Duration,
    pub interval: Duration,
    pub count: u32,
}

/// The kernel's limits: `TCP_MAX_KEEPIDLE`/`TCP_MAX_KEEPINTVL` (s) and `TCP_MAX_KEEPCNT`.
const MAX_KEEPALIVE_SECS: u64 = 32_767;
const MAX_KEEPALIVE_COUNT: u32 = 127;

impl FromStr for Keepalive {
    type Err = String;

    fn from_str(value: &str) -> Result<Self, String> {
        let parts: Vec<&str> = value.split(',').map(str::trim).collect();
        let [idle, interval, count] = parts[..] else {
            return Err(format!(
                "`{value}` is not IDLE,INTERVAL,COUNT (e.g. `5s,1s,3`)"
            ));
        };
        let seconds = |text: &str, what: &str| -> Result<Duration, String> {
            let d = duration(text)?;
            if d.as_secs() < 1 || d.as_secs() > MAX_KEEPALIVE_SECS || d.subsec_nanos() != 0 {
                return Err(format!(
                    "keepalive {what} `{text}` must be whole seconds, 1s-{MAX_KEEPALIVE_SECS}s"
                ));
            }
            Ok(d)
        };
        let count: u32 = count
            .parse()
            .ok()
            .filter(|c| (1..=MAX_KEEPALIVE_COUNT).contains(c))
            .ok_or_else(|| format!("keepalive count `{count}` must be 1-{MAX_KEEPALIVE_COUNT}"))?;
        Ok(Keepalive {
            idle: seconds(idle, "idle")?,
            interval: seconds(interval, "interval")?,
            count,
        })
    }
}

impl fmt::Display for Keepalive {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}s,{}s,{}",
            self.idle.as_secs(),
            self.interval.as_secs(),
            self.count
        )
    }
}

/// `TCP_USER_TIMEOUT`: how long sent data may stay unacknowledged; 1 ms to 24 days.
pub fn user_timeout(value: &str) -> Result<Duration, String> {
    let d = duration(value)?;
    if d.is_zero() || d.as_millis() > i32::MAX as u128 {
        return Err(format!(
            "user timeout `{value}` must be between 1ms and {}ms",
            i32::MAX
        ));
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keepalive_reads_idle_interval_count_within_kernel_limits() {
        let k: Keepalive = "5s,1s,3".parse().unwrap();
        assert_eq!(
            k,
            Keepalive {
                idle: Duration::from_secs(5),
                interval: Duration::from_secs(1),
                count: 3
            }
        );
        assert_eq!(k.to_string(), "5s,1s,3");
        assert!("5s,1s".parse::<Keepalive>().is_err());
        assert!(
            "500ms,1s,3"
                .parse::<Keepalive>()
                .unwrap_err()
                .contains("whole seconds")
        );
        assert!(
            "5s,1s,0"
                .parse::<Keepalive>()
                .unwrap_err()
                .contains("1-127")
        );
        assert!("5s,1s,200".parse::<Keepalive>().is_err());
        assert!(user_timeout("10s").is_ok());
        assert!(user_timeout("0s").is_err());
    }

    #[test]
    fn client_prefixes_parse_with_clear_errors() {
        assert_eq!(
            client_prefix("10.1.2.7/24").unwrap(),
            "10.1.2.0/24".parse::<IpNet>().unwrap()
        );
        assert_eq!(
            client_prefix("fd00::7").unwrap(),
            "fd00::7/128".parse::<IpNet>().unwrap()
        );
        assert!(client_prefix("10.0.0.0/33").unwrap_err().contains("0-32"));
        assert!(client_prefix("fd00::/129").unwrap_err().contains("0-128"));
        assert!(client_prefix("banana").unwrap_err().contains("banana"));
    }

    #[test]
    fn port_zero_is_refused() {
        assert!(port("0").unwrap_err().contains("port 0"));
        assert_eq!(port("5000"), Ok(5000));
        assert!(port("70000").is_err());
    }

    #[test]
    fn rate_limits_read_count_over_period() {
        assert_eq!(
            "5/10s".parse::<RateLimit>().unwrap(),
            RateLimit {
                count: 5,
                period: Duration::from_secs(10)
            }
        );
        assert_eq!("5/10s".parse::<RateLimit>().unwrap().to_string(), "5/10s");
        assert!("0/1s".parse::<RateLimit>().is_err());
        assert!("5".parse::<RateLimit>().is_err());
        assert!("5/0s".parse::<RateLimit>().is_err());
        assert!("5/fast".parse::<RateLimit>().unwrap_err().contains("fast"));
    }
}

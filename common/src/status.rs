//! What a daemon reports about itself, and its three renderings: versioned
//! JSON (the control socket's `status json`), a table for people (`status`),
//! and Prometheus text exposition (`--metrics`).
//!
//! Peer-provided strings (a guest's identity text, a client address the
//! guest reported) are data: JSON escapes them, and the table and the
//! metrics labels show them escaped as in the logs.

use std::collections::BTreeMap;
use std::fmt::Write;

use crate::json::Json;
use crate::proto::text::write_escaped;

/// The version of the JSON layout; it changes only when a field's meaning
/// does (fields may be added).
pub const STATUS_VERSION: u64 = 1;

#[derive(Clone, Debug, Default)]
pub struct Status {
    pub daemon: String,
    pub version: String,
    pub uptime_s: f64,
    pub guests: Vec<GuestStatus>,
    /// Descriptors: in use, the limit, stream sockets.
    pub fds_used: usize,
    pub fds_limit: usize,
    pub fd_streams: usize,
    /// (guest) Its listeners, `ADDR=SERVICE`.
    pub listeners: Vec<String>,
    /// (guest) Clients waiting for a stream.
    pub waiting: Option<usize>,
}

#[derive(Clone, Debug, Default)]
pub struct GuestStatus {
    pub name: String,
    /// Its identity address in PROXY headers (host).
    pub identity: Option<String>,
    /// Bytes held for its streams, against its budget.
    pub buffered: usize,
    pub max_buffered: usize,
    /// Streams open over all its channels (each one descriptor on the host).
    pub streams: usize,
    pub channels: Vec<ChannelStatus>,
}

#[derive(Clone, Debug, Default)]
pub struct ChannelStatus {
    pub channel: String,
    /// `connected`, or `down: ...` with why and when it is tried again.
    pub link: String,
    /// `established`, `handshaking`, `holding off`, `down`, `closed`.
    pub session: String,
    /// Seconds left holding off.
    pub holding_s: Option<f64>,
    pub session_age_s: Option<f64>,
    /// The peer's identity text (escaped when shown).
    pub peer: Option<String>,
    pub sessions: u64,
    pub streams_open: usize,
    pub streams_total: u64,
    pub bytes_to_peer: u64,
    pub bytes_from_peer: u64,
    pub refused: BTreeMap<String, u64>,
    pub ended: BTreeMap<String, u64>,
    pub violations: u64,
    pub throttled: u64,
    pub holds: u64,
    pub buffered: usize,
    pub streams: Vec<StreamStatus>,
}

#[derive(Clone, Debug, Default)]
pub struct StreamStatus {
    pub id: u64,
    pub service: String,
    /// The guest client's address as the guest saw it.
    pub client: Option<String>,
    /// Where the stream's socket leads (the service address on the host).
    pub peer: String,
    /// The local address of the socket (the broker connection's source).
    pub local: Option<String>,
    pub age_s: f64,
    /// Bytes from the peer written to the socket, and read from it.
    pub bytes_out: u64,
    pub bytes_in: u64,
}

fn escaped(s: &str) -> String {
    let mut out = String::new();
    let _ = write_escaped(&mut out, s);
    out
}

impl Status {
    /// Whether every channel has a session (the status command's exit code).
    pub fn all_established(&self) -> bool {
        self.guests
            .iter()
            .flat_map(|g| &g.channels)
            .all(|c| c.session == "established")
    }

    /// One line for systemd's `STATUS=`: guests, sessions, streams.
    pub fn summary(&self) -> String {
        let channels = self.guests.iter().flat_map(|g| &g.channels);
        let (up, all) = channels.fold((0, 0), |(up, all), c| {
            (up + usize::from(c.session == "established"), all + 1)
        });
        let streams: usize = self.guests.iter().map(|g| g.streams).sum();
        // The guest bridge (which reports clients waiting) is its own guest.
        let guests = match (self.waiting, self.guests.len()) {
            (Some(_), _) => String::new(),
            (None, 1) => "1 guest, ".to_owned(),
            (None, n) => format!("{n} guests, "),
        };
        format!("{guests}{up} of {all} sessions established, {streams} streams open")
    }

    pub fn to_json(&self) -> String {
        let mut j = Json::new();
        j.u64("version", STATUS_VERSION)
            .str("daemon", &self.daemon)
            .str("daemon_version", &self.version)
            .f64("uptime_s", self.uptime_s, 1)
            .bool("all_established", self.all_established());
        let mut fds = Json::new();
        fds.u64("used", self.fds_used as u64)
            .u64("limit", self.fds_limit as u64)
            .u64("streams", self.fd_streams as u64);
        j.obj("descriptors", fds);
        if !self.listeners.is_empty() {
            j.strs("listeners", &self.listeners);
        }
        if let Some(w) = self.waiting {
            j.u64("clients_waiting", w as u64);
        }
        let guests: Vec<String> = self.guests.iter().map(GuestStatus::to_json).collect();
        j.raw_array("guests", &guests);
        let mut t = Json::new();
        let chans = || self.guests.iter().flat_map(|g| &g.channels);
        t.u64("guests", self.guests.len() as u64)
            .u64("channels", chans().count() as u64)
            .u64(
                "sessions_established",
                chans().filter(|c| c.session == "established").count() as u64,
            )
            .u64("streams_open", chans().map(|c| c.streams_open as u64).sum())
            .u64("streams_total", chans().map(|c| c.streams_total).sum())
            .u64("bytes_to_peer", chans().map(|c| c.bytes_to_peer).sum())
            .u64("bytes_from_peer", chans().map(|c| c.bytes_from_peer).sum());
        j.obj("totals", t);
        j.finish()
    }

    /// A table for people: one line per channel, and per stream with
    /// `streams`.
    pub fn to_table(&self, streams: bool) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{} {}, up {:.0} s; descriptors {} of {} ({} streams)",
            self.daemon, self.version, self.uptime_s, self.fds_used, self.fds_limit, self.fd_streams
        );
        if !self.listeners.is_empty() {
            let _ = writeln!(
                out,
                "listening on {}; {} client(s) waiting",
                self.listeners.join(", "),
                self.waiting.unwrap_or(0)
            );
        }
        let _ = writeln!(
            out,
            "{:<20} {:<18} {:<12} {:>8} {:>7} {:>9} {:>12} {:>12}  peer / link",
            "GUEST", "CHANNEL", "SESSION", "AGE", "STREAMS", "TOTAL", "TO PEER", "FROM PEER"
        );
        for g in &self.guests {
            for c in &g.channels {
                let age = c.session_age_s.map_or("-".into(), |a| format!("{a:.0}s"));
                let session = match c.holding_s {
                    Some(s) => format!("hold {s:.0}s"),
                    None => c.session.clone(),
                };
                let detail = if c.link == "connected" || c.link.starts_with("open") {
                    c.peer.as_deref().map(escaped).unwrap_or_default()
                } else {
                    c.link.clone()
                };
                let _ = writeln!(
                    out,
                    "{:<20} {:<18} {:<12} {:>8} {:>7} {:>9} {:>12} {:>12}  {}",
                    clip(&g.name, 20),
                    clip(&c.channel, 18),
                    session,
                    age,
                    c.streams_open,
                    c.streams_total,
                    c.bytes_to_peer,
                    c.bytes_from_peer,
                    detail
                );
                let mut notes = Vec::new();
                if !c.refused.is_empty() {
                    notes.push(format!("refused {}", counts(&c.refused)));
                }
                if !c.ended.is_empty() {
                    notes.push(format!("sessions ended {}", counts(&c.ended)));
                }
                if c.violations + c.throttled + c.holds > 0 {
                    notes.push(format!(
                        "violations {}, throttled {}x, held off {}x",
                        c.violations, c.throttled, c.holds
                    ));
                }
                if !notes.is_empty() {
                    let _ = writeln!(out, "{:<20} {}", "", notes.join("; "));
                }
                if streams {
                    for s in &c.streams {
                        let client = s.client.as_deref().map(escaped).unwrap_or_else(|| "-".into());
                        let local = s.local.as_deref().unwrap_or("-");
                        let _ = writeln!(
                            out,
                            "{:<20}   stream {:<6} {:<10} client {:<22} {} -> {}  {:.0}s  {} B out, {} B in",
                            "", s.id, s.service, client, local, s.peer, s.age_s, s.bytes_out, s.bytes_in
                        );
                    }
                }
            }
        }
        out
    }

    /// Prometheus text exposition (version 0.0.4).
    pub fn to_prometheus(&self) -> String {
        let mut m = Metrics::default();
        m.gauge("vios_up", "1 while the daemon runs.", &[], 1.0);
        m.gauge(
            "vios_uptime_seconds",
            "Seconds since the daemon started.",
            &[],
            self.uptime_s,
        );
        m.gauge("vios_guests", "Guests served.", &[], self.guests.len() as f64);
        m.gauge(
            "vios_descriptors",
            "Descriptors the process holds.",
            &[],
            self.fds_used as f64,
        );
        m.gauge(
            "vios_descriptors_limit",
            "The process's open-files limit.",
            &[],
            self.fds_limit as f64,
        );
        if let Some(w) = self.waiting {
            m.gauge(
                "vios_clients_waiting",
                "Local clients waiting for a stream.",
                &[],
                w as f64,
            );
        }
        for g in &self.guests {
            let gl = [("guest", g.name.as_str())];
            m.gauge(
                "vios_buffered_bytes",
                "Bytes held for a guest's streams.",
                &gl,
                g.buffered as f64,
            );
            m.gauge(
                "vios_buffered_limit_bytes",
                "Bytes a guest's streams may hold.",
                &gl,
                g.max_buffered as f64,
            );
            for c in &g.channels {
                let l = [("guest", g.name.as_str()), ("channel", c.channel.as_str())];
                let est = f64::from(u8::from(c.session == "established"));
                m.gauge(
                    "vios_session_established",
                    "1 while the channel has a session.",
                    &l,
                    est,
                );
                m.counter(
                    "vios_sessions_total",
                    "Sessions established.",
                    &l,
                    c.sessions as f64,
                );
                m.gauge("vios_streams_open", "Streams open.", &l, c.streams_open as f64);
                m.counter(
                    "vios_streams_total",
                    "Streams opened.",
                    &l,
                    c.streams_total as f64,
                );
                for (dir, v) in [("to_peer", c.bytes_to_peer), ("from_peer", c.bytes_from_peer)] {
                    let l = [
                        ("guest", g.name.as_str()),
                        ("channel", c.channel.as_str()),
                        ("direction", dir),
                    ];
                    m.counter(
                        "vios_stream_bytes_total",
                        "Stream bytes carried over the channel, by direction.",
                        &l,
                        v as f64,
                    );
                }
                for (code, n) in &c.refused {
                    let l = [
                        ("guest", g.name.as_str()),
                        ("channel", c.channel.as_str()),
                        ("code", code.as_str()),
                    ];
                    m.counter(
                        "vios_opens_refused_total",
                        "Stream opens refused, by code.",
                        &l,
                        *n as f64,
                    );
                }
                for (reason, n) in &c.ended {
                    let l = [
                        ("guest", g.name.as_str()),
                        ("channel", c.channel.as_str()),
                        ("reason", reason.as_str()),
                    ];
                    m.counter(
                        "vios_session_ends_total",
                        "Sessions ended, by reason.",
                        &l,
                        *n as f64,
                    );
                }
                m.counter(
                    "vios_violations_total",
                    "Stream-rule violations by the peer.",
                    &l,
                    c.violations as f64,
                );
                m.counter(
                    "vios_throttled_total",
                    "Times the peer's input was throttled.",
                    &l,
                    c.throttled as f64,
                );
                m.counter(
                    "vios_holds_total",
                    "Times the channel held off after failures.",
                    &l,
                    c.holds as f64,
                );
            }
        }
        m.finish()
    }
}

impl GuestStatus {
    fn to_json(&self) -> String {
        let mut j = Json::new();
        j.str("name", &self.name)
            .opt_str("identity", self.identity.as_deref())
            .u64("buffered", self.buffered as u64)
            .u64("max_buffered", self.max_buffered as u64)
            .u64("streams", self.streams as u64);
        let ch: Vec<String> = self.channels.iter().map(ChannelStatus::to_json).collect();
        j.raw_array("channels", &ch);
        j.finish()
    }
}

impl ChannelStatus {
    fn to_json(&self) -> String {
        let mut j = Json::new();
        j.str("channel", &self.channel)
            .str("link", &self.link)
            .str("session", &self.session)
            .opt_f64("holding_s", self.holding_s)
            .opt_f64("session_age_s", self.session_age_s)
            .opt_str("peer", self.peer.as_deref())
            .u64("sessions", self.sessions)
            .u64("streams_open", self.streams_open as u64)
            .u64("streams_total", self.streams_total)
            .u64("bytes_to_peer", self.bytes_to_peer)
            .u64("bytes_from_peer", self.bytes_from_peer)
            .counts("refused", &self.refused)
            .counts("sessions_ended", &self.ended)
            .u64("violations", self.violations)
            .u64("throttled", self.throttled)
            .u64("holds", self.holds)
            .u64("buffered", self.buffered as u64);
        let streams: Vec<String> = self
            .streams
            .iter()
            .map(|s| {
                let mut o = Json::new();
                o.u64("id", s.id)
                    .str("service", &s.service)
                    .opt_str("client", s.client.as_deref())
                    .str("peer", &s.peer)
                    .opt_str("local", s.local.as_deref())
                    .f64("age_s", s.age_s, 1)
                    .u64("bytes_out", s.bytes_out)
                    .u64("bytes_in", s.bytes_in);
                o.finish()
            })
            .collect();
        j.raw_array("streams", &streams);
        j.finish()
    }
}

fn clip(s: &str, n: usize) -> String {
    let e = escaped(s);
    if e.chars().count() <= n {
        e
    } else {
        e.chars().take(n - 1).chain(std::iter::once('~')).collect()
    }
}

fn counts(m: &BTreeMap<String, u64>) -> String {
    m.iter()
        .map(|(k, v)| format!("{k} {v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Metrics in Prometheus text format: each family's HELP and TYPE once,
/// before its samples.
#[derive(Default)]
struct Metrics {
    families: Vec<(String, String, &'static str, Vec<String>)>,
}

impl Metrics {
    fn sample(&mut self, name: &str, help: &str, kind: &'static str, labels: &[(&str, &str)], v: f64) {
        let mut line = name.to_owned();
        if !labels.is_empty() {
            line.push('{');
            for (i, (k, val)) in labels.iter().enumerate() {
                if i > 0 {
                    line.push(',');
                }
                let _ = write!(line, "{k}=\"");
                for c in val.chars() {
                    match c {
                        '\\' => line.push_str("\\\\"),
                        '"' => line.push_str("\\\""),
                        '\n' => line.push_str("\\n"),
                        c if c.is_control() => {
                            let _ = write!(line, "\\\\u{{{:x}}}", u32::from(c));
                        }
                        c => line.push(c),
                    }
                }
                line.push('"');
            }
            line.push('}');
        }
        let _ = write!(line, " {v}");
        match self.families.iter_mut().find(|f| f.0 == name) {
            Some(f) => f.3.push(line),
            None => self
                .families
                .push((name.to_owned(), help.to_owned(), kind, vec![line])),
        }
    }

    fn gauge(&mut self, name: &str, help: &str, labels: &[(&str, &str)], v: f64) {
        self.sample(name, help, "gauge", labels, v);
    }

    fn counter(&mut self, name: &str, help: &str, labels: &[(&str, &str)], v: f64) {
        self.sample(name, help, "counter", labels, v);
    }

    fn finish(self) -> String {
        let mut out = String::new();
        for (name, help, kind, lines) in self.families {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
            for l in lines {
                out.push_str(&l);
                out.push('\n');
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Status {
        let mut c = ChannelStatus {
            channel: "org.qpid.vios.0".into(),
            link: "connected".into(),
            session: "established".into(),
            session_age_s: Some(12.0),
            peer: Some("vios-guest-bridge 0.1.0\n".into()),
            streams_open: 1,
            streams_total: 3,
            ..ChannelStatus::default()
        };
        c.refused.insert("NOT_PERMITTED".into(), 2);
        c.streams.push(StreamStatus {
            id: 3,
            service: "amqp".into(),
            client: Some("127.0.0.1:40000".into()),
            peer: "198.18.0.1:5672".into(),
            local: Some("198.18.0.1:51234".into()),
            age_s: 1.5,
            bytes_out: 10,
            bytes_in: 20,
        });
        Status {
            daemon: "vios-host-bridge".into(),
            version: "0.1.0".into(),
            guests: vec![GuestStatus {
                name: "vm\"1".into(),
                channels: vec![c],
                ..GuestStatus::default()
            }],
            ..Status::default()
        }
    }

    #[test]
    fn json_table_and_metrics() {
        let s = sample();
        assert!(s.all_established());
        let j = s.to_json();
        assert!(j.starts_with("{\"version\":1,"), "{j}");
        assert!(j.contains("\"name\":\"vm\\\"1\""), "{j}");
        assert!(j.contains("\"local\":\"198.18.0.1:51234\""), "{j}");
        assert!(j.contains("\"NOT_PERMITTED\":2"), "{j}");
        let t = s.to_table(true);
        assert!(
            t.contains("stream 3") && t.contains("client 127.0.0.1:40000"),
            "{t}"
        );
        assert!(!t.contains("0.1.0\n "), "peer text is escaped: {t}");
        let m = s.to_prometheus();
        assert!(m.contains("# TYPE vios_streams_open gauge"), "{m}");
        assert!(
            m.contains("vios_streams_open{guest=\"vm\\\"1\",channel=\"org.qpid.vios.0\"} 1"),
            "{m}"
        );
        assert!(m.contains("vios_opens_refused_total{guest=\"vm\\\"1\",channel=\"org.qpid.vios.0\",code=\"NOT_PERMITTED\"} 2"));
        // HELP and TYPE once per family, before its samples.
        assert_eq!(m.matches("# TYPE vios_stream_bytes_total").count(), 1);
    }
}

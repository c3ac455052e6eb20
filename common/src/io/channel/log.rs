//! A channel's log lines: session and channel news, and one line per stream
//! at open and close, each kind within its own rate so that a peer cannot
//! flood the log. Text from the peer reaches these lines only as
//! [`crate::proto::PeerText`], which escapes it.

use std::time::Instant;

use log::{debug, info, warn};

use super::Channel;
use crate::io::link::LinkNews;

impl Channel {
    pub(super) fn log_link(&mut self, news: LinkNews, now: Instant) {
        let spec = self.link.spec().to_string();
        match news {
            LinkNews::Connected => self.session_log(now, false, format!("channel {spec} connected")),
            LinkNews::Opened(path) => self.session_log(
                now,
                false,
                format!("channel {spec} opened ({}); waiting for the host", path.display()),
            ),
            LinkNews::HostPresent => self.session_log(now, false, format!("channel {spec}: host connected")),
            LinkNews::Lost(why) => self.session_log(now, true, format!("channel {spec} lost: {why}")),
            LinkNews::HostAbsent => self.session_log(now, true, format!("channel {spec}: host disconnected")),
            LinkNews::Failed {
                error,
                retry_in,
                repeated,
            } => {
                // The same failure again: quietly, so a stopped VM does not
                // flood the log; loudly once a minute.
                let ms = retry_in.as_millis();
                if repeated {
                    debug!("{}channel {spec}: {error}; retrying in {ms} ms", self.cfg.label);
                } else {
                    let line =
                        format!("channel {spec}: {error}; retrying in {ms} ms (repeats logged at debug)");
                    self.session_log(now, true, line);
                }
            }
        }
    }

    /// Logs a session or channel line, within the session-line rate: a peer
    /// restarting sessions in a loop cannot flood the log.
    pub(super) fn session_log(&mut self, now: Instant, warning: bool, line: String) {
        let (allowed, dropped) = self.session_log.allow(now);
        if let Some(n) = dropped {
            warn!(
                "{}{n} session log lines suppressed in the last second",
                self.cfg.label
            );
        }
        if allowed && warning {
            warn!("{}{line}", self.cfg.label);
        } else if allowed {
            info!("{}{line}", self.cfg.label);
        }
    }

    /// Logs a stream line, within the stream-line rate: a guest opening and
    /// closing streams in a loop cannot flood the log.
    pub(super) fn stream_log(&mut self, now: Instant, line: &str) {
        let (allowed, dropped) = self.log.allow(now);
        if let Some(n) = dropped {
            warn!(
                "{}{n} stream log lines suppressed in the last second",
                self.cfg.label
            );
        }
        if allowed {
            info!("{}{line}", self.cfg.label);
        }
    }
}

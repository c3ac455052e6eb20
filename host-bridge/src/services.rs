//! Connecting the streams a guest opens to the services it may use: the
//! host side's [`Opener`].

use log::debug;
use mio::net::TcpStream;
use vios_common::io::channel::Opener;
use vios_common::io::sock::Sock;
use vios_common::proto::{Code, StreamId};
use vios_common::sys;

use crate::settings::Settings;

/// Opens streams for one guest.
pub struct ServiceOpener<'a> {
    guest: &'a str,
    settings: &'a Settings,
}

impl<'a> ServiceOpener<'a> {
    pub fn new(guest: &'a str, settings: &'a Settings) -> ServiceOpener<'a> {
        ServiceOpener { guest, settings }
    }
}

impl Opener for ServiceOpener<'_> {
    fn open(&mut self, _stream: StreamId, service: &str) -> Result<(Sock, String), (Code, String)> {
        let Some(spec) = self.settings.services.iter().find(|s| s.name == service) else {
            return Err((
                Code::UnknownService,
                format!("no service named {service:?} for guest {}", self.guest),
            ));
        };
        let addr = spec.addr;
        let sock = TcpStream::connect(addr).map_err(|e| {
            let code = if sys::is_resource_error(&e) {
                Code::ResourceLimit
            } else {
                Code::Unreachable
            };
            (code, format!("connect to {addr}: {e}"))
        })?;
        if let Err(e) = sock.set_nodelay(true) {
            debug!("set TCP_NODELAY on a socket to {addr}: {e}");
        }
        Ok((Sock::Tcp(sock), addr.to_string()))
    }
}

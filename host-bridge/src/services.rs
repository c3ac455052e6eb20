//! Connecting the streams a guest opens to the services it may use: the
//! host side's [`Opener`].

use std::io;
use std::net::SocketAddr;

use log::debug;
use mio::net::TcpStream;
use socket2::{Domain, Socket, Type};
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
        let sock = connect(addr, self.settings.service_buffer).map_err(|e| {
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

/// Starts a non-blocking connect to `addr`. With `buffer`, the socket's
/// kernel send and receive buffers are capped at it (before the connect, so
/// that the TCP window is sized by it): a service that stops reading parks at
/// most that much in the host's kernel per stream, and one that floods holds
/// at most that much before the host reads it.
fn connect(addr: SocketAddr, buffer: Option<usize>) -> io::Result<TcpStream> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    s.set_nonblocking(true)?;
    if let Some(n) = buffer {
        s.set_send_buffer_size(n)?;
        s.set_recv_buffer_size(n)?;
    }
    match s.connect(&addr.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    Ok(TcpStream::from_std(s.into()))
}

//! Relaying the few node connections that arrived while the container slept (handed out
//! by the probe responder) to the restored app, until either side is done.
//!
//! The connection to the app is made from inside the namespace (over `lo`), from a socket
//! marked as the shim's ([`super::SHIM_MARK`]: the rules on `lo` neither hold nor count
//! it), the bytes the responder read go first, then both directions are
//! copied; an end of stream on one side is passed on as a half-close (`shutdown(Write)`)
//! to the other, and the relay ends when both directions have ended. The app sees the
//! connection coming from inside its namespace, not from the node: the README's known
//! differences say so. Only these connections are relayed; after the wake nothing is
//! redirected.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpSocket, TcpStream};
use tracing::debug;

use super::probes::Handed;
use super::{mark_shim_socket, NetError, NetNs};

/// Pause between connection attempts while the restored app is not listening yet.
const RETRY_EVERY: Duration = Duration::from_millis(5);

/// What a relay carried.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RelayStats {
    /// Bytes from the client to the app (the handed-out head included).
    pub to_app: u64,
    /// Bytes from the app to the client.
    pub to_client: u64,
}

/// Relays `handed` to `app` (an address in `ns`: the handed connection's original
/// destination, or the app's loopback port), trying to connect for up to `connect_within`
/// while the app comes up.
pub async fn relay(
    ns: &NetNs,
    handed: Handed,
    app: SocketAddr,
    connect_within: Duration,
) -> Result<RelayStats, NetError> {
    let Handed {
        stream: mut client,
        peer,
        head,
        ..
    } = handed;
    let mut upstream = connect(ns, app, connect_within).await?;
    upstream
        .write_all(&head)
        .await
        .map_err(|e| NetError::io(format!("relay to {app}"), ns.ino(), e))?;
    let (to_app, to_client) = tokio::io::copy_bidirectional(&mut client, &mut upstream)
        .await
        .map_err(|e| NetError::io(format!("relay {peer} to {app}"), ns.ino(), e))?;
    let stats = RelayStats {
        to_app: to_app + head.len() as u64,
        to_client,
    };
    debug!(%peer, %app, ?stats, "relay done");
    Ok(stats)
}

/// A connection of the shim's (marked: [`super::SHIM_MARK`]) from inside `ns` to `app`.
pub async fn connect(ns: &NetNs, app: SocketAddr, within: Duration) -> Result<TcpStream, NetError> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let socket = ns
            .enter(move || {
                let socket = if app.is_ipv4() {
                    TcpSocket::new_v4()
                } else {
                    TcpSocket::new_v6()
                }?;
                mark_shim_socket(&socket)?;
                Ok::<_, io::Error>(socket)
            })
            .await?
            .map_err(|e| NetError::io("make a socket", ns.ino(), e))?;
        match socket.connect(app).await {
            Ok(s) => return Ok(s),
            Err(e)
                if e.kind() == io::ErrorKind::ConnectionRefused
                    && tokio::time::Instant::now() + RETRY_EVERY < deadline =>
            {
                tokio::time::sleep(RETRY_EVERY).await;
            }
            Err(e) => return Err(NetError::io(format!("connect to {app}"), ns.ino(), e)),
        }
    }
}

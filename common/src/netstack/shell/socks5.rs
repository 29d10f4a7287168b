//! The SOCKS5 handshake (RFC 1928) for the client's proxy: no authentication, CONNECT to an
//! IPv4 or IPv6 literal. Domain names are refused (there is no DNS through the tunnel yet), as
//! are BIND and UDP ASSOCIATE.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

pub(super) const REP_SUCCEEDED: u8 = 0x00;
pub(super) const REP_GENERAL_FAILURE: u8 = 0x01;
pub(super) const REP_NOT_ALLOWED: u8 = 0x02;
pub(super) const REP_HOST_UNREACHABLE: u8 = 0x04;
pub(super) const REP_CONNECTION_REFUSED: u8 = 0x05;
pub(super) const REP_COMMAND_NOT_SUPPORTED: u8 = 0x07;
pub(super) const REP_ADDRESS_NOT_SUPPORTED: u8 = 0x08;

const VERSION: u8 = 0x05;
const METHOD_NO_AUTH: u8 = 0x00;
const METHOD_NONE_ACCEPTABLE: u8 = 0xff;
const CMD_CONNECT: u8 = 0x01;
const ATYP_IPV4: u8 = 0x01;
const ATYP_DOMAIN: u8 = 0x03;
const ATYP_IPV6: u8 = 0x04;

/// Why a SOCKS client was turned away (it has been told, where the protocol allows).
#[derive(Debug, thiserror::Error)]
pub(super) enum SocksError {
    #[error("client spoke SOCKS version {0}, not 5")]
    Version(u8),
    #[error("client offered no acceptable authentication method")]
    NoAcceptableMethod,
    #[error("command {0:#04x} is not supported (CONNECT only)")]
    Command(u8),
    #[error("address type {0:#04x} is not supported (IP literals only)")]
    AddressType(u8),
    #[error("destination {0} is not allowed")]
    NotAllowed(SocketAddr),
    #[error("handshake did not finish in time")]
    Timeout,
    #[error("i/o during the handshake: {0}")]
    Io(#[from] std::io::Error),
}

/// A reply: `VER REP RSV ATYP BND.ADDR BND.PORT`, with 0.0.0.0:0 when there is no bound
/// address to tell.
pub(super) fn reply(code: u8, bound: Option<SocketAddr>) -> Vec<u8> {
    let bound = bound.unwrap_or((Ipv4Addr::UNSPECIFIED, 0).into());
    let mut out = vec![VERSION, code, 0x00];
    match bound.ip() {
        IpAddr::V4(a) => {
            out.push(ATYP_IPV4);
            out.extend_from_slice(&a.octets());
        }
        IpAddr::V6(a) => {
            out.push(ATYP_IPV6);
            out.extend_from_slice(&a.octets());
        }
    }
    out.extend_from_slice(&bound.port().to_be_bytes());
    out
}

/// Runs the handshake up to the CONNECT request and returns its destination. Every refusal is
/// answered on the stream before the error is returned; the success reply is the caller's,
/// once the tunnel connection is up.
pub(super) async fn handshake<S>(
    stream: &mut S,
    allow: &(dyn Fn(SocketAddr) -> bool + Send + Sync),
) -> Result<SocketAddr, SocksError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut head = [0u8; 2];
    stream.read_exact(&mut head).await?;
    if head[0] != VERSION {
        return Err(SocksError::Version(head[0]));
    }
    let mut methods = vec![0u8; usize::from(head[1])];
    stream.read_exact(&mut methods).await?;
    if !methods.contains(&METHOD_NO_AUTH) {
        stream.write_all(&[VERSION, METHOD_NONE_ACCEPTABLE]).await?;
        return Err(SocksError::NoAcceptableMethod);
    }
    stream.write_all(&[VERSION, METHOD_NO_AUTH]).await?;

    let mut req = [0u8; 4];
    stream.read_exact(&mut req).await?;
    let [version, command, _reserved, atyp] = req;
    if version != VERSION {
        return Err(SocksError::Version(version));
    }
    let ip = match atyp {
        ATYP_IPV4 => {
            let mut a = [0u8; 4];
            stream.read_exact(&mut a).await?;
            Some(IpAddr::V4(Ipv4Addr::from(a)))
        }
        ATYP_IPV6 => {
            let mut a = [0u8; 16];
            stream.read_exact(&mut a).await?;
            Some(IpAddr::V6(Ipv6Addr::from(a)))
        }
        ATYP_DOMAIN => {
            // Read the name so the reply is not mixed with unread request bytes.
            let mut len = [0u8; 1];
            stream.read_exact(&mut len).await?;
            let mut name = vec![0u8; usize::from(len[0])];
            stream.read_exact(&mut name).await?;
            None
        }
        other => {
            stream
                .write_all(&reply(REP_ADDRESS_NOT_SUPPORTED, None))
                .await?;
            return Err(SocksError::AddressType(other));
        }
    };
    let mut port = [0u8; 2];
    stream.read_exact(&mut port).await?;
    if command != CMD_CONNECT {
        stream
            .write_all(&reply(REP_COMMAND_NOT_SUPPORTED, None))
            .await?;
        return Err(SocksError::Command(command));
    }
    let Some(ip) = ip else {
        stream
            .write_all(&reply(REP_ADDRESS_NOT_SUPPORTED, None))
            .await?;
        return Err(SocksError::AddressType(atyp));
    };
    let dst = SocketAddr::new(ip, u16::from_be_bytes(port));
    if !allow(dst) {
        stream.write_all(&reply(REP_NOT_ALLOWED, None)).await?;
        return Err(SocksError::NotAllowed(dst));
    }
    Ok(dst)
}

//! The fixed newstyle handshake: option haggling until `EXPORT_NAME` or
//! `GO` picks an export.

use crate::proto::{self, info, opt, read_u32, read_u64, rep, tflag};
use crate::{Conn, ServerConfig, MAX_REQUEST};
use std::io::{self, Read, Write};
use std::sync::Arc;

/// Largest option payload read (LIST/INFO/GO/meta contexts are small); a
/// longer one ends the connection after an error reply.
const MAX_OPTION: u32 = 64 << 10;

/// Meta context IDs.
pub const CONTEXT_ALLOCATION: u32 = 1;
/// `qemu:allocation-depth`.
pub const CONTEXT_DEPTH: u32 = 2;

/// What the handshake settled for the transmission phase.
pub struct Session {
    /// Index of the export in the configuration.
    pub export: usize,
    /// Structured replies were negotiated.
    pub structured: bool,
    /// Meta contexts selected for block status.
    pub contexts: Vec<u32>,
}

/// Transmission flags of an export.
pub fn transmission_flags(read_only: bool, structured: bool) -> u16 {
    let mut f = tflag::HAS_FLAGS
        | tflag::SEND_FLUSH
        | tflag::SEND_FUA
        | tflag::SEND_CACHE
        | tflag::CAN_MULTI_CONN;
    if structured {
        // DF only means something with structured replies.
        f |= tflag::SEND_DF;
    }
    if read_only {
        f |= tflag::READ_ONLY;
    } else {
        f |= tflag::SEND_TRIM | tflag::SEND_WRITE_ZEROES | tflag::SEND_FAST_ZERO;
    }
    f
}

fn take_str(data: &[u8], at: &mut usize) -> Option<String> {
    let len = u32::from_be_bytes(data.get(*at..*at + 4)?.try_into().ok()?) as usize;
    *at += 4;
    let s = data.get(*at..at.checked_add(len)?)?;
    *at += len;
    Some(String::from_utf8_lossy(s).into_owned())
}

/// The contexts a query names (`base:allocation`, `base:` for all of
/// base, `qemu:allocation-depth`, `qemu:` for all of qemu's).
fn contexts_for(query: &str) -> Vec<(u32, &'static str)> {
    let all = [
        (CONTEXT_ALLOCATION, "base:allocation"),
        (CONTEXT_DEPTH, "qemu:allocation-depth"),
    ];
    all.into_iter()
        .filter(|(_, n)| {
            *n == query || (query.ends_with(':') && n.starts_with(query)) || query.is_empty()
        })
        .collect()
}

/// Runs the handshake; `None` when the client aborted or left.
pub fn negotiate(conn: &mut Conn, config: &Arc<ServerConfig>) -> io::Result<Option<Session>> {
    let mut hello = Vec::with_capacity(18);
    hello.extend_from_slice(&proto::NBDMAGIC.to_be_bytes());
    hello.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
    hello.extend_from_slice(&(proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES).to_be_bytes());
    conn.write_all(&hello)?;
    let client = read_u32(conn)?;
    if client & !(proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES) != 0 {
        return Ok(None);
    }
    let no_zeroes = client & proto::FLAG_C_NO_ZEROES != 0;
    let mut structured = false;
    let mut contexts: Vec<u32> = Vec::new();
    loop {
        if read_u64(conn)? != proto::IHAVEOPT {
            return Ok(None);
        }
        let option = read_u32(conn)?;
        let len = read_u32(conn)?;
        if len > MAX_OPTION {
            proto::option_reply(conn, option, rep::ERR_TOO_BIG, b"option too long")?;
            return Ok(None);
        }
        let mut data = vec![0u8; len as usize];
        conn.read_exact(&mut data)?;
        match option {
            opt::EXPORT_NAME => {
                let name = String::from_utf8_lossy(&data).into_owned();
                let Some(i) = config.exports.iter().position(|e| e.name == name) else {
                    return Ok(None);
                };
                let e = &config.exports[i];
                let mut b = Vec::new();
                b.extend_from_slice(&e.image.size().to_be_bytes());
                b.extend_from_slice(&transmission_flags(e.read_only, structured).to_be_bytes());
                if !no_zeroes {
                    b.extend_from_slice(&[0u8; 124]);
                }
                conn.write_all(&b)?;
                return Ok(Some(Session {
                    export: i,
                    structured,
                    contexts,
                }));
            }
            opt::ABORT => {
                let _ = proto::option_reply(conn, option, rep::ACK, &[]);
                return Ok(None);
            }
            opt::LIST => {
                if !data.is_empty() {
                    proto::option_reply(conn, option, rep::ERR_INVALID, b"LIST takes no data")?;
                    continue;
                }
                for e in &config.exports {
                    let mut d = (e.name.len() as u32).to_be_bytes().to_vec();
                    d.extend_from_slice(e.name.as_bytes());
                    d.extend_from_slice(e.description.as_bytes());
                    proto::option_reply(conn, option, rep::SERVER, &d)?;
                }
                proto::option_reply(conn, option, rep::ACK, &[])?;
            }
            opt::STRUCTURED_REPLY => {
                if !data.is_empty() {
                    proto::option_reply(conn, option, rep::ERR_INVALID, b"no data expected")?;
                    continue;
                }
                structured = true;
                proto::option_reply(conn, option, rep::ACK, &[])?;
            }
            opt::LIST_META_CONTEXT | opt::SET_META_CONTEXT => {
                let set = option == opt::SET_META_CONTEXT;
                if !structured {
                    proto::option_reply(
                        conn,
                        option,
                        rep::ERR_INVALID,
                        b"structured replies first",
                    )?;
                    continue;
                }
                let mut at = 0;
                let parsed = (|| {
                    let name = take_str(&data, &mut at)?;
                    let n = u32::from_be_bytes(data.get(at..at + 4)?.try_into().ok()?);
                    at += 4;
                    let mut queries = Vec::new();
                    for _ in 0..n.min(1024) {
                        queries.push(take_str(&data, &mut at)?);
                    }
                    Some((name, n, queries))
                })();
                let Some((name, n, queries)) = parsed else {
                    proto::option_reply(conn, option, rep::ERR_INVALID, b"malformed request")?;
                    continue;
                };
                if config.export(&name).is_none() {
                    proto::option_reply(conn, option, rep::ERR_UNKNOWN, b"no such export")?;
                    continue;
                }
                let mut chosen: Vec<(u32, &str)> = Vec::new();
                if n == 0 && !set {
                    chosen = contexts_for("");
                }
                for q in &queries {
                    if set && (q.is_empty() || q.ends_with(':')) {
                        continue;
                    }
                    for c in contexts_for(q) {
                        if !chosen.contains(&c) {
                            chosen.push(c);
                        }
                    }
                }
                for (id, cname) in &chosen {
                    let mut d = id.to_be_bytes().to_vec();
                    d.extend_from_slice(cname.as_bytes());
                    proto::option_reply(conn, option, rep::META_CONTEXT, &d)?;
                }
                if set {
                    contexts = chosen.iter().map(|(id, _)| *id).collect();
                }
                proto::option_reply(conn, option, rep::ACK, &[])?;
            }
            opt::INFO | opt::GO => {
                let mut at = 0;
                let parsed = (|| {
                    let name = take_str(&data, &mut at)?;
                    let n = u16::from_be_bytes(data.get(at..at + 2)?.try_into().ok()?);
                    at += 2;
                    let mut wanted = Vec::new();
                    for _ in 0..n {
                        wanted.push(u16::from_be_bytes(data.get(at..at + 2)?.try_into().ok()?));
                        at += 2;
                    }
                    (at == data.len()).then_some((name, wanted))
                })();
                let Some((name, wanted)) = parsed else {
                    proto::option_reply(conn, option, rep::ERR_INVALID, b"malformed request")?;
                    continue;
                };
                let Some(i) = config.exports.iter().position(|e| e.name == name) else {
                    proto::option_reply(conn, option, rep::ERR_UNKNOWN, b"no such export")?;
                    continue;
                };
                let e = &config.exports[i];
                let mut d = info::EXPORT.to_be_bytes().to_vec();
                d.extend_from_slice(&e.image.size().to_be_bytes());
                d.extend_from_slice(&transmission_flags(e.read_only, structured).to_be_bytes());
                proto::option_reply(conn, option, rep::INFO, &d)?;
                if wanted.contains(&info::NAME) {
                    let mut d = info::NAME.to_be_bytes().to_vec();
                    d.extend_from_slice(e.name.as_bytes());
                    proto::option_reply(conn, option, rep::INFO, &d)?;
                }
                if wanted.contains(&info::DESCRIPTION) {
                    let mut d = info::DESCRIPTION.to_be_bytes().to_vec();
                    d.extend_from_slice(e.description.as_bytes());
                    proto::option_reply(conn, option, rep::INFO, &d)?;
                }
                // Any alignment works (the block layer does read-modify-
                // write); 4 KiB is preferred; requests up to 32 MiB.
                let mut d = info::BLOCK_SIZE.to_be_bytes().to_vec();
                d.extend_from_slice(&1u32.to_be_bytes());
                d.extend_from_slice(&4096u32.to_be_bytes());
                d.extend_from_slice(&MAX_REQUEST.to_be_bytes());
                proto::option_reply(conn, option, rep::INFO, &d)?;
                proto::option_reply(conn, option, rep::ACK, &[])?;
                if option == opt::GO {
                    return Ok(Some(Session {
                        export: i,
                        structured,
                        contexts,
                    }));
                }
            }
            opt::STARTTLS => {
                proto::option_reply(conn, option, rep::ERR_UNSUP, b"TLS is not configured")?;
            }
            _ => {
                proto::option_reply(conn, option, rep::ERR_UNSUP, b"unsupported option")?;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_select_contexts_as_the_protocol_says() {
        assert_eq!(
            contexts_for("base:allocation"),
            vec![(1, "base:allocation")]
        );
        assert_eq!(contexts_for("base:"), vec![(1, "base:allocation")]);
        assert_eq!(contexts_for("qemu:"), vec![(2, "qemu:allocation-depth")]);
        assert!(contexts_for("qemu:dirty-bitmap:x").is_empty());
        assert_eq!(contexts_for("").len(), 2);
    }
}

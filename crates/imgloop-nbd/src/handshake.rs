//! The fixed newstyle handshake: option haggling until `EXPORT_NAME` or
//! `GO` picks an export.

use crate::proto::{self, info, opt, read_u32, read_u64, rep, tflag};
use crate::{Conn, Export, ServerConfig, MAX_REQUEST};
use std::io::{self, Read, Write};
use std::sync::Arc;

/// Largest option payload read (LIST/INFO/GO/meta contexts are small); a
/// longer one ends the connection after an error reply.
const MAX_OPTION: u32 = 64 << 10;

/// Meta context IDs.
pub const CONTEXT_ALLOCATION: u32 = 1;
/// `qemu:allocation-depth`.
pub const CONTEXT_DEPTH: u32 = 2;
/// `qemu:dirty-bitmap:NAME` of the export's `i`-th exported bitmap is
/// `CONTEXT_BITMAP0 + i`.
pub const CONTEXT_BITMAP0: u32 = 3;

/// What the handshake settled for the transmission phase.
pub struct Session {
    /// Index of the export in the configuration.
    pub export: usize,
    /// Structured replies were negotiated (always with extended headers).
    pub structured: bool,
    /// Extended headers were negotiated: 32-byte requests and replies,
    /// 64-bit lengths.
    pub extended: bool,
    /// Meta contexts selected for block status.
    pub contexts: Vec<u32>,
}

/// Transmission flags of an export.
pub fn transmission_flags(read_only: bool, structured: bool, stat_payload: bool) -> u16 {
    let mut f = tflag::HAS_FLAGS
        | tflag::SEND_FLUSH
        | tflag::SEND_FUA
        | tflag::SEND_CACHE
        | tflag::CAN_MULTI_CONN;
    if structured {
        // DF only means something with structured replies.
        f |= tflag::SEND_DF;
    }
    if stat_payload {
        f |= tflag::BLOCK_STAT_PAYLOAD;
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

/// Every context an export offers, with its ID.
fn export_contexts(e: &Export) -> Vec<(u32, String)> {
    let mut all = vec![
        (CONTEXT_ALLOCATION, "base:allocation".to_string()),
        (CONTEXT_DEPTH, "qemu:allocation-depth".to_string()),
    ];
    for (i, b) in e.bitmaps.iter().enumerate() {
        all.push((CONTEXT_BITMAP0 + i as u32, format!("qemu:dirty-bitmap:{b}")));
    }
    all
}

/// The contexts of `e` a query names: the name itself, or with a query
/// ending in ':' (`base:`, `qemu:`, `qemu:dirty-bitmap:`) every context
/// under it, or with an empty query all of them.
fn contexts_for(e: &Export, query: &str) -> Vec<(u32, String)> {
    export_contexts(e)
        .into_iter()
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
    conn.flush()?;
    let client = read_u32(conn)?;
    if client & !(proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES) != 0 {
        return Ok(None);
    }
    let no_zeroes = client & proto::FLAG_C_NO_ZEROES != 0;
    let mut structured = false;
    let mut extended = false;
    // (export name, context IDs) of the last SET_META_CONTEXT.
    let mut contexts: Option<(String, Vec<u32>)> = None;
    // With TLS configured, nothing but STARTTLS and ABORT before it.
    let mut tls_pending = config.tls.is_some();
    loop {
        conn.flush()?;
        if read_u64(conn)? != proto::IHAVEOPT {
            return Ok(None);
        }
        let option = read_u32(conn)?;
        let len = read_u32(conn)?;
        if len > MAX_OPTION {
            proto::option_reply(conn, option, rep::ERR_TOO_BIG, b"option too long")?;
            conn.flush()?;
            return Ok(None);
        }
        let mut data = vec![0u8; len as usize];
        conn.read_exact(&mut data)?;
        if tls_pending && !matches!(option, opt::STARTTLS | opt::ABORT) {
            if option == opt::EXPORT_NAME {
                // No error reply exists for EXPORT_NAME: the session ends.
                return Ok(None);
            }
            proto::option_reply(conn, option, rep::ERR_TLS_REQD, b"TLS is required")?;
            continue;
        }
        let selected = |contexts: &Option<(String, Vec<u32>)>, name: &str| -> Vec<u32> {
            match contexts {
                Some((n, ids)) if n == name => ids.clone(),
                _ => Vec::new(),
            }
        };
        match option {
            opt::EXPORT_NAME => {
                if extended {
                    // Not allowed after extended headers (no way to say
                    // which headers follow): the session ends.
                    return Ok(None);
                }
                let name = String::from_utf8_lossy(&data).into_owned();
                let Some(i) = config.exports.iter().position(|e| e.name == name) else {
                    return Ok(None);
                };
                let e = &config.exports[i];
                let mut b = Vec::new();
                b.extend_from_slice(&e.image.size().to_be_bytes());
                b.extend_from_slice(
                    &transmission_flags(e.read_only, structured, false).to_be_bytes(),
                );
                if !no_zeroes {
                    b.extend_from_slice(&[0u8; 124]);
                }
                conn.write_all(&b)?;
                conn.flush()?;
                return Ok(Some(Session {
                    export: i,
                    structured,
                    extended: false,
                    contexts: selected(&contexts, &name),
                }));
            }
            opt::ABORT => {
                let _ = proto::option_reply(conn, option, rep::ACK, &[]);
                let _ = conn.flush();
                return Ok(None);
            }
            opt::STARTTLS => {
                let Some(tls) = &config.tls else {
                    proto::option_reply(conn, option, rep::ERR_POLICY, b"TLS is not configured")?;
                    continue;
                };
                if !tls_pending {
                    proto::option_reply(conn, option, rep::ERR_INVALID, b"TLS is already on")?;
                    continue;
                }
                if !data.is_empty() {
                    proto::option_reply(conn, option, rep::ERR_INVALID, b"no data expected")?;
                    conn.flush()?;
                    return Ok(None);
                }
                proto::option_reply(conn, option, rep::ACK, &[])?;
                conn.flush()?;
                conn.start_tls(tls)?;
                tls_pending = false;
                // Nothing negotiated before TLS carries over.
                structured = false;
                extended = false;
                contexts = None;
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
                if extended {
                    proto::option_reply(
                        conn,
                        option,
                        rep::ERR_EXT_HEADER_REQD,
                        b"extended headers already negotiated",
                    )?;
                    continue;
                }
                structured = true;
                proto::option_reply(conn, option, rep::ACK, &[])?;
            }
            opt::EXTENDED_HEADERS => {
                if !data.is_empty() {
                    proto::option_reply(conn, option, rep::ERR_INVALID, b"no data expected")?;
                    continue;
                }
                if extended {
                    proto::option_reply(
                        conn,
                        option,
                        rep::ERR_INVALID,
                        b"extended headers already negotiated",
                    )?;
                    continue;
                }
                extended = true;
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
                let Some(e) = config.export(&name) else {
                    proto::option_reply(conn, option, rep::ERR_UNKNOWN, b"no such export")?;
                    continue;
                };
                let mut chosen: Vec<(u32, String)> = Vec::new();
                if n == 0 && !set {
                    chosen = contexts_for(e, "");
                }
                for q in &queries {
                    if set && (q.is_empty() || q.ends_with(':')) {
                        continue;
                    }
                    for c in contexts_for(e, q) {
                        if !chosen.contains(&c) {
                            chosen.push(c);
                        }
                    }
                }
                for (id, cname) in &chosen {
                    // LIST replies carry ID 0, as the protocol asks.
                    let id = if set { *id } else { 0 };
                    let mut d = id.to_be_bytes().to_vec();
                    d.extend_from_slice(cname.as_bytes());
                    proto::option_reply(conn, option, rep::META_CONTEXT, &d)?;
                }
                if set {
                    contexts = Some((name, chosen.iter().map(|(id, _)| *id).collect()));
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
                let ids = selected(&contexts, &name);
                // The block status payload filter only with extended
                // headers, and (at GO) only when contexts were chosen.
                let stat_payload = extended && (option == opt::INFO || !ids.is_empty());
                let mut d = info::EXPORT.to_be_bytes().to_vec();
                d.extend_from_slice(&e.image.size().to_be_bytes());
                d.extend_from_slice(
                    &transmission_flags(e.read_only, structured, stat_payload).to_be_bytes(),
                );
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
                    conn.flush()?;
                    return Ok(Some(Session {
                        export: i,
                        structured,
                        extended,
                        contexts: ids,
                    }));
                }
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

    fn names(v: Vec<(u32, String)>) -> Vec<String> {
        v.into_iter().map(|(_, n)| n).collect()
    }

    #[test]
    fn queries_select_contexts_as_the_protocol_says() {
        let img = imgloop::Image::open_storage(
            std::sync::Arc::new(imgloop::storage::MemStorage::from_bytes(&[0u8; 4096])),
            Some("raw"),
            true,
            None,
        )
        .unwrap();
        let mut e = Export::new("", Arc::new(img));
        e.bitmaps = vec!["b0".into(), "b1".into()];
        assert_eq!(
            contexts_for(&e, "base:allocation"),
            vec![(1, "base:allocation".to_string())]
        );
        assert_eq!(names(contexts_for(&e, "base:")), ["base:allocation"]);
        assert_eq!(
            names(contexts_for(&e, "qemu:")),
            [
                "qemu:allocation-depth",
                "qemu:dirty-bitmap:b0",
                "qemu:dirty-bitmap:b1"
            ]
        );
        assert_eq!(
            contexts_for(&e, "qemu:dirty-bitmap:b1"),
            vec![(4, "qemu:dirty-bitmap:b1".to_string())]
        );
        assert_eq!(contexts_for(&e, "qemu:dirty-bitmap:").len(), 2);
        assert!(contexts_for(&e, "qemu:dirty-bitmap:x").is_empty());
        assert_eq!(contexts_for(&e, "").len(), 4);
    }
}

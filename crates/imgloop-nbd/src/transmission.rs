//! The transmission phase: a reader takes requests off the socket and
//! hands them to worker threads (at most `workers` in flight, so memory
//! is bounded), which run them against the image and write their replies
//! under one lock, in whatever order they finish.

use crate::handshake::{Session, CONTEXT_ALLOCATION};
use crate::proto::{self, cflag, chunk, cmd, errno, Request};
use crate::{Conn, DetectZeroes, Export, ServerConfig, MAX_REQUEST};
use imgloop::{ErrorKind, WriteFlags, ZeroFlags};
use std::io::{self, Read, Write};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::{Arc, Mutex};

/// Most block status descriptors one reply carries.
const MAX_EXTENTS: usize = 2048;

/// One request with its payload (writes).
struct Work {
    req: Request,
    payload: Vec<u8>,
}

/// The errno an imgloop error maps to.
fn errno_of(e: &imgloop::Error) -> u32 {
    match e.kind() {
        ErrorKind::ReadOnly => errno::EPERM,
        ErrorKind::NoSpace => errno::ENOSPC,
        ErrorKind::OutOfBounds | ErrorKind::InvalidArgument => errno::EINVAL,
        ErrorKind::Unsupported | ErrorKind::NoFastZero => errno::ENOTSUP,
        _ => errno::EIO,
    }
}

/// Serves requests until the client disconnects.
pub fn run(conn: Conn, config: Arc<ServerConfig>, session: Session) -> io::Result<()> {
    let writer = Arc::new(Mutex::new(conn.try_clone()?));
    let (tx, rx) = sync_channel::<Work>(config.workers.max(1));
    let rx = Arc::new(Mutex::new(rx));
    let session = Arc::new(session);
    let workers: Vec<_> = (0..config.workers.max(1))
        .map(|_| {
            let (rx, writer, config, session) =
                (rx.clone(), writer.clone(), config.clone(), session.clone());
            std::thread::spawn(move || worker(&rx, &writer, &config, &session))
        })
        .collect();
    let result = read_requests(conn, &config, &session, &writer, |w| {
        tx.send(w).map_err(|_| io::Error::other("workers ended"))
    });
    drop(tx);
    if !matches!(result, Ok(true)) {
        // Not a clean DISC: the client may not read what is still being
        // answered; cut it off so no worker blocks on it.
        writer.lock().unwrap_or_else(|e| e.into_inner()).shutdown();
    }
    let result = result.map(|_| ());
    for w in workers {
        let _ = w.join();
    }
    // Whatever the client left behind is durable.
    let _ = config.exports[session.export].image.sync();
    result
}

fn read_requests(
    mut conn: Conn,
    config: &ServerConfig,
    session: &Session,
    writer: &Mutex<Conn>,
    mut dispatch: impl FnMut(Work) -> io::Result<()>,
) -> io::Result<bool> {
    let _ = &config.exports[session.export];
    loop {
        let req = match Request::read(&mut conn) {
            Ok(Some(r)) => r,
            // A bad magic: the stream cannot be trusted any more.
            Ok(None) => return Ok(false),
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(false),
            Err(e) => return Err(e),
        };
        if req.kind == cmd::DISC {
            return Ok(true);
        }
        let mut payload = Vec::new();
        if req.kind == cmd::WRITE {
            if req.len > MAX_REQUEST {
                // Too large to buffer: refuse and end the connection, as
                // the payload cannot be skipped safely.
                reply_error(writer, session, req, errno::EOVERFLOW)?;
                return Ok(false);
            }
            payload = vec![0u8; req.len as usize];
            match conn.read_exact(&mut payload) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(false),
                Err(e) => return Err(e),
            }
        }
        if req.kind == cmd::READ && req.len > MAX_REQUEST {
            reply_error(writer, session, req, errno::EOVERFLOW)?;
            continue;
        }
        dispatch(Work { req, payload })?;
    }
}

fn worker(rx: &Mutex<Receiver<Work>>, writer: &Mutex<Conn>, config: &ServerConfig, s: &Session) {
    loop {
        let work = {
            let rx = rx.lock().unwrap_or_else(|e| e.into_inner());
            match rx.recv() {
                Ok(w) => w,
                Err(_) => return,
            }
        };
        let export = &config.exports[s.export];
        if handle(export, s, writer, work).is_err() {
            // The client is gone; the reader notices too.
            writer.lock().unwrap_or_else(|e| e.into_inner()).shutdown();
        }
    }
}

fn send(writer: &Mutex<Conn>, parts: &[&[u8]]) -> io::Result<()> {
    let mut w = writer.lock().unwrap_or_else(|e| e.into_inner());
    for p in parts {
        w.write_all(p)?;
    }
    w.flush()
}

fn reply_ok(writer: &Mutex<Conn>, s: &Session, req: Request) -> io::Result<()> {
    if s.structured {
        send(
            writer,
            &[&proto::chunk_header(
                req.cookie,
                chunk::FLAG_DONE,
                chunk::NONE,
                0,
            )],
        )
    } else {
        send(writer, &[&proto::simple_reply(req.cookie, 0)])
    }
}

fn reply_error(writer: &Mutex<Conn>, s: &Session, req: Request, err: u32) -> io::Result<()> {
    if s.structured {
        let mut p = err.to_be_bytes().to_vec();
        p.extend_from_slice(&0u16.to_be_bytes());
        send(
            writer,
            &[
                &proto::chunk_header(req.cookie, chunk::FLAG_DONE, chunk::ERROR, p.len() as u32),
                &p,
            ],
        )
    } else {
        send(writer, &[&proto::simple_reply(req.cookie, err)])
    }
}

fn handle(e: &Export, s: &Session, writer: &Mutex<Conn>, work: Work) -> io::Result<()> {
    let req = work.req;
    let img = &e.image;
    let size = img.size();
    let in_range = req
        .offset
        .checked_add(req.len as u64)
        .is_some_and(|end| end <= size);
    let result: Result<(), u32> = match req.kind {
        cmd::READ | cmd::WRITE | cmd::TRIM | cmd::WRITE_ZEROES | cmd::CACHE | cmd::BLOCK_STATUS
            if !in_range =>
        {
            Err(errno::EINVAL)
        }
        cmd::READ => return read(img, s, writer, req),
        cmd::BLOCK_STATUS => return block_status(img, s, writer, req),
        cmd::WRITE | cmd::TRIM | cmd::WRITE_ZEROES if e.read_only => Err(errno::EPERM),
        cmd::WRITE
            if e.detect_zeroes != DetectZeroes::Off && imgloop::storage::is_zero(&work.payload) =>
        {
            img.write_zeroes_with(
                req.offset,
                req.len as u64,
                ZeroFlags {
                    may_unmap: e.detect_zeroes == DetectZeroes::Unmap && e.unmap,
                    fua: req.flags & cflag::FUA != 0,
                    no_fallback: false,
                },
            )
            .map_err(|e| errno_of(&e))
        }
        cmd::WRITE => img
            .write_with(
                &work.payload,
                req.offset,
                WriteFlags {
                    fua: req.flags & cflag::FUA != 0,
                },
            )
            .map_err(|e| errno_of(&e)),
        cmd::WRITE_ZEROES => img
            .write_zeroes_with(
                req.offset,
                req.len as u64,
                ZeroFlags {
                    may_unmap: req.flags & cflag::NO_HOLE == 0,
                    fua: req.flags & cflag::FUA != 0,
                    no_fallback: req.flags & cflag::FAST_ZERO != 0,
                },
            )
            .map_err(|e| errno_of(&e)),
        cmd::TRIM => {
            let r = if e.unmap {
                img.discard(req.offset, req.len as u64)
            } else {
                Ok(())
            };
            r.and_then(|_| {
                if req.flags & cflag::FUA != 0 {
                    img.sync()
                } else {
                    Ok(())
                }
            })
            .map_err(|e| errno_of(&e))
        }
        cmd::FLUSH => img.sync().map_err(|e| errno_of(&e)),
        // Prefetching is not needed: reads are served from the image.
        cmd::CACHE => Ok(()),
        _ => Err(errno::EINVAL),
    };
    match result {
        Ok(()) => reply_ok(writer, s, req),
        Err(err) => reply_error(writer, s, req, err),
    }
}

/// READ: with structured replies, ranges that read as zeroes go as hole
/// chunks (not read at all) unless the client asked for one data chunk
/// (`DF`).
fn read(img: &imgloop::Image, s: &Session, writer: &Mutex<Conn>, req: Request) -> io::Result<()> {
    let (off, len) = (req.offset, req.len as u64);
    if !s.structured {
        let mut buf = vec![0u8; len as usize];
        return match img.read(&mut buf, off) {
            Ok(()) => send(writer, &[&proto::simple_reply(req.cookie, 0), &buf]),
            Err(e) => reply_error(writer, s, req, errno_of(&e)),
        };
    }
    let df = req.flags & cflag::DF != 0;
    // Plan the chunks first, so an error can still be the only reply.
    let mut pieces: Vec<(u64, u64, bool)> = Vec::new();
    let mut pos = off;
    while pos < off + len {
        let zero = if df {
            false
        } else {
            match img.block_status_chain(pos, off + len - pos) {
                Ok((st, _)) => {
                    let n = st.len.max(1).min(off + len - pos);
                    let z = st.zero;
                    match pieces.last_mut() {
                        Some(p) if p.2 == z && p.0 + p.1 == pos => p.1 += n,
                        _ => pieces.push((pos, n, z)),
                    }
                    pos += n;
                    continue;
                }
                Err(_) => false,
            }
        };
        pieces.push((pos, off + len - pos, zero));
        break;
    }
    if len == 0 {
        return reply_ok(writer, s, req);
    }
    // (offset, length, data; none for a hole)
    let mut chunks: Vec<(u64, u64, Option<Vec<u8>>)> = Vec::with_capacity(pieces.len());
    for (p, n, zero) in pieces {
        if zero {
            chunks.push((p, n, None));
            continue;
        }
        let mut buf = vec![0u8; n as usize];
        if let Err(e) = img.read(&mut buf, p) {
            return reply_error(writer, s, req, errno_of(&e));
        }
        chunks.push((p, n, Some(buf)));
    }
    let last = chunks.len() - 1;
    let mut w = writer.lock().unwrap_or_else(|e| e.into_inner());
    for (i, (p, n, buf)) in chunks.iter().enumerate() {
        let flags = if i == last { chunk::FLAG_DONE } else { 0 };
        match buf {
            None => {
                w.write_all(&proto::chunk_header(
                    req.cookie,
                    flags,
                    chunk::OFFSET_HOLE,
                    12,
                ))?;
                w.write_all(&p.to_be_bytes())?;
                w.write_all(&(*n as u32).to_be_bytes())?;
            }
            Some(buf) => {
                w.write_all(&proto::chunk_header(
                    req.cookie,
                    flags,
                    chunk::OFFSET_DATA,
                    8 + buf.len() as u32,
                ))?;
                w.write_all(&p.to_be_bytes())?;
                w.write_all(buf)?;
            }
        }
    }
    w.flush()
}

/// BLOCK_STATUS: one chunk per selected context, descriptors of
/// (length, flags) covering a prefix of the range.
fn block_status(
    img: &imgloop::Image,
    s: &Session,
    writer: &Mutex<Conn>,
    req: Request,
) -> io::Result<()> {
    if !s.structured || s.contexts.is_empty() || req.len == 0 {
        return reply_error(writer, s, req, errno::EINVAL);
    }
    let one = req.flags & cflag::REQ_ONE != 0;
    let end = req.offset + req.len as u64;
    let mut replies: Vec<(u32, Vec<(u32, u32)>)> = Vec::new();
    for &ctx in &s.contexts {
        let mut ext: Vec<(u32, u32)> = Vec::new();
        let mut pos = req.offset;
        while pos < end && ext.len() < MAX_EXTENTS {
            let (st, depth) = match img.block_status_chain(pos, end - pos) {
                Ok(r) => r,
                Err(e) => return reply_error(writer, s, req, errno_of(&e)),
            };
            let n = st.len.max(1).min(end - pos).min(u32::MAX as u64 & !511);
            let flags = if ctx == CONTEXT_ALLOCATION {
                (if st.data { 0 } else { proto::STATE_HOLE })
                    | (if st.zero { proto::STATE_ZERO } else { 0 })
            } else {
                // qemu's allocation depth: 0 unallocated in the chain,
                // else 1 for this image, 2 for its backing file, ...
                let allocated = st.allocated;
                if allocated {
                    depth as u32 + 1
                } else {
                    0
                }
            };
            match ext.last_mut() {
                Some(l) if l.1 == flags && (l.0 as u64 + n) <= u32::MAX as u64 => l.0 += n as u32,
                _ => ext.push((n as u32, flags)),
            }
            pos += n;
            if one {
                break;
            }
        }
        if ext.is_empty() {
            ext.push((req.len, 0));
        }
        if one {
            ext.truncate(1);
        }
        replies.push((ctx, ext));
    }
    let last = replies.len() - 1;
    let mut w = writer.lock().unwrap_or_else(|e| e.into_inner());
    for (i, (ctx, ext)) in replies.iter().enumerate() {
        let mut p = ctx.to_be_bytes().to_vec();
        for (l, f) in ext {
            p.extend_from_slice(&l.to_be_bytes());
            p.extend_from_slice(&f.to_be_bytes());
        }
        let flags = if i == last { chunk::FLAG_DONE } else { 0 };
        w.write_all(&proto::chunk_header(
            req.cookie,
            flags,
            chunk::BLOCK_STATUS,
            p.len() as u32,
        ))?;
        w.write_all(&p)?;
    }
    w.flush()
}

//! The transmission phase: `workers` threads take turns reading one
//! request each off the socket (the reading lock is held only while one
//! request and its payload are read), run it against the image and write
//! its reply under the writing lock, in whatever order they finish. No
//! request changes hands between threads, and at most `workers` requests
//! (with their payloads) are in memory at once.

use crate::handshake::{Session, CONTEXT_ALLOCATION, CONTEXT_BITMAP0, CONTEXT_DEPTH};
use crate::proto::{self, cflag, chunk, cmd, errno, Request};
use crate::splice::Pipe;
use crate::{Conn, DetectZeroes, Export, ServerConfig, MAX_REQUEST};
use imgloop::{ErrorKind, WriteFlags, ZeroFlags};
use std::io::{self, Read, Write};
use std::sync::{Arc, Mutex};

/// Most block status descriptors one reply carries.
const MAX_EXTENTS: usize = 2048;

/// One request with its payload (writes), and the worker's buffer for
/// the reply (kept from one request to the next: a fresh large buffer
/// costs a page fault per page).
struct Work<'a> {
    req: Request,
    payload: &'a [u8],
    reply: &'a mut Vec<u8>,
    /// The worker's pipe for spliced read replies (plain connections).
    pipe: &'a mut Option<Pipe>,
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

/// How the request stream ended.
#[derive(Clone, Copy, PartialEq)]
enum End {
    /// NBD_CMD_DISC: finish what is in flight, then close cleanly.
    Disconnect,
    /// End of stream, a bad magic or a request that cannot be skipped.
    Broken,
}

/// The socket's read side, taken in turns by the workers.
struct Requests {
    conn: io::BufReader<Conn>,
    /// Set once the stream has ended; later takers stop.
    end: Option<End>,
    /// An I/O error that ended it.
    error: Option<io::Error>,
}

/// Serves requests until the client disconnects.
pub fn run(conn: Conn, config: Arc<ServerConfig>, session: Session) -> io::Result<()> {
    let writer = Mutex::new(conn.try_clone()?);
    // Cuts the client off without the writing lock (a worker may hold it,
    // blocked on a client that does not read).
    let closer = conn.try_clone()?;
    // Clients queue requests back to back: one read takes many headers.
    let requests = Mutex::new(Requests {
        conn: io::BufReader::with_capacity(64 << 10, conn),
        end: None,
        error: None,
    });
    std::thread::scope(|scope| {
        for _ in 0..config.workers.max(1) {
            scope.spawn(|| worker(&requests, &writer, &closer, &config, &session));
        }
    });
    let requests = requests.into_inner().unwrap_or_else(|e| e.into_inner());
    if requests.end == Some(End::Disconnect) {
        // Every reply is out; a TLS session ends with close_notify, as
        // DISC asks.
        writer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .close_notify();
    }
    // Whatever the client left behind is durable.
    let _ = config.exports[session.export].image.sync();
    match requests.error {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Reads the next request and its payload (into `payload`). `Ok(None)`:
/// the stream ended (recorded in `r`).
fn next_request(
    r: &mut Requests,
    session: &Session,
    writer: &Mutex<Conn>,
    payload: &mut Vec<u8>,
) -> io::Result<Option<Request>> {
    loop {
        let req = match Request::read(&mut r.conn, session.extended) {
            Ok(Some(req)) => req,
            // A bad magic: the stream cannot be trusted any more.
            Ok(None) => return Ok(None),
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(e),
        };
        if req.kind == cmd::DISC {
            r.end = Some(End::Disconnect);
            return Ok(None);
        }
        // A payload follows a write, and with extended headers any
        // request flagged PAYLOAD_LEN (only block status has a payload
        // form; the others are refused after it is read).
        let has_payload =
            req.kind == cmd::WRITE || (session.extended && req.flags & cflag::PAYLOAD_LEN != 0);
        payload.clear();
        if has_payload {
            if req.len > MAX_REQUEST as u64 {
                // Too large to buffer: refuse and end the connection, as
                // the payload cannot be skipped safely.
                reply_error(writer, session, req, errno::EOVERFLOW)?;
                return Ok(None);
            }
            payload.resize(req.len as usize, 0);
            match r.conn.read_exact(payload) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
                Err(e) => return Err(e),
            }
        }
        if req.kind == cmd::READ && req.len > MAX_REQUEST as u64 {
            reply_error(writer, session, req, errno::EOVERFLOW)?;
            continue;
        }
        return Ok(Some(req));
    }
}

fn worker(
    requests: &Mutex<Requests>,
    writer: &Mutex<Conn>,
    closer: &Conn,
    config: &ServerConfig,
    s: &Session,
) {
    // This worker's payload and reply buffers, kept from one request to
    // the next.
    let mut payload = Vec::new();
    let mut reply = Vec::new();
    let export = &config.exports[s.export];
    // Read replies of images whose data lies as-is in files go through a
    // pipe, without a copy, where the socket is plain.
    let plain = lock(writer).plain_fd().is_some();
    let first = export.image.size().min(1);
    let mut pipe = if plain && matches!(export.image.file_ranges(0, first), Ok(Some(_))) {
        Pipe::new().ok()
    } else {
        None
    };
    loop {
        let req = {
            let mut r = requests.lock().unwrap_or_else(|e| e.into_inner());
            if r.end.is_some() {
                return;
            }
            match next_request(&mut r, s, writer, &mut payload) {
                Ok(Some(req)) => req,
                Ok(None) => {
                    let end = *r.end.get_or_insert(End::Broken);
                    if end == End::Broken {
                        // The client may not read what is still being
                        // answered: cut it off so no worker blocks on it.
                        closer.shutdown();
                    }
                    return;
                }
                Err(e) => {
                    r.end = Some(End::Broken);
                    r.error = Some(e);
                    closer.shutdown();
                    return;
                }
            }
        };
        let work = Work {
            req,
            payload: &payload,
            reply: &mut reply,
            pipe: &mut pipe,
        };
        if handle(export, s, writer, work).is_err() {
            // The client is gone; the next reader notices too.
            closer.shutdown();
        }
        // Buffers up to 2 MiB are kept; larger ones only while used.
        if payload.capacity() > 2 << 20 {
            payload = Vec::new();
        }
        if reply.capacity() > 2 << 20 {
            reply = Vec::new();
        }
    }
}

fn lock(writer: &Mutex<Conn>) -> std::sync::MutexGuard<'_, Conn> {
    writer.lock().unwrap_or_else(|e| e.into_inner())
}

fn send(writer: &Mutex<Conn>, parts: &[&[u8]]) -> io::Result<()> {
    let mut w = lock(writer);
    for p in parts {
        w.write_all(p)?;
    }
    w.flush()
}

/// The header of a reply chunk: extended (the request's offset, 64-bit
/// length) or compact.
fn chunk(s: &Session, req: Request, flags: u16, kind: u16, len: u64) -> Vec<u8> {
    if s.extended {
        proto::ext_chunk_header(req.cookie, flags, kind, req.offset, len).to_vec()
    } else {
        proto::chunk_header(req.cookie, flags, kind, len as u32).to_vec()
    }
}

fn reply_ok(writer: &Mutex<Conn>, s: &Session, req: Request) -> io::Result<()> {
    if s.structured {
        send(writer, &[&chunk(s, req, chunk::FLAG_DONE, chunk::NONE, 0)])
    } else {
        send(writer, &[&proto::simple_reply(req.cookie, 0)])
    }
}

fn reply_error(writer: &Mutex<Conn>, s: &Session, req: Request, err: u32) -> io::Result<()> {
    if s.structured {
        let mut b = chunk(s, req, chunk::FLAG_DONE, chunk::ERROR, 6);
        b.extend_from_slice(&err.to_be_bytes());
        b.extend_from_slice(&0u16.to_be_bytes());
        send(writer, &[&b])
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
        .checked_add(req.len)
        .is_some_and(|end| end <= size);
    let flagged_payload = s.extended && req.flags & cflag::PAYLOAD_LEN != 0;
    let result: Result<(), u32> = match req.kind {
        cmd::BLOCK_STATUS if flagged_payload => {
            return block_status(e, s, writer, req, Some(work.payload))
        }
        // No other command has a payload form.
        cmd::READ | cmd::TRIM | cmd::WRITE_ZEROES | cmd::CACHE | cmd::FLUSH if flagged_payload => {
            Err(errno::EINVAL)
        }
        cmd::READ | cmd::WRITE | cmd::TRIM | cmd::WRITE_ZEROES | cmd::CACHE | cmd::BLOCK_STATUS
            if !in_range =>
        {
            Err(errno::EINVAL)
        }
        cmd::READ => return read(img, s, writer, req, work.reply, work.pipe),
        cmd::BLOCK_STATUS => return block_status(e, s, writer, req, None),
        cmd::WRITE | cmd::TRIM | cmd::WRITE_ZEROES if e.read_only => Err(errno::EPERM),
        cmd::WRITE
            if e.detect_zeroes != DetectZeroes::Off && imgloop::storage::is_zero(work.payload) =>
        {
            img.write_zeroes_with(
                req.offset,
                req.len,
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
                work.payload,
                req.offset,
                WriteFlags {
                    fua: req.flags & cflag::FUA != 0,
                },
            )
            .map_err(|e| errno_of(&e)),
        cmd::WRITE_ZEROES => img
            .write_zeroes_with(
                req.offset,
                req.len,
                ZeroFlags {
                    may_unmap: req.flags & cflag::NO_HOLE == 0,
                    fua: req.flags & cflag::FUA != 0,
                    no_fallback: req.flags & cflag::FAST_ZERO != 0,
                },
            )
            .map_err(|e| errno_of(&e)),
        cmd::TRIM => {
            let r = if e.unmap {
                img.discard(req.offset, req.len)
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

/// Reads shorter than this go as one data chunk without asking where
/// the holes are (for small reads the lookup costs more than the zeroes
/// it would save sending).
const SPARSE_READ_MIN: u64 = 64 << 10;

/// READ: with structured replies, ranges that read as zeroes go as hole
/// chunks (not read at all) unless the client asked for one data chunk
/// (`DF`) or the read is small. Each chunk is built in one buffer (the
/// data read in place behind its header) and sent with one write.
fn read(
    img: &imgloop::Image,
    s: &Session,
    writer: &Mutex<Conn>,
    req: Request,
    out: &mut Vec<u8>,
    pipe: &mut Option<Pipe>,
) -> io::Result<()> {
    let (off, len) = (req.offset, req.len);
    // `out` keeps its length (initialized bytes) from one request to the
    // next; only what this reply needs beyond it is zero-filled.
    let room = |out: &mut Vec<u8>, end: usize| {
        if out.len() < end {
            out.resize(end, 0);
        }
    };
    if !s.structured {
        let header = proto::simple_reply(req.cookie, 0);
        if spliced(img, writer, pipe, &[(&header, Some((off, len)))])? {
            return Ok(());
        }
        let end = 16 + len as usize;
        room(out, end);
        return match img.read(&mut out[16..end], off) {
            Ok(()) => {
                out[..16].copy_from_slice(&proto::simple_reply(req.cookie, 0));
                send(writer, &[&out[..end]])
            }
            Err(e) => reply_error(writer, s, req, errno_of(&e)),
        };
    }
    if len == 0 {
        return reply_ok(writer, s, req);
    }
    let sparse = req.flags & cflag::DF == 0 && len >= SPARSE_READ_MIN;
    // Plan the chunks first, so an error can still be the only reply:
    // (offset, length, reads as zeroes).
    let mut pieces: Vec<(u64, u64, bool)> = Vec::new();
    let mut pos = off;
    while pos < off + len {
        let status = if sparse {
            img.block_status_chain(pos, off + len - pos).ok()
        } else {
            None
        };
        let Some((st, _)) = status else {
            pieces.push((pos, off + len - pos, false));
            break;
        };
        let n = st.len.max(1).min(off + len - pos);
        match pieces.last_mut() {
            Some(p) if p.2 == st.zero && p.0 + p.1 == pos => p.1 += n,
            _ => pieces.push((pos, n, st.zero)),
        }
        pos += n;
    }
    let last = pieces.len() - 1;
    // The header of each piece's chunk (offset and length for a hole,
    // the offset for data) and the data range it announces.
    let header = |i: usize, (p, n, zero): (u64, u64, bool)| {
        let flags = if i == last { chunk::FLAG_DONE } else { 0 };
        if zero {
            let mut h = chunk(s, req, flags, chunk::OFFSET_HOLE, 12);
            h.extend_from_slice(&p.to_be_bytes());
            h.extend_from_slice(&(n as u32).to_be_bytes());
            (h, None)
        } else {
            let mut h = chunk(s, req, flags, chunk::OFFSET_DATA, 8 + n);
            h.extend_from_slice(&p.to_be_bytes());
            (h, Some((p, n)))
        }
    };
    let data: u64 = pieces.iter().filter(|p| !p.2).map(|p| p.1).sum();
    if pipe.is_some() && data >= SPLICE_MIN {
        let headers: Vec<(Vec<u8>, Option<GuestRange>)> = pieces
            .iter()
            .enumerate()
            .map(|(i, &piece)| header(i, piece))
            .collect();
        let parts: Vec<ReplyPart> = headers.iter().map(|(h, d)| (&h[..], *d)).collect();
        if spliced(img, writer, pipe, &parts)? {
            return Ok(());
        }
    }
    // Every chunk goes into `out`, each data chunk read in place behind
    // its header, and the lot is sent with one write.
    let mut used = 0;
    for (i, piece) in pieces.into_iter().enumerate() {
        let (h, data) = header(i, piece);
        room(out, used + h.len());
        out[used..used + h.len()].copy_from_slice(&h);
        used += h.len();
        if let Some((p, n)) = data {
            let (at, end) = (used, used + n as usize);
            room(out, end);
            if let Err(e) = img.read(&mut out[at..end], p) {
                return reply_error(writer, s, req, errno_of(&e));
            }
            used = end;
        }
    }
    send(writer, &[&out[..used]])
}

/// A guest range: (offset, length).
type GuestRange = (u64, u64);

/// Part of a read reply: bytes to send, then the guest data they
/// announce (if any).
type ReplyPart<'a> = (&'a [u8], Option<GuestRange>);

/// Replies with less data than this are copied through a buffer: for
/// small reads the pipe costs more than the copy it saves.
const SPLICE_MIN: u64 = 64 << 10;

/// Sends a read reply of `parts` (bytes, each followed by the guest
/// range of data it announces, if any) with the data spliced from the
/// image's files through `pipe`. All the data is staged in the pipe
/// before anything is sent, so a range that cannot be spliced (not
/// plainly in a file, larger than the pipe, a file that shrank) sends
/// nothing and returns `Ok(false)`: the caller then reads through a
/// buffer, which also reports errors properly. `Err`: the socket failed.
fn spliced(
    img: &imgloop::Image,
    writer: &Mutex<Conn>,
    pipe: &mut Option<Pipe>,
    parts: &[ReplyPart],
) -> io::Result<bool> {
    let Some(p) = pipe.as_mut() else {
        return Ok(false);
    };
    if p.held() != 0 {
        // Left over from a reply that failed half-way: never send it.
        *pipe = Pipe::new().ok();
        return Ok(false);
    }
    let total: u64 = parts.iter().filter_map(|(_, d)| d.map(|d| d.1)).sum();
    if total < SPLICE_MIN || total > p.capacity() as u64 {
        return Ok(false);
    }
    // Held until the data is in the socket: the file handles.
    let mut ranges = Vec::new();
    for (_, data) in parts {
        if let Some((off, len)) = *data {
            match img.file_ranges(off, len) {
                Ok(Some(r)) => ranges.push(r),
                _ => return Ok(false),
            }
        }
    }
    for r in &ranges {
        for (file, at, n) in r.iter() {
            if p.fill(file, at, n as usize).is_err() {
                // Whatever it took is stuck in it: start a new pipe.
                *pipe = Pipe::new().ok();
                return Ok(false);
            }
        }
    }
    let mut w = lock(writer);
    let result = (|| {
        for (bytes, data) in parts {
            w.write_all(bytes)?;
            if let Some((_, len)) = data {
                let fd = w
                    .plain_fd()
                    .ok_or_else(|| io::Error::other("the connection is no longer plain"))?;
                p.drain_to(fd, *len as usize)?;
            }
        }
        w.flush()
    })();
    if result.is_err() {
        *pipe = None;
    }
    result.map(|()| true)
}

/// BLOCK_STATUS: one chunk per selected context (or per context the
/// extended-header payload names), descriptors of (length, flags)
/// covering a prefix of the range; 64-bit descriptors with extended
/// headers.
fn block_status(
    e: &Export,
    s: &Session,
    writer: &Mutex<Conn>,
    req: Request,
    payload: Option<&[u8]>,
) -> io::Result<()> {
    let img = &e.image;
    // The payload form: the effect length, then the context IDs wanted.
    let (len, contexts) = match payload {
        None => (req.len, s.contexts.clone()),
        Some(p) => {
            let ids: Vec<u32> = p
                .get(8..)
                .unwrap_or_default()
                .chunks(4)
                .map(|c| u32::from_be_bytes(c.try_into().unwrap_or([0; 4])))
                .collect();
            let mut seen = std::collections::HashSet::new();
            let valid = p.len() >= 8
                && p.len() % 4 == 0
                && ids
                    .iter()
                    .all(|id| s.contexts.contains(id) && seen.insert(*id));
            if !valid {
                return reply_error(writer, s, req, errno::EINVAL);
            }
            let len = u64::from_be_bytes(p[0..8].try_into().expect("8 bytes"));
            let ids = if ids.is_empty() {
                s.contexts.clone()
            } else {
                ids
            };
            (len, ids)
        }
    };
    let size = img.size();
    let in_range = req.offset.checked_add(len).is_some_and(|end| end <= size);
    if !s.structured || contexts.is_empty() || len == 0 || !in_range {
        return reply_error(writer, s, req, errno::EINVAL);
    }
    let one = req.flags & cflag::REQ_ONE != 0;
    let end = req.offset + len;
    // Descriptor lengths: 64-bit with extended headers, else 32-bit (in
    // whole sectors).
    let max_desc = if s.extended {
        u64::MAX
    } else {
        u32::MAX as u64 & !511
    };
    let mut replies: Vec<(u32, Vec<(u64, u64)>)> = Vec::new();
    for &ctx in &contexts {
        let mut ext: Vec<(u64, u64)> = Vec::new();
        let mut pos = req.offset;
        while pos < end && ext.len() < MAX_EXTENTS {
            let (n, flags) = match ctx {
                CONTEXT_ALLOCATION | CONTEXT_DEPTH => {
                    let (st, depth) = match img.block_status_chain(pos, end - pos) {
                        Ok(r) => r,
                        Err(err) => return reply_error(writer, s, req, errno_of(&err)),
                    };
                    let flags = if ctx == CONTEXT_ALLOCATION {
                        (if st.data { 0 } else { proto::STATE_HOLE })
                            | (if st.zero { proto::STATE_ZERO } else { 0 })
                    } else if st.allocated {
                        // qemu's allocation depth: 0 unallocated in the
                        // chain, else 1 for this image, 2 for its backing
                        // file, ...
                        depth as u32 + 1
                    } else {
                        0
                    };
                    (st.len, flags)
                }
                id => {
                    let i = (id - CONTEXT_BITMAP0) as usize;
                    let Some(name) = e.bitmaps.get(i) else {
                        return reply_error(writer, s, req, errno::EINVAL);
                    };
                    match img.bitmap_status(name, pos, end - pos) {
                        Ok((dirty, n)) => (n, if dirty { proto::STATE_DIRTY } else { 0 }),
                        Err(err) => return reply_error(writer, s, req, errno_of(&err)),
                    }
                }
            };
            let n = n.max(1).min(end - pos).min(max_desc);
            let flags = flags as u64;
            match ext.last_mut() {
                Some(l) if l.1 == flags && l.0.checked_add(n).is_some_and(|t| t <= max_desc) => {
                    l.0 += n
                }
                _ => ext.push((n, flags)),
            }
            pos += n;
            if one {
                break;
            }
        }
        if ext.is_empty() {
            ext.push((len.min(max_desc), 0));
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
        let kind = if s.extended {
            p.extend_from_slice(&(ext.len() as u32).to_be_bytes());
            for (l, f) in ext {
                p.extend_from_slice(&l.to_be_bytes());
                p.extend_from_slice(&f.to_be_bytes());
            }
            chunk::BLOCK_STATUS_EXT
        } else {
            for (l, f) in ext {
                p.extend_from_slice(&(*l as u32).to_be_bytes());
                p.extend_from_slice(&(*f as u32).to_be_bytes());
            }
            chunk::BLOCK_STATUS
        };
        let flags = if i == last { chunk::FLAG_DONE } else { 0 };
        let mut b = chunk(s, req, flags, kind, p.len() as u64);
        b.extend_from_slice(&p);
        w.write_all(&b)?;
    }
    w.flush()
}

//! Fuzz target: the NBD server's handshake and request parser driven by
//! client bytes, over a socket pair, against a small in-memory qcow2
//! export with a persistent bitmap. The server must answer or disconnect:
//! never panic, hang or allocate without bound.
//!
//! The first input byte chooses the export's mode and how the rest is
//! read. Raw: the bytes are sent as they are. Typed: the rest is read as
//! choices that build a mostly well-formed session — client flags,
//! options (meta contexts, INFO/GO, extended headers, lengths at the
//! extremes), then requests of every type with extreme offsets, lengths
//! and flags, in compact or extended headers — so that mutations reach
//! the transmission phase instead of dying at the magic.

#![no_main]

#[path = "fields.rs"]
mod fields;

use fields::{extreme, Input};
use imgloop::driver::BitmapOp;
use imgloop::storage::MemStorage;
use imgloop::{registry, CreateOptions, Image};
use imgloop_nbd::proto::{cflag, cmd, opt, EXTENDED_REQUEST_MAGIC, IHAVEOPT, REQUEST_MAGIC};
use imgloop_nbd::{serve_connection, Conn, Export, ServerConfig};
use libfuzzer_sys::fuzz_target;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::Arc;

/// Size of the export.
const SIZE: u64 = 1 << 20;

fn export() -> Arc<Image> {
    let mem = MemStorage::new();
    let o = CreateOptions {
        size: SIZE,
        ..Default::default()
    };
    registry::find("qcow2")
        .unwrap()
        .create(Arc::new(mem.clone()), None, &o)
        .unwrap();
    let img = Image::open_storage(Arc::new(mem), Some("qcow2"), false, None).unwrap();
    img.bitmap(&BitmapOp::Add {
        name: "b0".into(),
        granularity: None,
        enabled: true,
    })
    .unwrap();
    img.write(&[7u8; 4096], 65536).unwrap();
    Arc::new(img)
}

/// Meta context queries a client may send.
const QUERIES: &[&str] = &[
    "base:allocation",
    "qemu:allocation-depth",
    "qemu:dirty-bitmap:b0",
    "qemu:dirty-bitmap:",
    "qemu:",
    "base:",
    "",
    "nosuch:thing",
];

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u32).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn option(out: &mut Vec<u8>, code: u32, data: &[u8]) {
    out.extend_from_slice(&IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&code.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
}

/// The export name and meta context queries of LIST/SET_META_CONTEXT.
fn meta_data(input: &mut Input) -> Vec<u8> {
    let mut d = Vec::new();
    put_str(&mut d, "");
    let n = input.byte() % 4;
    d.extend_from_slice(&u32::from(n).to_be_bytes());
    for _ in 0..n {
        put_str(&mut d, QUERIES[input.byte() as usize % QUERIES.len()]);
    }
    d
}

/// The export name and information requests of INFO/GO.
fn info_data(input: &mut Input) -> Vec<u8> {
    let mut d = Vec::new();
    put_str(
        &mut d,
        if input.byte().is_multiple_of(8) {
            "other"
        } else {
            ""
        },
    );
    let n = input.byte() % 4;
    d.extend_from_slice(&u16::from(n).to_be_bytes());
    for _ in 0..n {
        let info = match input.byte() % 6 {
            5 => u16::from(input.byte()) << 8 | u16::from(input.byte()),
            k => u16::from(k),
        };
        d.extend_from_slice(&info.to_be_bytes());
    }
    d
}

/// A session built from the input's choices; returns the bytes.
fn typed_session(input: &mut Input) -> Vec<u8> {
    let mut out = Vec::new();
    let flags: u32 = match input.byte() % 8 {
        6 => 1,
        7 => input.u64() as u32,
        _ => 3,
    };
    out.extend_from_slice(&flags.to_be_bytes());
    let mut extended = false;
    let mut ended = false;
    for _ in 0..input.byte() % 8 {
        match input.byte() % 13 {
            0 => option(&mut out, opt::STRUCTURED_REPLY, &[]),
            1 => {
                extended = true;
                option(&mut out, opt::EXTENDED_HEADERS, &[]);
            }
            2 => option(&mut out, opt::SET_META_CONTEXT, &meta_data(input)),
            3 => option(&mut out, opt::LIST_META_CONTEXT, &meta_data(input)),
            4 => option(&mut out, opt::INFO, &info_data(input)),
            5 => option(&mut out, opt::LIST, &[]),
            6 => option(&mut out, opt::STARTTLS, &[]),
            7 => {
                let code = input.u64() as u32;
                let data: Vec<u8> = (0..input.byte() % 32).map(|_| input.byte()).collect();
                option(&mut out, code, &data);
            }
            8 => {
                // A length at the extremes, followed by a few bytes only.
                out.extend_from_slice(&IHAVEOPT.to_be_bytes());
                let code = [opt::GO, opt::INFO, opt::SET_META_CONTEXT, opt::LIST]
                    [input.byte() as usize % 4];
                out.extend_from_slice(&code.to_be_bytes());
                let len = extreme(input, 4096, 65536, 16) as u32;
                out.extend_from_slice(&len.to_be_bytes());
                out.extend((0..input.byte() % 16).map(|_| input.byte()));
            }
            9 => {
                option(&mut out, opt::ABORT, &[]);
                ended = true;
            }
            10 => {
                // The old way in: no reply, straight to transmission.
                option(&mut out, opt::EXPORT_NAME, b"");
                ended = true;
                break;
            }
            11 => {
                option(&mut out, opt::GO, &info_data(input));
                ended = true;
                break;
            }
            _ => extended = !extended,
        }
    }
    if !ended {
        option(&mut out, opt::GO, &info_data(input));
    }
    for _ in 0..input.byte() % 16 {
        let ty = match input.byte() % 11 {
            8 => u16::from(input.byte()),
            9 => cmd::WRITE,
            10 => cmd::READ,
            k => u16::from(k),
        };
        let flags = match input.byte() % 10 {
            0 => cflag::FUA,
            1 => cflag::NO_HOLE,
            2 => cflag::DF,
            3 => cflag::REQ_ONE,
            4 => cflag::FAST_ZERO,
            5 => cflag::PAYLOAD_LEN,
            6 => u16::from(input.byte()) << 8 | u16::from(input.byte()),
            _ => 0,
        };
        let offset = match input.byte() % 3 {
            0 => u64::from(input.byte()) * 4096,
            _ => extreme(input, 512, SIZE, 65536),
        };
        let len = match input.byte() % 3 {
            0 => u64::from(input.byte()) * 512,
            _ => extreme(input, 512, SIZE, 4096),
        };
        let cookie = u64::from(input.byte());
        // Now and then the other header form than was negotiated.
        let ext = extended ^ input.byte().is_multiple_of(16);
        if ext {
            out.extend_from_slice(&EXTENDED_REQUEST_MAGIC.to_be_bytes());
        } else {
            out.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        }
        out.extend_from_slice(&flags.to_be_bytes());
        out.extend_from_slice(&ty.to_be_bytes());
        out.extend_from_slice(&cookie.to_be_bytes());
        out.extend_from_slice(&offset.to_be_bytes());
        if ext {
            out.extend_from_slice(&len.to_be_bytes());
        } else {
            out.extend_from_slice(&(len as u32).to_be_bytes());
        }
        let payload = match ty {
            cmd::WRITE => len.min(8192),
            cmd::BLOCK_STATUS if flags & cflag::PAYLOAD_LEN != 0 => len.min(64),
            _ => 0,
        };
        out.extend((0..payload).map(|i| (i as u8) ^ (cookie as u8)));
        if ty == cmd::DISC {
            break;
        }
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let mode = data.first().copied().unwrap_or(0);
    let bytes = if mode & 4 == 0 {
        typed_session(&mut Input(data.get(1..).unwrap_or_default()))
    } else {
        data.get(1..).unwrap_or_default().to_vec()
    };
    let config = Arc::new(ServerConfig {
        exports: vec![Export {
            name: String::new(),
            description: "fuzz".into(),
            image: export(),
            read_only: mode & 1 == 1,
            unmap: true,
            detect_zeroes: if mode & 2 == 2 {
                imgloop_nbd::DetectZeroes::Unmap
            } else {
                imgloop_nbd::DetectZeroes::Off
            },
            bitmaps: vec!["b0".into()],
        }],
        workers: 2,
        tls: None,
    });
    let (mut client, server) = UnixStream::pair().unwrap();
    let t = std::thread::spawn(move || {
        let _ = serve_connection(Conn::Unix(server), &config);
    });
    // The client's bytes, then end of input; read everything back so the
    // server never blocks on a full socket.
    let reader = {
        let mut c = client.try_clone().unwrap();
        std::thread::spawn(move || {
            let mut sink = [0u8; 65536];
            while let Ok(n) = c.read(&mut sink) {
                if n == 0 {
                    break;
                }
            }
        })
    };
    let _ = client.write_all(&bytes);
    let _ = client.shutdown(std::net::Shutdown::Write);
    t.join().unwrap();
    let _ = client.shutdown(std::net::Shutdown::Both);
    reader.join().unwrap();
});

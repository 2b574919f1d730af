//! Fuzz target: the NBD server's handshake and request parser driven by
//! arbitrary client bytes, over a socket pair, against a small in-memory
//! qcow2 export. The server must answer or disconnect: never panic, hang
//! or allocate without bound.

#![no_main]

use imgloop::storage::MemStorage;
use imgloop::{registry, CreateOptions, Image};
use imgloop_nbd::{serve_connection, Conn, Export, ServerConfig};
use libfuzzer_sys::fuzz_target;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::Arc;

fn export() -> Arc<Image> {
    let mem = MemStorage::new();
    let o = CreateOptions {
        size: 1 << 20,
        ..Default::default()
    };
    registry::find("qcow2")
        .unwrap()
        .create(Arc::new(mem.clone()), None, &o)
        .unwrap();
    let img = Image::open_storage(Arc::new(mem), Some("qcow2"), false, None).unwrap();
    img.write(&[7u8; 4096], 65536).unwrap();
    Arc::new(img)
}

fuzz_target!(|data: &[u8]| {
    let config = Arc::new(ServerConfig {
        exports: vec![Export {
            name: String::new(),
            description: "fuzz".into(),
            image: export(),
            read_only: data.first().is_some_and(|b| b & 1 == 1),
            unmap: true,
            detect_zeroes: if data.first().is_some_and(|b| b & 2 == 2) {
                imgloop_nbd::DetectZeroes::Unmap
            } else {
                imgloop_nbd::DetectZeroes::Off
            },
            bitmaps: Vec::new(),
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
    let _ = client.write_all(data);
    let _ = client.shutdown(std::net::Shutdown::Write);
    t.join().unwrap();
    let _ = client.shutdown(std::net::Shutdown::Both);
    reader.join().unwrap();
});

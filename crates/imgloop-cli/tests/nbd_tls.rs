//! `imgloop serve` with TLS (X.509), against GnuTLS clients: qemu-img and
//! qemu-io (`tls-creds-x509` objects), nbdinfo and nbdcopy (`nbds://`
//! URIs), over Unix sockets and TCP, with and without client
//! certificates. Certificates are made in the test with openssl.

mod common;
use common::nbd::*;
use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA, a server certificate for localhost/127.0.0.1 and a client
/// certificate, in qemu's layouts: (server dir, client dir).
fn pki(sc: &Scratch, name: &str) -> (PathBuf, PathBuf) {
    let work = sc.path(name);
    let (srv, cli) = (work.join("server"), work.join("client"));
    for d in [&work, &srv, &cli] {
        std::fs::create_dir_all(d).unwrap();
    }
    let w = work.as_path();
    openssl(
        w,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca-key.pem",
            "-out",
            "ca-cert.pem",
            "-days",
            "3650",
            "-subj",
            "/CN=imgloop test CA",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
    );
    std::fs::write(
        work.join("server.ext"),
        "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n\
         extendedKeyUsage=serverAuth\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n",
    )
    .unwrap();
    std::fs::write(
        work.join("client.ext"),
        "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n\
         extendedKeyUsage=clientAuth\n",
    )
    .unwrap();
    for (who, subj) in [
        ("server", "/O=imgloop test/CN=localhost"),
        ("client", "/O=imgloop test/CN=client1"),
    ] {
        let key = format!("{who}-key.pem");
        let csr = format!("{who}.csr");
        let cert = format!("{who}-cert.pem");
        let ext = format!("{who}.ext");
        openssl(
            w,
            &[
                "req", "-newkey", "rsa:2048", "-nodes", "-keyout", &key, "-out", &csr, "-subj",
                subj,
            ],
        );
        openssl(
            w,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca-cert.pem",
                "-CAkey",
                "ca-key.pem",
                "-CAcreateserial",
                "-days",
                "3650",
                "-extfile",
                &ext,
                "-out",
                &cert,
            ],
        );
    }
    for (dir, files) in [
        (&srv, ["ca-cert.pem", "server-cert.pem", "server-key.pem"]),
        (&cli, ["ca-cert.pem", "client-cert.pem", "client-key.pem"]),
    ] {
        for f in files {
            std::fs::copy(work.join(f), dir.join(f)).unwrap();
        }
    }
    (srv, cli)
}

fn image(sc: &Scratch, name: &str) -> PathBuf {
    let img = sc.path(name);
    qemu_img(&["create", "-q", "-f", "qcow2", s(&img), "8M"]).ok();
    qemu_io("qcow2", &img, &["write -P 5 1M 64k"]).ok();
    img
}

/// qemu-img/qemu-io image options for an NBD export over a Unix socket
/// with the TLS credentials object `tls0`.
fn unix_opts(sock: &Path) -> String {
    format!(
        "driver=nbd,server.type=unix,server.path={},tls-creds=tls0,tls-hostname=localhost",
        s(sock)
    )
}

fn client_object(dir: &Path) -> String {
    format!("tls-creds-x509,id=tls0,endpoint=client,dir={}", s(dir))
}

#[test]
fn qemu_and_libnbd_clients_talk_tls_and_plain_clients_are_refused() {
    let sc = Scratch::new();
    let (srv_dir, cli_dir) = pki(&sc, "pki");
    let img = image(&sc, "t.qcow2");
    let want = sc.path("want.raw");
    qemu_img(&["convert", "-O", "raw", s(&img), s(&want)]).ok();
    qemu_io("raw", &want, &["write -P 6 2M 1M"]).ok();
    let srv = Server::start(&sc, &["-t", "-e", "4", "--tls-creds", s(&srv_dir), s(&img)]);
    let obj = client_object(&cli_dir);
    let opts = unix_opts(&srv.socket);
    let info = qemu_img(&[
        "info",
        "--output=json",
        "--object",
        &obj,
        "--image-opts",
        &opts,
    ])
    .ok()
    .json();
    assert_eq!(info["virtual-size"], 8 << 20);
    tool(
        "qemu-io",
        &[
            "--object",
            &obj,
            "--image-opts",
            &opts,
            "-c",
            "write -P 6 2M 1M",
            "-c",
            "read -P 5 1M 64k",
            "-c",
            "read -P 6 2M 1M",
        ],
    );
    // libnbd: nbds+unix with the certificates directory.
    let uri = format!(
        "nbds+unix:///?socket={}&tls-certificates={}",
        s(&srv.socket),
        s(&cli_dir)
    );
    let i = tool("nbdinfo", &["--json", &uri]).json();
    assert_eq!(i["exports"][0]["export-size"], 8 << 20);
    let out = sc.path("copy.raw");
    tool(
        "nbdcopy",
        &["--connections=2", "--requests=8", &uri, s(&out)],
    );
    assert!(std::fs::read(&out).unwrap() == std::fs::read(&want).unwrap());
    // A plain client gets no data: TLS is required first.
    let r = qemu_img(&["info", &srv.uri("")]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("TLS"), "{}", r.stderr);
    let r = run_program("nbdinfo", &[&srv.uri("")]);
    assert_ne!(r.code, 0);
    // The server still serves TLS clients after that.
    let i = tool("nbdinfo", &["--json", &uri]).json();
    assert_eq!(i["exports"][0]["export-size"], 8 << 20);
    assert!(srv.stop().success());
    assert_eq!(qemu_img(&["check", s(&img)]).code, 0);
}

#[test]
fn verify_peer_needs_a_client_certificate_from_the_ca_over_tcp() {
    let sc = Scratch::new();
    let (srv_dir, cli_dir) = pki(&sc, "pki");
    let (_, rogue_dir) = pki(&sc, "rogue");
    // The rogue client trusts our CA (so it accepts the server) but its
    // certificate comes from another CA.
    std::fs::copy(cli_dir.join("ca-cert.pem"), rogue_dir.join("ca-cert.pem")).unwrap();
    let no_cert = sc.path("nocert");
    std::fs::create_dir_all(&no_cert).unwrap();
    std::fs::copy(cli_dir.join("ca-cert.pem"), no_cert.join("ca-cert.pem")).unwrap();
    let img = image(&sc, "v.qcow2");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let port_s = port.to_string();
    let pid_file = sc.path("serve.pid");
    let server_obj = format!("tls-creds-x509,id=tls0,endpoint=server,dir={}", s(&srv_dir));
    let mut child = Command::new(imgloop_bin())
        .args([
            "serve",
            "-t",
            "-e",
            "4",
            "-b",
            "127.0.0.1",
            "-p",
            &port_s,
            "--pid-file",
            s(&pid_file),
            "--object",
            &server_obj,
            "--tls-creds",
            "tls0",
            s(&img),
        ])
        .spawn()
        .unwrap();
    let t = Instant::now();
    while !pid_file.exists() {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "the server did not listen"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let opts = format!(
        "driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={port},tls-creds=tls0"
    );
    let info = |dir: &Path| {
        qemu_img(&[
            "info",
            "--output=json",
            "--object",
            &client_object(dir),
            "--image-opts",
            &opts,
        ])
    };
    let r = info(&cli_dir);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.json()["virtual-size"], 8 << 20);
    for (dir, what) in [
        (&no_cert, "without a certificate"),
        (&rogue_dir, "with another CA's certificate"),
    ] {
        let r = info(dir);
        assert_eq!(r.code, 1, "a client {what} was let in");
        let uri = format!("nbds://127.0.0.1:{port}/?tls-certificates={}", s(dir));
        assert_ne!(run_program("nbdinfo", &[&uri]).code, 0, "nbdinfo {what}");
    }
    let uri = format!("nbds://127.0.0.1:{port}/?tls-certificates={}", s(&cli_dir));
    let i = tool("nbdinfo", &["--json", &uri]).json();
    assert_eq!(i["exports"][0]["export-size"], 8 << 20);
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    assert!(child.wait().unwrap().success());
}

#[test]
fn bad_or_unsupported_credentials_are_errors_at_start() {
    let sc = Scratch::new();
    let img = image(&sc, "c.qcow2");
    let sock = sc.path("c.sock");
    let empty = sc.path("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let r = imgloop(&[
        "serve",
        "--socket",
        s(&sock),
        "--tls-creds",
        s(&empty),
        s(&img),
    ]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("server-cert.pem"), "{}", r.stderr);
    let psk = format!("tls-creds-psk,id=tls0,endpoint=server,dir={}", s(&empty));
    let r = imgloop(&[
        "serve",
        "--socket",
        s(&sock),
        "--object",
        &psk,
        "--tls-creds",
        "tls0",
        s(&img),
    ]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("keys.psk"), "{}", r.stderr);
    let r = imgloop(&[
        "serve",
        "--socket",
        s(&sock),
        "--tls-creds",
        "nosuch",
        s(&img),
    ]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("nosuch"), "{}", r.stderr);
    assert!(!sock.exists());
}

#[test]
fn tls_authz_lets_in_the_same_certificate_subjects_as_qemu_nbd() {
    let sc = Scratch::new();
    let (srv_dir, cli_dir) = pki(&sc, "pki");
    let img = image(&sc, "a.qcow2");
    let server_obj = format!("tls-creds-x509,id=tls0,endpoint=server,dir={}", s(&srv_dir));
    let client_obj = client_object(&cli_dir);
    for (identity, allowed) in [
        ("O=imgloop test,CN=client1", true),
        ("CN=client1,O=imgloop test", false),
        ("O=imgloop test,CN=client2", false),
    ] {
        let authz = format!(
            "authz-simple,id=auth0,identity={}",
            identity.replace(',', ",,")
        );
        let mut codes = Vec::new();
        for program in ["imgloop", "qemu-nbd"] {
            let sock = sc.path(&format!("{program}{}.sock", rand_tag()));
            let common = [
                "--object",
                &server_obj,
                "--object",
                &authz,
                "--tls-creds",
                "tls0",
                "--tls-authz",
                "auth0",
                "-r",
                "-f",
                "qcow2",
            ];
            let mut cmd = if program == "imgloop" {
                let mut c = Command::new(imgloop_bin());
                c.arg("serve");
                c
            } else {
                Command::new("qemu-nbd")
            };
            let mut child = cmd
                .args(common)
                .args(["-k", s(&sock), s(&img)])
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap();
            let t = Instant::now();
            while !sock.exists() {
                assert!(
                    t.elapsed() < Duration::from_secs(20),
                    "{program} did not listen"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
            let r = qemu_img(&[
                "info",
                "--object",
                &client_obj,
                "--image-opts",
                &unix_opts(&sock),
            ]);
            codes.push(r.code);
            let _ = child.kill();
            let _ = child.wait();
        }
        assert_eq!(
            codes[0], codes[1],
            "{identity}: imgloop and qemu-nbd disagree"
        );
        assert_eq!(codes[0] == 0, allowed, "{identity}");
    }
}

/// A `keys.psk` in a directory of its own: `username:hexkey` lines.
fn psk_dir(sc: &Scratch, name: &str, users: &[&str]) -> PathBuf {
    let dir = sc.path(name);
    std::fs::create_dir(&dir).unwrap();
    let mut text = String::new();
    for u in users {
        let mut raw = [0u8; 32];
        use std::io::Read;
        std::fs::File::open("/dev/urandom")
            .unwrap()
            .read_exact(&mut raw)
            .unwrap();
        let key: String = raw.iter().map(|b| format!("{b:02x}")).collect();
        text.push_str(&format!("{u}:{key}\n"));
    }
    std::fs::write(dir.join("keys.psk"), text).unwrap();
    dir
}

fn psk_client(dir: &Path, user: &str) -> String {
    format!(
        "tls-creds-psk,id=tls0,endpoint=client,dir={},username={user}",
        s(dir)
    )
}

/// qemu-img/qemu-io image options for a PSK export on `sock`.
fn psk_opts(sock: &Path) -> String {
    format!(
        "driver=nbd,server.type=unix,server.path={},tls-creds=tls0",
        s(sock)
    )
}

/// An nbdsh script connecting with a pre-shared key; prints the export
/// size and whether TLS was negotiated.
fn nbdsh_psk(sock: &Path, keys: &Path, user: &str) -> Run {
    let script = format!(
        "h.set_tls(nbd.TLS_REQUIRE)\nh.set_tls_psk_file({keys:?})\n\
         h.set_tls_username({user:?})\nh.connect_unix({sock:?})\n\
         print(h.get_size(), h.get_tls_negotiated())\n\
         buf = h.pread(65536, 1 << 20)\nassert buf == bytes([5]) * 65536\n",
        keys = s(keys),
        sock = s(sock)
    );
    let path = format!("/usr/bin:{}", std::env::var("PATH").unwrap_or_default());
    let out = Command::new("nbdsh")
        .env("PATH", path)
        .args(["-c", &script])
        .output()
        .unwrap();
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

#[test]
fn pre_shared_keys_work_with_qemu_and_libnbd_and_wrong_keys_are_refused() {
    let sc = Scratch::new();
    let img = image(&sc, "p.qcow2");
    let keys = psk_dir(&sc, "psk", &["qemu", "alice"]);
    let obj = format!("tls-creds-psk,id=t0,endpoint=server,dir={}", s(&keys));
    let srv = Server::start(
        &sc,
        &[
            "-t",
            "-e",
            "4",
            "--object",
            &obj,
            "--tls-creds",
            "t0",
            s(&img),
        ],
    );
    let opts = psk_opts(&srv.socket);
    for user in ["qemu", "alice"] {
        let client = psk_client(&keys, user);
        let info = qemu_img(&[
            "info",
            "--output=json",
            "--object",
            &client,
            "--image-opts",
            &opts,
        ])
        .ok()
        .json();
        assert_eq!(info["virtual-size"], 8 << 20, "{user}");
    }
    let client = psk_client(&keys, "qemu");
    tool(
        "qemu-io",
        &[
            "--object",
            &client,
            "--image-opts",
            &opts,
            "-c",
            "write -P 8 3M 128k",
            "-c",
            "read -P 5 1M 64k",
            "-c",
            "read -P 8 3M 128k",
        ],
    );
    let r = nbdsh_psk(&srv.socket, &keys.join("keys.psk"), "alice");
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    assert_eq!(r.stdout.trim(), format!("{} True", 8 << 20));
    // A client with another key for the same name, or a name the server
    // does not know, or no TLS at all, gets nothing.
    let other = psk_dir(&sc, "other", &["qemu", "mallory"]);
    for user in ["qemu", "mallory"] {
        let r = qemu_img(&[
            "info",
            "--object",
            &psk_client(&other, user),
            "--image-opts",
            &opts,
        ]);
        assert_eq!(r.code, 1, "{user}: {}", r.stdout);
        let r = nbdsh_psk(&srv.socket, &other.join("keys.psk"), user);
        assert_ne!(r.code, 0, "{user}: {}", r.stdout);
    }
    let r = qemu_img(&["info", &srv.uri("")]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("TLS"), "{}", r.stderr);
    // Still serving the right clients after all that.
    let info = qemu_img(&[
        "info",
        "--output=json",
        "--object",
        &client,
        "--image-opts",
        &opts,
    ])
    .ok()
    .json();
    assert_eq!(info["virtual-size"], 8 << 20);
    assert!(srv.stop().success());
    qemu_io("qcow2", &img, &["read -P 8 3M 128k"]).ok();
    assert_eq!(qemu_img(&["check", s(&img)]).code, 0);
    // --tls-psk FILE says the same without an --object.
    let srv = Server::start(
        &sc,
        &["-t", "--tls-psk", s(&keys.join("keys.psk")), s(&img)],
    );
    let r = nbdsh_psk(&srv.socket, &keys.join("keys.psk"), "qemu");
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    assert!(srv.stop().success());
}

#[test]
fn tls_authz_with_pre_shared_keys_admits_only_the_named_user() {
    // qemu-nbd applies --tls-authz to certificate subjects only and lets
    // every PSK user in; imgloop checks the username (README, "NBD server").
    let sc = Scratch::new();
    let img = image(&sc, "a.qcow2");
    let keys = psk_dir(&sc, "psk", &["alice", "bob"]);
    let server_obj = format!("tls-creds-psk,id=tls0,endpoint=server,dir={}", s(&keys));
    let srv = Server::start(
        &sc,
        &[
            "-t",
            "-e",
            "2",
            "--object",
            &server_obj,
            "--object",
            "authz-simple,id=auth0,identity=alice",
            "--tls-creds",
            "tls0",
            "--tls-authz",
            "auth0",
            s(&img),
        ],
    );
    for user in ["alice", "bob", "alice"] {
        let r = qemu_img(&[
            "info",
            "--object",
            &psk_client(&keys, user),
            "--image-opts",
            &psk_opts(&srv.socket),
        ]);
        assert_eq!(
            r.code == 0,
            user == "alice",
            "{user}: {}{}",
            r.stdout,
            r.stderr
        );
    }
    assert!(srv.stop().success());
}

//! Servers that answer with their pod's name, the client address they saw and the port they were
//! reached on, TCP and UDP connect probes with a 1 s deadline, and a long-lived TCP flow that
//! measures its own stalls.

use std::{
    io::{ErrorKind, Read, Write},
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use crate::in_netns;

pub const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
const POLL: Duration = Duration::from_millis(20);

/// What a server answered: who it is, the client address it saw and the port it was reached on
/// (behind a Service: the target port).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    pub server: String,
    pub client: IpAddr,
    pub port: u16,
}

fn parse_reply(text: &str) -> Option<Reply> {
    let mut parts = text.split_whitespace();
    Some(Reply {
        server: parts.next()?.to_string(),
        client: parts.next()?.parse().ok()?,
        port: parts.next()?.parse().ok()?,
    })
}

/// TCP and UDP servers on `ports` inside a namespace; stopped and joined on drop.
pub struct Servers {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Servers {
    pub fn start(netns: &Path, name: &str, ports: &[u16]) -> Servers {
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for &port in ports {
            let sockets = in_netns(netns, move || sluice_lab_pod::bind(port))
                .expect("bind the pod's TCP and UDP servers");
            // Sockets keep their namespace; the threads serving them need not be inside it.
            threads.extend(sluice_lab_pod::serve(name, port, sockets, &stop));
        }
        Servers { stop, threads }
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// TCP connect probe from inside `netns`, optionally from a given source address.
pub fn tcp(netns: &Path, source: Option<Ipv4Addr>, dst: Ipv4Addr, port: u16) -> Option<Reply> {
    tcp_within(netns, source, dst, port, PROBE_TIMEOUT)
}

pub fn tcp_within(
    netns: &Path,
    source: Option<Ipv4Addr>,
    dst: Ipv4Addr,
    port: u16,
    timeout: Duration,
) -> Option<Reply> {
    in_netns(netns, move || {
        let dst = SocketAddr::from((dst, port));
        let mut stream = match source {
            None => TcpStream::connect_timeout(&dst, timeout).ok()?,
            Some(src) => connect_from(src, dst)?,
        };
        stream.set_read_timeout(Some(timeout)).ok()?;
        let mut text = String::new();
        stream.read_to_string(&mut text).ok()?;
        parse_reply(&text)
    })
}

/// Connects from a fixed source address (std has no bind-before-connect for TCP).
fn connect_from(src: Ipv4Addr, dst: SocketAddr) -> Option<TcpStream> {
    use nix::sys::socket::{bind, connect, socket, AddressFamily, SockFlag, SockType, SockaddrIn};
    let fd = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK,
        None,
    )
    .ok()?;
    bind(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        &SockaddrIn::from(std::net::SocketAddrV4::new(src, 0)),
    )
    .ok()?;
    let SocketAddr::V4(dst) = dst else {
        return None;
    };
    match connect(std::os::fd::AsRawFd::as_raw_fd(&fd), &SockaddrIn::from(dst)) {
        Ok(()) | Err(nix::errno::Errno::EINPROGRESS) => {}
        Err(_) => return None,
    }
    let stream = TcpStream::from(fd);
    let deadline = Instant::now() + PROBE_TIMEOUT;
    loop {
        match stream.peer_addr() {
            Ok(_) => break,
            Err(e) if e.kind() == ErrorKind::NotConnected && Instant::now() < deadline => {
                std::thread::sleep(POLL)
            }
            Err(_) => return None,
        }
    }
    stream.set_nonblocking(false).ok()?;
    Some(stream)
}

/// UDP probe: one datagram, one answer within the deadline. The socket is connected, as a real
/// client's: an answer from another address than the one probed (a Service reply that missed its
/// reverse translation) is no answer.
pub fn udp(netns: &Path, dst: Ipv4Addr, port: u16) -> Option<Reply> {
    udp_within(netns, dst, port, PROBE_TIMEOUT)
}

pub fn udp_within(netns: &Path, dst: Ipv4Addr, port: u16, timeout: Duration) -> Option<Reply> {
    udp_datagram(netns, dst, port, b"probe".len(), timeout)
}

/// UDP probe with a datagram of `len` bytes: beyond the pod's MTU, the sender's kernel sends it
/// in IPv4 fragments.
pub fn udp_datagram(
    netns: &Path,
    dst: Ipv4Addr,
    port: u16,
    len: usize,
    timeout: Duration,
) -> Option<Reply> {
    in_netns(netns, move || {
        let socket = UdpSocket::bind(("0.0.0.0", 0)).ok()?;
        socket.set_read_timeout(Some(timeout)).ok()?;
        socket.connect((dst, port)).ok()?;
        socket.send(&b"probe".repeat(len.div_ceil(5))[..len]).ok()?;
        let mut buf = [0u8; 128];
        let n = socket.recv(&mut buf).ok()?;
        parse_reply(std::str::from_utf8(&buf[..n]).ok()?)
    })
}

/// A TCP flow that keeps sending small writes; the receiver records the longest silence.
pub struct Flow {
    stop: Arc<AtomicBool>,
    received: Arc<AtomicU64>,
    max_gap: Arc<Mutex<Duration>>,
    client: Option<JoinHandle<Result<(), String>>>,
    server: Option<JoinHandle<Result<(), String>>>,
}

#[derive(Debug)]
pub struct FlowReport {
    pub bytes: u64,
    pub max_gap: Duration,
    pub client_error: Option<String>,
    pub server_error: Option<String>,
}

impl FlowReport {
    /// No reset, no error, no silence of a second or more.
    pub fn assert_unbroken(&self) {
        assert!(
            self.client_error.is_none() && self.server_error.is_none(),
            "flow broke: {self:?}"
        );
        assert!(
            self.max_gap < Duration::from_secs(1),
            "flow stalled for {:?}",
            self.max_gap
        );
    }
}

impl Flow {
    pub fn start(client_ns: PathBuf, server_ns: &Path, server_ip: Ipv4Addr, port: u16) -> Flow {
        let listener = in_netns(server_ns, move || {
            TcpListener::bind(("0.0.0.0", port)).expect("bind flow server")
        });
        let stop = Arc::new(AtomicBool::new(false));
        let received = Arc::new(AtomicU64::new(0));
        let max_gap = Arc::new(Mutex::new(Duration::ZERO));
        let (stop_s, received_s, gap_s) = (stop.clone(), received.clone(), max_gap.clone());
        let server = std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().map_err(|e| e.to_string())?;
            conn.set_read_timeout(Some(Duration::from_millis(100)))
                .unwrap();
            let mut buf = [0u8; 4096];
            let mut last = Instant::now();
            loop {
                match conn.read(&mut buf) {
                    Ok(0) => return Ok(()),
                    Ok(n) => {
                        received_s.fetch_add(n as u64, Ordering::Relaxed);
                        let gap = last.elapsed();
                        let mut max = gap_s.lock().unwrap();
                        *max = (*max).max(gap);
                        last = Instant::now();
                    }
                    Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                        if stop_s.load(Ordering::Relaxed) {
                            return Ok(());
                        }
                    }
                    Err(e) => return Err(e.to_string()),
                }
            }
        });
        let stop_c = stop.clone();
        let client = std::thread::spawn(move || {
            let mut conn = in_netns(&client_ns, move || {
                TcpStream::connect_timeout(&SocketAddr::from((server_ip, port)), PROBE_TIMEOUT)
            })
            .map_err(|e| e.to_string())?;
            let chunk = [0x5au8; 1024];
            // Bounded: stops when told, and in any case after 60 s.
            let deadline = Instant::now() + Duration::from_secs(60);
            while !stop_c.load(Ordering::Relaxed) && Instant::now() < deadline {
                conn.write_all(&chunk).map_err(|e| e.to_string())?;
                std::thread::sleep(Duration::from_millis(5));
            }
            Ok(())
        });
        Flow {
            stop,
            received,
            max_gap,
            client: Some(client),
            server: Some(server),
        }
    }

    pub fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }

    pub fn stop(mut self) -> FlowReport {
        self.stop.store(true, Ordering::Relaxed);
        let client_error = self.client.take().unwrap().join().unwrap().err();
        let server_error = self.server.take().unwrap().join().unwrap().err();
        FlowReport {
            bytes: self.received(),
            max_gap: *self.max_gap.lock().unwrap(),
            client_error,
            server_error,
        }
    }
}

/// A minimal HTTP/1.0 GET (health endpoints): (status code, body).
pub fn http_get(address: &str, path: &str) -> Option<(u16, String)> {
    let addr: SocketAddr = address.parse().ok()?;
    let mut stream = TcpStream::connect_timeout(&addr, PROBE_TIMEOUT).ok()?;
    stream.set_read_timeout(Some(PROBE_TIMEOUT)).ok()?;
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: {address}\r\n\r\n").as_bytes())
        .ok()?;
    let mut text = String::new();
    stream.read_to_string(&mut text).ok()?;
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Some((status, body))
}

/// A long-lived connection through a Service: echoes lines with the name of the pod behind it.
pub struct Session {
    conn: std::net::TcpStream,
}

impl Session {
    pub fn open(ns: &Path, ip: Ipv4Addr, port: u16) -> Session {
        let addr = std::net::SocketAddr::from((ip, port));
        let conn = in_netns(ns, move || {
            std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1))
        })
        .expect("session through the Service");
        conn.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        Session { conn }
    }

    /// `n` sessions, each with the pod that answered its first question.
    pub fn open_many(ns: &Path, ip: Ipv4Addr, port: u16, n: usize) -> Vec<(String, Session)> {
        (0..n)
            .map(|_| {
                let mut session = Session::open(ns, ip, port);
                let pod = session.ask().expect("session answers");
                (pod, session)
            })
            .collect()
    }

    /// The pod answering, or how the exchange failed.
    pub fn ask(&mut self) -> std::io::Result<String> {
        use std::io::{BufRead, BufReader, Write};
        self.conn.write_all(b"who\n")?;
        let mut line = String::new();
        let read = BufReader::new(&self.conn).read_line(&mut line)?;
        if read == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        Ok(line.trim().to_string())
    }
}

/// Whether a session failed the way one whose connection the other side never saw fails: reset
/// (or closed), never left hanging.
pub fn was_reset(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        ErrorKind::ConnectionReset | ErrorKind::UnexpectedEof | ErrorKind::BrokenPipe
    )
}

/// Echo servers for sessions: every line gets the pod's name back. Threads end with the test.
pub fn session_server(ns: &Path, pod: &str, port: u16) {
    let listener = in_netns(ns, move || {
        std::net::TcpListener::bind(("0.0.0.0", port)).expect("bind session server")
    });
    let pod = pod.to_string();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let pod = pod.clone();
            std::thread::spawn(move || {
                use std::io::{BufRead, BufReader, Write};
                let mut writer = conn.try_clone().expect("clone");
                for line in BufReader::new(conn).lines() {
                    if line.is_err() || writer.write_all(format!("{pod}\n").as_bytes()).is_err() {
                        return;
                    }
                }
            });
        }
    });
}

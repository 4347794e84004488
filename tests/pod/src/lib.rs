//! The lab's pod server: on each port, TCP and UDP, it answers every connection or datagram with
//! its name, the client address it saw and the port it was reached on (`ns/pod 10.244.0.2 80`),
//! which is what the lab's probes read. The embedded lab serves it from threads over sockets
//! bound inside a pod's namespace; on the real cluster it is the pods' container
//! (`sluice-lab-pod`, in the image `cargo xtask image` builds beside Sluice's).

use std::{
    io::Write,
    net::{TcpListener, UdpSocket},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::Duration,
};

const POLL: Duration = Duration::from_millis(20);

/// The TCP listener and UDP socket for `port`, on every address of the current namespace.
pub fn bind(port: u16) -> std::io::Result<(TcpListener, UdpSocket)> {
    let tcp = TcpListener::bind(("0.0.0.0", port))?;
    tcp.set_nonblocking(true)?;
    let udp = UdpSocket::bind(("0.0.0.0", port))?;
    udp.set_read_timeout(Some(POLL))?;
    Ok((tcp, udp))
}

/// Serves `port`'s sockets as `name` until `stop` is set; one thread per protocol.
pub fn serve(
    name: &str,
    port: u16,
    (tcp, udp): (TcpListener, UdpSocket),
    stop: &Arc<AtomicBool>,
) -> [JoinHandle<()>; 2] {
    let (stop_tcp, stop_udp) = (stop.clone(), stop.clone());
    let (name_tcp, name_udp) = (name.to_string(), name.to_string());
    [
        std::thread::spawn(move || {
            while !stop_tcp.load(Ordering::Relaxed) {
                match tcp.accept() {
                    Ok((mut conn, peer)) => {
                        let reply = format!("{name_tcp} {} {port}\n", peer.ip());
                        let _ = conn.write_all(reply.as_bytes());
                    }
                    Err(_) => std::thread::sleep(POLL),
                }
            }
        }),
        std::thread::spawn(move || {
            let mut buf = [0u8; 64];
            while !stop_udp.load(Ordering::Relaxed) {
                if let Ok((_, peer)) = udp.recv_from(&mut buf) {
                    let reply = format!("{name_udp} {} {port}\n", peer.ip());
                    let _ = udp.send_to(reply.as_bytes(), peer);
                }
            }
        }),
    ]
}

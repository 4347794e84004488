//! `sluice-lab-pod PORT...`: the pod server as a container's process. Its name is
//! `$POD_NAMESPACE/$POD_NAME` (the downward API); it serves until killed.

use std::sync::{atomic::AtomicBool, Arc};

fn main() {
    let name = match (std::env::var("POD_NAMESPACE"), std::env::var("POD_NAME")) {
        (Ok(ns), Ok(pod)) => format!("{ns}/{pod}"),
        _ => {
            eprintln!("sluice-lab-pod: POD_NAMESPACE and POD_NAME must be set");
            std::process::exit(2);
        }
    };
    let ports: Vec<u16> = match std::env::args().skip(1).map(|a| a.parse()).collect() {
        Ok(ports) => ports,
        Err(e) => {
            eprintln!("sluice-lab-pod: ports must be numbers 1-65535: {e}");
            std::process::exit(2);
        }
    };
    if ports.is_empty() {
        eprintln!("usage: sluice-lab-pod PORT...");
        std::process::exit(2);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::new();
    for port in ports {
        match sluice_lab_pod::bind(port) {
            Ok(sockets) => threads.extend(sluice_lab_pod::serve(&name, port, sockets, &stop)),
            Err(e) => {
                eprintln!("sluice-lab-pod: port {port}: {e}");
                std::process::exit(1);
            }
        }
    }
    println!("{name} serving TCP and UDP");
    for thread in threads {
        let _ = thread.join();
    }
}

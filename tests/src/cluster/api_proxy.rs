//! The API server from this machine's loopback: a TCP relay from `127.0.0.1:<port>` to the API
//! server in the lab namespace, so that `kubectl` and `helm` run on the host reach the lab
//! without a route into it. TLS passes through untouched (the serving certificate names
//! 127.0.0.1). Connections to the API server are opened from a thread inside the lab namespace
//! (a socket stays in the namespace it was created in).

use std::{
    io,
    net::{Shutdown, TcpListener, TcpStream},
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::Duration,
};

use anyhow::Result;

use crate::{in_netns, lab::SWITCH_IP};

pub struct ApiProxy {
    pub port: u16,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl ApiProxy {
    pub fn start(netns: PathBuf) -> Result<ApiProxy> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let port = listener.local_addr()?.port();
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let thread = std::thread::spawn(move || {
            while !stopping.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((client, _)) => {
                        let netns = netns.clone();
                        std::thread::spawn(move || {
                            let _ = relay(client, netns);
                        });
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    Err(_) => break,
                }
            }
        });
        Ok(ApiProxy {
            port,
            stop,
            thread: Some(thread),
        })
    }
}

fn relay(client: TcpStream, netns: PathBuf) -> io::Result<()> {
    client.set_nonblocking(false)?;
    let server = in_netns(&netns, || TcpStream::connect((SWITCH_IP, 6443)))?;
    let (mut client_read, mut server_write) = (client.try_clone()?, server.try_clone()?);
    let upstream = std::thread::spawn(move || {
        let _ = io::copy(&mut client_read, &mut server_write);
        let _ = server_write.shutdown(Shutdown::Write);
    });
    let (mut server_read, mut client_write) = (server, client);
    let _ = io::copy(&mut server_read, &mut client_write);
    let _ = client_write.shutdown(Shutdown::Write);
    let _ = upstream.join();
    Ok(())
}

impl Drop for ApiProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

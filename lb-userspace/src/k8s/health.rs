//! Health-check node ports of `externalTrafficPolicy: Local` Services: what an upstream NLB or
//! ALB probes to learn which nodes have endpoints for the Service. Answered the way kube-proxy
//! answers them: 200 while this node has a ready local endpoint, 503 otherwise, with a small
//! JSON body naming the Service and the count.
use std::{
    collections::BTreeMap,
    convert::Infallible,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::{Arc, Mutex},
};

use http_body_util::Full;
use hyper::{Request, Response, StatusCode, body::Bytes, service::service_fn};
use hyper_util::rt::TokioIo;
use log::{info, warn};
use tokio::task::JoinSet;

use super::HealthCheck;

struct Server {
    check: Arc<Mutex<HealthCheck>>,
    task: tokio::task::JoinHandle<()>,
}

/// The servers, one per health-check port.
#[derive(Default)]
pub struct HealthServers {
    servers: BTreeMap<u16, Server>,
    /// Ports that could not be bound (kube-proxy may serve them), reported once.
    unavailable: BTreeMap<u16, String>,
}

impl Drop for HealthServers {
    fn drop(&mut self) {
        for s in self.servers.values() {
            s.task.abort();
        }
    }
}

impl HealthServers {
    /// Serves exactly `checks`: starts servers for new ports, updates the counts of the others,
    /// stops the ones no longer wanted. Must run inside the tokio runtime.
    pub fn update(&mut self, checks: &[HealthCheck]) {
        let wanted: BTreeMap<u16, &HealthCheck> = checks.iter().map(|c| (c.port, c)).collect();
        self.servers.retain(|port, s| {
            let keep = wanted.contains_key(port) && !s.task.is_finished();
            if !keep {
                s.task.abort();
            }
            keep
        });
        self.unavailable.retain(|port, _| wanted.contains_key(port));
        for (port, check) in wanted {
            if let Some(s) = self.servers.get(&port) {
                *s.check
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = check.clone();
                continue;
            }
            let listener = match bind(port) {
                Ok(l) => l,
                Err(e) => {
                    let msg = e.to_string();
                    if self.unavailable.get(&port) != Some(&msg) {
                        warn!(
                            "health-check node port {port} of Service {}/{}: cannot listen: {msg} (is kube-proxy serving it?)",
                            check.service.0, check.service.1
                        );
                        self.unavailable.insert(port, msg);
                    }
                    continue;
                }
            };
            self.unavailable.remove(&port);
            info!(
                "serving the health-check node port {port} of Service {}/{}",
                check.service.0, check.service.1
            );
            let shared = Arc::new(Mutex::new(check.clone()));
            let task = tokio::spawn(serve(listener, shared.clone()));
            self.servers.insert(
                port,
                Server {
                    check: shared,
                    task,
                },
            );
        }
    }

    pub fn ports(&self) -> Vec<u16> {
        self.servers.keys().copied().collect()
    }
}

/// On every address of both families (of IPv4 only where IPv6 is off).
fn bind(port: u16) -> std::io::Result<tokio::net::TcpListener> {
    let (socket, addr) = match tokio::net::TcpSocket::new_v6() {
        Ok(s) => (s, SocketAddr::from((Ipv6Addr::UNSPECIFIED, port))),
        Err(_) => (
            tokio::net::TcpSocket::new_v4()?,
            SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)),
        ),
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(128)
}

async fn serve(listener: tokio::net::TcpListener, check: Arc<Mutex<HealthCheck>>) {
    let mut connections = JoinSet::new();
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        while connections.try_join_next().is_some() {}
        let check = check.clone();
        connections.spawn(async move {
            let service = service_fn(move |_req: Request<hyper::body::Incoming>| {
                let c = check
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .clone();
                async move { Ok::<_, Infallible>(answer(&c)) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// kube-proxy's answer: 200 with local endpoints, else 503.
pub fn answer(c: &HealthCheck) -> Response<Full<Bytes>> {
    let body = serde_json::json!({
        "service": { "namespace": c.service.0, "name": c.service.1 },
        "localEndpoints": c.local_endpoints,
    });
    let code = if c.local_endpoints > 0 {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .header("x-content-type-options", "nosniff")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap_or_default()
}

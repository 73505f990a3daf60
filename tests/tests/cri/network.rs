//! Pod networking under each handler: the pod's IP on the CNI network, reachable from the
//! node and from another pod, a host port, and `kubectl port-forward`.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use runc_architect_tests::cri::api::{self, ContainerState};
use runc_architect_tests::diff::Observation;
use runc_architect_tests::node::NODE_BRIDGE_IP;

use crate::run::Run;
use crate::Scenario;

/// The host port of the scenario's port mapping (one pod at a time uses it per node).
const HOST_PORT: i32 = 8081;

pub fn scenarios() -> Vec<Scenario> {
    vec![Scenario {
        name: "pod_network",
        as_runc: true,
        run: pod_network,
    }]
}

fn httpd(page: &str) -> String {
    format!("mkdir -p /www && echo {page} > /www/index.html && exec httpd -f -p 80 -h /www")
}

/// GETs `/` from `addr` inside the node until it answers (the server starts with the pod).
fn page(r: &Run, addr: SocketAddr) -> Result<String> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match r.node.http_get(addr, "/") {
            Ok(resp) if resp.status == 200 => return Ok(resp.body_str().trim().to_string()),
            other => {
                if Instant::now() > deadline {
                    bail!("GET http://{addr}/ from the node: {other:?}");
                }
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn pod_network(r: &mut Run) -> Result<Observation> {
    let a = r.pod(|p| {
        p.port_mappings.push(api::PortMapping {
            protocol: api::Protocol::Tcp as i32,
            container_port: 80,
            host_port: HOST_PORT,
            host_ip: String::new(),
        })
    })?;
    let spec = r.sh("web", &httpd("page-a"));
    let id_a = r.start(a, spec)?;
    let b = r.pod(|_| {})?;
    let spec = r.sh("web", &httpd("page-b"));
    let id_b = r.start(b, spec)?;
    r.wait_state(&id_a, ContainerState::ContainerRunning)?;
    r.wait_state(&id_b, ContainerState::ContainerRunning)?;
    let (ip_a, ip_b) = (r.pod_of(a).ip.clone(), r.pod_of(b).ip.clone());
    let mut o = Observation::new();
    o.put(
        "ips_differ",
        ip_a != ip_b && !ip_a.is_empty() && !ip_b.is_empty(),
    );
    o.put("from_node_a", page(r, format!("{ip_a}:80").parse()?)?);
    o.put("from_node_b", page(r, format!("{ip_b}:80").parse()?)?);
    o.put(
        "b_reaches_a",
        r.exec_ok(
            &id_b,
            &["sh", "-c", &format!("wget -q -O - http://{ip_a}/")],
        )?,
    );
    o.put(
        "host_port",
        page(r, format!("{NODE_BRIDGE_IP}:{HOST_PORT}").parse()?)?,
    );
    o.put(
        "pod_ip_inside",
        r.exec_ok(
            &id_a,
            &["sh", "-c", "ip -4 -o addr show eth0 | awk '{print $4}'"],
        )?,
    );
    // kubectl port-forward: through the streaming server into the pod's namespace.
    let pf = r
        .kubelet
        .port_forward(r.pod_of(a), &[80], Duration::from_secs(20))
        .map_err(|e| anyhow!("PortForward: {e}"))?;
    let f = pf
        .connect(80, Duration::from_secs(20))
        .map_err(|e| anyhow!("forward to port 80: {e}"))?;
    f.write(b"GET / HTTP/1.0\r\n\r\n", Duration::from_secs(10))
        .map_err(|e| anyhow!("forwarded write: {e}"))?;
    let body = f
        .read_to_end(Duration::from_secs(20))
        .map_err(|e| anyhow!("forwarded read: {e}"))?;
    o.put(
        "port_forward",
        String::from_utf8_lossy(&body).contains("page-a"),
    );
    Ok(o)
}

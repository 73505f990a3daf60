//! Labelling the node through the Kubernetes API, from inside a pod.
//!
//! `runtimeclass.yaml` schedules pods of the RuntimeClass only onto nodes labelled
//! `runc-architect.io/installed=true`; the installer sets that label once the node is ready
//! (and `uninstall` takes it away). It talks to the API server the way in-cluster clients do:
//! `https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT`, the pod's service-account
//! token as bearer token, and the service-account CA as the only trusted root. The change is
//! a JSON merge patch (RFC 7386) of the Node's `metadata.labels`, which touches nothing else
//! and needs only `patch` on `nodes`.
//!
//! The service-account directory (`/var/run/secrets/kubernetes.io/serviceaccount`) can be
//! overridden with `RUNC_ARCHITECT_SERVICEACCOUNT_DIR`, for tests.

use std::path::{Path, PathBuf};
use std::time::Duration;

use ureq::tls::{Certificate, PemItem, RootCerts, TlsConfig};

/// The label `runtimeclass.yaml` selects nodes by.
pub const LABEL: &str = "runc-architect.io/installed";

const SERVICEACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";
const SERVICEACCOUNT_ENV: &str = "RUNC_ARCHITECT_SERVICEACCOUNT_DIR";

/// A failure to reach or change the API server.
#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error("{0} is not set: --label-node works only inside a Kubernetes pod")]
    NoEnv(&'static str),
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: no PEM certificate in it")]
    NoCa { path: PathBuf },
    #[error("{0:?} is not a valid node name")]
    BadNodeName(String),
    #[error("PATCH {url}: {source}")]
    Http {
        url: String,
        #[source]
        source: Box<ureq::Error>,
    },
    #[error("PATCH {url}: HTTP {status}: {message}")]
    Status {
        url: String,
        status: u16,
        message: String,
    },
}

/// An in-cluster API client.
pub struct Client {
    agent: ureq::Agent,
    base: String,
    token: String,
}

impl Client {
    /// The client for the pod this runs in.
    pub fn in_cluster() -> Result<Client, KubeError> {
        let host = std::env::var("KUBERNETES_SERVICE_HOST")
            .map_err(|_| KubeError::NoEnv("KUBERNETES_SERVICE_HOST"))?;
        let port = std::env::var("KUBERNETES_SERVICE_PORT")
            .map_err(|_| KubeError::NoEnv("KUBERNETES_SERVICE_PORT"))?;
        let host = if host.contains(':') {
            format!("[{host}]")
        } else {
            host
        };
        let dir = std::env::var_os(SERVICEACCOUNT_ENV)
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(SERVICEACCOUNT_DIR));
        let token = read(&dir.join("token"))?.trim().to_string();
        let ca_path = dir.join("ca.crt");
        let ca = read(&ca_path)?;
        let certs: Vec<Certificate<'static>> = ureq::tls::parse_pem(ca.as_bytes())
            .filter_map(|item| match item {
                Ok(PemItem::Certificate(c)) => Some(c),
                _ => None,
            })
            .collect();
        if certs.is_empty() {
            return Err(KubeError::NoCa { path: ca_path });
        }
        let tls = TlsConfig::builder()
            .root_certs(RootCerts::new_with_certs(&certs))
            .build();
        let agent = ureq::Agent::config_builder()
            .tls_config(tls)
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(30)))
            .build()
            .new_agent();
        Ok(Client {
            agent,
            base: format!("https://{host}:{port}"),
            token,
        })
    }

    /// Sets (`Some`) or removes (`None`) label `key` on node `node`.
    pub fn set_node_label(
        &self,
        node: &str,
        key: &str,
        value: Option<&str>,
    ) -> Result<(), KubeError> {
        if !valid_node_name(node) {
            return Err(KubeError::BadNodeName(node.to_string()));
        }
        let url = format!("{}/api/v1/nodes/{node}", self.base);
        let patch = serde_json::json!({ "metadata": { "labels": { key: value } } });
        let mut resp = self
            .agent
            .patch(&url)
            .header("Authorization", format!("Bearer {}", self.token))
            .header("Accept", "application/json")
            .content_type("application/merge-patch+json")
            .send(patch.to_string())
            .map_err(|e| KubeError::Http {
                url: url.clone(),
                source: Box::new(e),
            })?;
        let status = resp.status().as_u16();
        if (200..300).contains(&status) {
            return Ok(());
        }
        let body = resp.body_mut().read_to_string().unwrap_or_default();
        // The API server explains refusals in a Status object's `message`.
        let message = serde_json::from_str::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| {
                v.get("message")
                    .and_then(|m| m.as_str())
                    .map(str::to_string)
            })
            .unwrap_or(body);
        Err(KubeError::Status {
            url,
            status,
            message,
        })
    }
}

fn read(path: &Path) -> Result<String, KubeError> {
    std::fs::read_to_string(path).map_err(|source| KubeError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// A DNS subdomain (RFC 1123), as Kubernetes requires of node names; it also keeps the
/// name from changing the request path.
fn valid_node_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_names() {
        assert!(valid_node_name("node-1.example"));
        assert!(!valid_node_name("Node"));
        assert!(!valid_node_name("a/../b"));
        assert!(!valid_node_name("-a"));
        assert!(!valid_node_name(""));
    }
}

//! Pushing an OCI image layout tarball (what [`crate::image::ImageBuilder::write_oci_tar`]
//! writes) to the node's registry with the OCI distribution API: for each blob a `HEAD`
//! (skip what is there), an upload session (`POST /v2/<name>/blobs/uploads/`) completed by
//! one `PUT <location>?digest=...` with the whole blob, then `PUT /v2/<name>/manifests/<tag>`.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

use super::http::Request;
use super::registry::Registry;

/// What a push put into the registry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PushedImage {
    /// `127.0.0.1:PORT/<repository>:<tag>`.
    pub reference: String,
    /// `127.0.0.1:PORT/<repository>@sha256:...`.
    pub digest_reference: String,
    /// `sha256:...` of the manifest.
    pub manifest_digest: String,
}

/// The files of an OCI layout tarball, by path.
fn read_layout(tarball: &Path) -> Result<BTreeMap<String, Vec<u8>>> {
    let f = std::fs::File::open(tarball).with_context(|| format!("open {}", tarball.display()))?;
    let mut ar = tar::Archive::new(f);
    let mut files = BTreeMap::new();
    for e in ar.entries()? {
        let mut e = e?;
        if !e.header().entry_type().is_file() {
            continue;
        }
        let path = e.path()?.display().to_string();
        let mut data = Vec::new();
        e.read_to_end(&mut data)?;
        files.insert(path.trim_start_matches("./").to_string(), data);
    }
    Ok(files)
}

fn blob<'a>(files: &'a BTreeMap<String, Vec<u8>>, digest: &str) -> Result<&'a [u8]> {
    let hex = digest
        .strip_prefix("sha256:")
        .with_context(|| format!("unsupported digest {digest:?}"))?;
    let data = files
        .get(&format!("blobs/sha256/{hex}"))
        .with_context(|| format!("blob {digest} missing from the layout"))?;
    let actual = format!("sha256:{}", hex::encode(Sha256::digest(data)));
    if actual != digest {
        bail!("blob {digest} has digest {actual}");
    }
    Ok(data)
}

/// Pushes the (single) image of the OCI layout `tarball` as `repository:tag`.
pub fn push_oci_tar(
    registry: &Registry,
    tarball: &Path,
    repository: &str,
    tag: &str,
) -> Result<PushedImage> {
    let files = read_layout(tarball)?;
    let index: serde_json::Value = serde_json::from_slice(
        files
            .get("index.json")
            .context("index.json missing from the layout")?,
    )?;
    let desc = &index["manifests"][0];
    let manifest_digest = desc["digest"]
        .as_str()
        .context("index.json names no manifest")?
        .to_string();
    let media_type = desc["mediaType"]
        .as_str()
        .unwrap_or("application/vnd.oci.image.manifest.v1+json")
        .to_string();
    let manifest_bytes = blob(&files, &manifest_digest)?;
    let manifest: serde_json::Value = serde_json::from_slice(manifest_bytes)?;
    let mut digests = vec![manifest["config"]["digest"]
        .as_str()
        .context("manifest has no config")?
        .to_string()];
    for l in manifest["layers"].as_array().into_iter().flatten() {
        digests.push(l["digest"].as_str().context("layer digest")?.to_string());
    }
    for d in &digests {
        push_blob(registry, repository, d, blob(&files, d)?)
            .with_context(|| format!("push blob {d} to {repository}"))?;
    }
    let host = registry.host();
    let target = format!("/v2/{repository}/manifests/{tag}");
    let r = registry.request(&Request {
        method: "PUT",
        host: &host,
        target: &target,
        headers: &[("Content-Type", &media_type)],
        body: manifest_bytes,
    })?;
    if r.status != 201 {
        bail!("PUT {target}: {} {}", r.status, r.body_str());
    }
    if let Some(d) = r.header("docker-content-digest") {
        if d != manifest_digest {
            bail!("the registry stored manifest {d}, expected {manifest_digest}");
        }
    }
    Ok(PushedImage {
        reference: registry.reference(&format!("{repository}:{tag}")),
        digest_reference: registry.reference(&format!("{repository}@{manifest_digest}")),
        manifest_digest,
    })
}

fn push_blob(registry: &Registry, repository: &str, digest: &str, data: &[u8]) -> Result<()> {
    let host = registry.host();
    let blob_target = format!("/v2/{repository}/blobs/{digest}");
    let head = registry.request(&Request {
        method: "HEAD",
        host: &host,
        target: &blob_target,
        headers: &[],
        body: &[],
    })?;
    if head.status == 200 {
        return Ok(());
    }
    let start = format!("/v2/{repository}/blobs/uploads/");
    let r = registry.request(&Request {
        method: "POST",
        host: &host,
        target: &start,
        headers: &[],
        body: &[],
    })?;
    if r.status != 202 {
        bail!("POST {start}: {} {}", r.status, r.body_str());
    }
    let location = r
        .header("location")
        .context("upload session without Location")?;
    let target = upload_target(location, digest);
    let r = registry.request(&Request {
        method: "PUT",
        host: &host,
        target: &target,
        headers: &[("Content-Type", "application/octet-stream")],
        body: data,
    })?;
    if r.status != 201 {
        bail!("PUT {target}: {} {}", r.status, r.body_str());
    }
    Ok(())
}

/// The request target that completes the upload session at `location` (absolute or
/// relative) with the blob's digest.
fn upload_target(location: &str, digest: &str) -> String {
    let path = match location.split_once("://") {
        Some((_, rest)) => rest.find('/').map(|i| &rest[i..]).unwrap_or("/"),
        None => location,
    };
    let sep = if path.contains('?') { '&' } else { '?' };
    format!("{path}{sep}digest={digest}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upload_target_keeps_the_session_state() {
        assert_eq!(
            upload_target(
                "http://127.0.0.1:5000/v2/a/b/blobs/uploads/u1?_state=xyz",
                "sha256:00"
            ),
            "/v2/a/b/blobs/uploads/u1?_state=xyz&digest=sha256:00"
        );
        assert_eq!(
            upload_target("/v2/a/blobs/uploads/u2", "sha256:11"),
            "/v2/a/blobs/uploads/u2?digest=sha256:11"
        );
    }
}

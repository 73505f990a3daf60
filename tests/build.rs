//! Compiles the CRI schema (`proto/proto/cri/api.proto` at the workspace root) with protox, a
//! pure-Rust protobuf compiler (no `protoc`), and generates tonic clients for
//! `runtime.v1.RuntimeService` and `runtime.v1.ImageService` (clients only: the tests are the
//! kubelet, containerd is the server).

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from("..").join("proto").join("proto");
    let file = root.join("cri").join("api.proto");
    println!("cargo:rerun-if-changed={}", file.display());
    let descriptors = protox::compile([&file], [&root])?;
    tonic_prost_build::configure()
        .build_server(false)
        .build_client(true)
        .build_transport(false)
        .compile_fds(descriptors)?;
    Ok(())
}

//! Compiles the schemas under `proto/` with protox (a pure-Rust protobuf compiler), so a
//! build needs no `protoc` binary, and feeds the descriptors to prost-build.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from("proto");
    let files = [
        root.join("containerd/runtimeoptions.proto"),
        root.join("containerd/runc_options.proto"),
        root.join("criu/rpc.proto"),
        root.join("criu/stats.proto"),
        root.join("criu/pagemap.proto"),
    ];
    for f in &files {
        println!("cargo:rerun-if-changed={}", f.display());
    }
    let descriptors = protox::compile(&files, [&root])?;
    prost_build::Config::new().compile_fds(descriptors)?;
    Ok(())
}

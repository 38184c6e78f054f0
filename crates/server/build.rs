//! Compiles `proto/reflex/v1/*.proto` with protox (pure Rust, no `protoc` binary) and
//! generates the tonic server and client code plus a descriptor set for reflection.

use std::path::PathBuf;

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    let file = root.join("reflex/v1/reflex.proto");
    println!("cargo:rerun-if-changed={}", root.display());
    let fds = protox::compile([&file], [&root])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("reflex_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        // Map fields decode straight into the `BTreeMap`s the core types keep, with no
        // hashing on the ingest path.
        .btree_map(".")
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)?;
    Ok(())
}

//! Compiles `spillway/v1/*.proto` with protox (a protobuf compiler written in
//! Rust), so that building needs no system `protoc`.

use std::{env, fs, path::PathBuf};

use prost::Message;

const PROTOS: &[&str] = &[
    "spillway/v1/types.proto",
    "spillway/v1/admin.proto",
    "spillway/v1/control.proto",
    "spillway/v1/inference.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }
    let fds = protox::compile(PROTOS, ["."])?;
    let out = PathBuf::from(env::var("OUT_DIR")?);
    // The encoded descriptor set backs the gRPC reflection service.
    fs::write(out.join("spillway_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // Relay bodies pass through without copies.
        .bytes(".spillway.v1")
        .compile_fds(fds)?;
    Ok(())
}

// Spillway carries this copy of etcd-client 0.21.1 only to change this build
// script: upstream compiles etcd's protos with the system `protoc`, which a
// fresh machine does not have; protox (a protobuf compiler in Rust) does the
// same without it. Everything else is unchanged.

#[cfg(feature = "build-server")]
fn should_build_server() -> bool {
    true
}

#[cfg(not(feature = "build-server"))]
fn should_build_server() -> bool {
    false
}

fn main() {
    let proto_root = "proto";
    println!("cargo:rerun-if-changed={proto_root}");

    let fds = protox::compile(
        [
            "etcd/api/authpb/auth.proto",
            "etcd/api/etcdserverpb/rpc.proto",
            "etcd/api/mvccpb/kv.proto",
            "etcd/server/etcdserver/api/v3election/v3electionpb/v3election.proto",
            "etcd/server/etcdserver/api/v3lock/v3lockpb/v3lock.proto",
        ],
        [proto_root],
    )
    .expect("failed to parse etcd's proto files");
    tonic_prost_build::configure()
        .build_server(should_build_server())
        .compile_fds(fds)
        .expect("failed to compile etcd's proto files");
}

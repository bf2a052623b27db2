//! Generates the tonic/prost code with the protoc shipped by
//! protoc-bin-vendored, so no system protoc is needed.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // Build scripts are single-threaded; prost-build reads PROTOC.
    std::env::set_var("PROTOC", protoc);
    // The rpc is named `Connect`, which would clash with the generated
    // client's `connect(endpoint)` constructor: clients build a Channel and
    // use `AgentServiceClient::new(channel)` instead.
    // Without the `grpc` feature, messages only (no tonic services).
    let grpc = std::env::var_os("CARGO_FEATURE_GRPC").is_some();
    tonic_prost_build::configure()
        .build_client(grpc)
        .build_server(grpc)
        .build_transport(false)
        // CreateSandbox carries env values, some of them secrets: its Debug
        // is written by hand in lib.rs and redacts them.
        .skip_debug([".corral.agent.v1.CreateSandbox"])
        .compile_protos(&["proto/corral/agent/v1/agent.proto"], &["proto"])?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}

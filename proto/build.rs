//! Generates the tonic/prost code with the protoc shipped by
//! protoc-bin-vendored, so no system protoc is needed.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // Build scripts are single-threaded; prost-build reads PROTOC.
    std::env::set_var("PROTOC", protoc);
    // The rpc is named `Connect`, which would clash with the generated
    // client's `connect(endpoint)` constructor: clients build a Channel and
    // use `AgentServiceClient::new(channel)` instead.
    tonic_prost_build::configure()
        .build_transport(false)
        .compile_protos(&["proto/corral/agent/v1/agent.proto"], &["proto"])?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}

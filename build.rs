//! Compiles proto/vitrine/v1/vitrine.proto with a vendored protoc (nothing to install).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    // The vendored protoc's include folder holds google/protobuf/struct.proto.
    let well_known = protoc_bin_vendored::include_path()?;
    let well_known = well_known.to_str().ok_or("protoc include path is not UTF-8")?;
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("vitrine_descriptor.bin"))
        .compile_with_config(config, &["proto/vitrine/v1/vitrine.proto"], &["proto", well_known])?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    tonic_build::configure().compile_protos(
        &[
            "proto/telemetry.proto",
            "proto/control.proto",
            "proto/enrollment.proto",
        ],
        &["proto"],
    )?;
    Ok(())
}

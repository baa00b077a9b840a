fn main() -> Result<(), Box<dyn std::error::Error>> {
    tonic_build::configure()
        // The query API is also served as HTTP/JSON: its messages are the
        // JSON bodies, by their proto field names.
        .type_attribute(
            ".zt.query.v1",
            "#[derive(serde::Serialize, serde::Deserialize)] #[serde(default)]",
        )
        // The console reads these admin replies as JSON too.
        .type_attribute(
            ".zt.control.v1.PolicyStatusReply",
            "#[derive(serde::Serialize)]",
        )
        .type_attribute(
            ".zt.control.v1.PolicyRollout",
            "#[derive(serde::Serialize)]",
        )
        .type_attribute(".zt.control.v1.AgentPolicy", "#[derive(serde::Serialize)]")
        .type_attribute(".zt.control.v1.PolicyLayers", "#[derive(serde::Serialize)]")
        .type_attribute(
            ".zt.control.v1.RevokeDeviceReply",
            "#[derive(serde::Serialize)]",
        )
        .compile_protos(
            &[
                "proto/telemetry.proto",
                "proto/control.proto",
                "proto/enrollment.proto",
                "proto/query.proto",
            ],
            &["proto"],
        )?;
    Ok(())
}

//! The Envoy bootstrap shipped in `deploy/envoy/` is one Envoy would load: parsed into Envoy's
//! own `Bootstrap` message from Envoy's compiled protos (the descriptor set envoy-types ships),
//! every field and every `typed_config` known, no Envoy binary needed.
use std::path::{Path, PathBuf};

use prost_reflect::{DescriptorPool, DeserializeOptions, DynamicMessage};
use serde_json::Value;
use yaml_rust2::{Yaml, YamlLoader};

/// envoy-types' compiled Envoy protos (a FileDescriptorSet), found where cargo keeps the crate.
fn envoy_descriptors() -> DescriptorPool {
    // Offline, and so only this host's packages (the others may not be downloaded).
    let rustc = std::process::Command::new("rustc")
        .arg("-vV")
        .output()
        .expect("rustc runs");
    let rustc = String::from_utf8_lossy(&rustc.stdout);
    let host = rustc
        .lines()
        .find_map(|l| l.strip_prefix("host: "))
        .expect("rustc names its host");
    let metadata = std::process::Command::new(env!("CARGO"))
        .args(["metadata", "--format-version", "1", "--offline"])
        .args(["--filter-platform", host])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo metadata runs");
    assert!(metadata.status.success(), "{metadata:?}");
    let metadata: Value = serde_json::from_slice(&metadata.stdout).unwrap();
    let manifest = metadata["packages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "envoy-types")
        .and_then(|p| p["manifest_path"].as_str())
        .expect("envoy-types is a dependency");
    let path: PathBuf = Path::new(manifest)
        .parent()
        .unwrap()
        .join("src/generated/types.bin");
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    DescriptorPool::decode(bytes.as_slice()).unwrap()
}

/// YAML as the JSON Envoy reads it into protos.
fn json(yaml: &Yaml) -> Value {
    match yaml {
        Yaml::Real(text) => text
            .parse::<f64>()
            .ok()
            .and_then(serde_json::Number::from_f64)
            .map_or(Value::Null, Value::Number),
        Yaml::Integer(n) => Value::from(*n),
        Yaml::String(s) => Value::from(s.clone()),
        Yaml::Boolean(b) => Value::from(*b),
        Yaml::Array(items) => Value::Array(items.iter().map(json).collect()),
        Yaml::Hash(map) => Value::Object(
            map.iter()
                .map(|(k, v)| {
                    let key = match k {
                        Yaml::String(s) => s.clone(),
                        other => panic!("a key that is not a string: {other:?}"),
                    };
                    (key, json(v))
                })
                .collect(),
        ),
        Yaml::Null => Value::Null,
        other => panic!("YAML Envoy would not read: {other:?}"),
    }
}

#[test]
fn the_envoy_bootstrap_parses_into_envoys_bootstrap_message() {
    let pool = envoy_descriptors();
    let bootstrap = pool
        .get_message_by_name("envoy.config.bootstrap.v3.Bootstrap")
        .expect("Envoy's Bootstrap");
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/envoy/envoy.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    let yaml = &YamlLoader::load_from_str(&text).unwrap()[0];
    let document = json(yaml);
    // Unknown fields refused (as Envoy does), every Any resolved against Envoy's own types.
    let options = DeserializeOptions::new().deny_unknown_fields(true);
    let message = DynamicMessage::deserialize_with_options(bootstrap, &document, &options)
        .unwrap_or_else(|e| panic!("deploy/envoy/envoy.yaml is not an Envoy bootstrap: {e}"));
    // Back to JSON, canonical: what Envoy would hold.
    let parsed: Value = serde_json::to_value(&message).unwrap();
    let listener = &parsed["staticResources"]["listeners"][0];
    let manager = &listener["filterChains"][0]["filters"][0]["typedConfig"];
    let filters = manager["httpFilters"].as_array().unwrap();
    let ext_authz = &filters[0]["typedConfig"];
    assert_eq!(
        ext_authz["@type"],
        "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz"
    );
    assert_eq!(ext_authz["transportApiVersion"], "V3");
    // Never fails open; an error is a 503, not Envoy's default 403.
    assert!(ext_authz.get("failureModeAllow").is_none_or(|v| v == false));
    assert_eq!(ext_authz["statusOnError"]["code"], "ServiceUnavailable");
    assert_eq!(
        ext_authz["grpcService"]["envoyGrpc"]["clusterName"],
        "authd"
    );
    // The router comes last; the authd cluster speaks HTTP/2 to authd's gRPC port.
    assert!(
        filters.last().unwrap()["typedConfig"]["@type"]
            .as_str()
            .unwrap()
            .ends_with("router.v3.Router")
    );
    let clusters = parsed["staticResources"]["clusters"].as_array().unwrap();
    let authd = clusters.iter().find(|c| c["name"] == "authd").unwrap();
    let protocol = &authd["typedExtensionProtocolOptions"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"];
    assert!(protocol["explicitHttpConfig"]["http2ProtocolOptions"].is_object());
    let port = &authd["loadAssignment"]["endpoints"][0]["lbEndpoints"][0]["endpoint"]["address"]["socketAddress"]
        ["portValue"];
    assert_eq!(port, 50051);
    // Every route goes to a cluster that exists.
    let routes = &manager["routeConfig"]["virtualHosts"][0]["routes"];
    for route in routes.as_array().unwrap() {
        let cluster = &route["route"]["cluster"];
        assert!(clusters.iter().any(|c| c["name"] == *cluster), "{route}");
    }

    // The check refuses a typo, so the test can fail: a misspelt field is caught.
    let misspelt: Value = serde_json::from_str(
        &document
            .to_string()
            .replace("failure_mode_allow", "failure_mode_alow"),
    )
    .unwrap();
    let bootstrap = pool
        .get_message_by_name("envoy.config.bootstrap.v3.Bootstrap")
        .unwrap();
    assert!(DynamicMessage::deserialize_with_options(bootstrap, &misspelt, &options).is_err());
}

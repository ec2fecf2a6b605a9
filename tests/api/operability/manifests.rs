//! The files shipped for deployments: every YAML parses, the manifests fit the service and are locked down.
use super::*;

/// Every YAML file the repository ships parses, and the Kubernetes manifests agree with the
/// service (probes on the health names, a termination grace above the drain grace).
#[test]
fn every_shipped_yaml_file_parses_and_the_manifests_fit_the_service() {
    use yaml_rust2::YamlLoader;
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    let mut dirs = vec![root.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().to_string();
            if path.is_dir() {
                if !name.starts_with('.') && name != "target" && name != "node_modules" {
                    dirs.push(path);
                }
            } else if name.ends_with(".yaml") || name.ends_with(".yml") {
                files.push(path);
            }
        }
    }
    assert!(files.len() >= 8, "{files:?}");
    let mut all = String::new();
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        let docs =
            YamlLoader::load_from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        assert!(!docs.is_empty(), "{}", file.display());
        all.push_str(&text);
    }
    let deployment =
        std::fs::read_to_string(root.join("deploy/kubernetes/deployment.yaml")).unwrap();
    let doc = &YamlLoader::load_from_str(&deployment).unwrap()[0];
    let pod = &doc["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    assert_eq!(
        container["livenessProbe"]["grpc"]["service"].as_str(),
        Some("liveness")
    );
    assert_eq!(
        container["readinessProbe"]["grpc"]["service"].as_str(),
        Some("")
    );
    // The gRPC port speaks TLS: probes use the plaintext health port, which the ConfigMap opens.
    let health_port = container["ports"]
        .as_vec()
        .unwrap()
        .iter()
        .find(|p| p["name"].as_str() == Some("health"))
        .and_then(|p| p["containerPort"].as_i64())
        .expect("a health port");
    for probe in ["livenessProbe", "readinessProbe", "startupProbe"] {
        assert_eq!(
            container[probe]["grpc"]["port"].as_i64(),
            Some(health_port),
            "{probe}"
        );
    }
    assert!(
        all.contains(&format!("HEALTH__ADDR: \"0.0.0.0:{health_port}\"")),
        "the ConfigMap opens the probes' port"
    );
    assert!(all.contains("kind: Certificate") && all.contains("secretName: authd-tls"));
    let grace_s = pod["terminationGracePeriodSeconds"].as_i64().unwrap();
    let drain: Duration = authd::config::Settings::default().grpc.shutdown_grace;
    // The preStop pause comes first, then the drain: the grace must cover both.
    let pre_stop = &container["lifecycle"]["preStop"]["exec"]["command"];
    assert_eq!(pre_stop[0].as_str(), Some("sleep"));
    let pause_s: u64 = pre_stop[1].as_str().unwrap().parse().unwrap();
    assert!(
        grace_s as u64 > pause_s + drain.as_secs(),
        "terminationGracePeriodSeconds {grace_s} must exceed the preStop pause and the drain"
    );
    for kind in [
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "HorizontalPodAutoscaler",
        "ConfigMap",
        "Secret",
        "Job",
    ] {
        assert!(all.contains(&format!("kind: {kind}")), "missing a {kind}");
    }
    let compose = std::fs::read_to_string(root.join("docker-compose.yaml")).unwrap();
    let compose = &YamlLoader::load_from_str(&compose).unwrap()[0];
    for service in ["postgres", "redis", "authd"] {
        assert!(
            !compose["services"][service]["healthcheck"].is_badvalue(),
            "{service} has a health check"
        );
    }
    // Published on the loopback only: a trial is not an open PostgreSQL or Redis.
    let services = compose["services"].as_hash().unwrap();
    for (name, service) in services {
        for port in service["ports"].as_vec().into_iter().flatten() {
            let port = port.as_str().unwrap();
            assert!(port.starts_with("127.0.0.1:"), "{name:?} publishes {port}");
        }
    }
    // authd runs as the app role after the owner migrated (deploy/postgres/roles.sql).
    let authd = &compose["services"]["authd"];
    assert_eq!(
        authd["environment"]["DATABASE__MIGRATE"].as_str(),
        Some("false")
    );
    assert!(
        authd["environment"]["DATABASE__URL"]
            .as_str()
            .unwrap()
            .contains("authd_app")
    );
    assert_eq!(
        authd["depends_on"]["migrate"]["condition"].as_str(),
        Some("service_completed_successfully")
    );
    assert_eq!(
        compose["services"]["migrate"]["command"][0].as_str(),
        Some("migrate")
    );
    for volume in compose["services"]["postgres"]["volumes"].as_vec().unwrap() {
        if let Some(local) = volume.as_str().unwrap().strip_prefix("./") {
            let file = local.split(':').next().unwrap();
            assert!(root.join(file).exists(), "{file} is mounted but missing");
        }
    }
    assert!(
        all.contains("DATABASE__MIGRATE: \"false\""),
        "the Deployment does not migrate"
    );
    assert!(all.contains("args: [\"migrate\"]"), "a Job migrates");
}

/// The deployment files leave nothing open that authd does not need (issue "No caller can take
/// authd down", finding 6): callers only from named namespaces, egress to DNS, PostgreSQL and
/// Redis only, the runtime's default seccomp profile, no service-account token, base images
/// pinned by digest, and CA roots in the runtime image (a managed Redis or PostgreSQL with a
/// public certificate is verified with them).
#[test]
fn the_deployment_files_are_locked_down() {
    use yaml_rust2::YamlLoader;
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let read = |file: &str| std::fs::read_to_string(root.join(file)).unwrap();
    let policy = &YamlLoader::load_from_str(&read("deploy/kubernetes/networkpolicy.yaml")).unwrap()
        [0]["spec"];
    let types: Vec<_> = policy["policyTypes"]
        .as_vec()
        .unwrap()
        .iter()
        .filter_map(|t| t.as_str())
        .collect();
    assert_eq!(types, ["Ingress", "Egress"]);
    for rule in policy["ingress"].as_vec().unwrap() {
        for from in rule["from"].as_vec().unwrap() {
            let namespaces = &from["namespaceSelector"];
            assert!(
                namespaces["matchLabels"]["kubernetes.io/metadata.name"]
                    .as_str()
                    .is_some()
                    || namespaces["matchExpressions"][0]["key"].as_str()
                        == Some("kubernetes.io/metadata.name"),
                "ingress from unnamed namespaces: {from:?}"
            );
        }
    }
    let egress_ports: Vec<i64> = policy["egress"]
        .as_vec()
        .unwrap()
        .iter()
        .flat_map(|rule| rule["ports"].as_vec().unwrap().iter())
        .filter_map(|port| port["port"].as_i64())
        .collect();
    assert_eq!(egress_ports, [53, 53, 5432, 6379, 26379]);
    for (file, pod) in [
        ("deploy/kubernetes/deployment.yaml", 0),
        ("deploy/kubernetes/migrate-job.yaml", 0),
    ] {
        let doc = &YamlLoader::load_from_str(&read(file)).unwrap()[pod];
        let spec = &doc["spec"]["template"]["spec"];
        assert_eq!(
            spec["automountServiceAccountToken"].as_bool(),
            Some(false),
            "{file}"
        );
        assert_eq!(
            spec["securityContext"]["seccompProfile"]["type"].as_str(),
            Some("RuntimeDefault"),
            "{file}"
        );
        let image = spec["containers"][0]["image"].as_str().unwrap();
        assert!(!image.ends_with(":latest"), "{file}: {image}");
    }
    let dockerfile = read("Dockerfile");
    let froms: Vec<_> = dockerfile
        .lines()
        .filter(|line| line.starts_with("FROM "))
        .collect();
    assert_eq!(froms.len(), 2);
    for from in froms {
        let image = from.split_whitespace().nth(1).unwrap();
        let (_, digest) = image.split_once("@sha256:").expect("pinned by digest");
        assert!(
            digest.len() == 64 && digest.chars().all(|c| c.is_ascii_hexdigit()),
            "{from}"
        );
    }
    let runtime = dockerfile.rsplit("\nFROM ").next().unwrap();
    assert!(
        runtime.contains("install -y --no-install-recommends ca-certificates"),
        "the runtime image has CA roots"
    );
}

/// What an adopter looks for beside the code: the licenses Cargo.toml names, a security policy
/// and a changelog; and the image says what it is, at the version Cargo.toml gives.
#[test]
fn the_release_files_are_there_and_the_image_labels_match_cargo() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let read = |name: &str| {
        std::fs::read_to_string(root.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
    };
    assert_eq!(env!("CARGO_PKG_LICENSE"), "MIT OR Apache-2.0");
    assert!(read("LICENSE-MIT").contains("Permission is hereby granted, free of charge"));
    assert!(read("LICENSE-APACHE").contains("Apache License"));
    assert!(read("SECURITY.md").contains("## Reporting a vulnerability"));
    assert!(read("CHANGELOG.md").contains("## Unreleased"));
    let dockerfile = read("Dockerfile");
    for label in [
        format!(
            "org.opencontainers.image.version=\"{}\"",
            env!("CARGO_PKG_VERSION")
        ),
        format!(
            "org.opencontainers.image.licenses=\"{}\"",
            env!("CARGO_PKG_LICENSE")
        ),
    ] {
        assert!(dockerfile.contains(&label), "Dockerfile lacks {label}");
    }
}

/// Review found: the image's build copied neither the `client` workspace member nor the Envoy
/// protos the build script compiles, so `docker compose up --build` could not build it. Every
/// directory a build of the binary reads is copied: the workspace's members, the benchmarks'
/// and patched crates' directories, the build script's inputs, and what the code embeds.
#[test]
fn the_image_build_copies_everything_the_build_reads() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let read = |name: &str| std::fs::read_to_string(root.join(name)).unwrap();
    let manifest: toml::Table = read("Cargo.toml").parse().unwrap();
    let first = |path: &str| path.split('/').next().unwrap().to_owned();
    let mut needed: Vec<String> = manifest["workspace"]["members"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m.as_str())
        .filter(|m| *m != ".")
        .map(first)
        .collect();
    for bench in manifest["bench"].as_array().unwrap() {
        needed.push(first(bench["path"].as_str().unwrap()));
    }
    for patched in manifest["patch"]["crates-io"].as_table().unwrap().values() {
        needed.push(first(patched["path"].as_str().unwrap()));
    }
    // The build script's inputs: `for input in ["proto", "proto-vendor", "build.rs"]`.
    let build = read("build.rs");
    let inputs = regex::Regex::new(r"for input in \[([^\]]*)\]").unwrap();
    let inputs = &inputs.captures(&build).expect("build.rs names its inputs")[1];
    needed.extend(
        inputs
            .split(',')
            .map(|i| i.trim().trim_matches('"').to_owned())
            .filter(|i| !i.ends_with(".rs")),
    );
    // What the code embeds: the migrations (sqlx::migrate!) and the password blocklist.
    needed.extend(["migrations".to_owned(), "data".to_owned(), "src".to_owned()]);
    let dockerfile = read("Dockerfile");
    for dir in needed {
        assert!(
            dockerfile.contains(&format!("COPY {dir} ./{dir}\n")),
            "the image's build does not copy {dir}/"
        );
    }
}

/// `deploy/grpc/service-config.json` (what gRPC clients read for deadlines and retries) names
/// only methods the protos have, gives every unary method of the public services a deadline,
/// and retries only UNAVAILABLE, only on the calls the API docs call safe to repeat.
#[test]
fn the_service_config_retries_only_what_is_safe_to_repeat() {
    use prost::Message;
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("deploy/grpc/service-config.json")).unwrap(),
    )
    .unwrap();
    let set = prost_types::FileDescriptorSet::decode(authd::proto::FILE_DESCRIPTOR_SET).unwrap();
    let mut unary = std::collections::BTreeSet::new();
    for file in &set.file {
        for service in &file.service {
            for method in &service.method {
                let name = format!("{}.{}/{}", file.package(), service.name(), method.name());
                if !method.client_streaming() && !method.server_streaming() {
                    unary.insert(name);
                }
            }
        }
    }
    let mut configured = std::collections::BTreeMap::new();
    for entry in config["methodConfig"].as_array().unwrap() {
        let retried = entry.get("retryPolicy");
        if let Some(policy) = retried {
            assert_eq!(
                policy["retryableStatusCodes"],
                serde_json::json!(["UNAVAILABLE"])
            );
        }
        assert!(entry["timeout"].is_string(), "{entry}");
        for name in entry["name"].as_array().unwrap() {
            let full = format!(
                "{}/{}",
                name["service"].as_str().unwrap(),
                name["method"].as_str().unwrap()
            );
            let known = unary.contains(&full) || full == "grpc.health.v1.Health/Check";
            assert!(known, "{full} is not a unary method of the protos");
            assert!(
                configured.insert(full.clone(), retried.is_some()).is_none(),
                "{full} twice"
            );
        }
    }
    // Every unary method has a deadline.
    for method in &unary {
        assert!(configured.contains_key(method), "{method} has no deadline");
    }
    // Repeating these after a lost answer does something else than the first time.
    for never in [
        "authd.v1.AuthService/Register",
        "authd.v1.AuthService/Login",
        "authd.v1.AuthService/ChangePassword",
        "authd.v1.ProfileService/UpdateProfile",
    ] {
        assert_eq!(
            configured.get(never),
            Some(&false),
            "{never} must not be retried"
        );
    }
    // The API docs' table says the same.
    let api = std::fs::read_to_string(root.join("docs/api.md")).unwrap();
    for (method, retried) in &configured {
        let short = method.rsplit('/').next().unwrap();
        let row = api
            .lines()
            .filter(|l| {
                l.starts_with("| ") && l.contains("| yes |")
                    || l.contains("| no |")
                    || l.contains("| read first |")
            })
            .find(|l| {
                l.split(" | ")
                    .next()
                    .is_some_and(|calls| calls.split([',', ' ']).any(|w| w == short))
            })
            .unwrap_or_else(|| panic!("docs/api.md's retry table lacks {short}"));
        assert_eq!(row.contains("| yes |"), *retried, "{method}: {row}");
    }
}

/// `kubectl apply -k deploy/kubernetes` applies every manifest but the example Secrets, the
/// migrate Job alone in its file (with the annotations that order it first under Argo CD and
/// Helm), and the certificate's DNS names take the kustomization's namespace.
#[test]
fn the_kustomization_applies_every_manifest_and_the_namespace_reaches_the_certificate() {
    use yaml_rust2::YamlLoader;
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/kubernetes");
    let read = |name: &str| {
        let text =
            std::fs::read_to_string(dir.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        YamlLoader::load_from_str(&text).unwrap()
    };
    let kustomization = &read("kustomization.yaml")[0];
    let listed: Vec<&str> = kustomization["resources"]
        .as_vec()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap())
        .collect();
    let examples = ["secret.yaml", "admin-keys.yaml", "kustomization.yaml"];
    let mut present: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".yaml") && !examples.contains(&name.as_str()))
        .collect();
    present.sort();
    let mut sorted = listed.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, present, "every manifest listed, the examples not");
    for example in ["secret.yaml", "admin-keys.yaml"] {
        for doc in read(example) {
            assert_eq!(
                doc["kind"].as_str(),
                Some("Secret"),
                "{example}: examples are Secrets"
            );
        }
    }
    let job = read("migrate-job.yaml");
    assert_eq!(job.len(), 1, "the Job alone");
    let annotations = &job[0]["metadata"]["annotations"];
    assert_eq!(
        annotations["argocd.argoproj.io/hook"].as_str(),
        Some("PreSync")
    );
    assert!(
        annotations["helm.sh/hook"]
            .as_str()
            .unwrap()
            .contains("pre-upgrade")
    );
    // The replacement writes the namespace over the second dot-separated part of these names.
    let replacement = &kustomization["replacements"][0];
    assert_eq!(
        replacement["source"]["fieldPath"].as_str(),
        Some("metadata.namespace")
    );
    let target = &replacement["targets"][0];
    assert_eq!(target["options"]["delimiter"].as_str(), Some("."));
    assert_eq!(target["options"]["index"].as_i64(), Some(1));
    let certificate = &read("certificate.yaml")[0];
    let names = certificate["spec"]["dnsNames"].as_vec().unwrap();
    for path in target["fieldPaths"].as_vec().unwrap() {
        let index: usize = path
            .as_str()
            .unwrap()
            .rsplit('.')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        let name = names[index].as_str().unwrap();
        assert_eq!(name.split('.').nth(1), Some("default"), "{name}");
    }
    assert_eq!(names.len(), 5, "every name with a namespace is a target");
    assert!(
        names
            .iter()
            .any(|n| n.as_str().unwrap().starts_with("authd-headless.")),
        "the headless Service's name is in the certificate"
    );
    // The headless Service for per-request balancing selects the same pods.
    let services = read("service.yaml");
    let headless = services
        .iter()
        .find(|s| s["spec"]["clusterIP"].as_str() == Some("None"))
        .expect("a headless Service");
    assert_eq!(
        headless["spec"]["selector"],
        services[0]["spec"]["selector"]
    );
}
